"""``kvmksm image build``: a tiny bootable base from the host's own kernel and busybox.

No downloads: the host's Debian kernel and initrd (``linux-image-amd64``; its initrd has
virtio-blk and ext4) boot an ext4 root holding a static busybox and an ``/init`` script.
The guest fills ``kvmksm.fill`` bytes of tmpfs with byte ``kvmksm.byte`` (both from the kernel
command line, so each clone can be told), prints ``KVMKSM-READY`` on its serial console and
idles. The image, kernel and initrd copies live in ``<data dir>/images``; the shut-off base
domain is tagged ``<kvmksm:base>`` (``kvmksm clean`` keeps it).

Guests need 256 MiB: Debian's 30 MB initrd (MODULES=most) unpacks in guest memory, and at
192 MiB the kernel runs out of memory doing so. Under TCG a guest is up in about 12 s.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import libvirt

from kvmksm.errors import UserError
from kvmksm.host import paths
from kvmksm.virt.base_image import define_base, refuse_rebuild
from kvmksm.virt.domains import base_tag_xml, lookup, read_tag

IMAGE_VERSION = 1  # bump when the image's contents change in a way inputs do not show
DEFAULT_NAME = "kvmksm-tiny"
DISK_MIB = 64
READY_MARKER = "KVMKSM-READY"
# panic=-1 reboots at once on a panic, and on_reboot=destroy makes that a stopped guest,
# so a guest that cannot boot fails fast instead of waiting out the boot timeout.
CMDLINE = "console=ttyS0 root=/dev/vda rootfstype=ext4 rw init=/init panic=-1"

INIT = r"""#!/bin/sh
# kvmksm tiny guest: fill memory as the kernel command line says (kvmksm.fill=<bytes>,
# kvmksm.byte=<0-255>), print the marker on the console, then idle for ever.
PATH=/bin
export PATH
# Debian's initramfs moves its /proc, /sys and /dev here; mount them only when it did not.
[ -e /proc/mounts ] || mount -t proc proc /proc
[ -d /sys/kernel ] || mount -t sysfs sysfs /sys
[ -e /dev/null ] || mount -t devtmpfs devtmpfs /dev

idle() { while :; do sleep 3600; done; }
fail() { echo "KVMKSM-FAILED: $*"; idle; }
uptime() { cut -d' ' -f1 /proc/uptime; }

fill=0
byte=97
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    kvmksm.fill=*) fill="${arg#*=}" ;;
    kvmksm.byte=*) byte="${arg#*=}" ;;
  esac
done
case "$fill:$byte" in *[!0-9:]* | :* | *:) fail "bad kvmksm.fill=$fill kvmksm.byte=$byte" ;; esac
[ "$byte" -le 255 ] || fail "kvmksm.byte=$byte is not a byte"

start=$(uptime)
if [ "$fill" -gt 0 ]; then
  mkdir -p /fill
  mount -t tmpfs -o size="$fill" kvmksm-fill /fill || fail "cannot mount a tmpfs of $fill bytes"
  f=/fill/pattern
  # One page through tr (slow per byte under emulation), then double the file onto itself.
  head -c 4096 /dev/zero | tr '\000' "\\$(printf %03o "$byte")" >$f
  size=4096
  while [ "$size" -lt "$fill" ]; do
    n=$size
    [ $((size + n)) -le "$fill" ] || n=$((fill - size))
    bs=1  # the largest block dividing offset and length (small: dd's buffer is freed memory)
    for b in 65536 4096; do
      if [ $((size % b)) -eq 0 ] && [ $((n % b)) -eq 0 ]; then bs=$b; break; fi
    done
    dd if=$f of=$f bs=$bs count=$((n / bs)) seek=$((size / bs)) conv=notrunc 2>/dev/null
    size=$((size + n))
  done
  [ "$fill" -ge 4096 ] || dd if=$f of=$f bs=1 count=0 seek="$fill" 2>/dev/null
  got=$(wc -c <$f)
  [ "$((got))" -eq "$fill" ] || fail "filled $((got)) of $fill bytes"
fi
echo "KVMKSM-READY fill=$fill byte=$byte uptime=$(uptime) fill_started=$start"
idle
"""


@dataclass
class TinyImage:
    domain: str
    image: Path
    kernel: Path
    initrd: Path
    built: bool  # the image was (re)built by this call
    defined: bool  # the domain was (re)defined by this call

    def __str__(self) -> str:
        what = "built" if self.built else "up to date"
        dom = "defined" if self.defined else "unchanged"
        return f"{self.domain}: image {self.image} ({what}), domain {dom}"


def find_kernel(boot: Path = Path("/boot")) -> tuple[Path, Path]:
    """The newest /boot/vmlinuz-<release> that has a matching initrd.img-<release>."""

    def key(p: Path) -> list[int | str]:
        return [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", p.name)]

    for kernel in sorted(boot.glob("vmlinuz-*"), key=key, reverse=True):
        initrd = boot / f"initrd.img-{kernel.name.removeprefix('vmlinuz-')}"
        if initrd.exists():
            return kernel, initrd
    raise UserError(
        f"no kernel with an initrd in {boot} (install linux-image-amd64: scripts/setup.sh does)"
    )


def is_static_elf(path: Path) -> bool:
    """True for an ELF executable with no program interpreter (no dynamic loader needed)."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:  # 64-bit only
            return False
        endian = "<" if head[5] == 1 else ">"
        phoff, phentsize, phnum = (
            struct.unpack_from(endian + "Q", head, 32)[0],
            *struct.unpack_from(endian + "HH", head, 54),
        )
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    pt_interp = 3
    return all(
        struct.unpack_from(endian + "I", table, i * phentsize)[0] != pt_interp for i in range(phnum)
    )


def make_rootfs(root: Path, busybox: Path) -> None:
    """The guest's root: /bin/busybox, a link per applet, /init, and mount points."""
    for d in ("bin", "dev", "proc", "sys", "run", "tmp", "fill", "root"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox, root / "bin/busybox")
    applets = subprocess.run(
        [str(busybox), "--list"], check=True, capture_output=True, text=True
    ).stdout.split()
    for a in applets:
        if a != "busybox" and "/" not in a:
            (root / "bin" / a).symlink_to("busybox")
    init = root / "init"
    init.write_text(INIT)
    init.chmod(0o755)


def make_disk(root: Path, out: Path, size_mib: int = DISK_MIB) -> None:
    """An ext4 file system holding ``root``, as qcow2 (mkfs.ext4 -d needs no mounting)."""
    raw = out.with_suffix(".raw.tmp")
    try:
        _run(
            [
                "mkfs.ext4",
                "-q",
                "-F",
                "-L",
                "kvmksm-tiny",
                "-d",
                str(root),
                str(raw),
                f"{size_mib}M",
            ]
        )
        _run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(out)])
    finally:
        raw.unlink(missing_ok=True)


def _run(cmd: list[str]) -> None:
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    except FileNotFoundError:
        raise UserError(f"{cmd[0]} not found (scripts/setup.sh installs it)") from None
    except subprocess.CalledProcessError as e:
        raise UserError(f"{' '.join(cmd[:2])} failed: {e.stderr.strip()}") from None


def fingerprint(*files: Path, extra: str = "") -> str:
    h = hashlib.sha256(f"{IMAGE_VERSION}\n{INIT}\n{extra}\n".encode())
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def base_domain_xml(
    name: str,
    image: Path,
    kernel: Path,
    initrd: Path,
    memory: int,
    vcpus: int,
    domain_type: str,
    build: str,
    uuid: str | None = None,
) -> str:
    """The shut-off base domain: direct kernel boot, virtio disk, serial console, no NIC."""
    tag = base_tag_xml({"version": str(IMAGE_VERSION), "build": build})
    uuid_el = f"<uuid>{uuid}</uuid>" if uuid else ""
    return f"""<domain type='{domain_type}'>
  <name>{name}</name>{uuid_el}
  <description>kvmksm tiny base, built by 'kvmksm image build'; clones of it are what
kvmksm runs. Guests fill kvmksm.fill bytes with kvmksm.byte (kernel command line).</description>
  <metadata>{tag}</metadata>
  <memory unit='KiB'>{memory // 1024}</memory>
  <vcpu>{vcpus}</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{CMDLINE}</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{image}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='pty'><target port='0'/></serial>
    <console type='pty'><target type='serial' port='0'/></console>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>"""


def build_image(
    conn: libvirt.virConnect,
    name: str = DEFAULT_NAME,
    directory: Path | None = None,
    kernel: Path | None = None,
    initrd: Path | None = None,
    busybox: Path = Path("/bin/busybox"),
    memory: int = 256 * 1024 * 1024,
    vcpus: int = 1,
    domain_type: str = "qemu",
    force: bool = False,
    progress: Callable[[str], None] = lambda _text: None,
) -> TinyImage:
    """Build the tiny image (when missing, when its inputs changed, or with ``force``) and
    define the shut-off base domain ``name`` (when missing or out of date).

    Refuses while tagged clones of it exist (their overlays are backed by the image) or when a
    domain called ``name`` exists that kvmksm did not make. ``domain_type`` is the base's own
    type; clones take theirs from the scenario.
    """
    directory = directory or paths.images_dir()
    if kernel is None or initrd is None:
        k, i = find_kernel()
        kernel, initrd = kernel or k, initrd or i
    for f in (kernel, initrd, busybox):
        if not f.exists():
            raise UserError(f"{f}: not found (scripts/setup.sh installs what the image needs)")
    if not is_static_elf(busybox):
        raise UserError(f"{busybox} is not statically linked (install busybox-static)")

    existing = lookup(conn, name)
    tag = read_tag(existing) if existing is not None else None
    if existing is not None and (tag is None or tag.kind != "base"):
        raise UserError(f"domain {name!r} exists and was not made by kvmksm; choose another name")

    image = directory / f"{name}.qcow2"
    kcopy, icopy = directory / f"{name}.vmlinuz", directory / f"{name}.initrd"
    manifest = directory / f"{name}.json"
    progress(f"checking inputs ({kernel.name}, {initrd.name}, {busybox})")
    fp = fingerprint(kernel, initrd, busybox, extra=f"{DISK_MIB}")
    old = _read_json(manifest)
    stale = (
        force or old.get("fingerprint") != fp or not all(p.exists() for p in (image, kcopy, icopy))
    )
    built = False
    if stale:
        refuse_rebuild(conn, name, existing)
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="kvmksm-rootfs-", dir=directory) as tmp:
            root = Path(tmp) / "root"
            progress(f"making the root file system (busybox from {busybox})")
            make_rootfs(root, busybox)
            progress(f"making a {DISK_MIB} MiB ext4 image -> {image}")
            tmp_image = Path(tmp) / "image.qcow2"
            make_disk(root, tmp_image)
            progress(f"copying {kernel} and {initrd}")
            for src, dst in ((kernel, kcopy), (initrd, icopy)):
                shutil.copyfile(src, Path(tmp) / dst.name)
                os.replace(Path(tmp) / dst.name, dst)
            os.replace(tmp_image, image)
        manifest.write_text(
            json.dumps(
                {
                    "version": IMAGE_VERSION,
                    "fingerprint": fp,
                    "kernel": str(kernel),
                    "initrd": str(initrd),
                    "busybox": str(busybox),
                },
                indent=1,
            )
        )
        built = True
    else:
        progress(f"image is up to date ({image})")

    # The domain is redefined when anything in its XML would change (inputs, settings, template).
    defined = define_base(
        conn,
        name,
        existing,
        tag,
        lambda build, uuid: base_domain_xml(
            name, image, kcopy, icopy, memory, vcpus, domain_type, build, uuid
        ),
        fp,
        built,
        progress,
    )
    return TinyImage(name, image, kcopy, icopy, built, defined)


def _read_json(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}

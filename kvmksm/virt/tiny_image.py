"""``kvmksm image build``: a tiny bootable base from the host's own kernel and busybox.

No downloads: the host's Debian kernel (``linux-image-amd64``) boots, through a minimal
initramfs built here from its own modules (``initramfs``: busybox, virtio-blk and ext4, 1.7 MB),
an ext4 root holding a static busybox and an ``/init`` script. The guest fills ``kvmksm.fill``
bytes of tmpfs with byte ``kvmksm.byte`` (both from the kernel command line, so each clone can
be told), prints ``KVMKSM-READY`` on its serial console and idles. The image, kernel and
initramfs live in ``<data dir>/images``; the shut-off base domain is tagged ``<kvmksm:base>``
(``kvmksm clean`` keeps it).

Guests of 96 MiB boot (the kernel alone needs about 82 MiB: ``guest_memory``) and may fill
memory - 64 MiB. Under TCG a guest is up about 4 s (guest uptime) after its kernel starts.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import struct
import subprocess
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import libvirt

from kvmksm.errors import UserError
from kvmksm.host import paths
from kvmksm.virt import initramfs
from kvmksm.virt.base_image import (
    BuiltImage,
    claim,
    define_base,
    read_manifest,
    refuse_rebuild,
    write_manifest,
)
from kvmksm.virt.domains import base_tag_xml, parse_tag

# Bump when the image's contents change in a way inputs do not show. 2: a minimal initramfs
# built from the kernel's modules instead of a copy of the host's Debian initrd.
IMAGE_VERSION = 2
DEFAULT_NAME = "kvmksm-tiny"
DISK_MIB = 64
READY_MARKER = "KVMKSM-READY"
DEFAULT_MEMORY = 128 << 20  # room for a 64 MiB fill (guest_memory.FILL_HEADROOM)
# panic=-1 reboots at once on a panic, and on_reboot=destroy makes that a stopped guest,
# so a guest that cannot boot fails fast instead of waiting out the boot timeout.
# The last two words give a small guest back ~14 MB of a distribution kernel's memory
# (measured on Debian 6.1 at 96 MiB: 19 MB -> 33 MB free when /init starts):
# - 6.1 creates ~10,600 tracefs files for the trace events at boot (an inode and a dentry each,
#   ~10 MB of slab); skipping that initcall leaves tracing unusable in the guest and nothing
#   else. From 6.6 on (eventfs) they are made lazily, and an unknown initcall name is ignored.
# - cgroup.memory=nokmem: no kernel-memory accounting, so the percpu allocator does not
#   vmalloc a 4 MB obj_cgroups array for its 2 MB chunk.
LOW_MEMORY_CMDLINE = "initcall_blacklist=tracer_init_tracefs cgroup.memory=nokmem"
CMDLINE = f"console=ttyS0 root=/dev/vda rootfstype=ext4 rw init=/init panic=-1 {LOW_MEMORY_CMDLINE}"

INIT = r"""#!/bin/sh
# kvmksm tiny guest: fill memory as the kernel command line says (kvmksm.fill=<bytes>,
# kvmksm.byte=<0-255>), print the marker on the console, then idle for ever.
PATH=/bin
export PATH
# The initramfs moves its /proc, /sys and /dev here; mount them only when it did not.
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


TinyImage = BuiltImage  # what build_image returns (the Debian image's builder returns the same)


def find_kernel(
    boot: Path = Path("/boot"), modules_dir: Path = Path("/lib/modules")
) -> tuple[Path, str]:
    """The newest /boot/vmlinuz-<release> whose modules are installed (a modules.dep in
    /lib/modules/<release>), and its release."""

    def key(p: Path) -> list[int | str]:
        return [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", p.name)]

    for kernel in sorted(boot.glob("vmlinuz-*"), key=key, reverse=True):
        release = kernel.name.removeprefix("vmlinuz-")
        if (modules_dir / release / "modules.dep").is_file():
            return kernel, release
    raise UserError(
        f"no kernel in {boot} with its modules in {modules_dir} (install linux-image-amd64: "
        "scripts/setup.sh does)"
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
    tag = base_tag_xml({"version": str(IMAGE_VERSION), "build": build, "image": "tiny"})
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
    release: str | None = None,
    modules_dir: Path = Path("/lib/modules"),
    busybox: Path = Path("/bin/busybox"),
    memory: int = DEFAULT_MEMORY,
    vcpus: int = 1,
    domain_type: str = "qemu",
    force: bool = False,
    progress: Callable[[str], None] = lambda _text: None,
) -> TinyImage:
    """Build the tiny image (when missing, when its inputs changed, or with ``force``) and
    define the shut-off base domain ``name`` (when missing or out of date).

    ``kernel`` defaults to the newest /boot/vmlinuz-<release> with its modules installed, and
    ``release`` to what follows ``vmlinuz-`` in its name; the initramfs is made from
    ``modules_dir/<release>``. Refuses while tagged clones of it exist (their overlays are
    backed by the image) or when a domain called ``name`` exists that kvmksm did not make.
    ``domain_type`` is the base's own type; clones take theirs from the scenario.
    """
    directory = directory or paths.images_dir()
    if kernel is None:
        kernel, found = find_kernel(modules_dir=modules_dir)
        release = release or found
    release = release or kernel.name.removeprefix("vmlinuz-")
    for f in (kernel, busybox):
        if not f.exists():
            raise UserError(f"{f}: not found (scripts/setup.sh installs what the image needs)")
    if not is_static_elf(busybox):
        raise UserError(f"{busybox} is not statically linked (install busybox-static)")
    contents = initramfs.plan(release, modules_dir)

    existing, tag = claim(conn, name)

    image = directory / f"{name}.qcow2"
    kcopy, icopy = directory / f"{name}.vmlinuz", directory / f"{name}.initrd"
    manifest = directory / f"{name}.json"
    progress(f"checking inputs ({kernel.name}, {len(contents.modules)} modules, {busybox})")
    # Everything that goes into the image, the initramfs and the domain's command line.
    fp = fingerprint(
        kernel,
        busybox,
        *contents.module_files(),
        extra=f"{DISK_MIB}\n{release}\n{contents.init}\n{CMDLINE}",
    )
    old = read_manifest(manifest)
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
            names = " ".join(m.name for m in contents.modules)
            progress(f"making the initramfs ({release}: busybox, {names}) -> {icopy}")
            size = initramfs.build(contents, busybox, Path(tmp) / icopy.name)
            progress(f"copying {kernel}")
            shutil.copyfile(kernel, Path(tmp) / kcopy.name)
            for dst in (kcopy, icopy):
                os.replace(Path(tmp) / dst.name, dst)
            os.replace(tmp_image, image)
        write_manifest(
            manifest,
            {
                "version": IMAGE_VERSION,
                "fingerprint": fp,
                "kernel": str(kernel),
                "release": release,
                "modules": [str(f) for f in contents.module_files()],
                "initrd_bytes": size,
                "busybox": str(busybox),
            },
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


def outdated(xml: str) -> str | None:
    """Why clones of this base domain (its XML) cannot run before it is rebuilt, or None: a
    tiny base made by an older kvmksm (version 1 booted Debian's 31 MB initrd, which no guest
    smaller than 256 MiB survives)."""
    for el in ET.fromstring(xml).iterfind("metadata/*"):
        tag = parse_tag(ET.tostring(el, encoding="unicode"))
        if tag is None or tag.kind != "base" or tag.attrs.get("image", "tiny") != "tiny":
            continue
        version = tag.attrs.get("version", "0")
        if not version.isdigit() or int(version) < IMAGE_VERSION:
            return (
                f"it is a tiny image of an older kvmksm (version {version}; this one makes "
                f"version {IMAGE_VERSION})"
            )
    return None

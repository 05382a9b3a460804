"""``kvmksm image build debian``: a real Debian 12 guest, built from Debian's packages through
the host's own apt sources, and its shut-off base domain (``kvmksm-debian`` by default).

The build: ``mmdebstrap --variant=minbase`` into a directory (systemd, udev, dbus, the QEMU
guest agent, an SSH server, python3, iproute2 and one kernel package), then ``mke2fs -d`` of
that directory (no loop mount) and ``qemu-img convert`` to qcow2; the kernel and initrd are
copied out of its /boot for direct kernel boot. Nothing else is downloaded, and nothing at run
time. The mirrors are those of the host's apt sources (``Debian mirrors``); the host's apt
configuration is read, never changed. A kernel package that only bookworm-backports has
(``--kernel linux-image-6.12.95+deb12-amd64``) is found through a private apt state in
kvmksm's data folder, and backports is then added to the build's own sources only.

What the guest is like, and why:
- the initrd holds only virtio-pci, virtio-blk and ext4 (``MODULES=list``, 6.5 MB instead of
  ~31 MB): it boots faster under TCG and in less memory (128 MiB boots, 256 MiB is the
  practical floor for python3);
- root logs in by SSH with a key kvmksm generates once and keeps in ``<data dir>/ssh``; the
  guest has one user-mode (slirp) NIC, reached from the host through a port forward
  (``ssh_forward``); the guest agent starts from udev when its channel appears;
- timers and periodic jobs are masked and the journal is volatile, so idle clones stay alike;
  ``DefaultTimeoutStopSec=10s`` (a stop job once held shutdown for 90 s); the machine-id is
  empty, so each clone makes its own;
- the domain: q35, ``<cpu mode='maximum'/>`` (x86-64-v2 and v3 programs run under TCG; the
  default qemu64 model dies on numpy), a 64 MiB TCG translation cache (QEMU's default 1 GiB
  buffer grows to ~330 MiB of RSS per guest, none of it mergeable), ``panic=-1`` with
  ``on_reboot=destroy`` (a guest that panics stops instead of hanging), the agent channel,
  virtio-rng, no balloon, no video. Clones under KVM drop the TCG cache (``domains``).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import libvirt
import libvirt_qemu

from kvmksm.errors import UserError
from kvmksm.host import paths
from kvmksm.progress import Progress, Silent
from kvmksm.virt.base_image import (
    BuiltImage,
    ImageFiles,
    claim,
    define_base,
    digest,
    read_manifest,
    refuse_rebuild,
    write_manifest,
)
from kvmksm.virt.domains import base_tag_xml

# Bump when the image's contents change in a way the inputs below do not show.
IMAGE_VERSION = 1
SUITE = "bookworm"
DEFAULT_NAME = "kvmksm-debian"
DEFAULT_KERNEL = "linux-image-amd64"  # bookworm's own kernel (6.1)
PACKAGES = (
    "systemd-sysv",
    "udev",
    "dbus",  # without it, agent shutdown fails and ACPI shutdown is ignored
    "qemu-guest-agent",
    "openssh-server",
    "python3",
    "iproute2",
)
DISK_SIZE = "3G"  # the ext4 file system; the qcow2 holds only what is used (~650 MiB)
DEFAULT_MEMORY = 512 << 20
CMDLINE = "root=/dev/vda rw console=ttyS0 panic=-1 quiet loglevel=3 systemd.show_status=0"
INITRD_MODULES = ("virtio_pci", "virtio_blk", "ext4", "crc32c_generic")
TB_CACHE_MIB = 64
MASKED_UNITS = (
    "systemd-networkd-wait-online.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "apt-daily.service",
    "apt-daily-upgrade.service",
    "man-db.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
    "dpkg-db-backup.timer",
    "systemd-tmpfiles-clean.timer",
    "logrotate.timer",
    "getty@tty1.service",  # no VGA; the serial getty comes from console=ttyS0
)
DEBIAN_RELEASES = {
    "buster",
    "bullseye",
    "bookworm",
    "trixie",
    "forky",
    "duke",
    "sid",
    "stable",
    "oldstable",
    "testing",
    "unstable",
}
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
EATMYDATA_HOOK = Path("/usr/share/mmdebstrap/hooks/eatmydata")
_PACKAGE_RE = re.compile(r"[a-z0-9][a-z0-9+.-]+")


# -- the host's apt sources ------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    """One apt source entry (deb822 stanza or one-line ``deb`` line)."""

    uris: tuple[str, ...]
    suites: tuple[str, ...]
    components: tuple[str, ...]
    signed_by: str | None = None


@dataclass(frozen=True)
class Mirrors:
    """The Debian archive and security archive the host's apt sources use."""

    archive: str
    security: str | None
    signed_by: str | None

    def sources(self, suite: str, backports: bool = False) -> str:
        """The build's own deb822 sources (mmdebstrap copies them into the guest)."""
        suites = [suite, f"{suite}-updates"] + ([f"{suite}-backports"] if backports else [])
        out = [_stanza(self.archive, suites, self.signed_by)]
        if self.security:
            out.append(_stanza(self.security, [f"{suite}-security"], self.signed_by))
        return "\n".join(out)


def _stanza(uri: str, suites: list[str], signed_by: str | None) -> str:
    text = f"Types: deb\nURIs: {uri}\nSuites: {' '.join(suites)}\nComponents: main\n"
    return text + (f"Signed-By: {signed_by}\n" if signed_by else "")


def parse_deb822(text: str) -> list[Source]:
    """Entries of a ``.sources`` file (disabled ones and non-``deb`` types left out)."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = None
        for line in block.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            if line[0] in " \t" and key:  # a continuation line (e.g. an inline Signed-By key)
                fields[key] += "\n" + line.strip()
                continue
            key, _, value = line.partition(":")
            key = key.strip().lower()
            fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").lower() == "no":
            continue
        signed = fields.get("signed-by")
        out.append(
            Source(
                tuple(fields.get("uris", "").split()),
                tuple(fields.get("suites", "").split()),
                tuple(fields.get("components", "").split()),
                signed if signed and "\n" not in signed else None,
            )
        )
    return out


def parse_one_line(text: str) -> list[Source]:
    """Entries of a one-line ``sources.list`` (``deb [options] URI SUITE COMPONENT...``)."""
    out = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line.startswith("deb "):
            continue
        opts: dict[str, str] = {}
        m = re.match(r"deb\s+\[([^\]]*)\]\s+(.*)", line)
        rest = line[4:].strip()
        if m:
            for opt in m.group(1).split():
                k, _, v = opt.partition("=")
                opts[k] = v
            rest = m.group(2)
        words = rest.split()
        if len(words) < 2:
            continue
        out.append(Source((words[0],), (words[1],), tuple(words[2:]), opts.get("signed-by")))
    return out


def host_sources(etc_apt: Path = Path("/etc/apt")) -> list[Source]:
    """Every enabled ``deb`` entry of the host's apt sources."""
    out: list[Source] = []
    files = [etc_apt / "sources.list", *sorted((etc_apt / "sources.list.d").glob("*"))]
    for f in files:
        try:
            text = f.read_text(errors="replace")
        except OSError:
            continue
        if f.suffix == ".sources":
            out += parse_deb822(text)
        elif f.name == "sources.list" or f.suffix == ".list":
            out += parse_one_line(text)
    return out


def debian_mirrors(sources: Iterable[Source]) -> Mirrors:
    """The host's Debian archive (an entry for a Debian release with component main) and its
    security archive (a ``-security`` suite); UserError when the host has no Debian source."""
    archive = security = signed = None
    for s in sources:
        if not s.uris or "main" not in s.components:
            continue
        releases = {x.split("-", 1)[0] for x in s.suites}
        if not releases & DEBIAN_RELEASES:
            continue
        if any(x.endswith("-security") or "/updates" in x for x in s.suites):
            security = security or s.uris[0]
        elif archive is None and any(x in DEBIAN_RELEASES for x in s.suites):
            archive, signed = s.uris[0], s.signed_by
    if archive is None:
        raise UserError(
            "the host's apt sources (/etc/apt/sources.list, /etc/apt/sources.list.d) name no "
            "Debian archive with component main; kvmksm builds the Debian guest through them"
        )
    if signed is None or not Path(signed).is_file():
        signed = str(KEYRING) if KEYRING.is_file() else None
    return Mirrors(archive, security, signed)


def host_apt_options() -> list[str]:
    """The host's apt proxy settings, passed on to the build's apt (mmdebstrap gives apt a
    configuration of its own)."""
    out = []
    for key in ("Acquire::http::Proxy", "Acquire::https::Proxy"):
        try:
            text = subprocess.run(
                ["apt-config", "shell", "V", key], capture_output=True, text=True, timeout=30
            ).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        m = re.match(r"V='(.*)'", text.strip())
        if m and m.group(1):
            out.append(f'{key} "{m.group(1)}"')
    return out


# -- finding the kernel package ---------------------------------------------------------------
class AptState:
    """A private apt state under ``directory`` (sources, lists, cache): ``apt-get update`` and
    ``apt-cache madison`` against the build's own sources, without the host's."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def options(self) -> list[str]:
        d = self.dir
        return [
            "-o", "Dir::Etc::SourceList=/dev/null",
            "-o", f"Dir::Etc::SourceParts={d / 'sources.list.d'}",
            "-o", f"Dir::State::Lists={d / 'lists'}",
            "-o", f"Dir::Cache={d / 'cache'}",
            "-o", "Dir::State::status=/dev/null",
            "-o", "Debug::NoLocking=true",
            "-o", "APT::Sandbox::User=root",
            "-o", "Acquire::Languages=none",
            "-o", 'Acquire::Retries=3',
        ]  # fmt: skip

    def update(self, sources: str) -> None:
        for sub in ("sources.list.d", "lists/partial", "cache/archives/partial"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        (self.dir / "sources.list.d" / "debian.sources").write_text(sources)
        _run(["apt-get", *self.options(), "-q", "update"], "apt-get update (private state)")

    def madison(self, package: str) -> list[tuple[str, str]]:
        """(version, suite) of every version of ``package`` the sources offer."""
        proc = subprocess.run(
            ["apt-cache", *self.options(), "madison", package],
            capture_output=True,
            text=True,
        )
        out = []
        for line in proc.stdout.splitlines():
            parts = [p.strip() for p in line.split("|")]
            if len(parts) >= 3 and parts[0] == package:
                words = parts[2].split()
                suite = words[1].split("/")[0] if len(words) > 1 else ""
                out.append((parts[1], suite))
        return out


def locate_kernel(
    package: str, mirrors: Mirrors, state: AptState, progress: Progress
) -> tuple[bool, list[tuple[str, str]]]:
    """Whether ``package`` needs bookworm-backports, and the versions found; UserError when
    neither the release (with updates and security) nor backports has it."""
    if package == DEFAULT_KERNEL:
        return False, []
    for backports in (False, True):
        where = f"{SUITE}-backports" if backports else f"{SUITE}, -updates, -security"
        with progress.phase(f"looking for {package} in {where} (private apt state)"):
            state.update(mirrors.sources(SUITE, backports))
            found = state.madison(package)
        if found:
            return backports, found
    raise UserError(
        f"--kernel {package}: no such package in {SUITE}, {SUITE}-updates, {SUITE}-security or "
        f"{SUITE}-backports at {mirrors.archive} (list them with: apt-cache search "
        "--names-only '^linux-image-')"
    )


# -- the SSH key --------------------------------------------------------------------------------
def ensure_ssh_key(directory: Path | None = None) -> Path:
    """kvmksm's own SSH key pair (ed25519, no passphrase), made once; returns the private key's
    path (the public key is beside it, ``.pub``)."""
    directory = directory or paths.ssh_dir()
    key = directory / "id_ed25519"
    if key.exists() and key.with_suffix(".pub").exists():
        return key
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    key.unlink(missing_ok=True)
    key.with_suffix(".pub").unlink(missing_ok=True)
    comment = f"kvmksm@{socket.gethostname()}"
    cmd = ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(key)]
    _run(cmd, "ssh-keygen")
    return key


# -- the build ----------------------------------------------------------------------------------
def setup_hook() -> str:
    """Before any package is unpacked: a small initrd (only what finds and mounts /dev/vda).
    modules.d, not /etc/initramfs-tools/modules: that is a conffile (dpkg would ask)."""
    mods = "\\n".join(INITRD_MODULES)
    return (
        'mkdir -p "$1/etc/initramfs-tools/conf.d" "$1/usr/share/initramfs-tools/modules.d"\n'
        'printf "MODULES=list\\nCOMPRESS=zstd\\n" > "$1/etc/initramfs-tools/conf.d/kvmksm"\n'
        f'printf "{mods}\\n" > "$1/usr/share/initramfs-tools/modules.d/kvmksm"\n'
    )


def customize_hook(hostname: str, pubkey: str) -> str:
    """After the packages: hostname, fstab, root's SSH key, DHCP on the NIC, masked units,
    a volatile journal, short stop timeouts, an empty machine-id."""
    masked = " ".join(MASKED_UNITS)
    return f"""set -e
R="$1"
echo {shlex.quote(hostname)} > "$R/etc/hostname"
printf '127.0.0.1\\tlocalhost\\n127.0.1.1\\t%s\\n::1\\tlocalhost ip6-localhost ip6-loopback\\n' \
  {shlex.quote(hostname)} > "$R/etc/hosts"
echo '/dev/vda / ext4 rw,relatime,errors=remount-ro 0 1' > "$R/etc/fstab"
install -d -m 700 "$R/root/.ssh"
echo {shlex.quote(pubkey)} > "$R/root/.ssh/authorized_keys"
chmod 600 "$R/root/.ssh/authorized_keys"
mkdir -p "$R/etc/ssh/sshd_config.d"
echo 'UseDNS no' > "$R/etc/ssh/sshd_config.d/kvmksm.conf"
mkdir -p "$R/etc/systemd/network"
printf '[Match]\\nName=en*\\n\\n[Network]\\nDHCP=yes\\n\\n[DHCPv4]\\nUseDomains=no\\n' \
  > "$R/etc/systemd/network/20-en.network"
chroot "$R" systemctl enable systemd-networkd.service
for u in {masked}; do chroot "$R" systemctl mask "$u" >/dev/null 2>&1 || true; done
mkdir -p "$R/etc/systemd/journald.conf.d" "$R/etc/systemd/system.conf.d"
printf '[Journal]\\nStorage=volatile\\nRuntimeMaxUse=8M\\n' \
  > "$R/etc/systemd/journald.conf.d/kvmksm.conf"
printf '[Manager]\\nDefaultTimeoutStopSec=10s\\n' > "$R/etc/systemd/system.conf.d/kvmksm.conf"
: > "$R/etc/machine-id"
rm -f "$R/var/lib/dbus/machine-id"
rm -rf "$R/var/cache/apt/"*.bin "$R/var/log/"*.log
"""


def mmdebstrap_command(
    root: Path,
    sources: Path,
    kernel: str,
    hostname: str,
    pubkey: str,
    apt_options: Iterable[str] = (),
    eatmydata: bool = False,
) -> list[str]:
    """The mmdebstrap command line (``sources`` is the MIRROR argument: a deb822 file)."""
    cmd = [
        "mmdebstrap",
        "--variant=minbase",
        f"--include={','.join((*PACKAGES, kernel))}",
        '--aptopt=Acquire::Retries "3"',
        *(f"--aptopt={o}" for o in apt_options),
        "--dpkgopt=path-exclude=/usr/share/man/*",
        "--dpkgopt=path-exclude=/usr/share/doc/*",
        "--dpkgopt=path-include=/usr/share/doc/*/copyright",
        "--dpkgopt=path-exclude=/usr/share/locale/*",
        "--dpkgopt=path-include=/usr/share/locale/locale.alias",
        "--dpkgopt=path-exclude=/usr/share/info/*",
    ]
    if eatmydata:  # no fsync in dpkg: the build's root is thrown away anyway
        cmd.append(f"--hook-dir={EATMYDATA_HOOK}")
    cmd += [
        f"--setup-hook={setup_hook()}",
        f"--customize-hook={customize_hook(hostname, pubkey)}",
        SUITE,
        str(root),
        str(sources),
    ]
    return cmd


def fingerprint(kernel: str, hostname: str, pubkey: str) -> str:
    """What decides the image's contents, known without asking a mirror: a rebuild when it
    changes. New package versions on the mirror do not count (``--force`` takes them)."""
    inputs = {
        "version": IMAGE_VERSION,
        "suite": SUITE,
        "kernel": kernel,
        "packages": PACKAGES,
        "disk": DISK_SIZE,
        "setup": setup_hook(),
        "customize": customize_hook(hostname, pubkey),
    }
    return digest(text=json.dumps(inputs, sort_keys=True))


def kernel_release(boot: Path, package: str) -> str:
    """The release of the kernel the package installed (``6.1.0-56-amd64``)."""
    found = sorted(p.name.removeprefix("vmlinuz-") for p in boot.glob("vmlinuz-*"))
    found = [r for r in found if (boot / f"initrd.img-{r}").exists()]
    if not found:
        raise UserError(f"{package} installed no kernel with an initrd in /boot")
    named = package.removeprefix("linux-image-")
    if named in found:
        return named

    def key(r: str) -> list[int | str]:
        return [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", r)]

    return max(found, key=key)


def installed_packages(root: Path) -> dict[str, str]:
    proc = subprocess.run(
        ["dpkg-query", f"--admindir={root / 'var/lib/dpkg'}", "-W", "-f=${Package}\t${Version}\n"],
        capture_output=True,
        text=True,
    )
    return dict(line.split("\t", 1) for line in proc.stdout.splitlines() if "\t" in line)


def base_domain_xml(
    name: str,
    files: ImageFiles,
    memory: int,
    vcpus: int,
    domain_type: str,
    build: str,
    uuid: str | None = None,
    about: str = "",
) -> str:
    """The shut-off Debian base domain (clones change name, disks, MACs, console log)."""
    tag = base_tag_xml({"version": str(IMAGE_VERSION), "build": build, "image": "debian"})
    uuid_el = f"<uuid>{uuid}</uuid>" if uuid else ""
    tcg = ""
    if domain_type == "qemu":
        tcg = f"<tcg><tb-cache unit='MiB'>{TB_CACHE_MIB}</tb-cache></tcg>"
    return f"""<domain type='{domain_type}'>
  <name>{name}</name>{uuid_el}
  <description>kvmksm Debian {SUITE} base, built by 'kvmksm image build debian'{about}.
Clones of it are what kvmksm runs.
root logs in with kvmksm's SSH key ({paths.ssh_dir()}).</description>
  <metadata>{tag}</metadata>
  <memory unit='KiB'>{memory // 1024}</memory>
  <vcpu>{vcpus}</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{files.kernel}</kernel>
    <initrd>{files.initrd}</initrd>
    <cmdline>{CMDLINE}</cmdline>
  </os>
  <features><acpi/>{tcg}</features>
  <cpu mode='maximum'/>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='unsafe' discard='unmap'/>
      <source file='{files.image}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='user'><model type='virtio'/></interface>
    <serial type='pty'><target port='0'/></serial>
    <console type='pty'><target type='serial' port='0'/></console>
    <channel type='unix'>
      <source mode='bind'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
    <video><model type='none'/></video>
  </devices>
</domain>"""


def build_image(
    conn: libvirt.virConnect,
    name: str = DEFAULT_NAME,
    kernel: str = DEFAULT_KERNEL,
    directory: Path | None = None,
    memory: int = DEFAULT_MEMORY,
    vcpus: int = 1,
    domain_type: str = "qemu",
    force: bool = False,
    progress: Progress | None = None,
) -> BuiltImage:
    """Build the Debian image (when missing, when its inputs changed, or with ``force``) and
    define the shut-off base domain ``name`` (when missing or out of date).

    Refuses a domain ``name`` that kvmksm did not make, and a rebuild while the base runs or
    tagged clones of it exist. Needs root (mmdebstrap, chroot)."""
    progress = progress or Silent()
    directory = directory or paths.images_dir()
    if not _PACKAGE_RE.fullmatch(kernel):
        raise UserError(f"--kernel {kernel!r}: expected a Debian package name")
    existing, tag = claim(conn, name)
    files = ImageFiles.of(directory, name)
    key = ensure_ssh_key()
    pubkey = key.with_suffix(".pub").read_text().strip()
    fp = fingerprint(kernel, name, pubkey)
    old = read_manifest(files.manifest)
    rebuild = force or old.get("fingerprint") != fp or not files.complete()
    if rebuild:
        refuse_rebuild(conn, name, existing)
        _need_tools()
        directory.mkdir(parents=True, exist_ok=True)
        manifest = _build(files, kernel, name, pubkey, progress)
        manifest.update(fingerprint=fp, ssh_key=str(key))
        write_manifest(files.manifest, manifest)
        old = manifest
    else:
        progress.note(f"image is up to date ({files.image})")
    about = f" (kernel package {kernel}, {old.get('kernel_release', '?')})"
    defined = define_base(
        conn,
        name,
        existing,
        tag,
        lambda build, uuid: base_domain_xml(
            name, files, memory, vcpus, domain_type, build, uuid, about
        ),
        fp,
        rebuild,
        progress.note,
    )
    return BuiltImage(name, files.image, files.kernel, files.initrd, rebuild, defined)


def _need_tools() -> None:
    if os.geteuid() != 0:
        raise UserError("building the Debian image needs root (mmdebstrap installs into a chroot)")
    for tool, pkg in (
        ("mmdebstrap", "mmdebstrap"),
        ("mke2fs", "e2fsprogs"),
        ("qemu-img", "qemu-utils"),
        ("apt-get", "apt"),
        ("dpkg-query", "dpkg"),
        ("ssh-keygen", "openssh-client"),
    ):
        if shutil.which(tool) is None:
            raise UserError(f"{tool} not found: apt-get install {pkg} (scripts/setup.sh does)")


def _build(
    files: ImageFiles, kernel: str, hostname: str, pubkey: str, progress: Progress
) -> dict[str, Any]:
    seconds: dict[str, float] = {}
    t = time.monotonic()
    mirrors = debian_mirrors(host_sources())
    state = AptState(paths.apt_dir() / SUITE)
    backports, versions = locate_kernel(kernel, mirrors, state, progress)
    seconds["apt"] = round(time.monotonic() - t, 1)
    if versions:
        found = ", ".join(f"{v} ({s})" for v, s in versions[:3])
        progress.note(f"{kernel}: {found}{' from backports' if backports else ''}")
    log = files.manifest.with_suffix(".build.log")
    with tempfile.TemporaryDirectory(prefix=f"{files.image.stem}-", dir=files.image.parent) as tmp:
        work = Path(tmp)
        root = work / "root"
        sources = work / "debian.sources"
        sources.write_text(mirrors.sources(SUITE, backports))
        cmd = mmdebstrap_command(
            root,
            sources,
            kernel,
            hostname,
            pubkey,
            host_apt_options(),
            eatmydata=EATMYDATA_HOOK.is_dir() and shutil.which("dpkg-architecture") is not None,
        )
        t = time.monotonic()
        _mmdebstrap(cmd, log, progress, f"mmdebstrap {SUITE} + {kernel} from {mirrors.archive}")
        seconds["mmdebstrap"] = round(time.monotonic() - t, 1)
        release = kernel_release(root / "boot", kernel)
        packages = installed_packages(root)
        progress.note(
            f"root file system: {len(packages)} packages, kernel {release} "
            f"({seconds['mmdebstrap']:.0f}s)"
        )
        raw, qcow = work / "disk.raw", work / "disk.qcow2"
        t = time.monotonic()
        with progress.phase(f"making a {DISK_SIZE} ext4 file system of it (mke2fs -d)"):
            _run(
                ["mke2fs", "-q", "-t", "ext4", "-L", "root", "-m", "0", "-E", "root_owner=0:0",
                 "-d", str(root), str(raw), DISK_SIZE],
                "mke2fs",
            )  # fmt: skip
        seconds["mke2fs"] = round(time.monotonic() - t, 1)
        t = time.monotonic()
        with progress.phase(f"converting it to qcow2 -> {files.image}"):
            cmd = ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow)]
            _run(cmd, "qemu-img")
        seconds["qcow2"] = round(time.monotonic() - t, 1)
        for src, dst in (
            (root / "boot" / f"vmlinuz-{release}", files.kernel),
            (root / "boot" / f"initrd.img-{release}", files.initrd),
        ):
            shutil.copyfile(src, work / dst.name)
            os.replace(work / dst.name, dst)
        os.replace(qcow, files.image)
    progress.note(f"image {files.image}: {files.image.stat().st_size / 2**20:.0f} MiB")
    return {
        "version": IMAGE_VERSION,
        "built": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "suite": SUITE,
        "kernel_package": kernel,
        "kernel_release": release,
        "backports": backports,
        "archive": mirrors.archive,
        "security": mirrors.security,
        "seconds": seconds,
        "image_bytes": files.image.stat().st_size,
        "initrd_bytes": files.initrd.stat().st_size,
        "packages": packages,
    }


def _mmdebstrap(cmd: list[str], log: Path, progress: Progress, what: str) -> None:
    """Run mmdebstrap, its output to ``log`` and its ``I:`` lines to the progress view."""
    last: list[str] = []
    with open(log, "w") as out, progress.phase(what) as update:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            line = line.rstrip()
            last = (last + [line])[-20:]
            if line.startswith("I: "):
                update(f"{what}: {line[3:]}")
        code = proc.wait()
    if code != 0:
        errors = [ln for ln in last if ln.startswith("E: ")] or last[-1:] or ["no output"]
        raise UserError(f"mmdebstrap failed (exit {code}): {errors[-1]} (whole log: {log})")


def _run(cmd: list[str], what: str) -> None:
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    except FileNotFoundError:
        raise UserError(f"{cmd[0]} not found (scripts/setup.sh installs it)") from None
    except subprocess.CalledProcessError as e:
        lines = (e.stderr or e.stdout or "").strip().splitlines() or ["no output"]
        err = [ln for ln in lines if ln.startswith("E:")] or lines
        raise UserError(f"{what} failed: {err[-1]}") from None


# -- reaching a running clone -----------------------------------------------------------------
def ssh_forward(dom: libvirt.virDomain, port: int, nic: int = 0) -> str:
    """Forward 127.0.0.1:``port`` on the host to the guest's SSH port, through its user-mode
    NIC (QEMU's ``hostfwd_add``; each clone needs its own port, so none is in the XML).
    Returns the ssh command that logs in as root with kvmksm's key."""
    cmd = f"hostfwd_add hostnet{nic} tcp:127.0.0.1:{port}-:22"
    flags = libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP
    try:
        reply = libvirt_qemu.qemuMonitorCommand(dom, cmd, flags)
    except libvirt.libvirtError as e:
        why = e.get_error_message()
        raise UserError(f"{dom.name()}: cannot forward port {port}: {why}") from None
    if reply.strip():  # HMP says nothing on success
        raise UserError(f"{dom.name()}: cannot forward port {port}: {reply.strip()}")
    key = paths.ssh_dir() / "id_ed25519"
    return (
        f"ssh -i {key} -p {port} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
        "root@127.0.0.1"
    )


def manifest_of(name: str, directory: Path | None = None) -> dict[str, Any]:
    """The manifest of the image behind base ``name`` ({} if it was never built here)."""
    return read_manifest(ImageFiles.of(directory or paths.images_dir(), name).manifest)


Runner = Callable[[list[str], str], None]

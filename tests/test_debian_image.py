"""The Debian image's logic without building one: the host's apt sources read, the build's own
sources, the kernel package looked up (backports only when needed), the mmdebstrap command and
its hooks, the SSH key, when a build is up to date (against libvirt's test driver, with the
build itself replaced), and the clone XML of its base under TCG and KVM."""

from __future__ import annotations

import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from kvmksm.errors import UserError
from kvmksm.progress import Silent
from kvmksm.virt import debian_image as di
from kvmksm.virt.base_image import ImageFiles
from kvmksm.virt.conn import open_connection
from kvmksm.virt.domains import CloneDisk, ClonePlan, clone_xml, read_tag

NODE = Path(__file__).parent / "fixtures" / "testnode.xml"

HOST_SOURCES = """Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""
NODESOURCE = """Types: deb
URIs: https://deb.nodesource.com/node_20.x
Suites: nodistro
Components: main
"""


def test_host_sources_deb822_and_one_line(tmp_path: Path) -> None:
    d = tmp_path / "sources.list.d"
    d.mkdir()
    (d / "debian.sources").write_text(HOST_SOURCES)
    (d / "nodesource.sources").write_text(NODESOURCE)
    (d / "google.list").write_text("deb https://packages.cloud.google.com/apt cloud-sdk main\n")
    (d / "off.sources").write_text(
        HOST_SOURCES.replace("Types: deb\n", "Types: deb\nEnabled: no\n")
    )
    found = di.host_sources(tmp_path)
    assert len(found) == 4
    m = di.debian_mirrors(found)
    assert m.archive == "http://deb.debian.org/debian"
    assert m.security == "http://deb.debian.org/debian-security"


def test_one_line_sources_with_options(tmp_path: Path) -> None:
    (tmp_path / "sources.list").write_text(
        "# a comment\n"
        "deb [arch=amd64 signed-by=/nonexistent.gpg] http://mirror.example/debian trixie main\n"
        "deb http://security.example/debian-security trixie-security main contrib\n"
        "deb-src http://mirror.example/debian trixie main\n"
    )
    m = di.debian_mirrors(di.host_sources(tmp_path))
    assert (m.archive, m.security) == (
        "http://mirror.example/debian",
        "http://security.example/debian-security",
    )
    # a Signed-By that is not there falls back to Debian's keyring
    assert m.signed_by in (str(di.KEYRING), None)
    text = m.sources("bookworm", backports=True)
    assert (
        "URIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates bookworm-backports"
        in text
    )
    assert "Suites: bookworm-security\n" in text


def test_no_debian_source_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "n.sources").write_text(NODESOURCE)
    with pytest.raises(UserError, match="name no Debian archive") as e:
        di.debian_mirrors(di.host_sources(tmp_path))
    assert "\n" not in str(e.value)


def test_build_sources_without_security() -> None:
    m = di.Mirrors("http://m/debian", None, None)
    assert m.sources("bookworm") == (
        "Types: deb\nURIs: http://m/debian\nSuites: bookworm bookworm-updates\nComponents: main\n"
    )


class FakeApt:
    """madison answers by the sources last written (with or without backports)."""

    def __init__(self, table: dict[bool, list[tuple[str, str]]]) -> None:
        self.table, self.updates = table, []
        self.backports = False

    def update(self, sources: str) -> None:
        self.backports = "-backports" in sources
        self.updates.append(self.backports)

    def madison(self, package: str) -> list[tuple[str, str]]:
        return self.table[self.backports]


MIRRORS = di.Mirrors("http://m/debian", "http://m/debian-security", None)


def test_default_kernel_needs_no_lookup() -> None:
    apt = FakeApt({False: [], True: []})
    assert di.locate_kernel(di.DEFAULT_KERNEL, MIRRORS, apt, Silent()) == (False, [])  # type: ignore[arg-type]
    assert apt.updates == []


def test_kernel_from_the_release_does_not_add_backports() -> None:
    apt = FakeApt({False: [("6.12.117-1~deb12u1", "bookworm-security")], True: []})
    needs, found = di.locate_kernel("linux-image-6.12-amd64", MIRRORS, apt, Silent())  # type: ignore[arg-type]
    assert (needs, apt.updates) == (False, [False])
    assert found == [("6.12.117-1~deb12u1", "bookworm-security")]


def test_kernel_only_in_backports() -> None:
    apt = FakeApt({False: [], True: [("6.12.95-1~bpo12+1", "bookworm-backports")]})
    needs, _ = di.locate_kernel("linux-image-6.12.95+deb12-amd64", MIRRORS, apt, Silent())  # type: ignore[arg-type]
    assert (needs, apt.updates) == (True, [False, True])


def test_unknown_kernel_package() -> None:
    apt = FakeApt({False: [], True: []})
    with pytest.raises(UserError, match="no such package in bookworm") as e:
        di.locate_kernel("linux-image-9.9-amd64", MIRRORS, apt, Silent())  # type: ignore[arg-type]
    assert "\n" not in str(e.value)


def test_madison_output_parsed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = (
        "linux-image-6.12.95+deb12-amd64 | 6.12.95-1~bpo12+1 | http://deb.debian.org/debian "
        "bookworm-backports/main amd64 Packages\n"
    )
    monkeypatch.setattr(
        subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, out, "")
    )
    got = di.AptState(tmp_path).madison("linux-image-6.12.95+deb12-amd64")
    assert got == [("6.12.95-1~bpo12+1", "bookworm-backports")]


def test_apt_state_is_private(tmp_path: Path) -> None:
    opts = " ".join(di.AptState(tmp_path).options())
    assert "Dir::Etc::SourceList=/dev/null" in opts
    assert f"Dir::State::Lists={tmp_path}/lists" in opts
    assert "Dir::State::status=/dev/null" in opts


def test_setup_hook_writes_a_small_initrd_config(tmp_path: Path) -> None:
    subprocess.run(["sh", "-ec", di.setup_hook(), "hook", str(tmp_path)], check=True)
    conf = (tmp_path / "etc/initramfs-tools/conf.d/kvmksm").read_text()
    assert conf == "MODULES=list\nCOMPRESS=zstd\n"
    mods = (tmp_path / "usr/share/initramfs-tools/modules.d/kvmksm").read_text().split()
    assert mods == list(di.INITRD_MODULES)


def test_customize_hook_is_valid_shell_with_the_key() -> None:
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE kvmksm@host"
    hook = di.customize_hook("kvmksm-debian", key)
    subprocess.run(["sh", "-n", "-c", hook], check=True)  # parses
    assert f"echo '{key}' > \"$R/root/.ssh/authorized_keys\"" in hook
    for unit in di.MASKED_UNITS:
        assert unit in hook
    assert "DefaultTimeoutStopSec=10s" in hook and "Storage=volatile" in hook


def test_mmdebstrap_command(tmp_path: Path) -> None:
    cmd = di.mmdebstrap_command(
        tmp_path / "root", tmp_path / "s.sources", "linux-image-amd64", "h", "k", ['A "b"'], True
    )
    assert cmd[0] == "mmdebstrap" and cmd[-3:] == [
        "bookworm",
        str(tmp_path / "root"),
        str(tmp_path / "s.sources"),
    ]
    include = next(c for c in cmd if c.startswith("--include="))
    for pkg in (*di.PACKAGES, "linux-image-amd64"):
        assert pkg in include.split("=", 1)[1].split(",")
    assert '--aptopt=A "b"' in cmd and f"--hook-dir={di.EATMYDATA_HOOK}" in cmd


def test_fingerprint_follows_inputs() -> None:
    a = di.fingerprint("linux-image-amd64", "n", "key")
    assert a == di.fingerprint("linux-image-amd64", "n", "key")
    assert a != di.fingerprint("linux-image-6.12-amd64", "n", "key")
    assert a != di.fingerprint("linux-image-amd64", "n", "other key")


def test_kernel_release(tmp_path: Path) -> None:
    for r in ("6.1.0-56-amd64", "6.12.95+deb12-amd64"):
        (tmp_path / f"vmlinuz-{r}").write_text("k")
        (tmp_path / f"initrd.img-{r}").write_text("i")
    assert di.kernel_release(tmp_path, "linux-image-6.1.0-56-amd64") == "6.1.0-56-amd64"
    assert di.kernel_release(tmp_path, "linux-image-amd64") == "6.12.95+deb12-amd64"
    with pytest.raises(UserError):
        di.kernel_release(tmp_path / "none", "linux-image-amd64")


def test_ssh_key_made_once(tmp_path: Path) -> None:
    key = di.ensure_ssh_key(tmp_path / "ssh")
    pub = key.with_suffix(".pub").read_text()
    assert pub.startswith("ssh-ed25519 ") and key.stat().st_mode & 0o077 == 0
    assert di.ensure_ssh_key(tmp_path / "ssh") == key
    assert key.with_suffix(".pub").read_text() == pub


# -- build_image's bookkeeping, against the test driver -----------------------------------------
@pytest.fixture
def conn() -> Iterator[libvirt.virConnect]:
    c = open_connection(f"test://{NODE}")
    yield c
    c.close()


@pytest.fixture
def fake_build(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """_build replaced: it writes the three files and says which kernel it was asked for."""
    calls: list[str] = []

    def build(files: ImageFiles, kernel: str, *_: Any) -> dict[str, Any]:
        calls.append(kernel)
        for p in (files.image, files.kernel, files.initrd):
            p.write_bytes(f"{kernel} {len(calls)}".encode())
        return {"kernel_package": kernel, "kernel_release": "6.1.0-56-amd64"}

    monkeypatch.setattr(di, "_build", build)
    monkeypatch.setattr(di, "_need_tools", lambda: None)
    return calls


def test_build_image_reuses_what_is_there(
    conn: libvirt.virConnect, tmp_path: Path, fake_build: list[str]
) -> None:
    first = di.build_image(conn, name="debian-test", directory=tmp_path)
    assert first.built and first.defined and fake_build == ["linux-image-amd64"]
    dom = conn.lookupByName("debian-test")
    tag = read_tag(dom)
    assert tag is not None and tag.kind == "base" and tag.attrs["image"] == "debian"
    xml = dom.XMLDesc(0)
    assert "org.qemu.guest_agent.0" in xml and "maximum" in xml
    again = di.build_image(conn, name="debian-test", directory=tmp_path)
    assert not again.built and not again.defined and fake_build == ["linux-image-amd64"]
    # another kernel: rebuilt, and the domain redefined in place (same UUID)
    uuid = dom.UUIDString()
    other = di.build_image(
        conn, name="debian-test", kernel="linux-image-6.12-amd64", directory=tmp_path
    )
    assert other.built and other.defined
    assert conn.lookupByName("debian-test").UUIDString() == uuid
    assert di.manifest_of("debian-test", tmp_path)["kernel_package"] == "linux-image-6.12-amd64"
    # a missing file: rebuilt
    other.initrd.unlink()
    assert di.build_image(
        conn, name="debian-test", kernel="linux-image-6.12-amd64", directory=tmp_path
    ).built


def test_build_image_refuses_a_foreign_domain_and_bad_names(
    conn: libvirt.virConnect, tmp_path: Path, fake_build: list[str]
) -> None:
    with pytest.raises(UserError, match="was not made by kvmksm"):
        di.build_image(conn, name="fedora01", directory=tmp_path)
    with pytest.raises(UserError, match="expected a Debian package name"):
        di.build_image(conn, name="x", kernel="linux-image; rm -rf /", directory=tmp_path)
    assert fake_build == []


def test_build_image_refuses_while_clones_exist(
    conn: libvirt.virConnect, tmp_path: Path, fake_build: list[str]
) -> None:
    di.build_image(conn, name="debian-test", directory=tmp_path)
    base = conn.lookupByName("debian-test").XMLDesc(0)
    plan = _plan("qemu")
    conn.defineXML(clone_xml(base, plan))
    with pytest.raises(UserError, match="clone"):
        di.build_image(conn, name="debian-test", directory=tmp_path, force=True)
    assert fake_build == ["linux-image-amd64"]


def _plan(domain_type: str) -> ClonePlan:
    name = "kvmksm-0123abcd-debian-test-01"
    return ClonePlan(
        name=name,
        uuid="00000000-0000-4000-8000-000000000009",
        run="0123abcd",
        index=1,
        base="debian-test",
        domain_type=domain_type,
        disks=[
            CloneDisk("vda", "default", f"{name}-vda.qcow2", f"/pool/{name}-vda.qcow2", "qcow2")
        ],
        macs=["52:54:00:00:00:09"],
        console=f"/var/lib/kvmksm/console/{name}.log",
    )


@pytest.mark.parametrize("domain_type", ["qemu", "kvm"])
def test_clone_of_the_debian_base(domain_type: str) -> None:
    files = ImageFiles.of(Path("/var/lib/kvmksm/images"), "kvmksm-debian")
    base = di.base_domain_xml("kvmksm-debian", files, 512 << 20, 1, "qemu", "b")
    root = ET.fromstring(clone_xml(base, _plan(domain_type)))
    assert root.get("type") == domain_type
    # TCG's translation cache only where TCG runs: libvirt refuses <tcg> under KVM
    assert (root.find("features/tcg") is not None) == (domain_type == "qemu")
    assert root.find("cpu").get("mode") == "maximum"  # type: ignore[union-attr]
    (iface,) = root.findall("devices/interface")
    assert iface.get("type") == "user" and iface.find("mac").get("address") == "52:54:00:00:00:09"  # type: ignore[union-attr]
    (ch,) = root.findall("devices/channel")
    assert ch.find("target").get("name") == "org.qemu.guest_agent.0"  # type: ignore[union-attr]
    assert "panic=-1" in root.findtext("os/cmdline", "")
    assert root.findtext("on_reboot") == "destroy"

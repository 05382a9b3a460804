"""Cloning logic against libvirt's test driver, opened on the project's own node XML (each
connection starts from the file, so tests never see each other's objects)."""

from __future__ import annotations

import random
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path

import libvirt
import pytest

from kvmksm.errors import UserError
from kvmksm.host import paths
from kvmksm.scenario.model import BaseDomain, BaseImage, VmsWorkload
from kvmksm.virt.cleanup import find_leftovers, remove_clone, remove_leftovers
from kvmksm.virt.clones import Clones
from kvmksm.virt.conn import open_connection, resolve_uri
from kvmksm.virt.domains import (
    CloneDisk,
    ClonePlan,
    clone_xml,
    load_base,
    new_macs,
    parse_tag,
    read_tag,
)

FIXTURES = Path(__file__).parent / "fixtures"
NODE = FIXTURES / "testnode.xml"
BASE_DISK = "/var/lib/libvirt/images/fedora01.qcow2"
UNTOUCHABLE = {"fedora01", "running01", "kvmksm-tiny", "kvmksm-0badc0de-lookalike-01"}


@pytest.fixture(autouse=True)
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KVMKSM_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


@pytest.fixture
def conn() -> Iterator[libvirt.virConnect]:
    c = open_connection(f"test://{NODE}")
    yield c
    c.close()


def vms(**kw: object) -> VmsWorkload:
    data: dict[str, object] = {"type": "vms", "base": {"domain": "fedora01"}, "clones": 3}
    data.update(kw)
    return VmsWorkload.model_validate(data)


def domain_names(conn: libvirt.virConnect) -> set[str]:
    return {d.name() for d in conn.listAllDomains(0)}


def volumes(conn: libvirt.virConnect, pool: str = "default") -> set[str]:
    return set(conn.storagePoolLookupByName(pool).listVolumes())


# -- the clone XML ------------------------------------------------------------------------
def golden_plan() -> ClonePlan:
    return ClonePlan(
        name="kvmksm-0123abcd-fedora01-01",
        uuid="00000000-0000-4000-8000-000000000001",
        run="0123abcd",
        index=1,
        base="fedora01",
        domain_type="qemu",
        disks=[
            CloneDisk(
                "vda",
                "default",
                "kvmksm-0123abcd-fedora01-01-vda.qcow2",
                "/var/lib/libvirt/images/kvmksm-0123abcd-fedora01-01-vda.qcow2",
                "qcow2",
            )
        ],
        macs=["52:54:00:00:00:01", "52:54:00:00:00:02"],
        console="/var/lib/kvmksm/console/kvmksm-0123abcd-fedora01-01.log",
        memory=256 * 1024 * 1024,
        cmdline_extra="kvmksm.fill=67108864 kvmksm.byte=97",
        record="20250101T000000Z-host",
    )


def test_clone_xml_changes_what_ties_a_clone_to_its_base(conn: libvirt.virConnect) -> None:
    base = load_base(conn, BaseDomain(domain="fedora01"))
    plan = golden_plan()
    root = ET.fromstring(clone_xml(base.xml, plan))
    assert root.get("type") == "qemu"
    assert root.findtext("name") == plan.name
    assert root.findtext("uuid") == plan.uuid
    assert root.find("title") is None
    assert root.find("cpu") is None  # host-passthrough cannot run under TCG
    assert root.findtext("memory") == "262144" and root.findtext("currentMemory") == "262144"
    assert root.findtext("os/cmdline") == (
        "console=ttyS0 root=/dev/vda rw kvmksm.fill=67108864 kvmksm.byte=97"
    )
    disks = root.findall("devices/disk")
    assert disks[0].find("source").get("file") == plan.disks[0].path
    assert disks[0].find("driver").get("type") == "qcow2"
    # The read-only CD-ROM is shared as it is.
    assert disks[1].find("source").get("file") == "/var/lib/libvirt/images/install.iso"
    ifaces = root.findall("devices/interface")
    assert [i.find("mac").get("address") for i in ifaces] == plan.macs
    assert all(i.find("target") is None for i in ifaces)
    g = root.find("devices/graphics")
    assert g.get("autoport") == "yes" and g.get("port") is None
    serial = root.find("devices/serial")
    assert serial.find("log").get("file") == plan.console
    tag = parse_tag(ET.tostring(root.find("metadata")[0], encoding="unicode"))
    assert tag is not None and tag.kind == "clone"
    assert tag.attrs["run"] == "0123abcd" and tag.attrs["record"] == plan.record
    assert tag.volumes == [("default", plan.disks[0].volume)]


def test_new_macs_are_unique_and_avoid_taken() -> None:
    taken = {"52:54:00:00:00:00"}
    macs = new_macs(200, taken, random.Random(1))
    assert len(set(macs)) == 200
    assert "52:54:00:00:00:00" not in macs
    assert all(m.startswith("52:54:00:") for m in macs)


def test_guest_fill_needs_direct_kernel_boot(conn: libvirt.virConnect) -> None:
    base = load_base(conn, BaseDomain(domain="fedora01"))
    no_kernel = base.xml.replace("<kernel>/boot/vmlinuz-test</kernel>", "")
    with pytest.raises(UserError, match="direct-kernel-boot"):
        clone_xml(no_kernel, golden_plan())


def test_base_from_image(conn: libvirt.virConnect, tmp_path: Path) -> None:
    img = qcow2_header(tmp_path / "base.qcow2", 64 << 20)
    spec = BaseImage(
        image=img, memory=192 << 20, kernel=Path("/k"), initrd=Path("/i"), cmdline="console=ttyS0"
    )
    base = load_base(conn, spec)
    assert base.name == "base"
    assert [(d.target, d.path, d.format, d.capacity) for d in base.disks] == [
        ("vda", str(img), "qcow2", 64 << 20)
    ]
    plan = golden_plan()
    plan.macs = []
    root = ET.fromstring(clone_xml(base.xml, plan))
    assert root.findtext("os/kernel") == "/k"
    assert root.findtext("os/cmdline").startswith("console=ttyS0 kvmksm.fill=")


# -- creating clones ------------------------------------------------------------------------
def test_clones_defines_tagged_clones_with_overlays(conn: libvirt.virConnect) -> None:
    events: list[tuple[str, str]] = []
    clones = Clones(
        conn,
        vms(domain_type="qemu", guest_fill={"size": "64MiB", "byte": "a"}, memory="256MiB"),
        record="rec",
        log=lambda k, d: events.append((k, d)),
    )
    guests = clones.create()
    names = [g.name for g in guests]
    assert names == [f"kvmksm-{clones.run}-fedora01-{i:02d}" for i in (1, 2, 3)]
    base_macs = {"52:54:00:aa:bb:01", "52:54:00:aa:bb:02"}
    all_macs = [m for g in guests for m in g.macs]
    assert len(all_macs) == 6 and len(set(all_macs)) == 6 and not base_macs & set(all_macs)
    uuids = {conn.lookupByName(n).UUIDString() for n in names}
    assert len(uuids) == 3 and "6695eb01-f6a4-8304-79aa-97f2502e193f" not in uuids
    for g in guests:
        dom = conn.lookupByName(g.name)
        assert not dom.isActive()
        root = ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        assert root.get("type") == "qemu"
        src = root.find("devices/disk/source").get("file")
        assert src == f"/var/lib/libvirt/images/{g.name}-vda.qcow2"
        vol = conn.storageVolLookupByPath(src)
        vroot = ET.fromstring(vol.XMLDesc(0))
        assert vroot.findtext("backingStore/path") == BASE_DISK
        assert vroot.find("target/format").get("type") == "qcow2"
        assert vol.info()[1] == 10737418240  # the base's virtual size
        tag = read_tag(dom)
        assert tag is not None and tag.attrs["run"] == clones.run and tag.attrs["index"]
        assert g.console == str(paths.console_dir() / f"{g.name}.log")
    assert ("guest_defined", f"{names[0]} (overlay of fedora01)") in events
    assert not conn.lookupByName("fedora01").isActive()  # the base is untouched
    assert clones.teardown() == []
    assert domain_names(conn) == UNTOUCHABLE
    assert volumes(conn) == {"fedora01.qcow2", "kvmksm-notes.img"}


def test_clones_full_copies(conn: libvirt.virConnect) -> None:
    clones = Clones(conn, vms(disk="copy", clones=2))
    clones.create()
    for g in clones.guests:
        vol = conn.storagePoolLookupByName("default").storageVolLookupByName(g.volumes[0][1])
        vroot = ET.fromstring(vol.XMLDesc(0))
        assert vroot.find("backingStore/path") is None
        assert vol.info()[1] == 10737418240
    assert clones.teardown() == []
    assert volumes(conn) == {"fedora01.qcow2", "kvmksm-notes.img"}


class Recorder:
    """Notes what the clones says it created and removed; ``hook`` runs on each creation."""

    def __init__(self, hook: Callable[[str, dict[str, object]], None] | None = None) -> None:
        self.made: list[tuple[str, dict[str, object]]] = []
        self.gone: list[tuple[str, dict[str, object]]] = []
        self.hook = hook

    def created(self, kind: str, **ident: object) -> None:
        self.made.append((kind, ident))
        if self.hook:
            self.hook(kind, ident)

    def removed(self, kind: str, **ident: object) -> None:
        self.gone.append((kind, ident))


def raw_volume_xml(name: str) -> str:
    return (
        f"<volume><name>{name}</name><capacity>1048576</capacity>"
        "<target><format type='raw'/></target></volume>"
    )


def test_rollback_when_a_volume_name_is_taken(conn: libvirt.virConnect) -> None:
    """Clone 2's volume name is taken before the run: clone 1 (domain and volume) is removed,
    and the volume kvmksm did not make is left alone."""
    run = "feedf00d"
    taken = f"kvmksm-{run}-fedora01-02-vda.qcow2"
    conn.storagePoolLookupByName("default").createXML(raw_volume_xml(taken), 0)
    rec = Recorder()
    clones = Clones(conn, vms(clones=3), run=run, recorder=rec)
    with pytest.raises(UserError, match=f"volume default/{taken} already exists"):
        clones.create()
    assert domain_names(conn) == UNTOUCHABLE
    assert volumes(conn) == {"fedora01.qcow2", "kvmksm-notes.img", taken}
    assert [k for k, _ in rec.made] == ["domain", "volume"]
    assert sorted(k for k, _ in rec.gone) == ["domain", "volume"]


def test_rollback_when_volume_creation_fails(conn: libvirt.virConnect) -> None:
    """Clone 2's volume appears (someone else's) between its domain's define and its storage:
    creation fails, clone 1 and clone 2's domain are removed, the other volume survives."""
    run = "feedf00d"
    taken = f"kvmksm-{run}-fedora01-02-vda.qcow2"
    pool = conn.storagePoolLookupByName("default")

    def race(kind: str, ident: dict[str, object]) -> None:
        if kind == "domain" and str(ident["name"]).endswith("-02"):
            pool.createXML(raw_volume_xml(taken), 0)

    rec = Recorder(race)
    clones = Clones(conn, vms(clones=3), run=run, recorder=rec)
    with pytest.raises(UserError, match=f"cannot create volume default/{taken}"):
        clones.create()
    assert domain_names(conn) == UNTOUCHABLE
    assert volumes(conn) == {"fedora01.qcow2", "kvmksm-notes.img", taken}
    assert [k for k, _ in rec.made] == ["domain", "volume", "domain"]
    assert sorted(k for k, _ in rec.gone) == ["domain", "domain", "volume"]
    assert find_leftovers(conn, run).domains == []


def test_rollback_when_define_fails(conn: libvirt.virConnect) -> None:
    clones = Clones(conn, vms(clones=2))
    clones.check()
    assert clones.base is not None
    # A second clone whose name is taken by an untagged domain fails to define.
    conn.defineXML(
        f"<domain type='test'><name>kvmksm-{clones.run}-fedora01-02</name>"
        "<memory>65536</memory><os><type>hvm</type></os></domain>"
    )
    conn.lookupByName(f"kvmksm-{clones.run}-fedora01-02").undefine()
    clones.base.xml = clones.base.xml.replace("<vcpu placement='static'>2</vcpu>", "<vcpu>x</vcpu>")
    with pytest.raises(UserError, match="cannot define clone"):
        clones.create()
    assert domain_names(conn) == UNTOUCHABLE
    assert volumes(conn) == {"fedora01.qcow2", "kvmksm-notes.img"}


def test_refuses_running_base(conn: libvirt.virConnect) -> None:
    clones = Clones(conn, vms(base={"domain": "running01"}))
    with pytest.raises(UserError, match="base domain 'running01' is running"):
        clones.create()
    assert domain_names(conn) == UNTOUCHABLE
    assert volumes(conn) == {"fedora01.qcow2", "kvmksm-notes.img"}


def test_refuses_missing_base_and_inactive_or_missing_pool(conn: libvirt.virConnect) -> None:
    with pytest.raises(UserError, match="base domain 'nosuch' not found"):
        Clones(conn, vms(base={"domain": "nosuch"})).check()
    conn.storagePoolLookupByName("stopped").destroy()
    with pytest.raises(UserError, match="pool 'stopped' is not active"):
        Clones(conn, vms(pool="stopped")).check()
    with pytest.raises(UserError, match="pool 'nvme' not found"):
        Clones(conn, vms(pool="nvme")).check()
    assert domain_names(conn) == UNTOUCHABLE


def qcow2_header(path: Path, size: int) -> Path:
    """A file that reads as a qcow2 image of ``size`` bytes (all describe_disk looks at)."""
    path.write_bytes(b"QFI\xfb" + bytes(20) + size.to_bytes(8, "big") + bytes(100))
    return path


def test_absent_default_pool_gets_kvmksm_pool(
    conn: libvirt.virConnect, data_dir: Path, tmp_path: Path
) -> None:
    pool = conn.storagePoolLookupByName("default")
    pool.destroy()
    pool.undefine()
    img = qcow2_header(tmp_path / "tiny.qcow2", 64 << 20)
    base = {"image": str(img), "memory": "192MiB", "kernel": "/k", "initrd": "/i"}
    clones = Clones(conn, vms(clones=2, base=base, guest_fill={"size": "16MiB"}))
    clones.create()
    assert clones.pool is not None and clones.pool.created and clones.pool.name == "kvmksm"
    kv = conn.storagePoolLookupByName("kvmksm")
    assert ET.fromstring(kv.XMLDesc(0)).findtext("target/path") == str(data_dir / "pool")
    for g in clones.guests:
        vol = kv.storageVolLookupByName(g.volumes[0][1])
        assert ET.fromstring(vol.XMLDesc(0)).findtext("backingStore/path") == str(img)
        assert vol.path() == str(data_dir / "pool" / g.volumes[0][1])
        root = ET.fromstring(conn.lookupByName(g.name).XMLDesc(0))
        assert root.find("devices/disk/source").get("file") == vol.path()
        assert root.findtext("memory") == str(192 * 1024)
    assert clones.describe()["pool_created"] is True
    assert clones.teardown() == []
    assert kv.listVolumes() == []  # the pool itself stays for later runs
    assert domain_names(conn) == UNTOUCHABLE
    # A second clones reuses it without saying it made it.
    again = Clones(conn, vms(clones=1, base=base))
    again.create()
    assert again.pool is not None and not again.pool.created
    assert again.teardown() == []


# -- leftovers and cleanup -------------------------------------------------------------------
def test_leftovers_are_only_tagged_objects(conn: libvirt.virConnect) -> None:
    a = Clones(conn, vms(clones=2))
    b = Clones(conn, vms(clones=1))
    a.create()
    b.create()
    paths.console_dir().mkdir(parents=True, exist_ok=True)
    stray = paths.console_dir() / f"kvmksm-{a.run}-fedora01-09.log"
    stray.write_text("boot\n")
    other = paths.console_dir() / "notes.log"
    other.write_text("not ours\n")
    # A log some process writes (a guest running elsewhere) is never a leftover.
    busy = paths.console_dir() / f"kvmksm-{b.run}-fedora01-07.log"
    busy_fd = busy.open("w")

    left = find_leftovers(conn)
    assert left.domains == sorted(g.name for g in a.guests + b.guests)
    assert sorted(v for _, v in left.volumes) == sorted(
        v for g in a.guests + b.guests for _, v in g.volumes
    )
    assert left.consoles == [stray]
    only_b = find_leftovers(conn, b.run)
    assert only_b.domains == [b.guests[0].name] and len(only_b.volumes) == 1

    assert remove_leftovers(conn, left) == []
    assert find_leftovers(conn).empty()
    assert domain_names(conn) == UNTOUCHABLE
    assert volumes(conn) == {"fedora01.qcow2", "kvmksm-notes.img"}
    assert other.exists() and busy.exists() and not stray.exists()
    busy_fd.close()
    assert find_leftovers(conn).consoles == [busy]  # no longer written: now a leftover
    assert a.teardown() == [] and b.teardown() == []  # idempotent


def test_remove_clone_refuses_untagged_domains(conn: libvirt.virConnect) -> None:
    for name in ("fedora01", "kvmksm-tiny", "kvmksm-0badc0de-lookalike-01"):
        problems = remove_clone(conn, name, [("default", "fedora01.qcow2")])
        assert problems and "no kvmksm clone tag" in problems[0]
    assert remove_clone(conn, "never-existed", [("default", "fedora01.qcow2")]) == [
        "refusing to delete volume default/fedora01.qcow2: not a kvmksm volume"
    ]
    assert domain_names(conn) == UNTOUCHABLE
    assert "fedora01.qcow2" in volumes(conn)


def test_resolve_uri_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LIBVIRT_DEFAULT_URI", raising=False)
    assert resolve_uri(None, None) == "qemu:///system"
    assert resolve_uri(None, "qemu:///session") == "qemu:///session"
    monkeypatch.setenv("LIBVIRT_DEFAULT_URI", "test:///default")
    assert resolve_uri(None, "qemu:///session") == "test:///default"
    assert resolve_uri("qemu+ssh://h/system", "qemu:///session") == "qemu+ssh://h/system"


def test_open_connection_error_is_one_line() -> None:
    with pytest.raises(UserError, match="cannot connect to libvirt at test:///nonexistent.xml"):
        open_connection("test:///nonexistent.xml")

"""The clone XML, in virt-manager's manner: a table of bases and plans, each checked against a
golden file (regenerate after a deliberate change with ``pytest --regen-golden``), and the
invariants every clone keeps whatever the base looks like."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import pytest

from kvmksm.virt.domains import CloneDisk, ClonePlan, clone_xml, parse_tag
from kvmksm.virt.tiny_image import base_domain_xml

CLONE = Path(__file__).parent / "fixtures" / "clone"
RUN = "0123abcd"


def disk(name: str, target: str, fmt: str, pool: str = "default") -> CloneDisk:
    vol = f"{name}-{target}.{fmt}"
    return CloneDisk(target, pool, vol, f"/var/lib/libvirt/images/{vol}", fmt)


def plan(base: str, **over: object) -> ClonePlan:
    name = f"kvmksm-{RUN}-{base}-01"
    p = ClonePlan(
        name=name,
        uuid="00000000-0000-4000-8000-000000000001",
        run=RUN,
        index=1,
        base=base,
        domain_type="qemu",
        disks=[disk(name, "vda", "qcow2")],
        console=f"/var/lib/kvmksm/console/{name}.log",
        record="20250101T000000Z-host",
    )
    return replace(p, **over)  # type: ignore[arg-type]


def tiny_base() -> str:
    return base_domain_xml(
        "kvmksm-tiny",
        Path("/var/lib/kvmksm/images/tiny.qcow2"),
        Path("/var/lib/kvmksm/images/vmlinuz"),
        Path("/var/lib/kvmksm/images/initrd.img"),
        256 << 20,
        1,
        "qemu",
        "fingerprint",
        uuid="7e57ba5e-0000-4000-8000-000000000000",
    )


def base(name: str) -> str:
    return (CLONE / f"base-{name}.xml").read_text()


CASES = {
    # qcow2 overlay on a direct-kernel-boot base with two NICs, smaller memory, a fill
    "overlay": lambda: (
        base("fedora01"),
        plan(
            "fedora01",
            macs=["52:54:00:00:00:01", "52:54:00:00:00:02"],
            memory=256 << 20,
            cmdline_extra="kvmksm.fill=67108864 kvmksm.byte=97",
        ),
    ),
    # a full copy keeps the base's format and, under KVM, its CPU
    "copy": lambda: (
        base("fedora01"),
        plan("fedora01", domain_type="kvm", macs=["52:54:00:00:00:03", "52:54:00:00:00:04"]),
    ),
    # a system disk as an overlay and a block data disk as a raw copy; CD-ROM shared; UEFI
    "several-disks": lambda: (
        base("twodisks"),
        plan(
            "web01",
            disks=[
                disk(f"kvmksm-{RUN}-web01-01", "vda", "qcow2"),
                disk(f"kvmksm-{RUN}-web01-01", "vdb", "raw"),
            ],
            macs=["52:54:00:00:00:05"],
        ),
    ),
    # no NIC, no graphics, the serial port a file already
    "no-nic": lambda: (
        base("nonic"),
        plan("batch01", disks=[disk(f"kvmksm-{RUN}-batch01-01", "vda", "raw")]),
    ),
    # the tiny image's own base: direct kernel boot, the fill on the command line
    "kernel-boot": lambda: (
        tiny_base(),
        plan("tiny", cmdline_extra="kvmksm.fill=33554432 kvmksm.byte=97", memory=128 << 20),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_clone_xml_matches_golden(case: str, regen_golden: bool) -> None:
    base_xml, p = CASES[case]()
    xml = clone_xml(base_xml, p) + "\n"
    golden = CLONE / f"{case}.golden.xml"
    if regen_golden:
        golden.write_text(xml)
    assert golden.exists(), f"no golden file for {case}: run pytest --regen-golden"
    assert xml == golden.read_text()


@pytest.mark.parametrize("case", sorted(CASES))
def test_what_every_clone_changes(case: str) -> None:
    base_xml, p = CASES[case]()
    before = ET.fromstring(base_xml)
    root = ET.fromstring(clone_xml(base_xml, p))
    assert root.get("type") == p.domain_type
    assert (root.findtext("name"), root.findtext("uuid")) == (p.name, p.uuid)
    assert root.find("title") is None and root.find("genid") is None
    assert root.find("os/nvram") is None  # libvirt makes a fresh one from the template
    for entry in root.iterfind("sysinfo/system/entry[@name='uuid']"):
        assert entry.text == p.uuid
    # cloned disks point at the plan's volumes; any other disk is the base's, untouched
    planned = {d.target: d for d in p.disks}
    for old, new in zip(before.iter("disk"), root.iter("disk"), strict=True):
        target = new.find("target").get("dev")  # type: ignore[union-attr]
        if target in planned:
            assert new.find("source").get("file") == planned[target].path  # type: ignore[union-attr]
            assert new.find("driver").get("type") == planned[target].format  # type: ignore[union-attr]
            assert new.find("backingStore") is None
        else:
            assert ET.tostring(new) == ET.tostring(old)
    assert [i.find("mac").get("address") for i in root.iter("interface")] == p.macs  # type: ignore[union-attr]
    assert all(i.find("target") is None for i in root.iter("interface"))
    for ch in root.iter("channel"):
        assert ch.find("source").get("path") is None  # type: ignore[union-attr]
    for g in root.iter("graphics"):
        assert g.get("port") is None and g.get("tlsPort") is None
    serial = root.find("devices/serial")
    assert serial is not None and p.console in ET.tostring(serial, encoding="unicode")
    if p.domain_type == "qemu":
        assert (root.find("cpu") is None) or not root.find("cpu").get("mode", "").startswith("host")  # type: ignore[union-attr]
    if p.memory:
        assert root.findtext("memory") == str(p.memory // 1024)
    if p.cmdline_extra:
        assert root.findtext("os/cmdline", "").endswith(p.cmdline_extra)
    tag = parse_tag(ET.tostring(root.find("metadata")[-1], encoding="unicode"))  # type: ignore[index]
    assert tag is not None and tag.kind == "clone" and tag.attrs["run"] == RUN
    assert tag.volumes == [(d.pool, d.volume) for d in p.disks]


def test_a_plan_for_a_disk_the_base_lacks_is_refused() -> None:
    from kvmksm.errors import UserError

    with pytest.raises(UserError, match="base has no disk vdz"):
        clone_xml(base("nonic"), plan("batch01", disks=[disk("x", "vdz", "raw")]))

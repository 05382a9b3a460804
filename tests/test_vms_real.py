"""Real guests under qemu:///system: tiny clones start, come up and leave nothing behind, and
one that panics at boot is reported in one line with the kernel's reason.

Needs libvirtd (scripts/setup.sh starts it). Guests are TCG (<domain type='qemu'>), which
runs anywhere, including hosts whose /dev/kvm cannot run guests. A running guest is a KSM user
(QEMU marks its RAM mergeable), so each test holds the real-KSM lock while guests run.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import libvirt
import pytest

from kvmksm.host.ksm import Ksm
from kvmksm.host.qemu import names_guest
from kvmksm.scenario.model import VmsWorkload
from kvmksm.virt.boot import BootError
from kvmksm.virt.cleanup import find_leftovers
from kvmksm.virt.clones import Clones
from kvmksm.virt.tiny_image import CMDLINE, TinyImage

pytestmark = [pytest.mark.libvirt, pytest.mark.realksm]
URI = "qemu:///system"


def workload(tiny: TinyImage, **kw: object) -> VmsWorkload:
    data: dict[str, object] = {
        "type": "vms",
        "domain_type": "qemu",
        "base": {"domain": tiny.domain},
        "clones": 2,
        # 96 MiB guests: the smallest the tiny image is made for (fill <= memory - 64 MiB),
        # filling a little less than they could, so a slow host does not make them thrash.
        "memory": "96MiB",
        "guest_fill": {"size": "24MiB", "byte": "k"},
        "boot": {"timeout": "120s"},
    }
    data.update(kw)
    return VmsWorkload.model_validate(data)


def test_tiny_overlay_clones_come_up(
    conn: libvirt.virConnect, tiny: TinyImage, real_ksm: Ksm
) -> None:
    clones = Clones(conn, workload(tiny), record="pytest")
    try:
        t0 = time.monotonic()
        guests = clones.create()
        created = time.monotonic() - t0
        assert created < 2.0, f"cloning 2 guests took {created:.2f}s"
        for g in guests:
            dom = conn.lookupByName(g.name)
            assert not dom.isActive()
        clones.start()
        times = clones.wait_up()
        assert set(times) == {g.name for g in guests}
        pids = clones.pids()
        assert len(set(pids.values())) == 2
        for g in guests:
            cmdline = Path(f"/proc/{pids[g.name]}/cmdline").read_bytes()
            assert names_guest(cmdline, g.name)
            log = Path(g.console or "").read_text(errors="replace")
            assert "KVMKSM-READY fill=25165824 byte=107" in log
            # Every clone boots from its own overlay of the one base image.
            vol = conn.storageVolLookupByPath(
                conn.lookupByName(g.name).XMLDesc(0).split("<source file='")[1].split("'")[0]
            )
            assert str(tiny.image) in vol.XMLDesc(0)
        consoles = [Path(g.console or "") for g in guests]
    finally:
        problems = clones.teardown()
    assert problems == []
    left = find_leftovers(conn, clones.run)
    assert left.empty(), left.describe()
    assert not any(p.exists() for p in consoles)
    assert not conn.lookupByName(tiny.domain).isActive()


def test_guest_that_fails_is_reported_with_its_console(
    conn: libvirt.virConnect, tiny: TinyImage, real_ksm: Ksm
) -> None:
    """A base given as an image whose command line the guest rejects: the run fails fast
    with the guest's own words, and nothing is left."""
    base = {
        "image": str(tiny.image),
        "memory": "96MiB",
        "kernel": str(tiny.kernel),
        "initrd": str(tiny.initrd),
        "cmdline": f"{CMDLINE} kvmksm.fill=lots",
    }
    clones = Clones(conn, workload(tiny, base=base, clones=1, guest_fill=None))
    try:
        clones.create()
        clones.start()
        with pytest.raises(BootError) as e:
            clones.wait_up()
    finally:
        problems = clones.teardown()
    assert "reported a failure (KVMKSM-FAILED: bad kvmksm.fill=lots" in str(e.value)
    assert "  | " in e.value.tail
    assert problems == []
    assert find_leftovers(conn, clones.run).empty()


@pytest.mark.parametrize(
    ("memory", "fill", "cause"),
    [
        # a fill the kernel cannot hold (the rule is fill <= memory - 64 MiB): out of memory
        (
            "96MiB",
            "60MiB",
            r"System is deadlocked on memory \(in \S+ \(pid \d+\); out of memory, no "
            r"killable process\)",
        ),
        # just below the kernel's floor: decompressing itself, it overwrites the initramfs
        (
            "80MiB",
            None,
            r"VFS: Unable to mount root fs on unknown-block\(0,0\) \(in \S+ \(pid 1\); "
            r"initramfs unpacking failed: .*\)",
        ),
    ],
    ids=["fill-out-of-memory", "initramfs-overwritten"],
)
def test_guest_that_panics_at_boot_is_one_line(
    conn: libvirt.virConnect,
    tiny: TinyImage,
    real_ksm: Ksm,
    memory: str,
    fill: str | None,
    cause: str,
) -> None:
    """Sizes bench refuses beforehand, cloned here directly: the guest's kernel panics, and
    the run says so in one line, with the reason from the console, at once."""
    guest_fill = {"size": fill, "byte": "p"} if fill else None
    clones = Clones(conn, workload(tiny, clones=1, memory=memory, guest_fill=guest_fill))
    try:
        clones.create()
        clones.start()
        t0 = time.monotonic()
        with pytest.raises(BootError) as e:
            clones.wait_up()
        took = time.monotonic() - t0
    finally:
        problems = clones.teardown()
    first = str(e.value).splitlines()[0]
    name = clones.guests[0].name
    assert re.fullmatch(
        f"guest {name}: kernel panic during boot: {cause}; last console lines:", first
    ), first
    assert e.value.tail.startswith("  | ")
    assert took < 60, f"the panic took {took:.0f}s to be reported"
    assert problems == []
    assert find_leftovers(conn, clones.run).empty()

"""Real guests under qemu:///system: tiny clones start, come up and leave nothing behind.

Needs libvirtd (scripts/setup.sh starts it). Guests are TCG (<domain type='qemu'>), which
runs anywhere, including hosts whose /dev/kvm cannot run guests.
"""

from __future__ import annotations

import time
from pathlib import Path

import libvirt
import pytest

from kvmksm.host.qemu import names_guest
from kvmksm.scenario.model import VmsWorkload
from kvmksm.virt.boot import BootError
from kvmksm.virt.cleanup import find_leftovers
from kvmksm.virt.clones import Clones
from kvmksm.virt.tiny_image import CMDLINE, TinyImage

pytestmark = pytest.mark.libvirt
URI = "qemu:///system"


def workload(**kw: object) -> VmsWorkload:
    data: dict[str, object] = {
        "type": "vms",
        "domain_type": "qemu",
        "base": {"domain": "kvmksm-tiny"},
        "clones": 2,
        "memory": "256MiB",
        "guest_fill": {"size": "32MiB", "byte": "k"},
        "boot": {"timeout": "120s"},
    }
    data.update(kw)
    return VmsWorkload.model_validate(data)


def test_tiny_overlay_clones_come_up(conn: libvirt.virConnect, tiny: TinyImage) -> None:
    clones = Clones(conn, workload(), record="pytest")
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
            assert "KVMKSM-READY fill=33554432 byte=107" in log
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
    assert not conn.lookupByName("kvmksm-tiny").isActive()


def test_guest_that_fails_is_reported_with_its_console(
    conn: libvirt.virConnect, tiny: TinyImage
) -> None:
    """A base given as an image whose command line the guest rejects: the run fails fast
    with the guest's own words, and nothing is left."""
    base = {
        "image": str(tiny.image),
        "memory": "256MiB",
        "kernel": str(tiny.kernel),
        "initrd": str(tiny.initrd),
        "cmdline": f"{CMDLINE} kvmksm.fill=lots",
    }
    clones = Clones(conn, workload(base=base, clones=1, guest_fill=None))
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

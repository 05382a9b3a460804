"""`kvmksm watch` on the real host: a tiny guest merging under real KSM, a second guest
started mid-watch, and not one write to /sys/kernel/mm/ksm by watch.

The test (not watch) switches KSM on with fast knobs, under the real-KSM lock, and puts the
knobs back; watch only reads. Guests boot under TCG here (domain type qemu): 30-60 s.
"""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import libvirt
import pandas as pd
import pytest
from rich.console import Console

from kvmksm.host.fs import KSM_DIR, HostFS
from kvmksm.host.ksm import Ksm
from kvmksm.scenario.model import VmsWorkload
from kvmksm.virt.clones import Clones
from kvmksm.virt.tiny_image import TinyImage

from .test_watch import WriteGuard, assert_no_gaps, kinds, meta_of, watch

pytestmark = [pytest.mark.libvirt, pytest.mark.realksm]
URI = "qemu:///system"
FAST = {"pages_to_scan": 1000, "sleep_millisecs": 20}  # merges a tiny guest in seconds
WATCH_SECONDS = 30.0
SECOND_AT = 8.0  # seconds into the watch that the second guest starts


def one_guest(base: str) -> VmsWorkload:
    return VmsWorkload.model_validate(
        {
            "type": "vms",
            "domain_type": "qemu",
            "base": {"domain": base},
            "clones": 1,
            "memory": "136MiB",
            "guest_fill": {"size": "64MiB", "byte": "w"},
            "boot": {"timeout": "180s"},
        }
    )


def test_watch_records_a_merging_guest_and_one_that_starts_mid_watch(
    conn: libvirt.virConnect, tiny: TinyImage, real_ksm: Ksm, tmp_path: Path
) -> None:
    first = Clones(conn, one_guest(tiny.domain), record="pytest-watch")
    second = Clones(conn, one_guest(tiny.domain), record="pytest-watch")
    saved = real_ksm.read_knobs()
    out = io.StringIO()
    started: dict[str, float] = {}
    errors: list[BaseException] = []
    try:
        (g1,) = first.create()
        first.start()
        first.wait_up()  # filled its 64 MiB with one byte: pages KSM can merge
        pid1 = first.pids()[g1.name]
        (g2,) = second.create()  # defined now, started mid-watch

        real_ksm.set_knobs({**FAST, "run": 1})
        knobs = real_ksm.read_knobs()

        def start_second() -> None:
            try:
                time.sleep(SECOND_AT)
                second.start()
                started["second"] = time.monotonic()
            except BaseException as e:  # surfaced below, not lost in the thread
                errors.append(e)

        mp = pytest.MonkeyPatch()
        guard = WriteGuard(Path("/") / KSM_DIR, mp, compare_files=False)
        t = threading.Thread(target=start_second)
        t0 = time.monotonic()
        t.start()
        try:
            res = watch(
                tmp_path,
                duration=WATCH_SECONDS,
                connect=URI,
                fs=HostFS("/"),
                console=Console(file=out, width=300),
            )
        finally:
            t.join()
            mp.undo()
        guard.check()  # watch opened nothing under /sys/kernel/mm/ksm for writing
        assert not errors, errors
        # ...and the knobs are as the test set them, in the record and on the host.
        assert real_ksm.read_knobs() == knobs
        meta = meta_of(res.record_dir)
        assert meta["knobs_before"] == meta["knobs_after"] == knobs
        pid2 = second.pids()[g2.name]
    finally:
        problems = first.teardown() + second.teardown()
        real_ksm.restore(saved)
    assert problems == []

    assert res.status == "passed", res.error
    assert meta["kind"] == "watch"
    assert meta["host"]["libvirt_uri"] == URI and meta["host"].get("qemu")
    assert meta["host"]["libvirt_node_memory"]["shm_pages_to_scan"] == knobs["pages_to_scan"]
    appeared = {e["domain"]: e for e in kinds(meta, "guest_appeared")}
    assert "running when the watch started" in appeared[g1.name]["detail"]
    assert appeared[g2.name]["pid"] == pid2
    assert "running when the watch started" not in appeared[g2.name]["detail"]
    assert appeared[g2.name]["t"] >= started["second"] - t0 - 1.0
    assert f"guest appeared: {g2.name}" in out.getvalue()
    guests = {g["name"]: g for g in meta["guests"]}
    assert guests[g1.name]["memory_kb"] == 136 * 1024

    samples = pd.read_csv(res.record_dir / "samples.csv")
    vm = pd.read_csv(res.record_dir / "vm_samples.csv")
    assert len(samples) >= WATCH_SECONDS - 2
    assert samples["run"].eq(1).all()
    assert samples["pages_sharing"].max() > 0
    r1, r2 = vm[vm["domain"] == g1.name], vm[vm["domain"] == g2.name]
    assert r1["pid"].eq(pid1).all() and r2["pid"].eq(pid2).all()
    # The first guest is there from the first tick to the last and merges.
    assert r1["t"].min() == samples["t"].min() and r1["t"].max() == samples["t"].max()
    assert_no_gaps(samples, vm, g1.name)
    merged = r1["ksm_merging_pages"].max()
    assert merged > 64 * 1024 * 1024 // 4096 // 2, f"only {merged} merging pages"
    assert r1["rss_kb"].min() > 64 * 1024
    # The second one shows up once started and stays, without gaps.
    assert r2["t"].min() >= SECOND_AT - 1.0
    assert r2["t"].max() == samples["t"].max()
    assert_no_gaps(samples, vm, g2.name)
    assert (res.record_dir / "report.html").exists()
    assert not kinds(meta, "sampler_errors")

"""The sampler's schedule and its extra samples at the events a run pokes it for."""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from kvmksm.host.fs import HostFS
from kvmksm.results.events import Kind
from kvmksm.results.record import RunRecord
from kvmksm.sampling.sampler import Sampler

from .fakehost import set_counter


def test_poke_takes_a_sample_at_once_off_the_schedule(fake_root: Path, tmp_path: Path) -> None:
    """At 10 s a sample, a 1.5 s run would hold one row; poked at three events it holds the
    counters as they were at each, within milliseconds of the event."""
    rec = RunRecord.create(tmp_path, {"name": "poke"}, None)
    sampler = Sampler(HostFS(fake_root), rec, interval=10.0)
    sampler.start()
    rec.on_event = lambda kind: sampler.poke()
    times = []
    try:
        for value in (100, 200, 300):
            time.sleep(0.3)
            set_counter(fake_root, "pages_sharing", value)
            times.append(rec.event(Kind.SCANS_DONE, f"{value}")["t"])
            time.sleep(0.2)
    finally:
        rec.on_event = None
        sampler.stop()
    rows = pd.read_csv(rec.dir / "samples.csv")
    assert sampler.extra == 3 and sampler.errors == []
    assert list(rows["pages_sharing"]) == [0, 100, 200, 300, 300]  # first, 3 pokes, final
    for t_event, t_row in zip(times, rows["t"].iloc[1:4], strict=True):
        assert 0 <= t_row - t_event < 0.1
    # the schedule itself was not moved: one on-schedule tick at t=0, the final one at stop
    assert sampler.missed == 0 and len(sampler.lateness) == 1

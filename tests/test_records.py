"""Records that stay small: per-guest rows in CSV then hourly Parquet parts, read back in
chunks, exact plateau medians in bounded memory, old (format 1) records, and a sampler whose
memory does not grow with the ticks it has taken."""

from __future__ import annotations

import json
import math
import shutil
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kvmksm.analysis import per_guest
from kvmksm.analysis.group_median import group_medians
from kvmksm.analysis.metrics import analyse
from kvmksm.host.fs import HostFS
from kvmksm.results import guest_samples
from kvmksm.results.guest_samples import GuestSamples, GuestSamplesWriter
from kvmksm.results.record import FORMAT, RunRecord, load_record, read_vm_samples
from kvmksm.sampling import sampler as sampler_mod
from kvmksm.sampling.sampler import Sampler

from .recordgen import VmRun, vm_record

FIXTURES = Path(__file__).parent / "fixtures" / "records"
COLUMNS = [
    "t",
    "domain",
    "pid",
    "ksm_rmap_items",
    "ksm_zero_pages",
    "ksm_merging_pages",
    "ksm_process_profit",
    "rss_kb",
]


def tick_rows(t: float, guests: int) -> list[tuple]:
    return [
        (t, f"g{i:03d}", 100 + i, 5, None if i == 1 else 0, int(t) * 10 + i, int(t), 1000 + i)
        for i in range(guests)
    ]


def test_csv_for_the_first_stretch_then_one_complete_part_an_hour(tmp_path):
    w = GuestSamplesWriter(tmp_path, COLUMNS, switch_seconds=5, part_seconds=10, group_rows=7)
    for k in range(35):
        w.write_sequences(tick_rows(float(k), 3))
        assert w.parts_started == (k >= 5)
    w.close()
    csv = pd.read_csv(tmp_path / "vm_samples.csv")
    assert sorted(set(csv["t"])) == [0, 1, 2, 3, 4]  # t < 5 s
    parts = sorted(p.name for p in (tmp_path / "vm_samples").iterdir())
    assert parts == [f"part-000{i}.parquet" for i in range(4)]  # [5,10) [10,20) [20,30) [30,35)
    vm = read_vm_samples(tmp_path)
    assert vm is not None and len(vm) == 105 and list(vm.columns) == COLUMNS
    assert list(vm["t"]) == sorted(vm["t"])  # tick order, as the CSV has it
    assert vm["ksm_merging_pages"].tolist() == [
        int(r[5]) for k in range(35) for r in tick_rows(k, 3)
    ]
    assert vm["ksm_zero_pages"].isna().sum() == 35  # None stays missing in both forms
    # chunks cover the same rows, and skip the parts outside the asked stretch
    got = list(GuestSamples(tmp_path).chunks(["ksm_merging_pages"], 12.0, 21.0))
    t = np.concatenate([c.t for c in got])
    assert sorted(set(t)) == list(np.arange(12.0, 22.0)) and len(t) == 30
    assert all(c.by_guest for c in got)


def test_a_crash_loses_only_the_part_being_written(tmp_path):
    w = GuestSamplesWriter(tmp_path, COLUMNS, switch_seconds=0, part_seconds=10, group_rows=5)
    for k in range(25):  # parts 0 and 1 closed, part 2 open with two row groups written
        w.write_sequences(tick_rows(float(k), 2))
    assert w._parts is not None
    w._parts._wait()
    names = sorted(p.name for p in (tmp_path / "vm_samples").iterdir())
    assert names == [".part-0002.parquet.open", "part-0000.parquet", "part-0001.parquet"]
    # the process dies here: what a reader finds is every closed hour, whole
    vm = read_vm_samples(tmp_path)
    assert vm is not None and sorted(set(vm["t"])) == list(np.arange(0.0, 20.0))
    w.close()
    assert len(read_vm_samples(tmp_path)) == 50


def test_at_most_ten_bytes_a_guest_sample(tmp_path):
    # two hours of 50 guests whose figures move every tick (recordgen's noise)
    d = vm_record(tmp_path / "r", VmRun(guests=50, duration=2 * 3600 - 1, noise=0.05))
    parts = list((d / "vm_samples").glob("part-*.parquet"))
    assert [p.name for p in parts] == ["part-0001.parquet"]
    rows = 3600 * 50
    per_sample = sum(p.stat().st_size for p in parts) / rows
    assert per_sample < 10, per_sample
    assert per_sample < (d / "vm_samples.csv").stat().st_size / rows / 5  # the first hour


def test_format_1_per_guest_figures_are_what_format_1_computed(tmp_path):
    """A format-1 VM record (vm_samples.csv alone; one guest late, one value missing) gives
    the per-guest figures, the reconciliation and every metric that the format-1 code, which
    pivoted the whole table, computed from it (tests/fixtures/format1-vms-expected.json,
    written by commit d3fbc37). tests/test_record_formats.py covers the real old records."""
    d = shutil.copytree(FIXTURES / "format1-vms", tmp_path / "format1-vms")
    expected = json.loads((FIXTURES.parent / "format1-vms-expected.json").read_text())
    assert json.loads((d / "run.json").read_text())["format"] == 1 < FORMAT
    a = analyse(load_record(d))
    got = {k: m["value"] for k, m in a.metrics.items()}
    assert expected["metrics"].keys() <= got.keys()
    for k, v in expected["metrics"].items():
        assert _same(got[k], v), (k, got[k], v)
    assert a.vm is not None
    assert _same(a.vm.rows, expected["vm_rows"])
    assert _same(a.vm.reconciliation, expected["reconciliation"])
    assert _same(a.vm.coverage_pct, expected["coverage_pct"])


def _same(a, b) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, int | float):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12)
    return a == b


def test_plateau_read_again_gives_what_the_kept_rows_give(tmp_path, monkeypatch):
    d = vm_record(tmp_path / "r", VmRun(guests=5, duration=1800, noise=0.05))
    vm = pd.read_csv(d / "vm_samples.csv")
    guest = vm["domain"].str[-1].astype(int)
    vm["ksm_merging_pages"] += guest * (vm["t"].astype(int) % 7)  # each guest its own median
    vm.to_csv(d / "vm_samples.csv", index=False)
    kept = analyse(load_record(d)).vm
    monkeypatch.setattr(per_guest, "KEEP_PLATEAU_ROWS", 10)  # too many to keep: read again
    again = analyse(load_record(d)).vm
    assert kept is not None and again is not None
    assert again.rows == kept.rows and again.reconciliation == kept.reconciliation
    merging = [r["merging_pages"] for r in kept.rows]
    assert len(set(merging)) > 1  # the guests differ, so the medians are each their own


@pytest.mark.parametrize("seed", range(8))
def test_group_medians_are_exact(seed):
    rng = np.random.default_rng(seed)
    groups, n = int(rng.integers(1, 9)), int(rng.integers(0, 400))
    codes = rng.integers(0, groups, n)
    scale = [3, 1000, 10**6, 10**15][seed % 4]
    a = rng.integers(-scale, scale, n).astype(float)
    a[rng.random(n) < 0.1] = np.nan  # a row without this value
    b = rng.integers(0, 7, n)  # integers, nothing missing

    def blocks(columns):
        for i in range(0, n, 37):
            cols = {"a": a[i : i + 37], "b": b[i : i + 37]}
            yield codes[i : i + 37], {k: v for k, v in cols.items() if not columns or k in columns}

    got = group_medians(blocks, groups, bins=int(rng.integers(2, 9)))
    for name, values in (("a", a), ("b", b.astype(float))):
        for g in range(groups):
            mine = values[(codes == g) & ~np.isnan(values)]
            want = float(np.median(mine)) if len(mine) else np.nan
            assert _same(float(got[name][g]), want) or (np.isnan(want) and np.isnan(got[name][g]))


class _Guests:
    """A probe of many guests whose rows cost nothing to make."""

    filename = guest_samples.VM_SAMPLES
    columns = COLUMNS

    def __init__(self, guests: int) -> None:
        self.guests = guests

    def rows(self, t: float) -> list[tuple]:
        return tick_rows(t, self.guests)


def test_a_long_watch_holds_the_same_memory(fake_root, tmp_path, monkeypatch):
    """Thousands of ticks of 100 guests into hourly parts: memory after 3,000 ticks is what
    it was after 1,000 (nothing kept per tick: rows, lateness, errors)."""
    monkeypatch.setattr(guest_samples, "SWITCH_SECONDS", 100.0)
    monkeypatch.setattr(guest_samples, "PART_SECONDS", 500.0)
    monkeypatch.setattr(guest_samples, "GROUP_ROWS", 5_000)
    rec = RunRecord.create(tmp_path, {"name": "long"}, None, kind="watch")
    clock = iter(range(10**9))
    monkeypatch.setattr(rec, "now", lambda: float(next(clock)))  # a second a tick
    sampler = Sampler(HostFS(fake_root), rec, interval=1.0, probes=[_Guests(100)])
    for _ in range(500):  # through the CSV stretch and into the first part
        sampler.tick()
    tracemalloc.start()
    try:
        for _ in range(1000):
            sampler.tick()
        first = tracemalloc.get_traced_memory()[0]
        for _ in range(2000):
            sampler.tick()
        last = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
        sampler.stop(final_tick=False)
    assert last - first < 2_000_000, (first, last)  # one row group's buffer at most
    names = sorted(p.name for p in (rec.dir / "vm_samples").iterdir())
    assert names == [f"part-000{i}.parquet" for i in range(7)]  # 100 .. 3,499 s by 500 s
    assert len(read_vm_samples(rec.dir)) == 3500 * 100


def test_lateness_and_errors_kept_are_bounded(fake_root, tmp_path, monkeypatch):
    monkeypatch.setattr(sampler_mod, "LATENESS_KEPT", 20)
    monkeypatch.setattr(sampler_mod, "ERRORS_KEPT", 3)

    class Broken(_Guests):
        def rows(self, t: float) -> list[tuple]:
            raise OSError("a guest's files cannot be read")

    rec = RunRecord.create(tmp_path, {"name": "bounded"}, None)
    sampler = Sampler(HostFS(fake_root), rec, interval=0.002, probes=[Broken(1)])
    sampler.start()
    time.sleep(0.4)
    sampler.stop(final_tick=False)
    assert sampler.ticks > 40 and len(sampler.lateness) == 20
    assert sampler.late_max >= max(sampler.lateness)
    assert len(sampler.errors) == 3 and sampler.error_count >= sampler.ticks

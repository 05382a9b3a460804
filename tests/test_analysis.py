"""Derived metrics on records with known curves (built in tests/recordgen.py)."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest

from kvmksm.analysis.metrics import (
    analyse,
    compute_metrics,
    crossing_time,
    ksmd_cpu_seconds,
    windows,
)
from kvmksm.results.record import load_record

from .recordgen import MIB, PAGE, VmRun, ltp_record, vm_record


def values(directory) -> dict:
    return {k: m["value"] for k, m in compute_metrics(load_record(directory)).items()}


@pytest.fixture
def vm_dir(tmp_path):
    # 3 guests x 256 MiB; pages_shared ramps 0 -> 32000 over t=100..300 (KSM on at 100),
    # so pages_sharing = 2 x 32000 = 64000 pages = 250 MiB; steady at 300, unmerge at 600.
    return vm_record(tmp_path / "vm")


def test_savings_and_ceiling_on_a_ramp(vm_dir):
    v = values(vm_dir)
    assert v["ksm_on_s"] == 100.0
    assert v["plateau_window_s"] == [300.0, 600.0]
    assert v["plateau_saved_mib"] == 250.0
    assert v["peak_saved_mib"] == 250.0
    assert v["guest_memory_mib"] == 768.0
    assert v["plateau_saved_pct"] == round(250 / 768 * 100, 4)
    assert v["ceiling_pct"] == round(2 / 3 * 100, 4)
    assert v["plateau_saved_pct_of_ceiling"] == round(250 / 512 * 100, 4)


def test_times_to_half_and_ninety_percent_on_a_ramp(vm_dir):
    v = values(vm_dir)
    # a straight line from 0 at t=100 to the plateau at t=300
    assert v["time_to_50pct_s"] == 100.0
    assert v["time_to_90pct_s"] == 180.0


def test_times_on_a_logistic_rise(tmp_path):
    run = VmRun(shape="logistic", rise=200.0)  # midpoint t=200, rate 0.05/s
    d = vm_record(tmp_path / "log", run)
    v = values(d)
    plateau_pages = v["plateau_saved_mib"] * MIB / PAGE / 2  # pages_shared on the plateau
    for frac, key in ((0.5, "time_to_50pct_s"), (0.9, "time_to_90pct_s")):
        p = frac * plateau_pages / run.shared_top
        expected = 200.0 + math.log(p / (1 - p)) / 0.05 - run.t_on
        assert v[key] == pytest.approx(expected, abs=0.05)
    assert v["time_to_90pct_s"] == pytest.approx(100 + math.log(9) / 0.05, abs=0.1)


def test_ksmd_cost(vm_dir):
    v = values(vm_dir)
    # 50% of a CPU for the 200 s of the rise, 5% for the 300 s of the plateau
    assert v["ksmd_cpu_s"] == 115.0
    assert v["ksmd_cpu_to_plateau_s"] == 100.0
    assert v["ksmd_cpu_plateau_pct"] == 5.0
    assert v["mib_per_cpu_s"] == 2.5


def test_profit_unmerge_and_scan_rate(vm_dir):
    v = values(vm_dir)
    # 64000 pages saved minus 3 x 65536 rmap_items of 64 bytes
    assert v["general_profit_mib"] == (64000 * PAGE - 3 * 65536 * 64) / MIB == 238.0
    assert v["unmerge_s"] == 2.5
    assert v["scan_rate"] == 40000.0
    assert v["scan_rate_configured"] == 1000 / 0.020
    assert v["scan_rate_pct"] == 80.0
    assert v["full_scans"] == (500 * 40000) // (3 * 65536)


def test_zero_pages_count_as_saved(tmp_path):
    d = vm_record(tmp_path / "z", zero_top=1280)
    assert values(d)["plateau_saved_mib"] == (64000 + 1280) * PAGE / MIB == 255.0


def test_each_metric_has_unit_and_definition(vm_dir):
    metrics = compute_metrics(load_record(vm_dir))
    for key, m in metrics.items():
        assert set(m) >= {"label", "value", "unit", "definition"}, key
        assert m["definition"].endswith("."), key
    json.dumps(metrics, allow_nan=False)  # storable in run.json as is


def test_pure_function_of_the_directory(vm_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(vm_dir, copy)
    first = json.dumps(compute_metrics(load_record(vm_dir)), sort_keys=True)
    assert json.dumps(compute_metrics(load_record(vm_dir)), sort_keys=True) == first
    assert json.dumps(compute_metrics(load_record(copy)), sort_keys=True) == first


def test_per_vm_attribution_and_reconciliation(vm_dir):
    vm = analyse(load_record(vm_dir)).vm
    assert vm is not None
    assert [r["domain"] for r in vm.rows] == ["clone01", "clone02", "clone03"]
    for i, row in enumerate(vm.rows):
        assert row["pid"] == 4001 + i
        assert row["merging_pages"] == 32000
        assert row["merged_mib"] == 125.0
        assert row["merged_pct"] == 125 / 256 * 100
        assert row["saved_mib"] == pytest.approx(250 / 3)  # 32000 x 2/3 of a page each
        assert row["memory_mib"] == 256
    assert sum(r["saved_mib"] for r in vm.rows) == pytest.approx(250.0)
    recon = {r["global"]: r for r in vm.reconciliation}
    merged = recon["pages_shared + pages_sharing"]
    assert (merged["sum"], merged["global_value"], merged["pct"]) == (96000, 96000, 100.0)
    profit = recon["general_profit"]
    assert profit["sum"] == profit["global_value"] == 238.0
    assert vm.coverage_pct == 100.0


def test_other_ksm_users_show_as_a_shortfall(tmp_path):
    d = vm_record(tmp_path / "other", other_pages=4000)
    a = analyse(load_record(d))
    merged = a.vm.reconciliation[0]
    assert merged["sum"] == 96000 and merged["global_value"] == 100000
    assert a.metrics["vm_coverage_pct"]["value"] == 96.0


def test_without_steady_event_the_plateau_is_the_last_tenth(tmp_path):
    d = vm_record(tmp_path / "nosteady", steady=None)
    w = windows(load_record(d))
    assert (w.plateau_start, w.plateau_end) == (550.0, 600.0)
    assert "no steady event" in w.plateau_source
    assert values(d)["plateau_saved_mib"] == 250.0


def test_older_kernel_without_some_counters(tmp_path):
    d = vm_record(
        tmp_path / "old", drop=("ksm_zero_pages", "general_profit", "pages_scanned", "ksmd_cpu")
    )
    m = compute_metrics(load_record(d))
    assert m["plateau_saved_mib"]["value"] == 250.0
    for key in ("general_profit_mib", "scan_rate", "scan_rate_pct", "ksmd_cpu_s", "mib_per_cpu_s"):
        assert m[key]["value"] is None, key
    assert "6.1" in m["general_profit_mib"]["note"]
    assert "6.7" in m["scan_rate"]["note"]
    assert m["scan_rate_configured"]["value"] == 50000.0


def test_ltp_processes_record(tmp_path):
    d = ltp_record(tmp_path / "ltp")
    a = analyse(load_record(d))
    v = {k: m["value"] for k, m in a.metrics.items()}
    assert a.vm is None and "vm_coverage_pct" not in v
    assert v["ksm_on_s"] == 1.6
    assert v["guest_memory_mib"] == 384.0  # 3 x 128 MiB
    assert v["plateau_saved_mib"] == round(98302 * PAGE / MIB, 4)  # round 4: 98302 sharing
    assert v["unmerge_s"] == 0.05
    assert v["scan_rate_configured"] is None
    assert "sleep_millisecs is 0" in a.metrics["scan_rate_configured"]["note"]


def test_watch_record_with_ksm_already_on(tmp_path):
    d = vm_record(tmp_path / "watch", t_on=0.0, steady=None, unmerge=None, duration=200.0)
    run = json.loads((d / "run.json").read_text())
    run["events"] = [e for e in run["events"] if e["kind"] not in ("ksm_on", "ksm_off")]
    (d / "run.json").write_text(json.dumps(run))
    w = windows(load_record(d))
    assert w.t_on == 0.0 and w.on_source == "KSM was already on at the first sample"
    assert w.merge_end == 199.0  # the teardown event


def test_empty_record_gives_no_values(tmp_path):
    d = vm_record(tmp_path / "empty", with_vm=False)
    (d / "samples.csv").write_text("t,time,pages_shared,pages_sharing\n")
    m = compute_metrics(load_record(d))
    assert m["plateau_saved_mib"]["value"] is None
    assert m["time_to_50pct_s"]["value"] is None


def test_crossing_time_interpolates_and_clamps():
    t = np.array([0.0, 1.0, 2.0, 3.0])
    y = np.array([0.0, 10.0, 20.0, 20.0])
    assert crossing_time(t, y, 15.0, 0.0) == 1.5
    assert crossing_time(t, y, 5.0, 0.8) == 0.8  # reached before the start: the start
    assert crossing_time(t, y, 25.0, 0.0) is None


def test_ksmd_cpu_seconds_weights_each_row_by_its_interval():
    s = pd.DataFrame({"t": [0.0, 1.0, 3.0, 4.0], "ksmd_cpu": [99.0, 50.0, 25.0, 100.0]})
    assert ksmd_cpu_seconds(s) == 0.5 + 0.5 + 1.0  # the first row has no interval
    assert ksmd_cpu_seconds(s, after=1.0, upto=3.0) == 0.5


def test_guest_missing_some_samples(tmp_path):
    # clone02 came up late: no rows before t=350; the pivot must not shift anybody's values
    d = vm_record(tmp_path / "late")
    vm = pd.read_csv(d / "vm_samples.csv")
    vm = vm[~((vm["domain"] == "clone02") & (vm["t"] < 350))]
    vm.to_csv(d / "vm_samples.csv", index=False)
    a = analyse(load_record(d))
    assert [r["merging_pages"] for r in a.vm.rows] == [32000, 32000, 32000]
    assert [r["pid"] for r in a.vm.rows] == [4001, 4002, 4003]
    # the stacked chart's buckets: 701 ticks in buckets of 2; clone02 has no row in
    # ticks 348-349 (bucket 174), and one in each of 350-351
    assert a.vm.merging.values.shape == (351, 3)
    assert np.isnan(a.vm.merging.values[174, 1])
    assert a.vm.merging.values[175, 1] == a.vm.merging.values[175, 0]
    assert a.vm.coverage_pct == 100.0  # median over the plateau: 250 of 300 ticks complete


def test_parquet_parts_give_the_same_analysis_as_csv(tmp_path):
    # the same rows, once as a short run writes them (CSV) and once as a long one (parts)
    from kvmksm.results.guest_samples import GuestSamplesWriter

    d = vm_record(tmp_path / "csv", guests=4, noise=0.05)
    vm = pd.read_csv(d / "vm_samples.csv")
    parted = tmp_path / "parts"
    shutil.copytree(d, parted)
    (parted / "vm_samples.csv").unlink()
    w = GuestSamplesWriter(parted, list(vm.columns), switch_seconds=0.0, part_seconds=100.0)
    w.write_frame(vm)
    w.close()
    assert len(list((parted / "vm_samples").glob("part-*.parquet"))) == 8
    plain, parts = analyse(load_record(d)).vm, analyse(load_record(parted)).vm
    assert plain is not None and parts is not None
    assert parts.rows == plain.rows and parts.reconciliation == plain.reconciliation
    assert np.array_equal(parts.merging.values, plain.merging.values, equal_nan=True)
    assert np.array_equal(parts.merging.t, plain.merging.t)

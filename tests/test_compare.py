"""kvmksm compare on synthetic records with known answers, the statistics, the Pareto front,
and the per-record figures both workloads share (analysis.metrics)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from rich.console import Console
from scipy import stats

from kvmksm.analysis.metrics import aligned_curve, analyse, saved_at_plateau
from kvmksm.analysis.pareto import pareto_front
from kvmksm.analysis.stats import difference
from kvmksm.analysis.windows import saved_pages, windows
from kvmksm.commands import compare
from kvmksm.errors import UserError
from kvmksm.results.record import load_record
from kvmksm.views import terminal

from .recordgen import MIB, PAGE, ltp_record, vm_record


def edit(directory: Path, **changes: Any) -> Path:
    """Change run.json fields: host__kernel_release='6.1' sets meta['host']['kernel_release']."""
    path = directory / "run.json"
    meta = json.loads(path.read_text())
    for key, value in changes.items():
        *parents, last = key.split("__")
        node = meta
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path.write_text(json.dumps(meta))
    return directory


def runs_of(
    tmp_path: Path, name: str, tops: list[int], kernel: str = "6.18.0-test", **over: Any
) -> list[Path]:
    """One VM record per entry of `tops` (pages_shared at the plateau: the saving is
    2 x top pages of 4 KiB for 3 guests), all on `kernel`."""
    out = []
    for i, top in enumerate(tops):
        d = vm_record(tmp_path / name / f"r{i}", shared_top=top, **over)
        out.append(edit(d, host__kernel_release=kernel))
    return out


def saved_mib(top: int) -> float:
    return 2 * top * PAGE / MIB


def metric(cmp: compare.Comparison, key: str) -> dict[str, Any]:
    return next(m for m in cmp.metrics if m["key"] == key)


# -- the statistics -------------------------------------------------------------------------
def test_welch_by_hand() -> None:
    d = difference([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    # equal variances 1 and n 3: se = sqrt(1/3 + 1/3), t = 3 / se = 3.674, df = 4
    se = math.sqrt(2 / 3)
    assert d["diff"] == 3.0 and d["diff_pct"] == 150.0
    assert d["df"] == pytest.approx(4.0)
    assert d["p"] == pytest.approx(2 * stats.t.sf(3 / se, 4))
    assert d["p"] == pytest.approx(0.02131, abs=1e-4)
    half = stats.t.ppf(0.975, 4) * se
    assert d["ci95"] == pytest.approx([3 - half, 3 + half])
    assert d["verdict"] == "beyond noise"


def test_verdicts_noise_too_few_and_exact() -> None:
    assert difference([10, 11, 9], [10.5, 9.5, 10.2])["verdict"] == "within noise"
    few = difference([10, 11], [20, 21, 22])
    assert few["verdict"] == "too few repeats to tell" and few["p"] is None
    assert few["diff"] == pytest.approx(10.5)
    # exact counters: no spread on either side
    assert difference([5, 5, 5], [5, 5, 5])["verdict"] == "same"
    assert difference([5, 5, 5], [6, 6, 6])["verdict"] == "beyond noise"
    assert difference([], [1, 2, 3])["verdict"] == "no data"


# -- comparing records ----------------------------------------------------------------------
def test_kernel_difference_flagged_and_named(tmp_path: Path) -> None:
    old = runs_of(tmp_path, "old", [32000, 32200, 31800], kernel="6.1.0-test")
    new = runs_of(tmp_path, "new", [36000, 36200, 35800], kernel="6.18.0-test")
    cmp = compare.compare(compare.collect([tmp_path / "old", tmp_path / "new"]))
    a, b = cmp.groups
    assert (a.label, len(a.runs)) == ("kernel=6.1.0-test", 3)
    assert (b.label, len(b.runs)) == ("kernel=6.18.0-test", 3)
    assert [d["field"] for d in cmp.differences] == ["host.kernel_release"]
    assert cmp.warnings == []
    m = metric(cmp, "plateau_saved_mib")
    assert m["groups"]["A"]["mean"] == pytest.approx(saved_mib(32000))
    assert m["groups"]["B"]["mean"] == pytest.approx(saved_mib(36000))
    assert m["groups"]["A"]["sd"] == pytest.approx(saved_mib(200))
    d = m["vs_baseline"]["B"]
    assert d["diff"] == pytest.approx(saved_mib(4000))  # 31.25 MiB
    assert d["verdict"] == "beyond noise" and d["better"] is True and d["p"] < 1e-4
    assert d["ci95"][0] < saved_mib(4000) < d["ci95"][1]
    # the curves rose at the same pace: the time to 50% is the same for all runs
    assert metric(cmp, "time_to_50pct_s")["vs_baseline"]["B"]["verdict"] == "same"
    assert len(old) == len(new) == 3


def test_noise_not_flagged(tmp_path: Path) -> None:
    runs_of(tmp_path, "a", [32000, 32200, 31800], kernel="6.1.0-test")
    runs_of(tmp_path, "b", [32100, 31850, 32150], kernel="6.18.0-test")
    cmp = compare.compare(compare.collect([tmp_path / "a", tmp_path / "b"]))
    d = metric(cmp, "plateau_saved_mib")["vs_baseline"]["B"]
    assert d["verdict"] == "within noise" and d["p"] > 0.5
    assert "better" not in d
    assert d["ci95"][0] < 0 < d["ci95"][1]


def test_too_few_repeats_said(tmp_path: Path) -> None:
    runs_of(tmp_path, "a", [32000, 32200], kernel="6.1.0-test")
    runs_of(tmp_path, "b", [36000, 36200], kernel="6.18.0-test")
    cmp = compare.compare(compare.collect([tmp_path / "a", tmp_path / "b"]))
    d = metric(cmp, "plateau_saved_mib")["vs_baseline"]["B"]
    assert d["verdict"] == "too few repeats to tell"
    assert d["diff"] == pytest.approx(saved_mib(4000))
    assert any("too few repeats" in w and "A, B" in w for w in cmp.warnings)


def test_repeats_pooled_across_arguments_and_by_argument(tmp_path: Path) -> None:
    runs_of(tmp_path, "x", [32000, 32100])
    runs_of(tmp_path, "y", [31900])
    pooled = compare.compare(compare.collect([tmp_path / "x", tmp_path / "y"]))
    assert [len(g.runs) for g in pooled.groups] == [3]  # same configuration: repeats
    assert pooled.groups[0].label == "all runs" and pooled.differences == []
    split = compare.compare(compare.collect([tmp_path / "x", tmp_path / "y"]), by_argument=True)
    assert [(g.label, len(g.runs)) for g in split.groups] == [("x", 2), ("y", 1)]


def test_libvirt_counters_do_not_split_repeats(tmp_path: Path) -> None:
    """libvirt's node-memory-tune view in the host facts holds KSM counters, different in
    every run: records alike in all else are still repeats."""
    for i, scans in enumerate((15503, 15871, 16002)):
        d = vm_record(tmp_path / "x" / f"r{i}", shared_top=32000 + 100 * i)
        edit(d, host__libvirt_node_memory={"shm_full_scans": scans, "shm_pages_to_scan": 1000})
    cmp = compare.compare(compare.collect([tmp_path / "x"]))
    assert [len(g.runs) for g in cmp.groups] == [3]
    assert "host.libvirt_node_memory" not in cmp.groups[0].config


def test_different_scenarios_warned(tmp_path: Path) -> None:
    vm_record(tmp_path / "vm")
    ltp_record(tmp_path / "ltp")
    cmp = compare.compare(compare.collect([tmp_path / "vm", tmp_path / "ltp"]))
    assert cmp.warnings[0].startswith("NOT COMPARABLE: the records ran different workloads")
    assert any(w.startswith("different scenarios: the groups differ in") for w in cmp.warnings)
    kinds = {d["field"]: d["kind"] for d in cmp.differences}
    assert kinds["host.kernel_release"] == "kernel"
    assert kinds["scenario.workload.type"] == "scenario"
    assert kinds["scenario.name"] == "scenario"
    assert next(d for d in cmp.differences if d["field"] == "scenario.name")["soft"] is True


def test_host_difference_and_unfinished_records(tmp_path: Path) -> None:
    runs_of(tmp_path, "a", [32000])
    (b,) = runs_of(tmp_path, "b", [32000])
    edit(b, host__hostname="otherhost")
    (c,) = runs_of(tmp_path, "c", [32000])
    edit(c, status="interrupted")
    cmp = compare.compare(compare.collect([tmp_path / "a", b, c]))
    assert [g.label for g in cmp.groups] == ["host=testhost", "host=otherhost"]
    assert any(w.startswith("different hosts") for w in cmp.warnings)
    assert cmp.excluded == [{"record": str(c), "status": "interrupted"}]
    assert any("left out because they did not finish (interrupted)" in w for w in cmp.warnings)


def test_nothing_to_compare(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such run record or experiment folder"):
        compare.collect([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no run record or experiment"):
        compare.collect([tmp_path / "empty"])


# -- curves, cost and benefit -------------------------------------------------------------
def test_curves_aligned_at_ksm_on(tmp_path: Path) -> None:
    early = load_record(vm_record(tmp_path / "early", t_on=100.0, steady=300.0))
    late = load_record(vm_record(tmp_path / "late", t_on=150.0, steady=350.0))
    ce, cl = aligned_curve(early), aligned_curve(late)
    for c in (ce, cl):
        assert (c.loc[c["t"] < 0, "saved_mib"] == 0).all()
        # halfway up the 200 s ramp, 100 s after KSM on: half the plateau
        assert c.loc[c["t"] == 100.0, "saved_mib"].item() == pytest.approx(saved_mib(16000))


def test_pareto_front_by_hand() -> None:
    # (cost, benefit): C is dominated by B (costs more, saves less); D ties B's cost but
    # saves less; A is cheapest; E saves most.
    pts = [(1.0, 10.0), (2.0, 30.0), (3.0, 20.0), (2.0, 25.0), (5.0, 40.0)]
    assert pareto_front(pts) == [True, True, False, False, True]
    assert pareto_front([(1.0, 1.0), (1.0, 1.0)]) == [True, True]  # equals do not dominate


def test_knob_sweep_cost_benefit(tmp_path: Path) -> None:
    """Three pages_to_scan settings, three repeats each, with known savings and ksmd CPU
    (cpu_rise % over the 200 s rise): 1000 saves most for least, 4000 is dominated."""
    setups = {1000: (36000, 30.0), 2000: (34000, 20.0), 4000: (33000, 40.0)}
    for pts, (top, cpu) in setups.items():
        for r, jitter in enumerate((-100, 0, 100)):
            vm_record(
                tmp_path / f"p{pts}" / f"r{r}",
                shared_top=top + jitter,
                cpu_rise=cpu,
                pages_to_scan=pts,
            )
    cmp = compare.compare(compare.collect(sorted(tmp_path.iterdir())))
    assert [g.label for g in cmp.groups] == [
        "pages_to_scan=1000",
        "pages_to_scan=2000",
        "pages_to_scan=4000",
    ]
    assert cmp.pareto is not None
    front = {p["label"]: p["front"] for p in cmp.pareto["points"]}
    assert front == {
        "pages_to_scan=1000": True,
        "pages_to_scan=2000": True,  # cheaper than 1000, though it saves less
        "pages_to_scan=4000": False,  # saves less than 1000 and costs more
    }
    cost = {p["label"]: p["x"] for p in cmp.pareto["points"]}
    assert cost["pages_to_scan=2000"] == pytest.approx(20.0 / 100 * 200)  # 40 CPU s
    cpu = metric(cmp, "ksmd_cpu_to_plateau_s")
    assert cpu["vs_baseline"]["B"]["verdict"] == "beyond noise" or cpu["groups"]["B"]["sd"] == 0


# -- output -------------------------------------------------------------------------------------
def test_cli_json_html_and_terminal(tmp_path: Path) -> None:
    runs_of(tmp_path, "old", [32000, 32200, 31800], kernel="6.1.0-test")
    runs_of(tmp_path, "new", [36000, 36200, 35800], kernel="6.18.0-test")
    html = tmp_path / "cmp.html"
    proc = subprocess.run(
        [sys.executable, "-m", "kvmksm", "compare", str(tmp_path / "old"), str(tmp_path / "new"),
         "-o", str(html), "--json"],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["html"] == str(html)
    assert [g["label"] for g in data["groups"]] == ["kernel=6.1.0-test", "kernel=6.18.0-test"]
    m = next(m for m in data["metrics"] if m["key"] == "plateau_saved_mib")
    assert m["vs_baseline"]["B"]["verdict"] == "beyond noise"
    page = html.read_text()
    assert page.count("<svg") == 1  # the overlay; no knob sweep, so no Pareto chart
    assert "beyond noise (better)" in page and "host.kernel_release" in page
    assert "http://" not in page.replace('"http://www.w3.org', "")  # self-contained
    # the terminal table
    cmp = compare.compare(compare.collect([tmp_path / "old", tmp_path / "new"]))
    console = Console(record=True, width=200)
    terminal.comparison(cmp, console)
    text = console.export_text()
    assert "A = kernel=6.1.0-test (3 run(s))" in text
    assert "beyond noise, better, p=" in text and "+31.2 (+12.5%)" in text


def test_bad_input_exits_2(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "kvmksm", "compare", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        == f"kvmksm: {tmp_path / 'nope'}: no such run record or experiment folder"
    )


# -- the processes figures ------------------------------------------------------------------
def test_processes_savings_at_end_of_last_fill(tmp_path: Path) -> None:
    """LTP ksm03's shape: four fills, then unmerge. The last fill's scans end at t=8.3 and
    the unmerge starts at 9.55: the sample at t=9 holds its saving, 98302 pages."""
    rec = load_record(ltp_record(tmp_path / "ltp"))
    w = windows(rec)
    assert (w.t_on, w.plateau_start, w.plateau_end) == (1.6, 8.3, pytest.approx(9.55))
    assert w.where == "at the end of the last fill"
    saved = saved_pages(rec.samples) * PAGE / MIB
    assert saved_at_plateau(rec, saved, w) == (pytest.approx(98302 * PAGE / MIB), w.plateau_source)
    a = analyse(rec)
    assert a.workload == "processes" and a.guests == 3 and a.guest_bytes == 128 * MIB
    assert a.value("plateau_saved_mib") == pytest.approx(98302 * PAGE / MIB, abs=1e-4)
    assert a.value("plateau_saved_pct") == pytest.approx(98302 / 98304 * 100, abs=1e-3)
    # ksmd at 95% in the rows after KSM on (t=1.6) up to the scans' end (8.3): t=2..8
    assert a.value("ksmd_cpu_to_plateau_s") == pytest.approx(7 * 0.95)
    assert a.value("mib_per_cpu_s") == pytest.approx(98302 * PAGE / MIB / 6.65, rel=1e-4)
    assert a.value("unmerge_s") == pytest.approx(0.05)
    # 0 pages at t=1, 98302 at t=2: linear between them, half is reached at t=1.5, before
    # KSM went on (1.6); crossing_time never answers before the start it is given
    assert a.value("time_to_50pct_s") == 0.0
    assert a.value("time_to_90pct_s") == pytest.approx(1.9 - 1.6)
    # (N-1)/N means nothing for processes that repeat their content: not shown
    assert a.value("ceiling_pct") is None and "not defined" in a.metrics["ceiling_pct"]["note"]


def test_processes_savings_from_the_check_without_a_sample(tmp_path: Path) -> None:
    """No sample between the scans' end and the unmerge: the step's own check says it."""
    rec_dir = ltp_record(tmp_path / "ltp")
    samples = pd.read_csv(rec_dir / "samples.csv")
    samples[samples["t"] != 9.0].to_csv(rec_dir / "samples.csv", index=False)
    rec = load_record(rec_dir)
    saved = saved_pages(rec.samples) * PAGE / MIB
    value, how = saved_at_plateau(rec, saved, windows(rec))
    assert how == "the step's exact check of pages_sharing"
    assert value == pytest.approx(98302 * PAGE / MIB)
    a = analyse(rec)
    assert a.metrics["plateau_saved_mib"]["note"] == f"from {how}"
    # the curve still has its crossings: the plateau's own figure ends it
    assert a.value("time_to_90pct_s") == pytest.approx(1.9 - 1.6)

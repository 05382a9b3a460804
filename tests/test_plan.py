"""kvmksm plan: the projection against hand calculations, on synthetic and real records."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from scipy import stats

from kvmksm.commands import compare, plan, plan_check
from kvmksm.errors import UserError
from kvmksm.host.ksm import Ksm
from kvmksm.results.experiment import load_runs
from kvmksm.views import terminal
from kvmksm.views.plan_chart import plan_chart

from .recordgen import MIB, PAGE, ltp_record, vm_record
from .test_experiment import run_alone

GIB = 1024 * MIB


def clone_sweep(tmp_path: Path, counts=(2, 4, 8), repeats: int = 1, **over) -> Path:
    """VM records of N identical 256 MiB guests: pages_sharing = 32000 x (N-1) on the plateau,
    so each added guest saves 32000 pages = 125 MiB; ksmd on the plateau uses 1 + 0.5 N %."""
    root = tmp_path / "sweep"
    for n in counts:
        for r in range(repeats):
            kw = {"guests": n, "cpu_plateau": 1 + 0.5 * n} | over
            vm_record(root / f"n{n}-r{r}", **kw)
    return root


def only(plans: list[plan.DensityPlan]) -> dict:
    assert len(plans) == 1
    return plans[0].data


def test_projection_matches_hand_calculation(tmp_path: Path) -> None:
    d = only(plan.plan(compare.collect([clone_sweep(tmp_path, repeats=2)])))
    f = d["fit"]
    assert f["a_mib"] == pytest.approx(125.0) and f["b_mib"] == pytest.approx(0.0, abs=1e-9)
    assert f["a_pct"] == pytest.approx(125 / 256 * 100)
    assert f["r2"] == pytest.approx(1.0) and f["counts"] == [2, 4, 8] and f["points"] == 6
    i = d["inputs"]
    # the records' host: 24 GiB; headroom 10%: 2.4 GiB; usable 21.6 GiB = 22118.4 MiB
    assert i["host_memory_mib"] == 24 * 1024 and i["usable_mib"] == pytest.approx(22118.4)
    assert i["guest_memory_mib"] == 256
    # without KSM: 22118.4 / 256 = 86.4 -> 86
    assert d["without_ksm"]["max"] == 86
    # with KSM: 256 N - 125 (N - 1) <= 22118.4  ->  N <= 21993.4 / 131 = 167.9 -> 167
    assert d["with_ksm"]["max"] == 167
    assert d["with_ksm"]["saved_mib"] == pytest.approx(125 * 166)
    assert d["with_ksm"]["used_mib"] == pytest.approx(256 * 167 - 125 * 166)
    assert d["gain"] == 81
    # ksmd on the plateau: 1 + 0.5 N % of one CPU -> 84.5% at 167
    assert d["cpu_fits"]["cpu_pct"]["c1"] == pytest.approx(0.5)
    assert d["with_ksm"]["ksmd_cpu_pct"] == pytest.approx(84.5)
    ext = d["extrapolation"]
    assert ext["measured_counts"] == [2, 8] and ext["projected"] == 167
    assert "measured at N = 2, 4, 8 (6 runs)" in ext["statement"]
    assert "the projection at N = 167 is 20.9x the largest measured count" in ext["statement"]
    assert any(n.startswith("the projection goes 21x past the largest count") for n in d["notes"])
    assert [m["saved_mib"] for m in d["measured"]] == pytest.approx([125.0, 375.0, 875.0])


def test_other_guest_size_host_and_overhead(tmp_path: Path) -> None:
    runs = compare.collect([clone_sweep(tmp_path)])
    d = only(
        plan.plan(
            runs,
            guest_memory=4 * GIB,
            host_memory=256 * GIB,
            headroom="10%",
            overhead=256 * MIB,
        )
    )
    # each added guest saves 125/256 of its memory: 2000 MiB of 4 GiB
    assert d["fit"]["a_mib"] == pytest.approx(2000.0)
    # usable 235929.6 MiB; without: 235929.6 / 4352 = 54.2 -> 54
    assert d["without_ksm"]["max"] == 54
    # with: 4352 N - 2000 (N - 1) <= 235929.6  ->  N <= 233929.6 / 2352 = 99.46 -> 99
    assert d["with_ksm"]["max"] == 99
    assert (
        "measured with 256.0 MiB guests, projected for 4.0 GiB (16x)"
        in d["extrapolation"]["statement"]
    )
    assert d["inputs"]["guest_memory_source"] == "--guest-memory"
    # a headroom given as a size
    d = only(plan.plan(runs, host_memory=64 * GIB, headroom="4GiB"))
    assert d["inputs"]["usable_mib"] == 60 * 1024
    assert d["without_ksm"]["max"] == 240  # 61440 / 256
    assert d["with_ksm"]["max"] == 468  # (61440 - 125) / 131 = 468.05


def test_unbounded_and_single_count(tmp_path: Path) -> None:
    # every page of every added guest merges: 65536 pages = all 256 MiB
    full = only(plan.plan(compare.collect([clone_sweep(tmp_path, shared_top=65536)])))
    assert full["with_ksm"]["max"] is None and full["gain"] is None
    assert any("does not bound the count" in n for n in full["notes"])
    # exact figures: no scatter, so the interval is the 1% floor about the line: its upper
    # side unbounded too, its lower side (1% less saved a guest) bounds the count
    fewest, most = full["with_ksm"]["max_interval"]
    assert isinstance(fewest, int) and most is None
    one = tmp_path / "one"
    vm_record(one / "a", guests=3)
    (p,) = plan.plan(compare.collect([one]))
    # one count: what was measured, and no projection
    assert p.refused is not None and p.refused.startswith("every record ran 3 guests: one count")
    assert "sweep the count (matrix: {clones: [1, 2, 4, 8]})" in p.refused
    assert "fit" not in p.data and "with_ksm" not in p.data
    assert [(r["n"], r["saved_mib"]) for r in p.data["measured"]] == [(3, 250.0)]


def test_one_plan_per_knob_setting(tmp_path: Path) -> None:
    clone_sweep(tmp_path, counts=(2, 4), pages_to_scan=1000)
    root = tmp_path / "sweep"
    for n in (2, 4):
        vm_record(root / f"fast-n{n}", guests=n, pages_to_scan=4000, shared_top=16000)
    plans = plan.plan(compare.collect([root]))
    by = {p.label: p.data for p in plans}
    assert set(by) == {"pages_to_scan=1000", "pages_to_scan=4000"}
    assert by["pages_to_scan=1000"]["fit"]["a_mib"] == pytest.approx(125.0)
    assert by["pages_to_scan=4000"]["fit"]["a_mib"] == pytest.approx(62.5)


def test_refusals(tmp_path: Path) -> None:
    single = tmp_path / "single"
    vm_record(single / "a", guests=1)
    (p,) = plan.plan(compare.collect([single]))
    assert p.refused.startswith("every record ran 1 guest: one count cannot tell")
    mixed = tmp_path / "mixed"
    vm_record(mixed / "a", guests=2, guest_mib=256)
    vm_record(mixed / "b", guests=4, guest_mib=512, shared_top=64000)  # the same share
    # guests of another size are another configuration: a plan of their own, of one count
    plans = plan.plan(compare.collect([mixed]))
    assert [p.label for p in plans] == [
        "base.memory=256.0 MiB, guest_fill.size=128.0 MiB",
        "base.memory=512.0 MiB, guest_fill.size=256.0 MiB",
    ]
    assert [p.refused.split(":")[:2] for p in plans] == [
        ["base.memory=256.0 MiB, guest_fill.size=128.0 MiB", " every record ran 2 guests"],
        ["base.memory=512.0 MiB, guest_fill.size=256.0 MiB", " every record ran 4 guests"],
    ]
    sweep = compare.collect([clone_sweep(tmp_path)])
    with pytest.raises(UserError, match=r"--headroom: expected a percentage"):
        plan.plan(sweep, guest_memory=MIB, headroom="lots")
    with pytest.raises(UserError, match="leaves no memory for guests"):
        plan.plan(sweep, guest_memory=MIB, headroom="64GiB")
    # a guest larger than the host: one clear line, not "max guests 0"
    with pytest.raises(UserError) as e:
        plan.plan(sweep, guest_memory=1024 * GIB, host_memory=64 * GIB)
    assert str(e.value) == (
        "a guest of 1.0 TiB does not fit in the 57.6 GiB usable (64.0 GiB host less 10% "
        "headroom): not even one fits; check --guest-memory and --host-memory"
    )
    with pytest.raises(
        UserError, match=r"of 256.0 MiB \+ 64.0 MiB overhead does not fit in the 256.0 MiB usable"
    ):
        plan.plan(sweep, host_memory=256 * MIB, headroom="0%", overhead=64 * MIB)


def test_cli_json_html_terminal(tmp_path: Path) -> None:
    root = clone_sweep(tmp_path)
    html = tmp_path / "plan.html"
    proc = subprocess.run(
        [sys.executable, "-m", "kvmksm", "plan", str(root), "--guest-memory", "4GiB",
         "--host-memory", "256GiB", "--headroom", "10%", "-o", str(html), "--json"],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    (p,) = data["plans"]
    assert (p["without_ksm"]["max"], p["with_ksm"]["max"]) == (57, 111)
    assert "saved(N) = (b + a·(N−1)) × m" in data["model"]
    page = html.read_text()
    assert page.count("<svg") == 1
    assert 'id="max-with">111<' in page and 'id="max-without">57<' in page
    console = Console(record=True, width=160)
    terminal.plans(plan.plan(compare.collect([root])), console)
    text = console.export_text()
    assert "max guests without KSM" in text and "each added one saves 48.8% of its memory" in text
    bad = subprocess.run(
        [sys.executable, "-m", "kvmksm", "plan", str(root), "--guest-memory", "lots"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and bad.stderr.startswith("kvmksm: --guest-memory: expected a size")


# -- intervals, check runs -------------------------------------------------------------------
# pages_shared at the plateau of each repeat: the saving scatters by a few hundred pages
TOPS = {2: [32000, 32400, 31700], 4: [32100, 31800, 32300], 8: [31900, 32200, 32050]}


def noisy_sweep(tmp_path: Path) -> Path:
    root = tmp_path / "noisy"
    for n, tops in TOPS.items():
        for r, top in enumerate(tops):
            vm_record(root / f"n{n}-r{r}", guests=n, shared_top=top, cpu_plateau=1 + 0.5 * n + r)
    return root


def textbook_interval(xs: list[float], ys: list[float], x0: float) -> tuple[float, float]:
    """The 95% prediction interval of a straight line at x0, by the textbook formula (the
    check on how statsmodels is asked, not what kvmksm computes with)."""
    x, y = np.asarray(xs, float), np.asarray(ys, float)
    slope, icpt = np.polyfit(x, y, 1)
    resid = y - (icpt + slope * x)
    n = len(x)
    s = math.sqrt((resid**2).sum() / (n - 2))
    se = s * math.sqrt(1 + 1 / n + (x0 - x.mean()) ** 2 / ((x - x.mean()) ** 2).sum())
    half = stats.t.ppf(0.975, n - 2) * se
    return icpt + slope * x0 - half, icpt + slope * x0 + half


def floored(lo: float, hi: float) -> tuple[float, float]:
    """A savings interval as the plan gives it: never narrower than 1% of the prediction."""
    mid = (lo + hi) / 2
    return min(lo, mid * (1 - plan.SAVED_FLOOR)), max(hi, mid * (1 + plan.SAVED_FLOOR))


def test_prediction_intervals_by_hand(tmp_path: Path) -> None:
    (p,) = plan.plan(compare.collect([noisy_sweep(tmp_path)]))
    d = p.data
    xs = [n - 1 for n, tops in TOPS.items() for _ in tops]
    shares = [top * (n - 1) * PAGE / (256 * MIB) for n, tops in TOPS.items() for top in tops]
    f = d["fit"]
    assert f["df_resid"] == 7 and f["r2"] is not None and 0.99 < f["r2"] < 1
    assert d["interval"]["level"] == 0.95 and "statsmodels" in d["interval"]["method"]
    # each measured count: the fit and its interval, in MiB of the 256 MiB guests measured
    for row in d["measured"]:
        lo, hi = floored(*textbook_interval(xs, shares, row["n"] - 1))
        assert row["fit_interval_mib"] == pytest.approx([lo * 256, hi * 256])
        assert lo * 256 < row["saved_mib"] < hi * 256
    # the projection: 168 by the fit; the range by where each bound meets the 22118.4 MiB
    k, u = d["with_ksm"], d["inputs"]["usable_mib"]
    n1, (fewest, most) = k["max"], k["max_interval"]
    assert fewest < n1 < most

    def used(n: int, bound: int) -> float:
        return n * 256 - floored(*textbook_interval(xs, shares, n - 1))[bound] * 256

    assert used(fewest, 0) <= u < used(fewest + 1, 0)  # the lower bound of the saving
    assert used(most, 1) <= u < used(most + 1, 1)  # the upper bound
    lo, hi = floored(*textbook_interval(xs, shares, n1 - 1))
    assert k["saved_interval_mib"] == pytest.approx([lo * 256, hi * 256])
    # ksmd's share grows 0.5 % a guest: its value at N and its interval
    cpu_x = [n for n, tops in TOPS.items() for _ in tops]
    cpu_y = [1 + 0.5 * n + r for n, tops in TOPS.items() for r in range(len(tops))]
    lo, hi = textbook_interval(cpu_x, cpu_y, n1)
    assert k["ksmd_cpu_pct_interval"] == pytest.approx([lo, min(hi, 100.0)])


def test_two_runs_say_no_r2_and_no_interval(tmp_path: Path) -> None:
    d = only(plan.plan(compare.collect([clone_sweep(tmp_path, counts=(2, 4))])))
    assert d["fit"]["r2"] is None and d["fit"]["df_resid"] == 0
    assert d["fit"]["r2_note"].startswith("2 runs at 2 counts: the line passes through both")
    assert d["interval"]["level"] is None and d["with_ksm"]["max_interval"] is None
    assert d["with_ksm"]["max"] == 167  # the line itself is still the projection
    console = Console(record=True, width=200)
    terminal.plans(plan.plan(compare.collect([tmp_path / "sweep"])), console)
    text = console.export_text()
    assert "R² not given" in text and "R² = 1.0000" not in text


def test_check_run_inside_and_outside(tmp_path: Path) -> None:
    runs = compare.collect([noisy_sweep(tmp_path)])
    good = vm_record(tmp_path / "check" / "n12", guests=12, shared_top=32100, cpu_plateau=8)
    bad = vm_record(tmp_path / "check" / "n12-bad", guests=12, shared_top=28000, cpu_plateau=8)
    plans = plan.plan(runs)
    plan_check.check_plans(plans, compare.collect([good, bad]))
    (p,) = plans
    ok, off = p.data["checks"]
    assert ok["n"] == 12 and ok["beyond_measured"] and ok["count_factor"] == 1.5
    mean, lo, hi = p.saved_band([12])
    saved = {
        c["record"]: next(f for f in c["figures"] if f["key"] == "saved_mib") for c in (ok, off)
    }
    s_ok, s_off = saved[str(good)], saved[str(bad)]
    assert s_ok["predicted"] == pytest.approx(mean[0])
    assert s_ok["interval"] == pytest.approx([lo[0], hi[0]])
    assert s_ok["measured"] == pytest.approx(32100 * 11 * PAGE / MIB)
    assert s_ok["error"] == pytest.approx(s_ok["predicted"] - s_ok["measured"])
    assert s_ok["error_pct"] == pytest.approx(s_ok["error"] / s_ok["measured"] * 100)
    assert s_ok["inside"] is True and s_off["inside"] is False
    assert s_off["error_pct"] == pytest.approx((mean[0] / (28000 * 11 * PAGE / MIB) - 1) * 100)
    cpu = next(f for f in ok["figures"] if f["key"] == "cpu_pct")
    assert cpu["measured"] == pytest.approx(8.0) and cpu["predicted"] == pytest.approx(
        p.cpu_lines["cpu_pct"].at(12)[0]
    )
    # a check of another workload is refused
    ltp = ltp_record(tmp_path / "ltp")
    with pytest.raises(UserError, match="a processes run, but the plan is of vms"):
        plan_check.check_plans(plans, compare.collect([ltp]))


def test_cli_check_json_refusal_and_precision(tmp_path: Path) -> None:
    root = noisy_sweep(tmp_path)
    check = vm_record(tmp_path / "check" / "n12", guests=12, shared_top=32100, cpu_plateau=8)
    html = tmp_path / "plan.html"
    args = [sys.executable, "-m", "kvmksm", "plan", str(root), "-o", str(html)]
    proc = subprocess.run([*args, "--check", str(check), "--json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["format"] == plan.JSON_FORMAT == 1 and data["interval_level"] == 0.95
    (p,) = data["plans"]
    (c,) = p["checks"]
    assert c["figures"][0]["inside"] is True and c["error"] == "predicted − measured"
    fewest, most = p["with_ksm"]["max_interval"]
    page = html.read_text()
    assert 'id="max-with">168<' in page and f"95% PI {fewest} – {most}" in page
    assert 'id="check-1-saved_mib"' in page and ">yes<" in page
    # plain when piped: no box drawing, the check's row on one line
    proc = subprocess.run([*args, "--check", str(check)], capture_output=True, text=True)
    assert proc.returncode == 0 and not set("│┃─━┏┗") & set(proc.stdout)
    row = next(line for line in proc.stdout.splitlines() if line.startswith("memory saved (MiB)"))
    assert row.endswith("yes")
    # sensible precision: no exponent for a b of rounding size (exact records: b = 1e-16 or so)
    exact = clone_sweep(tmp_path)
    subprocess.run([*args[:4], str(exact), "-o", str(html)], check=True, capture_output=True)
    fit = html.read_text().split('id="fit">')[1].split("</p>")[0]
    assert "e-" not in fit and "saved(N) = (0 + 0.488 · (N − 1))" in fit
    # one count: the measured figures shown, one line on stderr, exit 2, no page
    one = tmp_path / "one"
    vm_record(one / "a", guests=3)
    proc = subprocess.run(
        [*args[:4], str(one), "-o", str(tmp_path / "one.html")], capture_output=True, text=True
    )
    assert proc.returncode == 2 and not (tmp_path / "one.html").exists()
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("kvmksm: every record ran 3")
    assert "Measured (all runs)" in proc.stdout and "250" in proc.stdout
    # a guest larger than the host: one line, exit 2
    proc = subprocess.run(
        [*args, "--guest-memory", "1TiB", "--host-memory", "64GiB"], capture_output=True, text=True
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("kvmksm: a guest of 1.0 TiB does not fit in the 57.6 GiB")
    assert proc.stderr.count("\n") == 1


def test_chart_keeps_measured_points_readable(tmp_path: Path) -> None:
    """A processes-like projection thousands of times past the sweep: the measured panel
    stays at the sweep's scale."""
    (p,) = plan.plan(
        compare.collect([clone_sweep(tmp_path, shared_top=65000)]), host_memory=1024 * GIB
    )
    assert p.data["with_ksm"]["max"] > 100_000
    svg = plan_chart(p)
    assert "Measured: savings against N" in svg and "Projection: guests that fit" in svg
    ticks = [float(t.replace(",", "")) for t in re.findall(r">([\d,]+)</text>", svg)]
    assert max(ticks) > 100_000  # the projection panel's axis
    assert {2.0, 4.0, 8.0, 10.0} <= set(ticks)  # the measured panel's: a count per tick


# -- from real runs -------------------------------------------------------------------------
COUNT_SWEEP = """\
name: real-count
sample_interval: 0.1s
knobs: {pages_to_scan: 5000, sleep_millisecs: 20, max_page_sharing: 256, smart_scan: 0}
matrix:
  count: [1, 2, 4]
workload:
  type: processes
  count: 1
  size: 16MiB
  scan_timeout: 60s
  steps:
    - action: fill
      patterns: [a]
"""


@pytest.mark.realksm
def test_plan_from_a_real_count_sweep(real_ksm: Ksm, tmp_path: Path) -> None:
    """1, 2 and 4 processes of 16 MiB of 'a' on the real kernel. Identical pages merge in
    chains of 256, so N processes (4096 N pages) keep 16 N and save 4080 N pages: 15.9375 MiB
    each, the first one included (b = a = 15.9375 MiB). In 1 GiB with no headroom: 64
    without KSM; with KSM 16 N - 15.9375 N <= 1024 gives N <= 16384."""
    f = tmp_path / "count.yaml"
    f.write_text(COUNT_SWEEP)
    proc = run_alone(["bench", str(f), "-o", str(tmp_path / "out")])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (exp,) = (tmp_path / "out" / "real-count").iterdir()
    assert (exp / "plan.html").exists()  # a size sweep gets its plan written
    runs = load_runs(exp)
    assert [e.values["count"] for e, _ in runs] == [1, 2, 4]
    d = only(plan.plan(compare.collect([exp]), host_memory=GIB, headroom="0%"))
    assert [m["saved_mib"] for m in d["measured"]] == [15.9375, 31.875, 63.75]
    assert d["fit"]["a_mib"] == pytest.approx(15.9375) and d["fit"]["b_mib"] == pytest.approx(
        15.9375
    )
    assert d["fit"]["r2"] == pytest.approx(1.0)
    assert d["without_ksm"]["max"] == 64
    assert d["with_ksm"]["max"] == 16384
    assert d["inputs"]["guest_memory_source"] == "from the records: each one's configured memory"
    # exact counters: the runs lie on the line, so the interval is the line itself
    assert d["with_ksm"]["max_interval"] == [16384, 16384]
    # a check run of 6 processes (`bench --count 6`, the one pattern repeated): 6 x 4080 pages
    f.write_text(COUNT_SWEEP.replace("matrix:\n  count: [1, 2, 4]\n", ""))
    proc = run_alone(["bench", str(f), "--count", "6", "-o", str(tmp_path / "check")])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (check,) = (tmp_path / "check" / "real-count").iterdir()
    assert json.loads((check / "run.json").read_text())["scenario"]["workload"]["count"] == 6
    proc = subprocess.run(
        [sys.executable, "-m", "kvmksm", "plan", str(exp), "--check", str(check), "--json"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    (c,) = json.loads(proc.stdout)["plans"][0]["checks"]
    saved = c["figures"][0]
    assert saved["measured"] == 6 * 15.9375 and saved["predicted"] == pytest.approx(6 * 15.9375)
    assert saved["inside"] is True and abs(saved["error_pct"]) < 1e-6

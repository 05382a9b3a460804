"""kvmksm plan: the projection against hand calculations, on synthetic and real records."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from kvmksm.commands import compare, plan
from kvmksm.errors import UserError
from kvmksm.host.ksm import Ksm
from kvmksm.results.experiment import load_runs
from kvmksm.views import terminal

from .recordgen import MIB, vm_record
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
    one = tmp_path / "one"
    vm_record(one / "a", guests=3)
    d = only(plan.plan(compare.collect([one])))
    assert d["fit"]["through_origin"] and d["fit"]["r2"] is None
    assert d["fit"]["a_mib"] == pytest.approx(125.0)  # 250 MiB for the 2 added guests
    assert any("only one guest count measured (N=3)" in n for n in d["notes"])


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
    with pytest.raises(UserError, match=r"every record ran 1 guest: sweep the count"):
        plan.plan(compare.collect([single]))
    mixed = tmp_path / "mixed"
    vm_record(mixed / "a", guests=2, guest_mib=256)
    vm_record(mixed / "b", guests=4, guest_mib=512, shared_top=64000)  # the same share
    # guests of another size are another configuration: a plan of their own
    plans = plan.plan(compare.collect([mixed]))
    assert [p.data["inputs"]["guest_memory_mib"] for p in plans] == [256, 512]
    assert [p.label for p in plans] == [
        "base.memory=256.0 MiB, guest_fill.size=128.0 MiB",
        "base.memory=512.0 MiB, guest_fill.size=256.0 MiB",
    ]
    for p in plans:
        assert p.data["fit"]["a_pct"] == pytest.approx(125 / 256 * 100)
        assert p.data["fit"]["through_origin"]
    with pytest.raises(UserError, match=r"--headroom: expected a percentage"):
        plan.plan(compare.collect([mixed]), guest_memory=MIB, headroom="lots")
    with pytest.raises(UserError, match="leaves no memory for guests"):
        plan.plan(compare.collect([mixed]), guest_memory=MIB, headroom="64GiB")


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
    assert [e["values"]["count"] for e, _ in runs] == [1, 2, 4]
    d = only(plan.plan(compare.collect([exp]), host_memory=GIB, headroom="0%"))
    assert [m["saved_mib"] for m in d["measured"]] == [15.9375, 31.875, 63.75]
    assert d["fit"]["a_mib"] == pytest.approx(15.9375) and d["fit"]["b_mib"] == pytest.approx(
        15.9375
    )
    assert d["fit"]["r2"] == pytest.approx(1.0)
    assert d["without_ksm"]["max"] == 64
    assert d["with_ksm"]["max"] == 16384
    assert d["inputs"]["guest_memory_source"] == "from the records: each one's configured memory"

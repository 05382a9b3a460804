"""kvmksm compare as a gate: --fail-if-worse, the exit statuses, stderr first, plain output in a
pipe, the JSON's format key and how each derived figure is aggregated."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvmksm.commands import compare
from kvmksm.commands.compare_gate import CANNOT_TELL, OK, WORSE, judge

from .recordgen import ltp_record, vm_record
from .test_compare import runs_of

BOX = set("│┃─━┏┓┗┛┡┩╇╈┼")
BASE = [32000, 32200, 31800]  # pages_shared at the plateau of group A's three repeats


def kvmksm(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """The command with stdout a pipe, as in CI (no COLUMNS: rich would assume 80)."""
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    return subprocess.run(
        [sys.executable, "-m", "kvmksm", *map(str, args)], capture_output=True, text=True, env=env
    )


def doctored(tmp_path: Path, factor: float) -> tuple[Path, Path]:
    """Group A as measured, group B the same records with every saving scaled by `factor`
    (B on another kernel, so the two are groups of their own)."""
    runs_of(tmp_path, "a", BASE, kernel="6.1.0-test")
    runs_of(tmp_path, "b", [round(t * factor) for t in BASE], kernel="6.18.0-test")
    return tmp_path / "a", tmp_path / "b"


def test_fail_if_worse_on_a_doctored_pair(tmp_path: Path) -> None:
    a, b = doctored(tmp_path, 0.875)  # B saves 12.5% less, far beyond the noise of A
    html = tmp_path / "c.html"
    proc = kvmksm("compare", a, b, "--fail-if-worse", "5", "-o", html)
    assert proc.returncode == WORSE == 1, proc.stdout + proc.stderr
    worse = [line for line in proc.stdout.splitlines() if line.startswith("WORSE:")]
    assert any(line.startswith("WORSE: Memory saved") and "by 12.5%" in line for line in worse)
    assert proc.stderr == ""
    # the same pair, a threshold above every difference: passes
    cmp = compare.compare(compare.collect([a, b]))
    worst = max(abs(w["diff_pct"]) for w in judge(cmp, 0.0).worse)
    assert 12.5 <= worst < 20
    assert kvmksm("compare", a, b, "--fail-if-worse", "20", "-o", html).returncode == OK
    # better is never a failure: B against A the other way round is the same pair
    better = judge(compare.compare(compare.collect([b, a])), 5)
    assert better.worse == [] and better.status == OK
    # without --fail-if-worse the comparison is only reported
    assert kvmksm("compare", a, b, "-o", html).returncode == OK


def test_identical_records_pass(tmp_path: Path) -> None:
    a, _ = doctored(tmp_path, 0.875)
    shutil.copytree(a, tmp_path / "same")
    proc = kvmksm(
        "compare", a, tmp_path / "same", "--by-argument", "--fail-if-worse", "0", "-o",
        tmp_path / "c.html", "--json",
    )  # fmt: skip
    assert proc.returncode == OK, proc.stdout + proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["format"] == compare.JSON_FORMAT == 1
    assert doc["gate"]["exit_status"] == 0 and doc["gate"]["worse"] == []
    assert doc["gate"]["fail_if_worse_pct"] == 0.0
    verdicts = {d["verdict"] for m in doc["metrics"] for d in m["vs_baseline"].values()}
    assert verdicts <= {"same", "within noise"}


def test_cannot_tell_goes_to_stderr_first_with_status_3(tmp_path: Path) -> None:
    # different workloads
    vm_record(tmp_path / "vm")
    ltp_record(tmp_path / "ltp")
    proc = kvmksm("compare", tmp_path / "vm", tmp_path / "ltp", "-o", tmp_path / "c.html")
    assert proc.returncode == CANNOT_TELL == 3
    lines = proc.stderr.splitlines()
    assert lines[0].startswith("kvmksm: NOT COMPARABLE: the records ran different workloads")
    assert "NOT COMPARABLE" not in proc.stdout
    # too few repeats, even with a large difference and --fail-if-worse: 3, not 1 nor 0
    runs_of(tmp_path, "x", [32000, 32200], kernel="6.1.0-test")
    runs_of(tmp_path, "y", [28000, 28200], kernel="6.18.0-test")
    proc = kvmksm(
        "compare", tmp_path / "x", tmp_path / "y", "--fail-if-worse", "1", "--json", "-o",
        tmp_path / "c.html",
    )  # fmt: skip
    assert proc.returncode == 3
    assert proc.stderr.startswith("kvmksm: too few repeats to tell a difference from noise")
    doc = json.loads(proc.stdout)
    assert doc["gate"]["exit_status"] == 3 and doc["gate"]["cannot_tell"]
    # bad input is 2
    assert kvmksm("compare", tmp_path / "x", "--fail-if-worse", "lots").returncode == 2
    assert kvmksm("compare", tmp_path / "nothing-here").returncode == 2


def test_exit_statuses_documented() -> None:
    text = kvmksm("compare", "--help").stdout
    for status in ("0  ", "1  ", "2  ", "3  "):
        assert f"\n  {status}" in text
    assert "--fail-if-worse PCT" in text
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert "`--fail-if-worse PCT`" in readme and "**3**" in readme


def test_piped_output_is_plain_and_not_wrapped(tmp_path: Path) -> None:
    a, b = doctored(tmp_path, 0.875)
    proc = kvmksm("compare", a, b, "-o", tmp_path / "c.html")
    out = proc.stdout
    assert not BOX & set(out)
    cmp = compare.compare(compare.collect([a, b]))
    for m in cmp.metrics:  # every metric on one line of its own, its name whole
        name = f"{m['label']} ({m['unit']})" if m["unit"] else m["label"]
        (line,) = [ln for ln in out.splitlines() if ln.startswith(name)]
        assert "beyond noise" in line or "within noise" in line or "same" in line
    assert max(len(line) for line in out.splitlines()) > 80  # nothing cut to the 80 columns


def test_each_figure_says_how_it_is_aggregated(tmp_path: Path) -> None:
    for k, pts in (("200", 200), ("5000", 5000)):
        for i, top in enumerate(BASE):
            vm_record(tmp_path / k / f"r{i}", shared_top=top + pts, pages_to_scan=pts)
    proc = kvmksm("compare", tmp_path / "200", tmp_path / "5000", "--json", "-o", tmp_path / "c")
    doc = json.loads(proc.stdout)
    by_key = {m["key"]: m for m in doc["metrics"]}
    assert "a mean of ratios" in by_key["mib_per_cpu_s"]["aggregation"]
    assert by_key["plateau_saved_mib"]["aggregation"] == "mean ± sd over the repeats of each group"
    pareto = doc["pareto"]
    assert pareto["mib_per_cpu_s_aggregation"].startswith("ratio of means")
    for p in pareto["points"]:
        assert p["mib_per_cpu_s"] == pytest.approx(p["y"] / p["x"])
    out = kvmksm("compare", tmp_path / "200", tmp_path / "5000", "-o", tmp_path / "c").stdout
    assert "Saved per ksmd CPU second (MiB/CPU s), mean of per-run ratios" in out
    assert "MiB per ksmd CPU s (ratio of means)" in out
    page = (tmp_path / "c").read_text()
    assert "a mean of ratios" in page and "MiB per ksmd CPU s (ratio of means)" in page

"""Experiments: matrix validation and expansion, running on a fake host, and a real sweep."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kvmksm.analysis.metrics import analyse
from kvmksm.commands import compare
from kvmksm.commands.experiment import expand, points, run_experiment
from kvmksm.errors import UserError, WorkloadFailed
from kvmksm.host.fs import HostFS
from kvmksm.host.ksm import Ksm, ksm_processes
from kvmksm.results.experiment import load_index, load_runs
from kvmksm.scenario import load as scenario
from kvmksm.scenario.model import Scenario
from kvmksm.workloads.base import RunContext, Workload

from .conftest import REAL_KSM_LOCK
from .fakehost import knob_values, make_tree, set_counter

SWEEP = """\
name: sweep
sample_interval: 0.1s
repeats: 2
knobs: {{sleep_millisecs: 20}}
matrix:
{matrix}
workload:
  type: processes
  count: 2
  size: 1MiB
  steps:
    - action: fill
      patterns: [a, a]
"""


def _sweep(matrix: str = "  pages_to_scan: [1000, 5000]\n", **sub: str) -> str:
    return SWEEP.format(matrix=matrix.rstrip("\n"), **sub)


# -- validation ---------------------------------------------------------------------------
BAD = [
    (
        "  clones: [1, 2]",
        "s.yaml:6: matrix.clones: a processes workload's size axis is 'count', not 'clones'",
    ),  # fmt: skip
    ("  speed: [1, 2]", "s.yaml:6: matrix.speed: unknown axis (expected 'count' or a KSM knob: "),
    ("  pages_to_scan: []", "s.yaml:6: matrix.pages_to_scan: expected at least 1 item(s)"),
    (
        "  pages_to_scan:\n    - 100\n    - 100",
        "s.yaml:8: matrix.pages_to_scan[1]: duplicate value 100",
    ),
    (
        "  pages_to_scan: [100]\n  sleep_millisecs: [10, 20]",
        "s.yaml:7: matrix.sleep_millisecs: also set in knobs.sleep_millisecs: set it in one place",
    ),
    (
        "  advisor_mode:\n    - none\n    - fastest",
        "s.yaml:8: matrix.advisor_mode[1]: expected 'none' or 'scan-time', got 'fastest'",
    ),
    ("  count: [2, 0]", "s.yaml:6: matrix.count[1]: expected a whole number from 1 to 1024, got 0"),
    ("  pages_to_scan: [1.5]", "s.yaml:6: matrix.pages_to_scan[0]: expected an integer, got 1.5"),
    ("  run: [0, 1]", "s.yaml:6: matrix.run: 'run' is switched by the workload, not an axis"),
    ("  pages_to_scan: 100", "s.yaml:6: matrix.pages_to_scan: expected a list, got 100"),
]


@pytest.mark.parametrize(("matrix", "message"), BAD, ids=[b[0].split(":")[0].strip() for b in BAD])
def test_bad_matrix_one_line_with_line_number(matrix: str, message: str) -> None:
    with pytest.raises(UserError) as e:
        scenario.loads(_sweep(matrix + "\n"), "s.yaml")
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)


def test_bad_repeats_and_mixed_patterns() -> None:
    with pytest.raises(UserError, match=r"^s\.yaml:3: repeats: expected a value >= 1, got 0$"):
        scenario.loads(_sweep().replace("repeats: 2", "repeats: 0"), "s.yaml")
    text = _sweep("  count: [2, 3]\n").replace("[a, a]", "[a, b]")
    with pytest.raises(UserError, match=r"^s\.yaml:13: workload\.steps\[0\]\.patterns: with a "):
        scenario.loads(text, "s.yaml")


def test_expand_cross_product_repeat_by_repeat() -> None:
    sc = scenario.loads(_sweep("  count: [1, 3]\n  pages_to_scan: [100, 2000]\n"), "s.yaml")
    assert points(sc) == [
        {"count": 1, "pages_to_scan": 100},
        {"count": 1, "pages_to_scan": 2000},
        {"count": 3, "pages_to_scan": 100},
        {"count": 3, "pages_to_scan": 2000},
    ]
    plans = expand(sc)
    assert len(plans) == 8
    # every point once, then every point again
    assert [(p.repeat, p.point) for p in plans] == [(r, i) for r in (1, 2) for i in range(4)]
    p = plans[6]  # repeat 2 of count=3, pages_to_scan=100
    assert p.dirname == "007_count-3_pages_to_scan-100_r2"
    assert p.label == "count=3, pages_to_scan=100"
    run = p.scenario
    assert run.matrix == {} and run.repeats == 1 and run.name == "sweep"
    assert run.knobs == {"sleep_millisecs": 20, "pages_to_scan": 100}
    assert run.workload.count == 3
    assert [x.describe() for x in run.workload.steps[0].patterns] == ["a", "a", "a"]
    # the source scenario is untouched
    assert sc.workload.count == 2 and sc.knobs == {"sleep_millisecs": 20}


def test_validate_says_how_many_runs(tmp_path: Path) -> None:
    f = tmp_path / "s.yaml"
    f.write_text(_sweep("  count: [1, 3]\n  pages_to_scan: [100, 2000, 5000]\n"))
    out = subprocess.run(
        [sys.executable, "-m", "kvmksm", "validate", str(f)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "6 point(s) x 2 repeat(s) = 12 runs" in out.stdout


# -- running on a fake host ---------------------------------------------------------------
class Mimic(Workload):
    """Turns ksmd on, 'merges' a number of pages that depends on the point, and on request
    fails or interrupts a given run."""

    def __init__(self, sc: Scenario, root: Path, calls: list[dict[str, object]]) -> None:
        self.sc, self.root, self.calls = sc, root, calls

    def run(self, ctx: RunContext) -> None:
        n = len(self.calls) + 1
        self.calls.append(dict(ctx.ksm.read_knobs()))
        ctx.ksm.write("run", 1)
        ctx.ksm.write("use_zero_pages", 1)  # a knob the scenario never set: must come back too
        ctx.record.event("ksm_on", "run=1")
        time.sleep(0.25)
        if os.environ.get("MIMIC_SIGINT") == str(n):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        if os.environ.get("MIMIC_FAIL") == str(n):
            raise WorkloadFailed("the guest never came up")
        # A fill step as the processes workload logs one: the saving holds from its scans'
        # end until the run ends.
        set_counter(self.root, "pages_sharing", int(self.sc.knobs["pages_to_scan"]))
        ctx.record.event("round_filled", "fill", step=1, seconds=0.0)
        ctx.record.event("scans_done", "3 full scans", step=1, seconds=0.0)
        time.sleep(0.25)

    def teardown(self, ctx: RunContext) -> list[str]:
        set_counter(self.root, "pages_sharing", 0)
        return []


def _fake_run(tmp_path: Path, fake_root: Path, text: str) -> tuple[object, list[dict[str, object]]]:
    sc = scenario.loads(text, "s.yaml")
    calls: list[dict[str, object]] = []
    result = run_experiment(
        sc,
        tmp_path / "out",
        "s.yaml",
        fs=HostFS(fake_root),
        workload_factory=lambda s: Mimic(s, fake_root, calls),
    )
    return result, calls


def test_fake_sweep_restores_host_between_runs(
    fake_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = knob_values(fake_root)
    monkeypatch.setenv("MIMIC_FAIL", "3")
    result, calls = _fake_run(tmp_path, fake_root, _sweep())
    assert result.status == "failed" and result.exit_code == 1  # type: ignore[attr-defined]
    assert knob_values(fake_root) == before
    exp = result.dir  # type: ignore[attr-defined]
    assert exp.parent == tmp_path / "out" / "sweep" and exp.name.endswith("-exp")
    # Each run ran its point, and started from the host as it was before the experiment:
    # the previous run's knobs (use_zero_pages=1 included) were put back.
    assert [c["pages_to_scan"] for c in calls] == [1000, 5000, 1000, 5000]
    assert all(c["sleep_millisecs"] == 20 and c["use_zero_pages"] == 0 for c in calls)
    index = load_index(exp)
    assert index.axes == {"pages_to_scan": [1000, 5000]} and index.repeats == 2
    assert [r.status for r in index.runs] == ["passed", "passed", "failed", "passed"]
    assert index.runs[2].error == "the guest never came up"
    assert all(r.host_restored for r in index.runs)
    assert [p.runs for p in index.points] == [[0, 2], [1, 3]]
    assert index.knobs_after == index.knobs_before
    assert not (exp / ".running").exists()
    runs = load_runs(exp)
    assert [e.dir for e, _ in runs] == [
        "001_pages_to_scan-1000_r1",
        "002_pages_to_scan-5000_r1",
        "003_pages_to_scan-1000_r2",
        "004_pages_to_scan-5000_r2",
    ]
    for entry, rec in runs:
        assert rec.meta.experiment.values == entry.values
        assert rec.meta.experiment.repeat == entry.repeat
        assert rec.meta.knobs_during["pages_to_scan"] == entry.values["pages_to_scan"]
        assert rec.meta.knobs_before == rec.meta.knobs_after == index.knobs_before
        assert "pages_to_scan" not in rec.meta.scenario.matrix
    # the saving each run recorded is the one its point set (run 3 failed before it merged)
    saved = [analyse(r).value("plateau_saved_mib") for _, r in runs]
    expected = [p * 4096 / 2**20 if p else None for p in (1000, 5000, None, 5000)]
    assert saved == [pytest.approx(e, abs=1e-4) if e else None for e in expected]


def test_fake_sweep_interrupted_stops_and_restores(
    fake_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = knob_values(fake_root)
    monkeypatch.setenv("MIMIC_SIGINT", "2")
    result, calls = _fake_run(tmp_path, fake_root, _sweep())
    assert result.status == "interrupted" and result.exit_code == 130  # type: ignore[attr-defined]
    assert len(calls) == 2
    assert knob_values(fake_root) == before
    index = load_index(result.dir)  # type: ignore[attr-defined]
    assert [r.status for r in index.runs] == ["passed", "interrupted", "not run", "not run"]
    assert index.status == "interrupted" and index.finished


def test_knob_not_on_this_kernel_refused_before_anything(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "old", old_kernel=True)
    before = knob_values(root)
    f = tmp_path / "s.yaml"
    f.write_text(_sweep("  smart_scan: [0, 1]\n"))
    sc = scenario.load(f)
    with pytest.raises(UserError) as e:
        run_experiment(sc, tmp_path / "out", str(f), fs=HostFS(root))
    assert str(e.value).startswith(
        f"{f}:6: matrix.smart_scan: KSM knob 'smart_scan' is not available on this kernel"
    )
    assert "appeared in Linux 6.7" in str(e.value)
    assert not (tmp_path / "out").exists()
    assert knob_values(root) == before


def test_bench_cli_on_fake_host_runs_the_matrix(fake_root: Path, tmp_path: Path) -> None:
    """`kvmksm bench` of a matrix scenario routes to the experiment (here the real processes
    workload against a fake /sys whose ksmd never scans: every run times out quickly)."""
    f = tmp_path / "s.yaml"
    f.write_text(
        _sweep()
        .replace("repeats: 2", "repeats: 1")
        .replace("  steps:", "  scan_timeout: 0.3s\n  steps:")
    )
    before = knob_values(fake_root)
    proc = subprocess.run(
        [sys.executable, "-m", "kvmksm", "bench", str(f), "-o", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env={**os.environ, "KVMKSM_ROOT": str(fake_root), "COLUMNS": "120"},
        timeout=120,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "[1/2] pages_to_scan=1000, repeat 1/1" in proc.stderr
    assert "[2/2] pages_to_scan=5000, repeat 1/1" in proc.stderr
    assert "experiment sweep: FAILED" in proc.stdout
    (exp,) = (tmp_path / "out" / "sweep").iterdir()
    index = load_index(exp)
    assert [r.status for r in index.runs] == ["failed", "failed"]
    assert "did not finish 3 full scans" in index.runs[0].error
    assert knob_values(fake_root) == before


# -- a real sweep on the real kernel ------------------------------------------------------
REAL = """\
name: real-sweep
sample_interval: 0.1s
repeats: 3
knobs: {sleep_millisecs: 20, max_page_sharing: 256, smart_scan: 0}
matrix:
  pages_to_scan: [200, 5000]
workload:
  type: processes
  count: 2
  size: 16MiB
  scan_timeout: 60s
  steps:
    - action: fill
      patterns: [a, a]
      expect: {pages_sharing: 8160}
"""


class ForeignKsmUsers:
    """Watches, in a thread, for processes other than our fillers with memory under KSM
    (another session's guests): their pages mix into the host-wide counters, so a real run
    they overlap says nothing exact about ours."""

    def __init__(self) -> None:
        self.seen: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        fs = HostFS("/")
        while not self._stop.is_set():
            for p in ksm_processes(fs):
                pid = int(p["pid"])  # type: ignore[call-overload]
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                except OSError:
                    continue
                if "workloads/filler.py" not in cmd:
                    self.seen[pid] = cmd[:80]
            self._stop.wait(0.2)

    def __enter__(self) -> ForeignKsmUsers:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_alone(argv: list[str], attempts: int = 3) -> subprocess.CompletedProcess[str]:
    """Run a real bench; again (up to `attempts` times) when another KSM user overlapped it."""
    seen: dict[int, str] = {}
    for _ in range(attempts):
        with ForeignKsmUsers() as foreign:
            proc = subprocess.run(
                [sys.executable, "-m", "kvmksm", *argv],
                capture_output=True,
                text=True,
                env={**os.environ, "COLUMNS": "120"},
                timeout=600,
            )
        if not foreign.seen:
            return proc
        seen |= foreign.seen
        out = Path(argv[argv.index("-o") + 1])
        shutil.rmtree(out, ignore_errors=True)
    pytest.fail(f"other KSM users kept overlapping the run (not holding {REAL_KSM_LOCK}): {seen}")


@pytest.mark.realksm
def test_real_sweep_restores_host_between_runs(real_ksm: Ksm, tmp_path: Path) -> None:
    """pages_to_scan 200 and 5000, three repeats each, two processes of 16 MiB of 'a': the
    saving is exact (8192 pages in chains of 256: 32 kept, 8160 saved) at both scan rates,
    ksmd reaches it much sooner at 5000, and the host is as before between runs."""
    knobs0 = real_ksm.read_knobs()
    f = tmp_path / "real.yaml"
    f.write_text(REAL)
    proc = run_alone(["bench", str(f), "-o", str(tmp_path / "out")])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (exp,) = (tmp_path / "out" / "real-sweep").iterdir()
    index = load_index(exp)
    assert index.status == "passed"
    assert index.knobs_before == knobs0 == index.knobs_after == real_ksm.read_knobs()
    runs = load_runs(exp)
    assert [e.values["pages_to_scan"] for e, _ in runs] == [200, 5000] * 3
    base = index.counters_before["pages_sharing"]
    for entry, rec in runs:
        assert entry.status == "passed" and entry.host_restored is True
        assert rec.meta.knobs_before == knobs0 == rec.meta.knobs_after
        assert rec.meta.knobs_during["pages_to_scan"] == entry.values["pages_to_scan"]
        # nothing of the previous run's merged pages is left in the counters
        assert entry.counters_before["pages_sharing"] == base
        assert any(e.kind == "drained" for e in rec.events)
        assert rec.checks[0].observed == 8160
        assert analyse(rec).value("plateau_saved_mib") == 8160 * 4096 / 2**20
    assert "experiment real-sweep: PASSED" in proc.stdout
    # The comparison: the saving is exactly the same at both rates, and at 5000 pages a
    # wake-up ksmd gets there sooner, beyond the run-to-run noise.
    cmp = compare.compare(compare.collect([exp]))
    assert [(g.label, len(g.runs)) for g in cmp.groups] == [
        ("pages_to_scan=200", 3),
        ("pages_to_scan=5000", 3),
    ]
    by = {m["key"]: m["vs_baseline"]["B"] for m in cmp.metrics}
    assert by["plateau_saved_mib"]["verdict"] == "same"
    assert by["time_to_90pct_s"]["verdict"] == "beyond noise" and by["time_to_90pct_s"]["better"]
    assert cmp.pareto is not None
    assert (exp / "compare.html").exists()
    assert all((exp / e.dir / "report.html").exists() for e, _ in runs)

"""The runner on a fake /sys tree: knobs restored on every exit path, the lock."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvmksm.commands.bench import bench
from kvmksm.errors import LockedError, WorkloadFailed
from kvmksm.host.fs import HostFS
from kvmksm.host.state import ActiveRun, HostLock
from kvmksm.scenario import load as scenario
from kvmksm.workloads.base import RunContext, Workload

from .fakehost import knob_values, set_counter

SCENARIO = """\
name: fake
sample_interval: 0.1s
knobs: {pages_to_scan: 5000, sleep_millisecs: 0, max_page_sharing: 1024}
workload:
  type: processes
  count: 2
  size: 1MiB
  scan_timeout: 60s
  steps:
    - action: fill
      patterns: [a, a]
      expect: {pages_sharing: 255}
"""


class Scripted(Workload):
    """A workload that does one thing mid-run: raise, signal itself, or check counters."""

    def __init__(self, action: str, root: Path) -> None:
        self.action = action
        self.root = root
        self.torn_down = False

    def run(self, ctx: RunContext) -> None:
        ctx.ksm.write("run", 1)
        time.sleep(0.25)  # let the sampler take a few rows
        if self.action == "raise":
            raise RuntimeError("boom")
        if self.action == "fail":
            raise WorkloadFailed("guest never came up")
        if self.action in ("SIGINT", "SIGTERM"):
            os.kill(os.getpid(), getattr(signal, self.action))
            time.sleep(5)
        if self.action == "check":
            set_counter(self.root, "pages_sharing", 255)
            set_counter(self.root, "pages_shared", 3)
            ctx.check("round", {"pages_sharing": 255, "pages_shared": 1})

    def teardown(self, ctx: RunContext) -> list[str]:
        self.torn_down = True
        return []


@pytest.mark.parametrize(
    ("action", "status"),
    [
        ("raise", "error"),
        ("fail", "failed"),
        ("SIGINT", "interrupted"),
        ("SIGTERM", "interrupted"),
        ("check", "failed"),
    ],
)
def test_knobs_restored_on_every_exit_path(
    action: str, status: str, fake_root: Path, fake_fs: HostFS, tmp_path: Path
) -> None:
    before = knob_values(fake_root)
    sc = scenario.loads(SCENARIO, "fake.yaml")
    wl = Scripted(action, fake_root)
    result = bench(sc, tmp_path / "out", fs=fake_fs, workload=wl)
    assert result.status == status
    assert wl.torn_down
    assert knob_values(fake_root) == before
    meta = json.loads((result.record_dir / "run.json").read_text())
    assert meta["status"] == status
    assert meta["knobs_during"]["pages_to_scan"] == 5000
    assert meta["knobs_after"]["pages_to_scan"] == 100
    kinds = [e["kind"] for e in meta["events"]]
    assert kinds[0] == "run_start" and kinds[-1] == "run_end"
    assert "knobs_restored" in kinds
    rows = (result.record_dir / "samples.csv").read_text().splitlines()
    assert len(rows) >= 3  # header + at least two ticks
    assert ActiveRun.load() is None  # nothing left for `kvmksm clean`
    if action == "check":
        assert [(c["name"], c["passed"]) for c in meta["checks"]] == [
            ("round: pages_sharing", True),
            ("round: pages_shared", False),
        ]
        assert result.exit_code == 1


def test_second_bench_refuses_while_locked(
    fake_root: Path, fake_fs: HostFS, tmp_path: Path
) -> None:
    before = knob_values(fake_root)
    sc = scenario.loads(SCENARIO, "fake.yaml")
    held = HostLock()
    held.acquire("scenario other")
    try:
        with pytest.raises(
            LockedError,
            match=r"another kvmksm run is using KSM on this host "
            r"\(pid \d+, scenario other\)",
        ):
            bench(sc, tmp_path / "out", fs=fake_fs, workload=Scripted("check", fake_root))
        proc = subprocess.run(
            [sys.executable, "-m", "kvmksm", "bench", "-", "-o", str(tmp_path / "out")],
            input=SCENARIO,
            capture_output=True,
            text=True,
            env={**os.environ, "KVMKSM_ROOT": str(fake_root)},
        )
        assert proc.returncode == 2, proc.stderr
        assert "another kvmksm run is using KSM on this host" in proc.stderr
    finally:
        held.release()
    assert knob_values(fake_root) == before
    assert not (tmp_path / "out").exists()
    # Once released, the next run may go.
    result = bench(sc, tmp_path / "out", fs=fake_fs, workload=Scripted("raise", fake_root))
    assert result.status == "error"


def test_sigterm_mid_round_real_processes_fake_sysfs(fake_root: Path, tmp_path: Path) -> None:
    """The real processes workload waits for full scans a fake ksmd never makes: SIGTERM
    then ends it, the children go, the knobs come back, the partial record stays readable."""
    sc = tmp_path / "s.yaml"
    sc.write_text(SCENARIO)
    before = knob_values(fake_root)
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvmksm", "bench", str(sc), "-o", str(tmp_path / "out")],
        env={**os.environ, "KVMKSM_ROOT": str(fake_root)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    run_json = _wait_for_event(tmp_path / "out", "round_filled")
    pids = [p["pid"] for p in json.loads(run_json.read_text())["processes"]]
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    meta = json.loads(run_json.read_text())
    assert meta["status"] == "interrupted"
    assert meta["error"] == "interrupted by SIGTERM"
    assert knob_values(fake_root) == before
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid)
    assert len((run_json.parent / "samples.csv").read_text().splitlines()) >= 2


def _wait_for_event(out: Path, kind: str, timeout: float = 60) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for rj in out.glob("*/*/run.json"):
            try:
                if any(e["kind"] == kind for e in json.loads(rj.read_text())["events"]):
                    return rj
            except (json.JSONDecodeError, KeyError):
                pass
        time.sleep(0.05)
    raise AssertionError(f"no {kind} event within {timeout}s")


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except OSError:
        return True

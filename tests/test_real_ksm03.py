"""The seed's LTP ksm03 on the real kernel, exactly; and Ctrl-C mid-round."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kvmksm.host.ksm import Ksm
from kvmksm.scenario.load import SCENARIO_DIR

from .test_runner import _wait_for_event

pytestmark = pytest.mark.realksm
KSM03 = SCENARIO_DIR / "ltp-ksm03.yaml"


def test_ksm03_exact_counts(real_ksm: Ksm, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "kvmksm", "bench", str(KSM03), "-o", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (run_json,) = tmp_path.glob("ltp-ksm03/*/run.json")
    meta = json.loads(run_json.read_text())
    assert meta["status"] == "passed"
    checks = {c["name"]: c for c in meta["checks"]}
    assert len(checks) == 30 and all(c["passed"] for c in checks.values())
    # The seed's figures, observed (not only "passed"):
    assert checks["step 1 fill c/a/a: pages_sharing"]["observed"] == 98302
    assert checks["step 2 fill c/b/a: pages_shared"]["observed"] == 3
    assert checks["step 3 fill d/d/d: pages_sharing"]["observed"] == 98303
    assert checks["step 4 fill d/d+e/d: pages_unshared"]["observed"] == 1
    assert checks["step 5 unmerge: pages_sharing"]["observed"] == 0
    assert meta["knobs_after"] == meta["knobs_before"]
    # this kernel has /proc/<ksmd>/schedstat: ksmd_cpu in nanoseconds, not 10 ms ticks
    assert meta["sampler"]["ksmd_cpu_source"] == "schedstat"
    assert "checks: 30 passed, 0 failed" in proc.stdout
    kinds = [e["kind"] for e in meta["events"]]
    assert kinds.count("verified") == 5 and kinds.count("scans_done") == 4
    assert not list(Path("/sys/fs/cgroup/memory").glob("kvmksm-*"))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_mid_round_restores_host(
    real_ksm: Ksm, tmp_path: Path, sig: signal.Signals
) -> None:
    # ksm03 with a crawling ksmd, so the run is surely mid-round when the signal comes.
    data = yaml.safe_load(KSM03.read_text())
    data["knobs"].update(pages_to_scan=100, sleep_millisecs=1000)
    data["sample_interval"] = "0.2s"
    sc = tmp_path / "slow.yaml"
    sc.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvmksm", "bench", str(sc), "-o", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    run_json = _wait_for_event(out, "ksm_on")
    assert real_ksm.read("run") == 1 and real_ksm.read("pages_to_scan") == 100
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stdout + stderr
    meta = json.loads(run_json.read_text())
    assert meta["status"] == "interrupted"
    assert meta["knobs_after"] == meta["knobs_before"]
    assert [e["kind"] for e in meta["events"]][-1] == "run_end"
    rows = (run_json.parent / "samples.csv").read_text().splitlines()
    assert len(rows) >= 2 and rows[0].startswith("t,time,")
    assert not list(Path("/sys/fs/cgroup/memory").glob("kvmksm-*"))
    # real_ksm's teardown asserts that every knob is back to its prior value.

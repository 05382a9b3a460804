from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kvmksm.errors import UserError
from kvmksm.scenario import load as scenario

from .fakehost import knob_values

GOOD = """\
name: ok
workload:
  type: processes
  count: 2
  size: 1MiB
  steps:
    - action: fill
      patterns: [a, a]
      expect: {pages_sharing: 255}
"""

# (scenario text, the exact one-line error)
BAD = [
    (
        "workload:\n  type: processes\n  count: three\n  size: 1MiB\n  steps: [{action: stop}]\n",
        "bad.yaml:3: workload.count: expected an integer, got 'three'",
    ),
    (
        "workload:\n  type: processes\n  count: 3\n  size: 12XB\n  steps: [{action: stop}]\n",
        "bad.yaml:4: workload.size: expected a size such as 128MiB, 1GiB or 4096 (bytes), "
        "got '12XB'",
    ),
    (
        "foo: 1\nworkload: {type: processes, count: 3, size: 1MiB, steps: [{action: stop}]}\n",
        "bad.yaml:1: foo: unknown field (expected one of: name, description, sample_interval, "
        "knobs, workload, repeats, matrix, optional)",
    ),
    (
        "workload:\n  type: processes\n  size: 1MiB\n  steps: [{action: stop}]\n",
        "bad.yaml:2: workload.count: missing required field",
    ),
    ("name: x\n", "bad.yaml:1: workload: missing required field"),
    (
        "workload:\n  type: processes\n  count: 2\n  size: 1MiB\n  steps:\n    - action: fill\n"
        "      patterns: [a]\n",
        "bad.yaml:7: workload.steps[0].patterns: expected 2 patterns (one per process, "
        "workload.count), got 1",
    ),
    (
        "workload:\n  type: procs\n  count: 2\n",
        "bad.yaml:2: workload.type: expected one of 'processes', 'vms', got 'procs'",
    ),
    (
        "workload:\n  type: processes\n  count: 2\n  size: 1MiB\n  steps:\n    - action: stopp\n",
        "bad.yaml:6: workload.steps[0].action: expected one of 'fill', 'unmerge', 'stop', "
        "got 'stopp'",
    ),
    (
        "workload:\n  type: processes\n  count: 2\n  size: 1MiB\n  steps:\n    - action: stop\n"
        "      expec: {}\n",
        "bad.yaml:7: workload.steps[0].expec: unknown field (expected one of: action, expect)",
    ),
    (
        "workload:\n  type: processes\n  count: 2\n  size: 1MiB\n  steps:\n    - action: stop\n"
        "      expect: {pages_shard: 1}\n",
        "bad.yaml:7: workload.steps[0].expect: unknown counter 'pages_shard' (expected a KSM "
        "counter such as pages_shared, pages_sharing, pages_unshared, pages_volatile, or a knob "
        "such as run)",
    ),
    (
        "workload:\n  type: processes\n  count: 2\n  size: 1MiB\n  scan_timeout: 5 minutes\n"
        "  steps: [{action: stop}]\n",
        "bad.yaml:5: workload.scan_timeout: expected a duration such as 30s, 15m or 1h30m, "
        "got '5 minutes'",
    ),
    (
        "sample_interval: 0.01s\nworkload: {type: vms, base: {domain: x}, clones: 2}\n",
        "bad.yaml:1: sample_interval: expected a value >= 0.1, got 0.01",
    ),
    (
        "knobs:\n  pages_to_scn: 3\nworkload: {type: vms, base: {domain: x}, clones: 2}\n",
        "bad.yaml:2: knobs.pages_to_scn: unknown KSM knob (expected one of: pages_to_scan, "
        "sleep_millisecs, merge_across_nodes, use_zero_pages, max_page_sharing, "
        "stable_node_chains_prune_millisecs, smart_scan, advisor_mode, advisor_max_cpu, "
        "advisor_min_pages_to_scan, advisor_max_pages_to_scan, advisor_target_scan_time)",
    ),
    (
        "knobs:\n  run: 1\nworkload: {type: vms, base: {domain: x}, clones: 2}\n",
        "bad.yaml:2: knobs.run: 'run' is set by the workload (ksmd goes on when the scenario "
        "says), not a knob to pin",
    ),
    (
        "knobs:\n  pages_to_scan: lots\nworkload: {type: vms, base: {domain: x}, clones: 2}\n",
        "bad.yaml:2: knobs.pages_to_scan: expected an integer, got 'lots'",
    ),
    (
        "workload:\n  type: vms\n  base: {domain: x}\n  clones: 2\n  bogus: 1\n",
        "bad.yaml:5: workload.bogus: unknown field (expected one of: type, connect, domain_type, "
        "base, clones, disk, pool, memory, guest_fill, boot, guest_run, churn, probe, settle, "
        "steady, plateau, unmerge, expect, sharing)",
    ),
    (
        "workload:\n  type: vms\n  base: {domain: x}\n  clones: 0\n",
        "bad.yaml:4: workload.clones: expected a value >= 1, got 0",
    ),
    (
        "workload:\n  type: vms\n  base: {domain: x}\n  clones: 2\n  disk: clone\n",
        "bad.yaml:5: workload.disk: expected 'overlay' or 'copy', got 'clone'",
    ),
    (
        "workload:\n  type: processes\n  count: 2\n  count: 3\n  size: 1MiB\n"
        "  steps: [{action: stop}]\n",
        "bad.yaml:4: workload.count: duplicate key (also on line 3)",
    ),
    ("workload: [1, 2\n", "bad.yaml:2: invalid YAML: did not find expected ',' or ']'"),
    ("", "bad.yaml:1: the scenario is empty (expected a mapping with 'workload')"),
    ("- a\n", "bad.yaml:1: expected a mapping of fields at the top of the scenario"),
    (
        "workload:\n  type: processes\n  count: 3\n  size: 128MiB\n"
        "  cgroup: {memory_limit: 64MiB}\n  steps: [{action: stop}]\n",
        "bad.yaml:5: workload.cgroup.memory_limit: expected at least count x size = 402653184 "
        "bytes, or the processes would be killed by the OOM killer",
    ),
    (
        "workload:\n  type: processes\n  count: 1\n  size: 1MiB\n  steps:\n    - action: fill\n"
        "      patterns: [abc]\n",
        "bad.yaml:7: workload.steps[0].patterns[0]: expected one character or a byte value 0-255, "
        "got 'abc'",
    ),
]


@pytest.mark.parametrize(("text", "message"), BAD, ids=[m.split(": ")[1] for _, m in BAD])
def test_bad_scenario_one_line(text: str, message: str) -> None:
    with pytest.raises(UserError) as exc:
        scenario.loads(text, "bad.yaml")
    assert str(exc.value) == message


def test_good_scenario_resolves_units() -> None:
    sc = scenario.loads(GOOD, "good.yaml")
    assert sc.workload.size == 1024 * 1024
    dumped = sc.model_dump(mode="json")
    assert dumped["workload"]["steps"][0]["patterns"][0] == {
        "byte": 97,
        "last_byte": None,
        "random": False,
    }
    assert dumped["sample_interval"] == 1.0


def test_bundled_scenarios_are_valid() -> None:
    files = sorted(scenario.SCENARIO_DIR.glob("*.yaml"))
    assert files
    for f in files:
        scenario.load(f)


def test_bench_bad_input_exit_2_changes_nothing(tmp_path: Path, fake_root: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD[0][0])
    before = knob_values(fake_root)
    proc = subprocess.run(
        [sys.executable, "-m", "kvmksm", "bench", str(bad), "-o", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env={"KVMKSM_ROOT": str(fake_root), "PATH": "/usr/bin"},
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"kvmksm: {bad}:3: workload.count: expected an integer, got 'three'"
    ]
    assert "Traceback" not in proc.stderr
    assert knob_values(fake_root) == before
    assert not (tmp_path / "out").exists()


def test_knob_missing_on_kernel_exit_2(tmp_path: Path) -> None:
    from .fakehost import make_tree

    root = make_tree(tmp_path / "old", old_kernel=True)
    sc = tmp_path / "s.yaml"
    sc.write_text("knobs: {smart_scan: 0}\n" + GOOD.replace("name: ok\n", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "kvmksm", "bench", str(sc), "-o", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env={"KVMKSM_ROOT": str(root), "PATH": "/usr/bin"},
    )
    assert proc.returncode == 2, proc.stderr
    assert "knob 'smart_scan' is not available on this kernel" in proc.stderr
    assert "appeared in Linux 6.7" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1

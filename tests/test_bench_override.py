"""`kvmksm bench --clones N` / `--count N`: the scenario run at another count, as a matrix point
would run it; the wrong flag, a matrix or per-process patterns refused in one line, before
anything touches the host."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from kvmksm.commands.experiment import apply_point
from kvmksm.commands.overrides import override_count
from kvmksm.errors import UserError
from kvmksm.scenario.load import load, load_arg

PROCS = """\
name: procs
repeats: 2
workload:
  type: processes
  count: 2
  size: 1MiB
  steps:
    - action: fill
      patterns: [a, a]
      expect: {pages_sharing: {min: 1}}
"""


def test_count_repeats_the_pattern_as_a_matrix_point_does(tmp_path: Path) -> None:
    f = tmp_path / "p.yaml"
    f.write_text(PROCS)
    sc = load(f)
    out = override_count(sc, str(f), None, 5)
    assert out.workload.count == 5 and out.repeats == 2 and out.matrix == {}
    assert [len(s.patterns) for s in out.workload.steps] == [5]
    # the same as the matrix's own point (repeats aside)
    assert out.workload == apply_point(sc, {"count": 5}).workload
    assert override_count(sc, str(f), None, None) is sc


def test_clones_on_a_vms_scenario() -> None:
    sc, path = load_arg("tiny3")
    out = override_count(sc, path, 6, None)
    assert out.workload.clones == 6 and out.workload.base == sc.workload.base
    assert out.knobs == sc.knobs


@pytest.mark.parametrize(
    ("scenario", "clones", "count", "message"),
    [
        ("tiny3", None, 4, "--count is for a processes workload; this scenario runs vms: use --c"),
        ("ltp-ksm03", 4, None, "--clones is for a vms workload; this scenario runs processes: use"),
        ("tiny-sweep", 6, None, "--clones: the scenario has a matrix (clones), which says which"),
        ("ltp-ksm03", None, 4, "--count: workload.steps[0] gives each process its own pattern"),
        ("tiny3", 1001, None, "--clones: expected 1 to 1000, got 1001"),
    ],
)  # fmt: skip
def test_refused(scenario: str, clones: int | None, count: int | None, message: str) -> None:
    sc, path = load_arg(scenario)
    with pytest.raises(UserError, match=re.escape(message)):
        override_count(sc, path, clones, count)


def test_cli_refuses_in_one_line_before_touching_the_host(tmp_path: Path) -> None:
    for args, says in (
        (["tiny-sweep", "--clones", "6"], "the scenario has a matrix (clones)"),
        (["tiny3", "--count", "3"], "--count is for a processes workload"),
        (["ltp-ksm03", "--clones", "0"], "argument --clones: expected at least 1, got 0"),
        (["ltp-ksm03", "--clones", "2", "--count", "2"], "not allowed with argument"),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "kvmksm", "bench", *args, "-o", str(tmp_path / "out")],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 2, proc.stderr
        assert says in proc.stderr and proc.stdout == ""
        assert not (tmp_path / "out").exists()

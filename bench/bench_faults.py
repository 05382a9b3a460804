"""The fault table of bench/RESULTS.md: every fault of tests/test_faults_real.py caused for real
(tiny guests under qemu:///system, the host's real KSM), and what each gave: exit status, the
record's status, the events that tell the story, and the line kvmksm said.

    python3 bench/bench_faults.py            # about 5 minutes on a 2-core host under TCG

A row is written only once its test has checked that the host was put back (no kvmksm
domain, volume or cgroup of the run left, every KSM knob as before, no killed-run state), so
every row below also means "nothing stranded". Runs the tests under the real-KSM lock.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "faults.jsonl"
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
             "tests/test_faults_real.py"],
            cwd=ROOT,
            env={**os.environ, "KVMKSM_FAULT_TABLE": str(table)},
        )  # fmt: skip
        rows = (
            [json.loads(line) for line in table.read_text().splitlines()] if table.exists() else []
        )
    print("| fault | exit | status | events | what kvmksm said |")
    print("|---|---|---|---|---|")
    for r in rows:
        said = r["said"].replace("|", "\\|")
        events = ", ".join(r["events"]) or "-"
        print(f"| {r['fault']} | {r['exit']} | {r['status'] or '-'} | {events} | {said} |")
    print(f"\n{len(rows)} faults, host put back after each; pytest exit status {proc.returncode}")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())

"""How long kvmksm takes to refuse hostile scenario files, and how much memory it uses.

    python3 bench/bench_hostile_input.py            # median of 5 passes per file
    python3 bench/bench_hostile_input.py --passes 20

Each file is checked in this process (scenario.load.check_bytes: decoding, the bounded YAML
reader, the schema, the knob checks); time is the median wall time, memory the peak Python
allocation seen by tracemalloc in a separate pass. Also `kvmksm validate` in a fresh process
on the worst file, Python's start and imports included. Target: every file refused in under a
second (issue 9), with a few MiB.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kvmksm.scenario.load import check_bytes  # noqa: E402
from kvmksm.scenario.safe_yaml import MAX_BYTES  # noqa: E402

PROC = "workload: {type: processes, count: 1, size: 1MiB, steps: [{action: stop}]}\n"


def _bomb(levels: int) -> str:
    text = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    for i in range(levels):
        text += f"{chr(98 + i)}: &{chr(98 + i)} [" + ",".join([f"*{chr(97 + i)}"] * 9) + "]\n"
    return text + PROC


FILES: dict[str, bytes] = {
    "billion laughs (9 levels, 10^9 nodes)": _bomb(9).encode(),
    "recursive alias": b"description: &d [*d]\n",
    "100,000 levels of [": b"a: " + b"[" * 100_000 + b"]" * 100_000 + b"\n",
    "not UTF-8": b"description: caf\xe9\n" + PROC.encode(),
    "NaN duration": b"sample_interval: .nan\n" + PROC.encode(),
    "256 KiB flow list": b"a: [" + b",".join([b"1"] * (MAX_BYTES // 2 - 8)) + b"]\n",
    "10k unknown knobs": (
        "knobs: {" + ", ".join(f"k{i}: 1" for i in range(4900)) + "}\n" + PROC
    ).encode(),
    "10k bad axis values": (
        "matrix:\n  max_page_sharing: [" + ",".join(str(-i) for i in range(9900)) + "]\n" + PROC
    ).encode(),
    "5k duplicate keys": (
        "knobs:\n" + "".join(f"  pages_to_scan: -{i}\n" for i in range(4900)) + PROC
    ).encode(),
    "5000-digit number": b"workload: {type: processes, count: "
    + b"9" * 5000
    + b", size: 1MiB, steps: [{action: stop}]}\n",
    "the bundled tiny3 (valid)": (ROOT / "kvmksm/scenarios/tiny3.yaml").read_bytes(),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--passes", type=int, default=5)
    args = ap.parse_args()
    print(f"{'file':40} {'bytes':>8} {'median':>9} {'max':>9} {'peak MiB':>9} problems")
    worst = ("", 0.0)
    for name, raw in FILES.items():
        times = []
        for _ in range(args.passes):
            t0 = time.perf_counter()
            checked = check_bytes(raw, "f.yaml", "f")
            times.append(time.perf_counter() - t0)
        tracemalloc.start()
        check_bytes(raw, "f.yaml", "f")
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        med = statistics.median(times)
        worst = max(worst, (name, max(times)), key=lambda w: w[1])
        print(
            f"{name:40} {len(raw):8} {med * 1000:7.1f}ms {max(times) * 1000:7.1f}ms "
            f"{peak:9.1f} {len(checked.problems)}"
        )
    print(f"slowest: {worst[0]}, {worst[1] * 1000:.0f} ms")
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "worst.yaml"
        f.write_bytes(FILES["10k bad axis values"])
        t0 = time.perf_counter()
        p = subprocess.run(
            [sys.executable, "-m", "kvmksm", "validate", str(f)], capture_output=True, cwd=ROOT
        )
        took = time.perf_counter() - t0
        print(
            f"kvmksm validate (fresh process) on '10k bad axis values': {took:.2f} s, "
            f"exit {p.returncode}, {len(p.stderr.splitlines())} lines"
        )


if __name__ == "__main__":
    main()

"""How long the HTML report takes for a big record, and how big it gets.

    python3 bench/bench_report.py            # 24 h at 1 Hz, 100 guests (the issue's target)
    python3 bench/bench_report.py --hours 1 --guests 10

Builds a synthetic record (tests/recordgen.py: known curves with jitter) in a temporary folder,
then times `kvmksm report RUN_DIR` in fresh processes: starting Python, reading the CSV files,
the metrics, the charts and the HTML. Targets: under 10 s and under 5 MB.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kvmksm.analysis.metrics import analyse  # noqa: E402
from kvmksm.results.record import load_record  # noqa: E402
from kvmksm.views.report import render_report  # noqa: E402
from tests.recordgen import VmRun, vm_record  # noqa: E402


def _parts(run_dir: Path) -> dict[str, float]:
    """Where the time goes: reading the record, the metrics, charts and HTML."""
    out = {}
    t0 = time.perf_counter()
    record = load_record(run_dir)
    out["load_record"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    analyse(record)
    out["metrics"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    render_report(record)
    out["metrics again + charts + HTML"] = time.perf_counter() - t0
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hours", type=float, default=24.0)
    ap.add_argument("--guests", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--keep", type=Path, help="build the record here and keep it")
    args = ap.parse_args()

    duration = args.hours * 3600 - 1  # samples at t = 0 .. duration: hours x 3600 rows
    run = VmRun(
        guests=args.guests,
        guest_mib=1024,
        duration=duration,
        t_on=600.0,
        rise=min(1800.0, duration / 4),
        steady=min(2400.0, duration / 2),
        unmerge=duration - 300,
        shared_top=100_000,
        noise=0.05,
    )
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.keep or Path(tmp) / "run"
        t0 = time.perf_counter()
        vm_record(run_dir, run)
        built = time.perf_counter() - t0
        sizes = {p.name: p.stat().st_size for p in run_dir.iterdir()}
        print(
            f"record: {args.hours:g} h at 1 Hz, {args.guests} guests: "
            f"samples.csv {sizes['samples.csv'] / 2**20:.1f} MiB, "
            f"vm_samples.csv {sizes.get('vm_samples.csv', 0) / 2**20:.1f} MiB "
            f"(built in {built:.1f} s)"
        )
        times = []
        for _ in range(args.repeat):  # a fresh process each time, as a user runs it
            t0 = time.perf_counter()
            cmd = [sys.executable, "-m", "kvmksm", "report", str(run_dir)]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
            times.append(time.perf_counter() - t0)
        size = (run_dir / "report.html").stat().st_size
        parts = _parts(run_dir)
    print(
        f"kvmksm report RUN_DIR: median {statistics.median(times):.2f} s, "
        f"max {max(times):.2f} s over {len(times)} fresh processes (target < 10 s)"
    )
    print("in one process: " + ", ".join(f"{k} {v:.2f} s" for k, v in parts.items()))
    print(f"report.html: {size:,} bytes = {size / 1e6:.2f} MB (target < 5 MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

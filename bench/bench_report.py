"""How long the HTML report takes for a big record, and how big it gets.

    python3 bench/bench_report.py            # 24 h at 1 Hz, 100 guests (the issue's target)
    python3 bench/bench_report.py --hours 1 --guests 10

Builds a synthetic record (tests/recordgen.py: known curves with jitter) in a temporary folder,
then times write_report(RUN_DIR) as `kvmksm report` runs it: reading the CSV files, the
metrics, the charts and the HTML. Targets: under 10 s and under 5 MB.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvmksm.analysis import analyse  # noqa: E402
from kvmksm.record import load_record  # noqa: E402
from kvmksm.report import write_report  # noqa: E402
from tests.recordgen import VmRun, vm_record  # noqa: E402


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
        t0 = time.perf_counter()
        record = load_record(run_dir)
        t_load = time.perf_counter() - t0
        t0 = time.perf_counter()
        analyse(record)
        t_analyse = time.perf_counter() - t0
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            out = write_report(run_dir)
            times.append(time.perf_counter() - t0)
        size = out.stat().st_size
    print(f"parts: load_record {t_load:.2f} s, metrics {t_analyse:.2f} s")
    print(
        f"write_report: median {statistics.median(times):.2f} s, max {max(times):.2f} s "
        f"over {len(times)} runs (target < 10 s)"
    )
    print(f"report.html: {size:,} bytes = {size / 1e6:.2f} MB (target < 5 MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

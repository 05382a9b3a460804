"""How long the HTML report takes for big records, how much memory it needs, how big they get.

    python3 bench/bench_report.py                      # 1 day x 100 guests, 7 days x 200 guests
    python3 bench/bench_report.py --sizes 1x10 --repeat 1
    python3 bench/bench_report.py --sizes 168x200 --keep /var/tmp/week   # keep the record

Builds each synthetic record (tests/recordgen.py: known curves, jitter on ksmd's CPU and on
every guest's figures) in a temporary folder, laid out as a run writes it (vm_samples.csv for
the first hour, hourly Parquet parts after), then times `kvmksm report RUN_DIR` and
`kvmksm compare RUN_DIR` in fresh processes and takes each one's peak memory (ru_maxrss from
wait4). Targets: report and compare under 60 s and under 2 GB at 7 days x 200 guests; at most
about 10 bytes a guest-sample on disk.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.recordgen import VmRun, vm_record  # noqa: E402


def timed(cmd: list[str]) -> tuple[float, float]:
    """(seconds, peak resident MiB) of one fresh process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited with {proc.returncode}")
    return seconds, usage.ru_maxrss / 1024  # kB on Linux


def build(run_dir: Path, hours: float, guests: int) -> VmRun:
    duration = hours * 3600 - 1  # samples at t = 0 .. duration: hours x 3600 rows
    run = VmRun(
        guests=guests,
        guest_mib=1024,
        duration=duration,
        t_on=600.0,
        rise=min(1800.0, duration / 4),
        steady=min(2400.0, duration / 2),
        unmerge=duration - 300,
        shared_top=100_000,
        noise=0.05,
    )
    vm_record(run_dir, run)
    return run


def sizes(run_dir: Path) -> dict[str, int]:
    out = {p.name: p.stat().st_size for p in run_dir.iterdir() if p.is_file()}
    parts = sorted((run_dir / "vm_samples").glob("part-*.parquet"))
    out["parts"] = sum(p.stat().st_size for p in parts)
    out["part_files"] = len(parts)
    return out


def one(hours: float, guests: int, repeat: int, keep: Path | None) -> None:
    with tempfile.TemporaryDirectory(dir=keep.parent if keep else None) as tmp:
        run_dir = keep or Path(tmp) / "run"
        t0 = time.perf_counter()
        run = build(run_dir, hours, guests)
        built = time.perf_counter() - t0
        s = sizes(run_dir)
        rows = len(run.times()) * guests
        csv_rows = min(3600, len(run.times())) * guests
        vm_bytes = s.get("vm_samples.csv", 0) + s["parts"]
        print(
            f"record: {hours:g} h at 1 Hz, {guests} guests, {rows:,} guest-samples "
            f"(built in {built:.0f} s): samples.csv {s['samples.csv'] / 2**20:.1f} MiB, "
            f"vm_samples.csv (first hour) {s.get('vm_samples.csv', 0) / 2**20:.1f} MiB, "
            f"{s['part_files']} Parquet parts {s['parts'] / 2**20:.1f} MiB"
        )
        per_part = s["parts"] / (rows - csv_rows) if rows > csv_rows else float("nan")
        print(
            f"  bytes per guest-sample: {vm_bytes / rows:.2f} over the whole record, "
            f"{per_part:.2f} in the Parquet parts"
        )
        py = [sys.executable, "-m", "kvmksm"]
        for name, cmd in (
            ("report", [*py, "report", str(run_dir)]),
            ("compare", [*py, "compare", str(run_dir), "-o", str(Path(tmp) / "compare.html")]),
        ):
            got = [timed(cmd) for _ in range(repeat)]
            secs = [g[0] for g in got]
            peak = max(g[1] for g in got)
            print(
                f"  kvmksm {name}: median {statistics.median(secs):.1f} s, "
                f"max {max(secs):.1f} s over {len(secs)} fresh processes; "
                f"peak memory {peak:,.0f} MiB"
            )
        size = (run_dir / "report.html").stat().st_size
        print(f"  report.html: {size:,} bytes = {size / 1e6:.2f} MB")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--sizes",
        default="24x100,168x200",
        help="records to build, HOURSxGUESTS, comma separated (default 24x100,168x200)",
    )
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--keep", type=Path, help="build the (single) record here and keep it")
    args = ap.parse_args()
    for spec in args.sizes.split(","):
        hours, guests = spec.split("x")
        one(float(hours), int(guests), args.repeat, args.keep)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Sampler benchmark: the cost of one tick, and how closely ticks follow the schedule.

    python3 bench/bench_sampler.py --ticks 2000 --duration 600 --interval 1

Reads the real /sys and /proc (read only: no knob is written).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from kvmksm.host.fs import HostFS
from kvmksm.results.record import RunRecord
from kvmksm.sampling.sampler import Sampler


def tick_cost(n: int) -> list[float]:
    """Whole ticks: read every file and append the row to samples.csv (flushed)."""
    with tempfile.TemporaryDirectory() as d:
        rec = RunRecord.create(Path(d), {"name": "bench-sampler"}, None)
        sampler = Sampler(HostFS(), rec)
        out = []
        for _ in range(n):
            s = time.perf_counter()
            sampler.tick()
            out.append(time.perf_counter() - s)
        sampler.stop(final_tick=False)
        return out


def schedule(duration: float, interval: float) -> tuple[list[float], int, int]:
    with tempfile.TemporaryDirectory() as d:
        rec = RunRecord.create(Path(d), {"name": "bench-sampler"}, None)
        sampler = Sampler(HostFS(), rec, interval)
        sampler.start()
        time.sleep(duration)
        sampler.stop(final_tick=False)
        print(f"sampler thread real-time (SCHED_FIFO 1): {sampler.realtime}")
        return sampler.lateness, sampler.missed, sampler.out.rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ticks", type=int, default=2000, help="ticks timed back to back")
    ap.add_argument("--duration", type=float, default=600, help="seconds on the schedule")
    ap.add_argument("--interval", type=float, default=1.0)
    a = ap.parse_args()

    cost = np.array(tick_cost(a.ticks)) * 1000
    print(
        f"tick cost over {a.ticks} ticks"
        " (every KSM file, ksmd stat, meminfo, vmstat, CSV row written):"
    )
    print(
        f"  mean {cost.mean():.3f} ms  median {np.median(cost):.3f} ms  "
        f"p99 {np.percentile(cost, 99):.3f} ms  max {cost.max():.3f} ms"
    )

    late, missed, rows = schedule(a.duration, a.interval)
    ms = np.array(late) * 1000
    k = np.arange(len(ms))
    slope = np.polyfit(k, ms, 1)[0] if len(ms) > 2 else float("nan")
    print(f"schedule over {a.duration:g}s at {a.interval:g}s: {rows} rows, {missed} missed")
    print(
        f"  lateness after deadline: median {statistics.median(ms):.3f} ms  "
        f"p99 {np.percentile(ms, 99):.3f} ms  max {ms.max():.3f} ms"
    )
    print(
        f"  drift: {slope * 3600 / a.interval:+.4f} ms per hour of ticks (linear fit), "
        f"first 10 mean {ms[:10].mean():.3f} ms, last 10 mean {ms[-10:].mean():.3f} ms"
    )


if __name__ == "__main__":
    main()

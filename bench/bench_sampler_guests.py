"""One sampler tick with N guests: every KSM counter, ksmd, host memory, and per guest its
/proc/<pid>/ksm_stat and RSS, the row(s) appended to the CSV files.

    python3 bench/bench_sampler_guests.py --guests 30 --ticks 1000

Stand-ins for QEMU: N processes with a MADV_MERGEABLE mapping each (kvmksm's own filler), so
their ksm_stat holds what a guest's does. Reads only: no knob is written.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from kvmksm.host.fs import HostFS
from kvmksm.results.record import RunRecord
from kvmksm.sampling.guest_rows import VmProbe
from kvmksm.sampling.sampler import Sampler


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--guests", type=int, default=30)
    ap.add_argument("--ticks", type=int, default=1000)
    a = ap.parse_args()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "kvmksm.workloads.filler", str(4 << 20), str(i)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(a.guests)
    ]
    try:
        pids = {}
        for i, p in enumerate(procs):
            assert p.stdout is not None
            kind, pid = json.loads(p.stdout.readline())
            pids[f"guest-{i:02d}"] = pid
        with tempfile.TemporaryDirectory() as d:
            rec = RunRecord.create(Path(d), {"name": "bench-guests"}, None)
            fs = HostFS()
            sampler = Sampler(fs, rec, probes=[VmProbe(fs, lambda: pids)])
            cost = []
            for _ in range(a.ticks):
                s = time.perf_counter()
                sampler.tick()
                cost.append(time.perf_counter() - s)
            rows = sampler.probe_out[0].rows
            sampler.stop(final_tick=False)
        ms = np.array(cost) * 1000
        print(f"{a.guests} guests, {a.ticks} ticks ({rows} per-guest rows written):")
        print(
            f"  tick mean {ms.mean():.3f} ms  median {np.median(ms):.3f} ms  "
            f"p99 {np.percentile(ms, 99):.3f} ms  max {ms.max():.3f} ms (target < 5 ms)"
        )
    finally:
        for p in procs:
            p.kill()
            p.wait()


if __name__ == "__main__":
    main()

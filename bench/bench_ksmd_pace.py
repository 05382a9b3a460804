"""How fast ksmd really goes through batches: the time a batch takes when it has almost no
work (100 unique pages), at a few sleep_millisecs values. The configured rate
pages_to_scan x 1000 / sleep_millisecs assumes the sleep is exact; this shows what the
kernel's timer makes of it, i.e. the fastest ksmd can scan with those knobs.

    flock /tmp/kvmksm-realksm.lock python3 bench/bench_ksmd_pace.py

Uses real KSM (host-wide): run it alone; every knob is restored, merged pages unmerged.
"""

from __future__ import annotations

import mmap
import os
import time

from kvmksm.host.fs import HostFS
from kvmksm.host.ksm import Ksm

BATCH = 100


def main() -> None:
    ksm = Ksm(HostFS())
    saved = ksm.read_knobs()
    # 64 MiB of unique pages, so every batch is BATCH pages of checksum and nothing else.
    m = mmap.mmap(-1, 64 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(mmap.MADV_MERGEABLE)
    for off in range(0, len(m), 4096):
        m[off : off + 8] = os.urandom(8)
    try:
        for sleep in (20, 10, 0):
            ksm.set_knobs({"pages_to_scan": BATCH, "sleep_millisecs": sleep})
            ksm.write("run", 1)
            time.sleep(0.5)
            a, t0 = int(ksm.read("pages_scanned")), time.monotonic()
            time.sleep(3)
            b, t1 = int(ksm.read("pages_scanned")), time.monotonic()
            per_s = (b - a) / BATCH / (t1 - t0)
            print(
                f"sleep_millisecs={sleep:2d}: {per_s:6.1f} batches/s = {1000 / per_s:5.1f} ms a "
                f"batch (configured {sleep} ms + the batch's work)"
            )
    finally:
        ksm.write("run", 2)
        problems = ksm.restore(saved)
        print("knobs restored" if not problems and ksm.read_knobs() == saved else problems)


if __name__ == "__main__":
    main()

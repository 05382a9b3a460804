"""kvmksm churn: keep rewriting SIZE bytes of memory at RATE bytes a second, inside a guest.

kvmksm copies this file into every guest through the guest agent and starts it with the
guest's python3 (standard library only). It fills an anonymous buffer of SIZE bytes, then
rewrites it page by page, in order, RATE bytes a second, for ever (RATE 0: fill once and hold).

Every guest writes the same sequence: page i in pass p holds a pattern made of i and p only.
So a page is the same in every guest until it is rewritten (clones running one program on one
data set, the kindest churn for KSM): ksmd can merge pages that stay put long enough, and each
rewrite of a merged page is a copy-on-write break on the host (``cow_ksm`` in /proc/vmstat).
Pages are never the same inside one guest, so one guest alone merges none of them.

Every second it replaces a JSON status file: ready (the first fill is done), pages, passes,
bytes written since the fill, seconds, and the rate achieved (a slow guest may fall behind).
"""

import argparse
import json
import mmap
import os
import struct
import sys
import time

PAGE = mmap.PAGESIZE
MAGIC = 0x6B766D6B736D6331  # "kvmksmc1": not the probe's pattern, nor anyone else's


def pattern(i, p):
    """Page i of pass p."""
    return struct.pack("<QQQQ", MAGIC, i, p, i ^ p) * (PAGE // 32)


def write_status(path, status):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(status, f)
    os.replace(tmp, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, required=True, help="bytes of memory")
    ap.add_argument("--rate", type=int, required=True, help="bytes rewritten a second (0: none)")
    ap.add_argument("--status", default="/run/kvmksm-churn.json", help="status file")
    ap.add_argument("--duration", type=float, default=0, help="stop after this (0: never)")
    a = ap.parse_args(argv)
    pages = max(1, a.size // PAGE)
    buf = mmap.mmap(-1, pages * PAGE)
    t0 = time.monotonic()
    for i in range(pages):
        buf[i * PAGE : (i + 1) * PAGE] = pattern(i, 0)
    status = {
        "ready": True,
        "pid": os.getpid(),
        "pages": pages,
        "rate": a.rate,
        "fill_seconds": round(time.monotonic() - t0, 3),
        "passes": 0,
        "written": 0,
        "seconds": 0.0,
        "achieved_rate": 0.0,
        "behind": 0,
    }
    write_status(a.status, status)
    start = time.monotonic()
    last = start
    done = 0  # pages rewritten
    while True:
        now = time.monotonic()
        elapsed = now - start
        if a.duration and elapsed >= a.duration:
            break
        due = int(elapsed * a.rate / PAGE)
        # Bounded bursts: a guest that cannot keep up still writes its status each second.
        for _ in range(min(due - done, max(1, a.rate // PAGE))):
            i, p = done % pages, done // pages + 1
            buf[i * PAGE : (i + 1) * PAGE] = pattern(i, p)
            done += 1
        if now - last >= 1.0:
            last = now
            status.update(
                passes=done // pages,
                written=done * PAGE,
                seconds=round(elapsed, 3),
                achieved_rate=round(done * PAGE / elapsed, 1) if elapsed else 0.0,
                behind=max(0, due - done),
            )
            write_status(a.status, status)
        time.sleep(0.01 if a.rate else 1.0)
    status.update(
        passes=done // pages,
        written=done * PAGE,
        seconds=round(time.monotonic() - start, 3),
        achieved_rate=round(done * PAGE / max(1e-9, time.monotonic() - start), 1),
    )
    write_status(a.status, status)
    return 0


if __name__ == "__main__":
    sys.exit(main())

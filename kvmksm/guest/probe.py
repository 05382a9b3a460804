"""kvmksm probe: what a guest feels of KSM, as the latency of writes to memory KSM may merge.

kvmksm copies this file into every guest through the guest agent and starts it with the
guest's python3 (standard library only). It fills a SIZE buffer with contents that are the
same in every guest (page i holds a pattern of i), so ksmd merges it across guests like any
memory the guests have in common, writes DIR/ready, and waits. For each request file
DIR/req-NAME that appears it writes one byte into every page of the buffer, in a fixed
shuffled order, each write timed on its own, and writes the result to DIR/res-NAME.json:
percentiles of the write times in microseconds and the cost of the timer itself.

The byte written is the one the page already holds, so its contents stay the same and ksmd
can merge it again. A write to a page KSM merged traps to the host, which copies the page
first (a copy-on-write break, counted in the host's ``cow_ksm``): that copy, and ksmd's share
of the CPUs, is what KSM adds to a guest's latency.
"""

import argparse
import gc
import json
import math
import mmap
import os
import random
import struct
import sys
import time

PAGE = mmap.PAGESIZE
MAGIC = 0x6B766D6B736D7031  # "kvmksmp1": not the churn's pattern
PERCENTILES = (50, 90, 99, 99.9)


def pattern(i):
    return struct.pack("<QQQQ", MAGIC, i, ~i & 0xFFFFFFFFFFFFFFFF, 0) * (PAGE // 32)


def percentile(ordered, q):
    """Nearest-rank percentile of a sorted list."""
    if not ordered:
        return None
    rank = math.ceil(q * len(ordered) / 100.0 - 1e-9)  # 1-based; tolerant of 99.9 * 1000
    k = max(0, min(len(ordered) - 1, rank - 1))
    return ordered[k]


def measure(buf, pages, order):
    """Time one write into each page; microseconds."""
    clock = time.perf_counter_ns
    floor = []
    for _ in range(1000):  # what timing itself costs: two clock reads
        t0 = clock()
        t1 = clock()
        floor.append(t1 - t0)
    times = []
    gc.disable()
    try:
        for i in order:
            off = i * PAGE + 8  # inside the pattern: the byte it already holds
            b = buf[off]
            t0 = clock()
            buf[off] = b
            t1 = clock()
            times.append(t1 - t0)
    finally:
        gc.enable()
    times.sort()
    floor.sort()
    out = {"writes": len(times), "pages": pages}
    for q in PERCENTILES:
        out[f"p{str(q).replace('.', '')}_us"] = round(percentile(times, q) / 1000.0, 3)
    out["max_us"] = round(times[-1] / 1000.0, 3)
    out["mean_us"] = round(sum(times) / len(times) / 1000.0, 3)
    out["timer_us"] = round(percentile(floor, 50) / 1000.0, 3)
    out["over_100us"] = sum(1 for t in times if t > 100_000)
    return out


def write_json(path, data):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, required=True, help="bytes of memory to write into")
    ap.add_argument("--dir", default="/run/kvmksm-probe", help="where requests and results go")
    ap.add_argument("--once", help="measure once as NAME, print the result and exit")
    a = ap.parse_args(argv)
    pages = max(1, a.size // PAGE)
    buf = mmap.mmap(-1, pages * PAGE)
    for i in range(pages):
        buf[i * PAGE : (i + 1) * PAGE] = pattern(i)
    order = list(range(pages))
    random.Random(pages).shuffle(order)
    if a.once:
        print(json.dumps(dict(measure(buf, pages, order), name=a.once)))
        return 0
    os.makedirs(a.dir, exist_ok=True)
    write_json(os.path.join(a.dir, "ready"), {"pid": os.getpid(), "pages": pages})
    while True:
        for name in sorted(os.listdir(a.dir)):
            if not name.startswith("req-"):
                continue
            what = name[4:]
            os.unlink(os.path.join(a.dir, name))
            result = dict(measure(buf, pages, order), name=what, uptime=_uptime())
            write_json(os.path.join(a.dir, f"res-{what}.json"), result)
        time.sleep(0.05)


def _uptime():
    try:
        with open("/proc/uptime") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError):
        return None


if __name__ == "__main__":
    sys.exit(main())

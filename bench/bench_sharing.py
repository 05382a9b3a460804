"""Cost of the sharing step per GiB of guest memory: the matrix pass (smaps, pagemap,
kpageflags, kpagecount) and the potential pass (every present page hashed through
/proc/<pid>/mem), and how to read /proc/kpageflags (stretches around the frames needed vs
the whole file).

    python3 bench/bench_sharing.py --procs 4 --size 256MiB --runs 3

Stand-ins for QEMU: processes with a MADV_MERGEABLE mapping each, a quarter of it zero
pages, a quarter a content common to all, half random. No knob is written, but mergeable
memory would mix into anyone else's KSM figures, so it holds the real-KSM lock
(/tmp/kvmksm-realksm.lock) while its processes live. Needs root (pagemap frame numbers).
"""

from __future__ import annotations

import argparse
import fcntl
import os
import statistics
import subprocess
import sys
import time

import numpy as np

from kvmksm.analysis.potential import measure_potential
from kvmksm.analysis.sharing import measure_sharing
from kvmksm.host.fs import HostFS
from kvmksm.host.ksm import Ksm
from kvmksm.host.pagemap import read_kpage
from kvmksm.units import parse_size

LOCK = "/tmp/kvmksm-realksm.lock"
CHILD = """
import mmap, os, random, sys
size, index = int(sys.argv[1]), int(sys.argv[2])
ps = mmap.PAGESIZE
m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
m.madvise(mmap.MADV_MERGEABLE)
common = random.Random(7).randbytes(1 << 20)
n = size // ps
q = n // 4
m[q * ps : 2 * q * ps] = (common * (q * ps // len(common) + 1))[: q * ps]  # shared by all
m[2 * q * ps :] = os.urandom(size - 2 * q * ps)  # unique
m[: q * ps] = bytes(q * ps)  # zero pages, written so they are present
print(os.getpid(), flush=True)
sys.stdin.read()
"""


def whole_file(path: str) -> np.ndarray:
    parts = []
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(8 << 20):
            parts.append(np.frombuffer(chunk, dtype="<u8"))
    return np.concatenate(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--size", default="256MiB")
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    size = parse_size(a.size)
    lock = os.open(LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the process ends
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(size), str(i)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(a.procs)
    ]
    try:
        pids = {f"p{i}": int(p.stdout.readline()) for i, p in enumerate(procs)}  # type: ignore[union-attr]
        fs = HostFS()
        gib = a.procs * size / (1 << 30)
        matrix, pot = [], []
        for _ in range(a.runs):
            t = time.perf_counter()
            s, snap = measure_sharing(fs, Ksm(fs), pids)
            matrix.append(time.perf_counter() - t)
            t = time.perf_counter()
            p = measure_potential(fs, snap)
            pot.append(time.perf_counter() - t)
        print(
            f"{a.procs} processes x {a.size} = {gib:.2f} GiB, {p['pages']:,} pages "
            f"({p['zero_pages']:,} zero), potential {p['potential']:,} pages, {a.runs} runs"
        )
        for name, xs in (("matrix (pagemap + kpageflags)", matrix), ("potential (hash)", pot)):
            m = statistics.median(xs)
            print(f"  {name}: median {m:.3f} s = {m / gib:.3f} s per GiB (min {min(xs):.3f} s)")
        union = np.unique(np.concatenate([pp.pfn for pp in snap.pages]))
        print(f"kpageflags for {len(union):,} frames:")
        for gap in (0, 8, 64, 512, 4096):
            if gap == 0 and len(union) > 300_000:
                continue  # one pread per frame: too slow to bother
            t = time.perf_counter()
            read_kpage(fs, "kpageflags", union, gap)
            print(f"  stretches with gaps < {gap}: {time.perf_counter() - t:.3f} s")
        t = time.perf_counter()
        n = len(whole_file(str(fs.path("proc/kpageflags"))))
        print(f"  whole file ({n:,} frames): {time.perf_counter() - t:.3f} s")
        print(f"host load while measuring: {os.getloadavg()[0]:.2f} (2 CPUs shared)")
    finally:
        for p in procs:
            p.stdin.close()  # type: ignore[union-attr]
            p.wait(10)


if __name__ == "__main__":
    main()

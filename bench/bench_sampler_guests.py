"""One sampler tick with N guests: every KSM counter, ksmd, host memory, and per guest its
/proc/<pid>/ksm_stat and RSS, the rows appended to the CSV files, at 10, 100 and 1,000 guests.

    flock /tmp/kvmksm-realksm.lock python3 bench/bench_sampler_guests.py --guests 10,100,1000

Stand-ins for QEMU: real processes, forked from this one, each with a small anonymous
MADV_MERGEABLE mapping filled with one of a few byte values, so ksmd merges them and their
ksm_stat holds real figures. KSM is switched on (pages_to_scan 1000, sleep_millisecs 20, as
tiny3) and left scanning while the ticks are timed, so the kernel does its real work beside
the reads; every knob is put back at the end. That needs the real-KSM lock (run it under
flock as above); `--no-ksm` only reads (the mappings are then not merged).

Ticks run back to back with a short gap, on the sampler thread's real-time priority
(SCHED_FIFO 1, as kvmksm's sampler takes it; `--normal-priority` to compare). The first tick
opens every guest's files and is reported apart; then the mean, median, p99 and max, and
beside them the floor: the same two files a guest pread with nothing parsed or written.
`--reopen` also times the reads done the old way (open, read, close each file every tick).
Guests are shared with helper processes as kvmksm shares them (one at 1,000 guests on two
CPUs; kvmksm.sampling.read_helper); `--helpers 0` reads them all in the sampler's process.
"""

from __future__ import annotations

import argparse
import gc
import mmap
import os
import signal
import sys
import time

LOCK = "/tmp/kvmksm-realksm.lock"
KNOBS = {"pages_to_scan": 1000, "sleep_millisecs": 20}


def spawn(n: int, size: int) -> list[int]:
    """n children, each filling a MADV_MERGEABLE mapping of `size` bytes and then waiting."""
    gc.freeze()  # children must not dirty the parent's pages by collecting them
    r, w = os.pipe()
    pids = []
    for i in range(n):
        pid = os.fork()
        if pid == 0:  # the child: only os/mmap/signal from here on
            try:
                os.close(r)
                m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
                m.madvise(mmap.MADV_MERGEABLE)
                m.write(bytes([97 + i % 4]) * size)  # four groups of identical pages
                os.write(w, b"r")
                while True:
                    signal.pause()
            finally:
                os._exit(0)
        pids.append(pid)
    os.close(w)
    got = 0
    while got < n:
        chunk = os.read(r, n - got)
        if not chunk:
            raise RuntimeError(f"only {got} of {n} children came up")
        got += len(chunk)
    os.close(r)
    return pids


def reap(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid in pids:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


def lock_is_held() -> bool:
    """True when someone (our `flock` wrapper) holds the real-KSM lock."""
    import fcntl

    fd = os.open(LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases the lock if we did take it
    return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--guests", default="10,100,1000", help="guest counts, comma-separated")
    ap.add_argument("--ticks", type=int, default=300, help="timed ticks per guest count")
    ap.add_argument("--gap", type=float, default=0.05, help="seconds between ticks")
    ap.add_argument("--size", type=int, default=256 << 10, help="bytes of mergeable memory each")
    ap.add_argument("--no-ksm", action="store_true", help="do not switch KSM on (reads only)")
    ap.add_argument("--normal-priority", action="store_true", help="no SCHED_FIFO for ticks")
    ap.add_argument("--reopen", action="store_true", help="also time open/read/close per guest")
    ap.add_argument(
        "--helpers",
        type=int,
        help="helper processes sharing the reads (default: as kvmksm chooses for the count)",
    )
    a = ap.parse_args()
    counts = sorted(int(x) for x in a.guests.split(","))
    if not a.no_ksm and not lock_is_held():
        sys.exit(f"run under `flock {LOCK} ...` (KSM is global), or pass --no-ksm")

    children = spawn(max(counts), a.size)  # before the heavy imports: smaller children
    try:
        run(a, counts, children)
    finally:
        reap(children)


def run(a: argparse.Namespace, counts: list[int], children: list[int]) -> None:
    import tempfile
    from pathlib import Path

    import numpy as np

    from kvmksm.host.fs import HostFS
    from kvmksm.host.ksm import Ksm
    from kvmksm.host.process import ProcessGone, read_process
    from kvmksm.results.record import RunRecord
    from kvmksm.sampling.guest_rows import VmProbe
    from kvmksm.sampling.sampler import Sampler, _realtime_thread

    fs = HostFS()
    ksm = Ksm(fs)
    saved = ksm.read_knobs()
    realtime = False if a.normal_priority else _realtime_thread()
    try:
        if not a.no_ksm:
            ksm.set_knobs(KNOBS)
            ksm.write("run", 1)
            waited = ksm.wait_full_scans(3, timeout=300)
            print(
                f"KSM on ({', '.join(f'{k}={v}' for k, v in KNOBS.items())}): 3 full scans of "
                f"{len(children)} processes x {a.size >> 10} KiB in {waited:.1f} s; "
                f"pages_shared {ksm.read('pages_shared')}, "
                f"pages_sharing {ksm.read('pages_sharing')}"
            )
        print(f"ticks on SCHED_FIFO 1: {realtime}; {a.ticks} ticks per count, {a.gap} s apart")
        for n in counts:
            pids = {f"guest-{i:04d}": pid for i, pid in enumerate(children[:n])}
            with tempfile.TemporaryDirectory() as d:
                rec = RunRecord.create(Path(d), {"name": "bench-guests"}, None)
                probe = VmProbe(fs, lambda pids=pids: dict(pids), helpers=a.helpers)
                sampler = Sampler(fs, rec, probes=[probe])
                s = time.perf_counter()
                sampler.tick()
                first = time.perf_counter() - s
                helpers = len(probe.helper_pids)
                cost = []
                for _ in range(a.ticks):
                    time.sleep(a.gap)
                    s = time.perf_counter()
                    sampler.tick()
                    cost.append(time.perf_counter() - s)
                rows = sampler.probe_out[0].rows
                merging = sum(r["ksm_merging_pages"] or 0 for r in probe.last.values())
                source = sampler.ksmd_cpu_source
                sampler.stop(final_tick=False)
            ms = np.array(cost) * 1000
            print(
                f"{n:5d} guests: tick mean {ms.mean():.3f} ms  median {np.median(ms):.3f} ms  "
                f"p99 {np.percentile(ms, 99):.3f} ms  max {ms.max():.3f} ms  "
                f"(first tick, opening the files: {first * 1000:.1f} ms; "
                f"{helpers} helper process{'es' * (helpers != 1)})"
            )
            print(
                f"               {rows} guest rows written; ksm_merging_pages summed over the "
                f"guests {merging}; ksmd_cpu from {source}"
            )
            # The floor: the same two files a guest, held open and pread, nothing parsed,
            # nothing written.
            fds = [
                os.open(f"/proc/{pid}/{name}", os.O_RDONLY)
                for pid in pids.values()
                for name in ("ksm_stat", "statm")
            ]
            cost = []
            for _ in range(a.ticks):
                time.sleep(a.gap)
                s = time.perf_counter()
                for fd in fds:
                    os.pread(fd, 512, 0)
                cost.append(time.perf_counter() - s)
            for fd in fds:
                os.close(fd)
            ms = np.array(cost) * 1000
            print(
                f"               the reads alone (2 preads a guest): mean {ms.mean():.3f} ms  "
                f"median {np.median(ms):.3f} ms  p99 {np.percentile(ms, 99):.3f} ms"
            )
            if a.reopen:
                cost = []
                for _ in range(min(a.ticks, 50)):
                    time.sleep(a.gap)
                    s = time.perf_counter()
                    for pid in pids.values():
                        try:
                            read_process(fs, pid)
                        except ProcessGone:
                            pass
                    cost.append(time.perf_counter() - s)
                ms = np.array(cost) * 1000
                print(
                    f"               reads alone, opening and closing each file every tick: "
                    f"mean {ms.mean():.3f} ms  median {np.median(ms):.3f} ms"
                )
    finally:
        problems = ksm.restore(saved)
        after = ksm.read_knobs()
        print("knobs restored" if after == saved and not problems else f"RESTORE FAILED {problems}")


if __name__ == "__main__":
    main()

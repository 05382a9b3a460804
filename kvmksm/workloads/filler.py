"""The child side of the processes workload: one anonymous MADV_MERGEABLE mapping,
filled and verified on command. Run as `python -S -E .../filler.py SIZE INDEX [TOUCHED]`:
only the first TOUCHED bytes are ever written or read (a sparse mapping, reserved with
MAP_NORESERVE so it may be larger than memory). It imports only the standard library (and
``random`` only for random patterns), so a child starts in about 20 ms."""

from __future__ import annotations

import json
import mmap
import os
import signal
import sys
import time
import traceback
from typing import Any

CHUNK = 1 << 20
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)  # Linux's value; Python 3.11 lacks it


def content(pattern: dict[str, Any], index: int, round_no: int, size: int) -> bytes | None:
    """The whole expected content for random patterns (None for byte patterns)."""
    if pattern.get("random"):
        import random

        return random.Random(f"{round_no}/{index}").randbytes(size)
    return None


def fill(
    m: mmap.mmap, pattern: dict[str, Any], index: int, round_no: int, size: int | None = None
) -> None:
    size = len(m) if size is None else size
    data = content(pattern, index, round_no, size)
    if data is not None:
        m[:size] = data
        return
    chunk = bytes([pattern["byte"]]) * CHUNK
    for off in range(0, size, CHUNK):
        n = min(CHUNK, size - off)
        m[off : off + n] = chunk[:n]
    if pattern.get("last_byte") is not None:
        m[size - 1] = pattern["last_byte"]


def verify(
    m: mmap.mmap, pattern: dict[str, Any], index: int, round_no: int, size: int | None = None
) -> int | None:
    """First offset whose byte differs from what was written, or None."""
    size = len(m) if size is None else size
    data = content(pattern, index, round_no, size)
    chunk = b"" if data is not None else bytes([pattern["byte"]]) * CHUNK
    for off in range(0, size, CHUNK):
        n = min(CHUNK, size - off)
        # Compare against the prebuilt chunk (no per-chunk copies: they cost page faults).
        want = data[off : off + n] if data is not None else (chunk if n == CHUNK else chunk[:n])
        if data is None and pattern.get("last_byte") is not None and off + n == size:
            want = want[:-1] + bytes([pattern["last_byte"]])
        got = m[off : off + n]
        if got != want:
            return off + next(i for i in range(n) if got[i] != want[i])
    return None


def child_main(size: int, index: int, touched: int | None = None) -> None:
    """Serve commands, one JSON line each on stdin; answer one JSON line each on stdout."""
    # Ctrl-C goes to the whole process group; the parent decides when children end.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    out = sys.stdout

    def reply(kind: str, value: Any = None) -> None:
        out.write(json.dumps([kind, value]) + "\n")
        out.flush()

    try:
        touched = size if touched is None else min(touched, size)
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        if touched < size:
            flags |= MAP_NORESERVE  # most of it is never touched: do not account for it
        m = mmap.mmap(-1, size, flags=flags)
        m.madvise(mmap.MADV_MERGEABLE)
        if touched < size:
            # No transparent huge pages: a huge page at the edge of the touched part would
            # bring zero-filled pages with it (where the kernel does not align the mapping),
            # and their merging would spoil exact counts.
            m.madvise(mmap.MADV_NOHUGEPAGE)
        reply("ready", os.getpid())
        pattern: dict[str, Any] = {}
        round_no = 0
        for line in sys.stdin:
            cmd, arg = json.loads(line)
            t = time.monotonic()
            if cmd == "fill":
                round_no, pattern = arg
                fill(m, pattern, index, round_no, touched)
                reply("filled", time.monotonic() - t)
            elif cmd == "verify":
                bad = verify(m, pattern, index, round_no, touched)
                reply("verified", [bad, time.monotonic() - t])
            elif cmd == "exit":
                reply("bye")
                return
    except Exception:
        reply("error", traceback.format_exc())


if __name__ == "__main__":
    child_main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else None)

"""The child side of the processes workload: one anonymous MADV_MERGEABLE mapping,
filled and verified on command. Kept free of heavy imports: each child is spawned."""

from __future__ import annotations

import mmap
import os
import random
import signal
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

CHUNK = 4 << 20


def content(pattern: dict[str, Any], index: int, round_no: int, size: int) -> bytes | None:
    """The whole expected content for random patterns (None for byte patterns)."""
    if pattern.get("random"):
        return random.Random(f"{round_no}/{index}").randbytes(size)
    return None


def fill(m: mmap.mmap, pattern: dict[str, Any], index: int, round_no: int) -> None:
    size = len(m)
    data = content(pattern, index, round_no, size)
    if data is not None:
        m[:] = data
        return
    chunk = bytes([pattern["byte"]]) * CHUNK
    for off in range(0, size, CHUNK):
        n = min(CHUNK, size - off)
        m[off : off + n] = chunk[:n]
    if pattern.get("last_byte") is not None:
        m[size - 1] = pattern["last_byte"]


def verify(m: mmap.mmap, pattern: dict[str, Any], index: int, round_no: int) -> int | None:
    """First offset whose byte differs from what was written, or None."""
    size = len(m)
    data = content(pattern, index, round_no, size)
    if data is None:
        chunk = bytes([pattern["byte"]]) * CHUNK
    for off in range(0, size, CHUNK):
        n = min(CHUNK, size - off)
        want = data[off : off + n] if data is not None else bytearray(chunk[:n])
        if data is None and pattern.get("last_byte") is not None and off + n == size:
            want[-1] = pattern["last_byte"]
        got = m[off : off + n]
        if got != want:
            return off + next(i for i in range(n) if got[i] != want[i])
    return None


def child_main(conn: Connection, size: int, index: int) -> None:
    # Ctrl-C goes to the whole process group; the parent decides when children end.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        m.madvise(mmap.MADV_MERGEABLE)
        conn.send(("ready", os.getpid()))
        pattern: dict[str, Any] = {}
        round_no = 0
        while True:
            cmd, arg = conn.recv()
            if cmd == "fill":
                round_no, pattern = arg
                t = time.monotonic()
                fill(m, pattern, index, round_no)
                conn.send(("filled", time.monotonic() - t))
            elif cmd == "verify":
                conn.send(("verified", verify(m, pattern, index, round_no)))
            elif cmd == "exit":
                conn.send(("bye", None))
                return
    except EOFError:
        return
    except Exception:
        conn.send(("error", traceback.format_exc()))

"""A second process that reads a share of the guests' /proc files each tick, on another CPU.

At a thousand guests a tick is mostly the kernel producing two files a guest (``ksm_stat``
takes the process's mmap lock and walks its VMAs): about 6 us a guest, all on one CPU.
Python threads cannot share that work (the GIL changes hands at every read: two threads
were slower than one), processes can. The sampler (kvmksm.sampling.guest_rows) starts
helpers, each this file run as ``python -S -E`` (the standard library and kvmksm.host only:
20 ms to start), gives each a contiguous share of the guests, and each tick asks them for
their rows while it reads its own share.

The protocol, over the helper's stdin and stdout: frames of a 4-byte length and a marshal'd
tuple (the helper is ours and reads only /proc: marshal carries tuples, str, int, float and
None, nothing else).
- ``("keys", [(domain, pid), ...])`` -> ``("opened", gone, failed)``: hold these guests'
  files (the new opened, the others closed);
- ``("tick", t)`` -> ``("rows", rows, gone, failed)``: kvmksm.host.process.read_all on them.
Guests found gone, or whose files fail, are dropped by the helper once it has said so; the
caller reads the failing ones by path. The helper ends at end of input, so it never outlives
its sampler, even one killed with SIGKILL.
"""

from __future__ import annotations

import fcntl
import marshal
import os
import select
import signal
import struct
import subprocess
import sys
from contextlib import suppress
from pathlib import Path
from typing import Any

Key = tuple[str, int]

_HEADER = struct.Struct("<I")
# A helper that has not answered in this long is lost: a tick takes milliseconds.
ANSWER_TIMEOUT = 2.0
# Up to a thousand rows in one frame, without the helper waiting on the pipe meanwhile.
_PIPE_SIZE = 1 << 20


class HelperLost(Exception):
    """The helper died, stalled or said something that is not a frame."""


class ReadHelper:
    """The sampler's side of one helper process."""

    def __init__(self, root: Path) -> None:
        # Run by path with -S (no site, no package lookup) and -E (no PYTHON* settings).
        cmd = [sys.executable, "-S", "-E", str(Path(__file__).resolve()), str(root)]
        try:
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
        except OSError as e:
            raise HelperLost(f"could not start a reading helper: {e}") from None
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._in = self._proc.stdin.fileno()
        self._out = self._proc.stdout.fileno()
        self.keys: list[Key] = []  # the share it holds

    @property
    def pid(self) -> int:
        return self._proc.pid

    def hold(self, keys: list[Key]) -> tuple[list[Key], list[Key]]:
        """Hold these guests' files from now on; returns those gone and those failing."""
        self._send(("keys", keys))
        _, gone, failed = self._receive("opened")
        self._forget(gone, failed, keys)
        return gone, failed

    def ask(self, t: float) -> None:
        """Start reading this tick's rows (collect them with answer())."""
        self._send(("tick", t))

    def answer(self) -> tuple[list[tuple[Any, ...]], list[Key], list[Key]]:
        _, rows, gone, failed = self._receive("rows")
        if gone or failed:
            self._forget(gone, failed, self.keys)
        return rows, gone, failed

    def close(self) -> None:
        """End of input ends the helper; one that does not end is killed."""
        for stream in (self._proc.stdin, self._proc.stdout, self._proc.stderr):
            with suppress(OSError):
                stream.close()  # type: ignore[union-attr]
        try:
            self._proc.wait(timeout=1)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()

    def _forget(self, gone: list[Key], failed: list[Key], keys: list[Key]) -> None:
        dropped = set(gone) | set(failed)
        self.keys = [k for k in keys if k not in dropped]

    def _send(self, message: tuple[Any, ...]) -> None:
        try:
            _write_frame(self._in, message)
        except OSError as e:
            raise HelperLost(self._why(f"could not be written to ({e})")) from None

    def _receive(self, kind: str) -> tuple[Any, ...]:
        try:
            message = _read_frame(self._out, ANSWER_TIMEOUT)
        except TimeoutError:
            raise HelperLost(f"no answer from helper {self.pid} in {ANSWER_TIMEOUT:g}s") from None
        except (OSError, ValueError, EOFError) as e:
            raise HelperLost(self._why(f"sent no frame ({e})")) from None
        if message is None:
            raise HelperLost(self._why("ended"))
        if not isinstance(message, tuple) or not message or message[0] != kind:
            raise HelperLost(f"helper {self.pid} answered {str(message)[:80]!r}, not {kind}")
        return message

    def _why(self, what: str) -> str:
        """What happened, with the helper's exit status and last words if it has ended (its
        stderr is a pipe: a traceback there must not scribble over a live view)."""
        try:
            # A helper whose pipe broke is exiting: a moment lets its exit status be known.
            code = self._proc.wait(timeout=0.1)
        except subprocess.TimeoutExpired:
            return f"helper {self.pid} {what}"
        said = ""
        if self._proc.stderr is not None:
            with suppress(OSError, ValueError):
                lines = self._proc.stderr.read(65536).decode(errors="replace").strip()
                said = f": {lines.splitlines()[-1]}" if lines else ""
        return f"helper {self.pid} {what}; exit status {code}{said}"


def _write_frame(fd: int, message: tuple[Any, ...]) -> None:
    body = marshal.dumps(message)
    data = memoryview(_HEADER.pack(len(body)) + body)
    while data:
        data = data[os.write(fd, data) :]


def _read_exactly(fd: int, n: int, timeout: float | None) -> bytes | None:
    """n bytes, or None at end of input before the first byte."""
    buf = bytearray()
    while len(buf) < n:
        if timeout is not None and not select.select([fd], [], [], timeout)[0]:
            raise TimeoutError
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            if buf:
                raise EOFError(f"input ended after {len(buf)} of {n} bytes")
            return None
        buf += chunk
    return bytes(buf)


def _read_frame(fd: int, timeout: float | None = None) -> Any:
    header = _read_exactly(fd, _HEADER.size, timeout)
    if header is None:
        return None
    (size,) = _HEADER.unpack(header)
    body = _read_exactly(fd, size, timeout)
    if body is None:
        raise EOFError("input ended inside a frame")
    return marshal.loads(body)


# -- the helper's side ------------------------------------------------------------------------
def serve(root: str) -> None:
    """Answer frames on stdin until it ends."""
    # Here, not at the top: run by path, this file finds its package only once the
    # __main__ block below has put it on sys.path.
    from kvmksm.host.fs import HostFS
    from kvmksm.host.process import ProcessFiles, ProcessGone, open_process_files, read_all

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the group: the sampler decides
    with suppress(OSError, AttributeError):
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))  # as the sampler's thread
    with suppress(OSError, AttributeError):
        fcntl.fcntl(1, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
    fs = HostFS(root)
    files: dict[Key, ProcessFiles] = {}
    held: list[tuple[Key, ProcessFiles]] = []

    while (message := _read_frame(0)) is not None:
        if message[0] == "keys":
            wanted = [tuple(k) for k in message[1]]
            keep = set(wanted)
            for key in [k for k in files if k not in keep]:
                files.pop(key).close()
            gone: list[Key] = []
            failed: list[Key] = []
            for key in wanted:
                if key not in files:
                    try:
                        files[key] = open_process_files(fs, key[1])
                    except ProcessGone:
                        gone.append(key)
                    except OSError:
                        failed.append(key)
            held = [(k, files[k]) for k in wanted if k in files]
            _write_frame(1, ("opened", gone, failed))
        elif message[0] == "tick":
            rows, gone, failed = read_all(held, (message[1],))
            if gone or failed:
                for key in (*gone, *failed):
                    files.pop(key).close()
                held = [(k, f) for k, f in held if k in files]
            _write_frame(1, ("rows", rows, gone, failed))
    for f in files.values():
        f.close()


if __name__ == "__main__":
    # Run by path with -S: the package this file belongs to is two folders up from here.
    sys.path[0] = str(Path(__file__).resolve().parents[2])
    serve(sys.argv[1])

"""One process's KSM figures and CPU time from /proc: ``ksm_stat``, RSS and CPU clocks.

Two ways to read them. ``read_process`` opens, reads and closes (for one-off reads such as the
end-of-run reconciliation). ``ProcessFiles`` keeps a process's files open and re-reads them
with ``pread`` at offset 0, which makes procfs generate the content afresh: a sampler reading
a thousand guests a second pays two system calls a guest instead of six. An open /proc file
also stays bound to the process it was opened for, so a recycled pid can never be misread:
once the process has exited and been reaped, a read fails with ESRCH.

``CpuClock`` gives a process's CPU time: ``/proc/<pid>/schedstat`` (nanoseconds on CPU, where
the kernel has CONFIG_SCHEDSTATS), or utime + stime from ``/proc/<pid>/stat`` (clock ticks of
10 ms, too coarse for sub-second samples) where it has not; ``source`` says which.
"""

from __future__ import annotations

import errno
import operator
import os
import resource
from collections.abc import Sequence
from typing import Any

from kvmksm.host.fs import HostFS, parse_keyvalue, parse_stat_cpu_ticks

KSM_STAT_FIELDS = ("ksm_rmap_items", "ksm_zero_pages", "ksm_merging_pages", "ksm_process_profit")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
CLK_TCK = os.sysconf("SC_CLK_TCK")

# The process has gone (ENOENT: /proc/<pid> is gone; ESRCH: it has exited).
_GONE = (errno.ENOENT, errno.ESRCH)
# ksm_stat is about 130 bytes on 6.18: room for longer numbers and fields later kernels add.
# Of statm only the first two numbers are used, and two 20-digit numbers fit in 64 bytes.
# (Smaller reads are cheaper: Python allocates the whole size, then shrinks it.)
_KSM_STAT_MAX = 512
_STATM_MAX = 64
_NFIELDS = len(KSM_STAT_FIELDS)


class ProcessGone(Exception):
    pass


def parse_ksm_stat(text: str) -> dict[str, int | None]:
    """The KSM_STAT_FIELDS of a ``/proc/<pid>/ksm_stat`` text; a field this kernel lacks is
    None (6.1 has only ksm_rmap_items)."""
    stat = parse_keyvalue(text)
    return {f: stat.get(f) for f in KSM_STAT_FIELDS}


def read_process(fs: HostFS, pid: int) -> dict[str, int | None]:
    """The ksm_stat fields and VmRSS (kB) of one process; a field this kernel (or these
    permissions) cannot give is None. Raises ProcessGone when the process no longer exists."""
    try:
        text = fs.read(f"proc/{pid}/ksm_stat")
    except OSError as e:
        if e.errno == errno.ESRCH:
            raise ProcessGone(pid) from None
        # ENOENT: gone, or a kernel before 6.1 (no ksm_stat): statm below tells which.
        out = dict.fromkeys(KSM_STAT_FIELDS)
        # Before 6.1, 5.19's ksm_merging_pages file may still be there.
        try:
            out["ksm_merging_pages"] = int(fs.read(f"proc/{pid}/ksm_merging_pages").split()[0])
        except (OSError, ValueError, IndexError):
            pass
    else:
        if not text:  # exited, not yet reaped: no mm left to report on
            raise ProcessGone(pid)
        out = parse_ksm_stat(text)
    result: dict[str, int | None] = dict(out)
    try:
        statm = fs.read(f"proc/{pid}/statm").split()
    except OSError as e:
        if e.errno in _GONE:
            raise ProcessGone(pid) from None
        statm = []  # one unreadable file must not cost the other guests' rows
    if statm and statm[0] == "0":  # a zombie: no address space
        raise ProcessGone(pid)
    # statm's resident pages is VmRSS, at a fraction of the cost of parsing status.
    result["rss_kb"] = int(statm[1]) * PAGE_KB if len(statm) > 1 else None
    return result


class ProcessFiles:
    """One process's ksm_stat (or 5.19's ksm_merging_pages) and statm, kept open.

    ``read()`` returns the KSM_STAT_FIELDS and the RSS in kB as a tuple, in that order (None
    where this kernel has no such field). Raises ProcessGone once the process has exited,
    and OSError (e.g. EMFILE) from the constructor when the files cannot be opened."""

    __slots__ = (
        "pid",
        "_ksm_fd",
        "_statm_fd",
        "_old_file",
        "_ntok",
        "_get",
        "_slots",
        "_fast",
        "_split",
        "_spec",
    )

    def __init__(self, fs: HostFS, pid: int) -> None:
        self.pid = pid
        self._ksm_fd = -1  # -1: none (an old kernel, or not ours to read)
        self._statm_fd = -1
        self._old_file = False
        self._spec: tuple[int, int, int, int, operator.itemgetter[bytes]] | None = None
        try:
            self._statm_fd = fs.open_fd(f"proc/{pid}/statm")
            try:
                self._ksm_fd = fs.open_fd(f"proc/{pid}/ksm_stat")
            except FileNotFoundError:
                # Before 6.1: no ksm_stat (the statm open above proved the process is there);
                # 5.19's ksm_merging_pages may still be.
                try:
                    self._ksm_fd = fs.open_fd(f"proc/{pid}/ksm_merging_pages")
                    self._old_file = True
                except (FileNotFoundError, PermissionError):
                    pass
            except PermissionError:
                pass  # another user's process: its RSS is still worth a row
            tokens = [] if self._old_file else self._tokens()
        except OSError as e:
            self.close()
            if e.errno in _GONE:
                raise ProcessGone(pid) from None
            raise
        # Where each field's value sits among ksm_stat's whitespace-separated tokens: the
        # layout is fixed for a kernel, so it is found once and each read is one split().
        names = tokens[0::2]
        index = [2 * names.index(f.encode()) + 1 for f in KSM_STAT_FIELDS if f.encode() in names]
        self._ntok = len(tokens)
        # Which of KSM_STAT_FIELDS this kernel has, for the partial-layout path.
        self._slots = [f.encode() in names for f in KSM_STAT_FIELDS]
        self._fast = len(index) == _NFIELDS
        self._get = operator.itemgetter(*index) if self._fast else operator.itemgetter(0)
        self._split = -1
        if self._fast:
            # Split no further than the last value wanted; the tail stays one token.
            self._split = max(index) + 1
            self._ntok = min(len(tokens), self._split + 1)
        # All read_all() needs, in one tuple: unpacking it beats five attribute loads.
        self._spec = (
            (self._ksm_fd, self._statm_fd, self._split, self._ntok, self._get)
            if self._fast
            else None
        )

    def _tokens(self) -> list[bytes]:
        if self._ksm_fd < 0:
            return []
        return os.pread(self._ksm_fd, _KSM_STAT_MAX, 0).split()

    def read(self) -> tuple[int | None, ...]:
        # The hot path of a tick (twice a guest a second): one pread per file, no helpers.
        old = b"-"
        try:
            if self._fast:
                tokens = os.pread(self._ksm_fd, _KSM_STAT_MAX, 0).split(None, self._split)
                statm = os.pread(self._statm_fd, _STATM_MAX, 0).split(None, 2)
                if len(tokens) == self._ntok and statm[0] != b"0":
                    return (*map(int, self._get(tokens)), int(statm[1]) * PAGE_KB)
            else:
                tokens = [] if self._old_file else self._tokens()
                old = os.pread(self._ksm_fd, _STATM_MAX, 0) if self._old_file else old
                statm = os.pread(self._statm_fd, _STATM_MAX, 0).split(None, 2)
                if len(tokens) == self._ntok and old and statm[0] != b"0":
                    return (*self._partial(tokens, old), int(statm[1]) * PAGE_KB)
        except OSError as e:
            if e.errno in _GONE:
                raise ProcessGone(self.pid) from None
            raise
        # An exited process not yet reaped has no mm: ksm_stat is empty, statm all zeros.
        if not tokens or not old or statm[0] == b"0":
            raise ProcessGone(self.pid)
        raise OSError(errno.EIO, f"/proc/{self.pid}/ksm_stat changed its layout")

    def _partial(self, tokens: list[bytes], old: bytes) -> list[int | None]:
        """The fields of a kernel that has only some of them (or 5.19's single file)."""
        out: list[int | None] = [None] * _NFIELDS
        if self._old_file:
            out[KSM_STAT_FIELDS.index("ksm_merging_pages")] = int(old)
            return out
        for i, f in enumerate(KSM_STAT_FIELDS):
            if self._slots[i]:
                out[i] = int(tokens[tokens.index(f.encode()) + 1])
        return out

    def close(self) -> None:
        for fd in (self._ksm_fd, self._statm_fd):
            if fd >= 0:
                os.close(fd)
        self._ksm_fd = self._statm_fd = -1
        self._spec = None


def read_all(
    entries: Sequence[tuple[tuple[Any, ...], ProcessFiles]], head: tuple[Any, ...]
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """``head + key + files.read()`` for each ``(key, files)``, in one loop: the same as
    calling read() on each, at about half the interpreter's cost (a sampler's tick at a
    thousand guests). Returns the rows, the keys whose process has gone, and the keys whose
    files failed otherwise (to be read some other way)."""
    rows: list[tuple[Any, ...]] = []
    gone: list[tuple[Any, ...]] = []
    failed: list[tuple[Any, ...]] = []
    append, pread, page_kb = rows.append, os.pread, PAGE_KB
    for key, files in entries:
        spec = files._spec
        if spec is not None:
            ksm_fd, statm_fd, split, ntok, get = spec
            try:
                tokens = pread(ksm_fd, _KSM_STAT_MAX, 0).split(None, split)
                statm = pread(statm_fd, _STATM_MAX, 0).split(None, 2)
            except OSError:
                pass  # read() below tells gone from failed
            else:
                if len(tokens) == ntok and statm[0] != b"0":
                    a, b, c, d = get(tokens)
                    append((*head, *key, int(a), int(b), int(c), int(d), int(statm[1]) * page_kb))
                    continue
        try:
            append((*head, *key, *files.read()))
        except ProcessGone:
            gone.append(key)
        except OSError:
            failed.append(key)
    return rows, gone, failed


class MergedPages:
    """The sum of ksm_merging_pages over some processes (a run's guests), files held open.

    ``read()`` is None when this kernel has no per-process figure (before 5.19) or one of
    the processes has gone: then only the host-wide counters can tell."""

    def __init__(self, fs: HostFS, pids: Sequence[int]) -> None:
        self._files: list[ProcessFiles] = []
        try:
            for pid in pids:
                self._files.append(ProcessFiles(fs, pid))
        except (ProcessGone, OSError):
            self.close()

    def read(self) -> int | None:
        if not self._files:
            return None
        total = 0
        i = KSM_STAT_FIELDS.index("ksm_merging_pages")
        for files in self._files:
            try:
                value = files.read()[i]
            except (ProcessGone, OSError):
                return None
            if value is None:
                return None
            total += value
        return total

    def close(self) -> None:
        for files in self._files:
            files.close()
        self._files = []


class CpuClock:
    """A process's CPU time in seconds, re-read with pread: ``schedstat`` (ns) if the kernel
    has it, else utime + stime from ``stat``. ``source`` is "schedstat", "stat", or None when
    neither could be opened (then ``seconds()`` is None)."""

    def __init__(self, fs: HostFS, pid: int | None) -> None:
        self.source: str | None = None
        self._fd: int | None = None
        if pid is None:
            return
        for source in ("schedstat", "stat"):
            try:
                fd = fs.open_fd(f"proc/{pid}/{source}")
            except OSError:
                continue
            try:
                seconds = self._parse(source, os.pread(fd, 4096, 0))
            except (OSError, ValueError, IndexError):
                os.close(fd)
                continue  # e.g. schedstat present but empty without CONFIG_SCHEDSTATS
            if seconds is not None:
                self._fd, self.source = fd, source
                return
            os.close(fd)

    @staticmethod
    def _parse(source: str, data: bytes) -> float | None:
        if source == "schedstat":
            return int(data.split()[0]) / 1e9
        return parse_stat_cpu_ticks(data.decode()) / CLK_TCK

    def seconds(self) -> float | None:
        if self._fd is None or self.source is None:
            return None
        try:
            return self._parse(self.source, os.pread(self._fd, 4096, 0))
        except (OSError, ValueError, IndexError):
            return None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def raise_fd_limit() -> bool:
    """Two files a guest: with a thousand guests a soft limit of 1024 open files is too low.
    Raise it (for this process only) to the hard limit; True if that gave more room."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft >= hard:
        return False
    new = hard if hard != resource.RLIM_INFINITY else max(soft * 4, 65536)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    except (ValueError, OSError):
        return False
    return True


def open_process_files(fs: HostFS, pid: int) -> ProcessFiles:
    """ProcessFiles(fs, pid), once more after raising the open-files limit if it was hit."""
    try:
        return ProcessFiles(fs, pid)
    except OSError as e:
        if e.errno != errno.EMFILE or not raise_fd_limit():
            raise
        return ProcessFiles(fs, pid)

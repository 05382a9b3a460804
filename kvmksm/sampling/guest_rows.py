"""Per-guest KSM figures: one row per guest per tick in ``vm_samples.csv`` (long format).

Which guests to read is asked of a callable every tick (``{domain: QEMU pid}``): bench passes
its clones, watch the running domains it re-lists in the background. Each row holds the
fields of ``/proc/<pid>/ksm_stat`` and the RSS from ``/proc/<pid>/statm``.

The files of every guest stay open between ticks (kvmksm.host.process.ProcessFiles) and are
opened only when the mapping changes, so a tick costs two pread() calls a guest. A QEMU
process can exit between the listing and the read: its row is then left out, never an error,
so guests that stop leave no gap in the other guests' data and no hole in the host's.
"""

from __future__ import annotations

import errno
import resource
from collections.abc import Callable, Mapping
from typing import Any

from kvmksm.host.fs import HostFS
from kvmksm.host.process import (
    KSM_STAT_FIELDS,
    ProcessFiles,
    ProcessGone,
    read_all,
    read_process,
)
from kvmksm.results.record import VM_SAMPLES

VM_COLUMNS = ["t", "domain", "pid", *KSM_STAT_FIELDS, "rss_kb"]
_VALUE_COLUMNS = (*KSM_STAT_FIELDS, "rss_kb")


class VmProbe:
    """A sampler Probe (kvmksm.sampling.sampler.Probe) writing vm_samples.csv.

    ``guests`` returns the current ``{domain: pid}``; it is called once per tick, so it must
    be quick (bench passes its clones; watch a mapping a background thread keeps up to date).
    """

    filename = VM_SAMPLES

    def __init__(
        self,
        fs: HostFS,
        guests: Callable[[], Mapping[str, int]],
        on_gone: Callable[[str, int], None] | None = None,
    ) -> None:
        self.fs = fs
        self.guests = guests
        # Told (domain, pid) once when a listed guest's process is found gone (bench fails
        # the run: its guests are the scenario); watch lists guests that come and go.
        self.on_gone = on_gone
        self.columns = list(VM_COLUMNS)
        self._last: list[tuple[Any, ...]] = []  # this tick's rows, for live views
        self.gone = 0  # reads skipped because the process had exited
        self._mapping: dict[str, int] = {}
        # (domain, pid) -> its open files, or None: read by path each tick (no fds left)
        self._files: dict[tuple[str, int], ProcessFiles | None] = {}
        self._dead: set[tuple[str, int]] = set()  # exited, still listed: not reopened
        self._held: list[tuple[tuple[str, int], ProcessFiles]] = []
        self._by_path: list[tuple[str, int]] = []

    def _sync(self, mapping: Mapping[str, int]) -> None:
        """Open the files of guests new to the mapping, close those of guests that left."""
        wanted = set(mapping.items())
        for key in set(self._files) - wanted:
            files = self._files.pop(key)
            if files is not None:
                files.close()
        self._dead &= wanted
        for key in sorted(wanted - set(self._files) - self._dead):
            try:
                self._files[key] = self._open_files(key[1])
            except ProcessGone:
                self._dead.add(key)
                self._tell_gone(key)
        self._mapping = dict(mapping)
        self._index()

    def _open_files(self, pid: int) -> ProcessFiles | None:
        try:
            return ProcessFiles(self.fs, pid)
        except OSError as e:
            if e.errno != errno.EMFILE or not _raise_fd_limit():
                return None  # read this guest the slow way rather than lose it
            try:
                return ProcessFiles(self.fs, pid)
            except OSError:
                return None

    def rows(self, t: float) -> list[tuple[Any, ...]]:
        """This tick's rows, each a tuple in ``columns`` order (no dict per row: at a
        thousand guests a tick, building and writing dicts cost as much as the reads)."""
        mapping = self.guests()
        if mapping != self._mapping:
            self._sync(mapping)
        head = (round(t, 3),)
        out, dropped, failed = read_all(self._held, head)
        by_path = self._by_path + failed
        for key in failed:
            # Something odd about this one guest's files: read it the slow way from now on
            # rather than lose the tick for every guest.
            self._slow(key)
        for key in by_path:
            try:
                values = read_process(self.fs, key[1])
            except ProcessGone:
                dropped.append(key)
                continue
            out.append(head + key + tuple(values[c] for c in _VALUE_COLUMNS))
        if by_path:
            out.sort(key=lambda r: r[1])  # slow-path rows came last: domain order as always
        if dropped:
            for key in dropped:
                files = self._files.pop(key)
                if files is not None:
                    files.close()
                self._dead.add(key)
                self._tell_gone(key)
            self._index()
        self.gone += len(self._dead)
        self._last = out  # replaced whole: a reader in another thread never sees it half-built
        return out

    def _tell_gone(self, key: tuple[str, int]) -> None:
        if self.on_gone is not None:
            self.on_gone(*key)

    @property
    def last(self) -> dict[str, dict[str, Any]]:
        """The latest row of each guest as a dict, by domain (for live views)."""
        cols = self.columns
        return {r[1]: dict(zip(cols, r, strict=True)) for r in self._last}

    def _slow(self, key: tuple[str, int]) -> None:
        files = self._files.get(key)
        if files is not None:
            files.close()
        self._files[key] = None
        self._index()

    def _index(self) -> None:
        """The guests read through held files, and those read by path, in domain order."""
        keys = sorted(self._files)
        self._held = [(k, f) for k in keys if (f := self._files[k]) is not None]
        self._by_path = [k for k in keys if self._files[k] is None]

    def close(self) -> None:
        for files in self._files.values():
            if files is not None:
                files.close()
        self._files.clear()
        self._index()
        self._mapping = {}


def _raise_fd_limit() -> bool:
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

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

import os
from collections.abc import Callable, Mapping
from typing import Any

from kvmksm.host.fs import HostFS
from kvmksm.host.process import (
    KSM_STAT_FIELDS,
    ProcessFiles,
    ProcessGone,
    open_process_files,
    read_all,
    read_process,
)
from kvmksm.results.record import VM_SAMPLES
from kvmksm.sampling.read_helper import HelperLost, Key, ReadHelper

VM_COLUMNS = ["t", "domain", "pid", *KSM_STAT_FIELDS, "rss_kb"]
_VALUE_COLUMNS = (*KSM_STAT_FIELDS, "rss_kb")
# Guests a share: below two shares' worth a helper's round trip costs more than it saves
# (a tick at 300 guests is about 3 ms on one CPU).
SHARE = 300


class VmProbe:
    """A sampler Probe (kvmksm.sampling.sampler.Probe) writing vm_samples.csv.

    ``guests`` returns the current ``{domain: pid}``; it is called once per tick, so it must
    be quick (bench passes its clones; watch a mapping a background thread keeps up to date).
    ``helpers``: how many helper processes share the reading (kvmksm.sampling.read_helper);
    None for as many as helpers_for() says for the guests there are.
    """

    filename = VM_SAMPLES

    def __init__(
        self,
        fs: HostFS,
        guests: Callable[[], Mapping[str, int]],
        on_gone: Callable[[str, int], None] | None = None,
        helpers: int | None = None,
    ) -> None:
        self.fs = fs
        self.guests = guests
        # Told (domain, pid) once when a listed guest's process is found gone (bench fails
        # the run: its guests are the scenario); watch lists guests that come and go.
        self.on_gone = on_gone
        self.columns = list(VM_COLUMNS)
        self._last: list[tuple[Any, ...]] = []  # this tick's rows, for live views
        self.gone = 0  # reads skipped because the process had exited
        self.problems: list[str] = []  # not errors of one guest: for the sampler to record
        self._mapping: dict[str, int] = {}
        self._files: dict[Key, ProcessFiles] = {}  # this process's share, held open
        self._by_path: set[Key] = set()  # files that failed: read by path each tick
        self._dead: set[Key] = set()  # exited, still listed: not reopened
        self._helper_count = helpers
        self._helpers: list[ReadHelper] = []
        self._held: list[tuple[Key, ProcessFiles]] = []

    @property
    def helper_pids(self) -> list[int]:
        return [h.pid for h in self._helpers]

    def _sync(self, mapping: Mapping[str, int]) -> None:
        """Share the guests out (contiguous in domain order: this process the first share,
        each helper one of the others), open the files of those new to a share and close
        those of guests that left it."""
        wanted = set(mapping.items())
        self._dead &= wanted
        self._by_path &= wanted
        live = sorted(wanted - self._dead - self._by_path)
        shares = self._shares(live)
        mine = set(shares[0])
        for key in [k for k in self._files if k not in mine]:
            self._files.pop(key).close()
        for key in shares[0]:
            if key not in self._files:
                self._open(key)
        for helper, share in zip(self._helpers, shares[1:], strict=True):
            try:
                gone, failed = helper.hold(share)
            except HelperLost as e:
                self._drop_helpers(e)
                return self._sync(mapping)  # this process's share is now every guest
            self._lost(gone)
            self._by_path.update(failed)
        self._mapping = dict(mapping)
        self._index()

    def _shares(self, live: list[Key]) -> list[list[Key]]:
        """Contiguous shares of the live guests, the first this process's; helpers started
        or stopped to match."""
        n = helpers_for(len(live)) if self._helper_count is None else self._helper_count
        n = min(n, max(0, len(live) - 1))
        while len(self._helpers) > n:
            self._helpers.pop().close()
        while len(self._helpers) < n:
            try:
                self._helpers.append(ReadHelper(self.fs.root))
            except HelperLost as e:
                self._drop_helpers(e)
                break
        size = -(-len(live) // (len(self._helpers) + 1)) if live else 0
        return [live[i * size : (i + 1) * size] for i in range(len(self._helpers) + 1)]

    def _drop_helpers(self, why: HelperLost) -> None:
        """A helper lost: this process reads every guest from now on (a run that says so,
        not a tick without rows)."""
        self.problems.append(f"{why}; every guest read by the sampler itself from now on")
        for helper in self._helpers:
            helper.close()
        self._helpers = []
        self._helper_count = 0

    def _open(self, key: Key) -> None:
        try:
            self._files[key] = open_process_files(self.fs, key[1])
        except ProcessGone:
            self._lost([key])
        except OSError:
            self._by_path.add(key)  # read this guest the slow way rather than lose it

    def rows(self, t: float) -> list[tuple[Any, ...]]:
        """This tick's rows, each a tuple in ``columns`` order (no dict per row: at a
        thousand guests a tick, building and writing dicts cost as much as the reads)."""
        mapping = self.guests()
        if mapping != self._mapping:
            self._sync(mapping)
        head = (round(t, 3),)
        lost: HelperLost | None = None  # the first helper failure of this tick
        asked = []
        for helper in self._helpers:  # their shares are read meanwhile, on other CPUs
            try:
                helper.ask(head[0])
                asked.append(helper)
            except HelperLost as e:
                lost = lost or e
        out, dropped, failed = read_all(self._held, head)
        answered = []
        for helper in asked:
            try:
                rows, gone, bad = helper.answer()
            except HelperLost as e:
                lost = lost or e
                continue
            answered.append(helper)
            out += rows
            dropped += gone
            failed += bad
        if lost is not None:
            unread = {k for h in self._helpers if h not in answered for k in h.keys}
            self._drop_helpers(lost)
            self._sync(mapping)  # their guests are this process's now: read them so
            more, gone, bad = read_all([(k, f) for k, f in self._held if k in unread], head)
            out += more
            dropped += gone
            failed += bad
        for key in failed:
            # Something odd about this one guest's files: read it the slow way from now on
            # rather than lose the tick for every guest.
            self._slow(key)
        for key in sorted(self._by_path):
            try:
                values = read_process(self.fs, key[1])
            except ProcessGone:
                dropped.append(key)
                continue
            out.append(head + key + tuple(values[c] for c in _VALUE_COLUMNS))
        if self._by_path or lost is not None:
            out.sort(key=lambda r: r[1])  # rows read some other way came last: domain order
        if dropped:
            for key in dropped:
                files = self._files.pop(key, None)
                if files is not None:
                    files.close()
                self._by_path.discard(key)
            self._lost(dropped)
            self._index()
        self.gone += len(self._dead)
        self._last = out  # replaced whole: a reader in another thread never sees it half-built
        return out

    def _lost(self, keys: list[Key]) -> None:
        for key in keys:
            if key in self._dead:
                continue  # told once
            self._dead.add(key)
            if self.on_gone is not None:
                self.on_gone(*key)

    @property
    def last(self) -> dict[str, dict[str, Any]]:
        """The latest row of each guest as a dict, by domain (for live views)."""
        cols = self.columns
        return {r[1]: dict(zip(cols, r, strict=True)) for r in self._last}

    def _slow(self, key: Key) -> None:
        files = self._files.pop(key, None)
        if files is not None:
            files.close()
        self._by_path.add(key)
        self._index()

    def _index(self) -> None:
        """This process's held files, in domain order."""
        self._held = sorted(self._files.items())

    def close(self) -> None:
        for files in self._files.values():
            files.close()
        self._files.clear()
        for helper in self._helpers:
            helper.close()
        self._helpers = []
        self._index()
        self._mapping = {}


def helpers_for(guests: int) -> int:
    """Helper processes for this many guests: one more share for each SHARE guests, at most
    one share per CPU this process may run on (the first share is the sampler's own)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    return max(0, min(cpus, guests // SHARE) - 1)

"""Per-guest KSM figures: one row per guest per tick in ``vm_samples.csv`` (long format).

Which guests to read is asked of a callable every tick (``{domain: QEMU pid}``): bench passes
its clones, watch the running domains it re-lists in the background. Each row holds the
fields of ``/proc/<pid>/ksm_stat`` and ``VmRSS`` from ``/proc/<pid>/status``. A QEMU process
can exit between the listing and the read: its row is then left out for that tick, never an
error, so guests that stop leave no gap in the other guests' data and no hole in the host's.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Mapping
from typing import Any

from kvmksm.host.fs import HostFS, parse_keyvalue
from kvmksm.results.record import VM_SAMPLES

KSM_STAT_FIELDS = ("ksm_rmap_items", "ksm_zero_pages", "ksm_merging_pages", "ksm_process_profit")
VM_COLUMNS = ["t", "domain", "pid", *KSM_STAT_FIELDS, "rss_kb"]

PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024

# The process has gone (ENOENT: /proc/<pid> is gone; ESRCH: it is exiting).
_GONE = (errno.ENOENT, errno.ESRCH)


class ProcessGone(Exception):
    pass


def read_process(fs: HostFS, pid: int) -> dict[str, int | None]:
    """The ksm_stat fields and VmRSS (kB) of one process; a field this kernel (or these
    permissions) cannot give is None. Raises ProcessGone when the process no longer exists."""
    out: dict[str, int | None] = dict.fromkeys(KSM_STAT_FIELDS)
    try:
        stat = parse_keyvalue(fs.read(f"proc/{pid}/ksm_stat"))
        for f in KSM_STAT_FIELDS:
            out[f] = stat.get(f)
    except OSError as e:
        if e.errno == errno.ESRCH:
            raise ProcessGone(pid) from None
        # ENOENT: gone, or a kernel before 6.1 (no ksm_stat): status below tells which.
        # Before 6.1, 5.19's ksm_merging_pages file may still be there.
        try:
            out["ksm_merging_pages"] = int(fs.read(f"proc/{pid}/ksm_merging_pages").split()[0])
        except (OSError, ValueError, IndexError):
            pass
    try:
        # statm's resident pages is VmRSS, at a fraction of the cost of parsing status.
        out["rss_kb"] = int(fs.read(f"proc/{pid}/statm").split()[1]) * PAGE_KB
    except OSError as e:
        if e.errno in _GONE:
            raise ProcessGone(pid) from None
        out["rss_kb"] = None  # one unreadable file must not cost the other guests' rows
    return out


class VmProbe:
    """A sampler Probe (kvmksm.sampling.sampler.Probe) writing vm_samples.csv.

    ``guests`` returns the current ``{domain: pid}``; it is called once per tick, so it must
    be quick (bench passes its clones; watch a mapping a background thread keeps up to date).
    """

    filename = VM_SAMPLES

    def __init__(self, fs: HostFS, guests: Callable[[], Mapping[str, int]]) -> None:
        self.fs = fs
        self.guests = guests
        self.columns = list(VM_COLUMNS)
        self.last: dict[str, dict[str, Any]] = {}  # latest row per domain, for live views
        self.gone = 0  # reads skipped because the process had exited

    def rows(self, t: float) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for domain, pid in sorted(self.guests().items()):
            try:
                values = read_process(self.fs, pid)
            except ProcessGone:
                self.gone += 1
                continue
            out.append({"t": round(t, 3), "domain": domain, "pid": pid, **values})
        # Replaced whole, so a reader in another thread never sees it half-built.
        self.last = {r["domain"]: r for r in out}
        return out

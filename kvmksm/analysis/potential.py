"""Sharing potential: the most KSM could save, from the contents of every page.

Every present page of the guests' mergeable memory is hashed (SHA-1 cut to 64 bits, per
page: with the CPU's SHA instructions it is twice as fast as blake2b here; all-zero pages are
found with numpy and not hashed). Pages with the same content could all
map one frame, so potential = pages - distinct contents; KSM's own limit, max_page_sharing
mappings per frame, gives a second, reachable figure. Beside it: what is saved now (pages -
frames that back them, from the same pass), and what merging inside each guest alone could
save (the rest needs pages shared across guests).

Pages are read through /proc/<pid>/mem, only where pagemap says they are present, and pages
mapped to the shared zero page are not read at all: nothing is faulted in, no page table
changes, nothing is written. The read pins each page for a moment, so a page ksmd tries to
merge during that moment waits for its next scan: take this after the plateau window.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from kvmksm.analysis.sharing import Snapshot, _ksm_stat
from kvmksm.analysis.windows import saved_pages
from kvmksm.host.fs import HostFS
from kvmksm.host.pagemap import (
    PM_PFN_MASK,
    PM_PRESENT,
    MemReader,
    page_size,
    read_pagemap,
)

READ_PAGES = 4096  # pages per pagemap look-up and per /proc/<pid>/mem read (16 MiB)
GIB = 1 << 30


def _digest(page: memoryview | bytes) -> bytes:
    return hashlib.sha1(page).digest()[:8]


def zero_hash(ps: int) -> int:
    return int.from_bytes(_digest(bytes(ps)), "little")


def page_hashes(data: memoryview | bytes, ps: int) -> np.ndarray:
    """One 64-bit digest per page of `data`; all-zero pages get zero_hash(ps) without
    hashing (a vectorised test is cheaper than a digest)."""
    view = memoryview(data)
    n = len(view) // ps
    words = np.frombuffer(view, dtype="<u8", count=n * ps // 8).reshape(n, ps // 8)
    out = np.full(n, zero_hash(ps), dtype="<u8")
    idx = np.flatnonzero(words.any(axis=1))
    sha1 = hashlib.sha1
    digests = b"".join([sha1(view[i * ps : (i + 1) * ps]).digest()[:8] for i in idx])
    out[idx] = np.frombuffer(digests, dtype="<u8")
    return out


def _frames_needed(counts: np.ndarray, per_frame: int | None) -> int:
    if per_frame:
        return int(np.sum(-(-counts // per_frame)))
    return int(np.count_nonzero(counts))


def potential(
    guests: list[str],
    hashes: list[np.ndarray],
    ksm_zero: list[int],
    frames_now: int,
    ps: int,
    use_zero_pages: bool = False,
    max_page_sharing: int | None = None,
    guest_memory: int | None = None,
) -> dict[str, Any]:
    """The potential of pages with contents `hashes` (one array per guest, one digest per
    page backed by a frame) plus `ksm_zero` pages per guest that KSM mapped to the zero
    page; `frames_now` frames back them today."""
    zh = np.uint64(zero_hash(ps))
    total_kz = int(sum(ksm_zero))
    allh = np.concatenate(hashes) if hashes else np.empty(0, dtype="<u8")
    values, counts = np.unique(allh, return_counts=True)
    is_zero = values == zh
    zero_pages = int(counts[is_zero].sum()) + total_kz
    nonzero = counts[~is_zero]
    pages = int(len(allh)) + total_kz

    def needed(nz: np.ndarray, zeros: int, per_frame: int | None) -> int:
        # Zero pages need no frame at all when KSM maps them to the zero page.
        z = 0 if use_zero_pages or not zeros else _frames_needed(np.array([zeros]), per_frame)
        return _frames_needed(nz, per_frame) + z

    distinct = int(len(nonzero)) + (1 if zero_pages else 0)
    best = pages - needed(nonzero, zero_pages, None)
    reachable = pages - needed(nonzero, zero_pages, max_page_sharing)
    twins = int(nonzero[nonzero >= 2].sum()) + (zero_pages if zero_pages >= 2 else 0)
    per_guest, within = [], 0
    for name, h, kz in zip(guests, hashes, ksm_zero, strict=True):
        v, c = np.unique(h, return_counts=True)
        z = int(c[v == zh].sum()) + kz
        nz = c[v != zh]
        n = int(len(h)) + kz
        saving = n - needed(nz, z, None)
        within += saving
        # This guest's pages whose content appears at least twice anywhere.
        mine = h[h != zh]
        anywhere = counts[np.searchsorted(values, mine)]
        per_guest.append(
            {
                "name": name,
                "pages": n,
                "zero_pages": z,
                "distinct": int(len(nz)) + (1 if z else 0),
                "potential_alone": saving,
                "pages_with_twin": int(np.count_nonzero(anywhere >= 2))
                + (z if zero_pages >= 2 else 0),
            }
        )
    achieved = pages - frames_now
    n_guests = len(guests)
    mem_pages = guest_memory // ps if guest_memory else None
    return {
        "guests": list(guests),
        "page_size": ps,
        "pages": pages,
        "zero_pages": zero_pages,
        "ksm_zero_pages": total_kz,
        "distinct": distinct,
        "pages_with_twin": twins,
        "potential": best,
        "potential_within_max_page_sharing": reachable,
        "potential_within_guests": within,
        "achieved": achieved,
        "frames_now": frames_now,
        "achieved_pct_of_potential": round(100.0 * achieved / best, 3) if best else None,
        "guest_memory_pages": mem_pages,
        "potential_pct_of_memory": round(100.0 * best / mem_pages, 3) if mem_pages else None,
        "achieved_pct_of_memory": round(100.0 * achieved / mem_pages, 3) if mem_pages else None,
        "ceiling_pct": round(100.0 * (n_guests - 1) / n_guests, 3) if n_guests > 1 else None,
        "use_zero_pages": use_zero_pages,
        "max_page_sharing": max_page_sharing,
        "per_guest": per_guest,
        "definitions": DEFINITIONS,
    }


DEFINITIONS = {
    "pages": "guest pages backed by a frame, plus those KSM mapped to the zero page",
    "distinct": "distinct page contents among them (all-zero is one content)",
    "pages_with_twin": "pages whose content appears at least twice (in any guest)",
    "potential": "pages - frames the distinct contents need: what merging every duplicate "
    "saves (zero pages need no frame with use_zero_pages=1)",
    "potential_within_max_page_sharing": "the same when a frame holds at most "
    "max_page_sharing mappings, as KSM's chains do",
    "potential_within_guests": "what merging only inside each guest would save",
    "achieved": "pages - frames backing them now (KSM's saving over the same pages)",
    "ceiling_pct": "(N-1)/N: what N identical guests save, as a percentage of their memory",
}


def measure_potential(
    fs: HostFS,
    snap: Snapshot,
    use_zero_pages: bool = False,
    max_page_sharing: int | None = None,
    guest_memory: int | None = None,
) -> dict[str, Any]:
    """Hash every present page of the guests' mergeable memory (the regions `snap` found),
    re-reading pagemap just before each read so no page that went away is touched."""
    t0 = time.monotonic()
    ps = page_size()
    buf = bytearray(READ_PAGES * ps)
    zero_pfns = np.asarray(snap.zero_pfns, dtype="<u8")
    hashes, pfns, ksm_zero = [], [], []
    read = skipped_zero = not_present = 0
    for pid, pages in zip(snap.pids, snap.pages, strict=True):
        h_parts, f_parts = [], []
        zero_mapped = 0
        with (
            open(fs.path(f"proc/{pid}/pagemap"), "rb", buffering=0) as pm,
            MemReader(fs, pid) as mem,
        ):
            for r in pages.regions:
                for a in range(r.start, r.end, READ_PAGES * ps):
                    b = min(r.end, a + READ_PAGES * ps)
                    entries = read_pagemap(pm.fileno(), a, b, ps)
                    present = (entries & np.uint64(PM_PRESENT)) != 0
                    pfn = entries & np.uint64(PM_PFN_MASK)
                    zero = present & np.isin(pfn, zero_pfns)
                    real = present & ~zero
                    zero_mapped += int(np.count_nonzero(zero))
                    not_present += int(len(entries) - np.count_nonzero(present))
                    idx = np.flatnonzero(real)
                    f_parts.append(pfn[idx])
                    for i, j in _runs(idx):
                        view = mem.read(a + i * ps, (j - i) * ps, buf)
                        h_parts.append(page_hashes(view, ps))
                        read += (j - i) * ps
        hashes.append(np.concatenate(h_parts) if h_parts else np.empty(0, dtype="<u8"))
        pfns.append(np.concatenate(f_parts) if f_parts else np.empty(0, dtype="<u8"))
        # KSM's zero pages are among the zero-page mappings; the rest were never written.
        kz = _ksm_stat(fs, pid).get("ksm_zero_pages", 0)
        ksm_zero.append(min(kz, zero_mapped))
        skipped_zero += zero_mapped
    frames_now = int(len(np.unique(np.concatenate(pfns)))) if pfns else 0
    result = potential(
        snap.guests,
        hashes,
        ksm_zero,
        frames_now,
        ps,
        use_zero_pages=use_zero_pages,
        max_page_sharing=max_page_sharing,
        guest_memory=guest_memory,
    )
    secs = time.monotonic() - t0
    result.update(
        seconds=round(secs, 4),
        bytes_read=read,
        seconds_per_gib_read=round(secs / (read / GIB), 3) if read else None,
        zero_page_mappings=skipped_zero,
        not_present_pages=not_present,
        method=(
            "SHA-1 (64 bits) of each present page of every MADV_MERGEABLE mapping, read "
            "through /proc/<pid>/mem; pages not present and pages mapped to the zero page are "
            "not read (nothing is faulted in)"
        ),
    )
    return result


def _runs(idx: np.ndarray) -> list[tuple[int, int]]:
    """[i, j) runs of consecutive indices."""
    if not len(idx):
        return []
    cut = np.flatnonzero(np.diff(idx) != 1) + 1
    starts = idx[np.concatenate([[0], cut])]
    ends = idx[np.concatenate([cut - 1, [len(idx) - 1]])] + 1
    return list(zip(starts.tolist(), ends.tolist(), strict=True))


def time_to_fraction(
    samples: pd.DataFrame, t_on: float | None, pages: int | None, fraction: float = 0.9
) -> float | None:
    """Seconds from KSM on until the saving (pages_sharing + ksm_zero_pages) first reached
    `fraction` of `pages`; None when it never did."""
    if t_on is None or not pages or samples.empty:
        return None
    saved = saved_pages(samples)
    t = samples["t"].astype(float)
    hit = t[(t >= t_on) & (saved >= fraction * pages)]
    return round(float(hit.iloc[0]) - t_on, 3) if len(hit) else None


def guest_totals(memory: Mapping[str, int | None]) -> int | None:
    values = list(memory.values())
    return sum(values) if values and all(isinstance(v, int) for v in values) else None

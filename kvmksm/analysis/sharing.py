"""Who shares with whom: which KSM pages each pair of guests both map, and which pages a
guest shares only with itself, with the sums checked against the global counters.

A KSM page is one physical frame (KPF_KSM in /proc/kpageflags) mapped at several virtual
pages. Summed over KSM frames, the number of frames is pages_shared and (mappings - 1) is
pages_sharing, when only these guests use KSM. Pages KSM maps to the zero page
(use_zero_pages=1) are not KSM frames: ksm_zero_pages counts them. The matrix itself
(`sharing_matrix`) is a pure function of frame numbers; `measure_sharing` reads them.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import sparse

from kvmksm.host.fs import HostFS, parse_keyvalue
from kvmksm.host.ksm import Ksm, ksm_processes
from kvmksm.host.pagemap import (
    KPF_KSM,
    KPF_ZERO_PAGE,
    ProcessPages,
    bit,
    check_pfns_visible,
    guest_ram,
    mergeable_regions,
    page_size,
    present_pages,
    read_kpage,
    read_mappings,
)

TOLERANCE = 0.01  # relative: counters and mappings are read milliseconds apart while ksmd runs


def sharing_matrix(guests: list[str], ksm_pfns: list[np.ndarray]) -> dict[str, Any]:
    """From each guest's KSM frame numbers (one entry per mapping, so a frame a guest maps
    twice appears twice): pairs[i][j] = frames guests i and j both map (the diagonal:
    frames guest i maps at all); self_only[i] = frames only guest i maps, at least twice."""
    n = len(guests)
    owner = np.concatenate(
        [np.full(len(p), g, dtype=np.int64) for g, p in enumerate(ksm_pfns)] or [np.empty(0)]
    ).astype(np.int64)
    pfns = np.concatenate(ksm_pfns) if ksm_pfns else np.empty(0, dtype="<u8")
    frames, inv = np.unique(pfns, return_inverse=True)
    # One row per (frame, guest) with how many times that guest maps that frame.
    keys, times = np.unique(inv.astype(np.int64) * max(n, 1) + owner, return_counts=True)
    f_idx, g_idx = keys // max(n, 1), keys % max(n, 1)
    b = sparse.csr_matrix(
        (np.ones(len(keys), dtype=np.int64), (f_idx, g_idx)), shape=(len(frames), n)
    )
    pairs = (b.T @ b).toarray() if n else np.zeros((0, 0), dtype=np.int64)
    sharers = np.bincount(f_idx, minlength=len(frames))  # guests mapping each frame
    per_frame = np.bincount(inv, minlength=len(frames))  # mappings of each frame
    alone = (sharers[f_idx] == 1) & (times >= 2)
    self_only = np.bincount(g_idx[alone], minlength=n)
    hist = np.bincount(sharers)
    return {
        "guests": list(guests),
        "pairs": pairs.astype(int).tolist(),
        "self_only": self_only.astype(int).tolist(),
        "frames": int(len(frames)),
        "mappings": int(len(pfns)),
        "saved": int(len(pfns) - len(frames)),
        "mappings_per_guest": np.bincount(owner, minlength=n).astype(int).tolist(),
        "frames_by_sharers": {str(k): int(v) for k, v in enumerate(hist) if k and v},
        "frames_mapped_once": int(np.count_nonzero(per_frame == 1)),
    }


def _check(
    name: str, observed: int, before: int | None, after: int | None, tolerance: float
) -> dict[str, Any]:
    """A counter against what the pages show: passed when within `tolerance` of the
    counter as read before or after the scan (ksmd keeps running meanwhile)."""
    seen = [v for v in (before, after) if isinstance(v, int)]
    if not seen:
        return {"name": name, "expected": None, "observed": observed, "passed": None}
    diff = min((observed - v for v in seen), key=abs)
    ref = seen[-1]
    rel = abs(diff) / max(ref, 1)
    return {
        "name": name,
        "expected": ref,
        "observed": observed,
        "difference": int(diff),
        "relative_difference": round(rel, 6),
        "passed": abs(diff) <= tolerance * max(ref, 1),
    }


@dataclass
class Snapshot:
    """What measure_sharing saw, for measure_potential to reuse."""

    guests: list[str]
    pids: list[int]
    pages: list[ProcessPages]
    zero_pfns: np.ndarray  # frames that are the shared zero page (or huge zero page)


def _ksm_stat(fs: HostFS, pid: int) -> dict[str, int]:
    try:
        return parse_keyvalue(fs.read(f"proc/{pid}/ksm_stat"))
    except OSError:
        return {}


def measure_sharing(
    fs: HostFS,
    ksm: Ksm,
    procs: Mapping[str, int],
    memory: Mapping[str, int | None] | None = None,
    tolerance: float = TOLERANCE,
) -> tuple[dict[str, Any], Snapshot]:
    """Read every guest's mergeable pages and their frames now; the sharing matrix with
    per-guest figures and its checks against the global counters (plain data)."""
    t0 = time.monotonic()
    ps = page_size()
    memory = memory or {}
    before = ksm.read_counters()
    names, pids = list(procs), [procs[n] for n in procs]
    pages: list[ProcessPages] = []
    info: list[dict[str, Any]] = []
    stats: list[dict[str, int]] = []
    for name, pid in zip(names, pids, strict=True):
        maps = read_mappings(fs, pid)
        regions = mergeable_regions(maps)
        ram = guest_ram(maps, memory.get(name))
        pages.append(present_pages(fs, pid, regions, ps))
        stats.append(_ksm_stat(fs, pid))  # right after its pages: the two agree
        info.append(
            {
                "name": name,
                "pid": pid,
                "ram": ram.as_dict() if ram else None,
                "ram_mergeable": bool(ram and ram.mergeable),
                "mergeable_mappings": len(regions),
                "mergeable_bytes": sum(r.size for r in regions),
            }
        )
    check_pfns_visible(pages)
    # kpageflags once for every frame of every guest, then split back per guest.
    union = np.unique(np.concatenate([p.pfn for p in pages])) if pages else np.empty(0, "<u8")
    flags = read_kpage(fs, "kpageflags", union)
    ksm_pfns, zero_pfns = [], union[bit(flags, KPF_ZERO_PAGE)]
    for p, row in zip(pages, info, strict=True):
        f = flags[np.searchsorted(union, p.pfn)]
        is_ksm, is_zero = bit(f, KPF_KSM), bit(f, KPF_ZERO_PAGE)
        ksm_pfns.append(p.pfn[is_ksm])
        row.update(
            virtual_pages=p.virtual_pages,
            present_pages=len(p.pfn),
            swapped_pages=p.swapped,
            zero_page_mappings=int(np.count_nonzero(is_zero)),
        )
    result = sharing_matrix(names, ksm_pfns)
    frames = np.unique(np.concatenate(ksm_pfns)) if ksm_pfns else np.empty(0, "<u8")
    # Mappings of our frames by anyone else (kpagecount is every mapping of a frame).
    counts = read_kpage(fs, "kpagecount", frames)
    foreign = int(counts.sum()) - result["mappings"] if len(frames) else 0
    after = ksm.read_counters()
    others = _other_users(fs, set(pids))
    for g, row in enumerate(info):
        row.update(
            ksm_frames=result["pairs"][g][g],
            ksm_mappings=result["mappings_per_guest"][g],
            self_only=result["self_only"][g],
            ksm_merging_pages=stats[g].get("ksm_merging_pages"),
            ksm_zero_pages=stats[g].get("ksm_zero_pages"),
        )
    exclusive = not others["processes"] and foreign == 0
    glob = [
        _check(
            "KSM frames = pages_shared",
            result["frames"],
            before.get("pages_shared"),
            after.get("pages_shared"),
            tolerance,
        ),
        _check(
            "mappings - frames = pages_sharing",
            result["saved"],
            before.get("pages_sharing"),
            after.get("pages_sharing"),
            tolerance,
        ),
    ]
    kz = [r["ksm_zero_pages"] for r in info]
    if "ksm_zero_pages" in after and all(isinstance(v, int) for v in kz):
        glob.append(
            _check(
                "guests' ksm_zero_pages = ksm_zero_pages",
                sum(kz),
                before.get("ksm_zero_pages"),
                after["ksm_zero_pages"],
                tolerance,
            )
        )
    if not exclusive:
        for c in glob:
            c["note"] = "other processes use KSM too: the global counters include their pages"
    checks = glob + [
        _check(
            f"{row['name']}: KSM mappings = ksm_merging_pages",
            row["ksm_mappings"],
            row["ksm_merging_pages"],
            None,
            tolerance,
        )
        for row in info
        if isinstance(row["ksm_merging_pages"], int)
    ]
    result.update(
        page_size=ps,
        seconds=round(time.monotonic() - t0, 4),
        per_guest=info,
        zero_page_mappings=sum(r["zero_page_mappings"] for r in info),
        foreign_mappings=foreign,
        other_ksm_users=others,
        only_these_guests=exclusive,
        counters_before={k: before.get(k) for k in _COUNTERS if k in before},
        counters_after={k: after.get(k) for k in _COUNTERS if k in after},
        tolerance=tolerance,
        checks=checks,
        definitions=DEFINITIONS,
    )
    return result, Snapshot(names, pids, pages, zero_pfns)


def _other_users(fs: HostFS, ours: set[int], top: int = 10) -> dict[str, Any]:
    """Other processes with merged pages: how many, their pages, the largest few."""
    found = [
        {k: p[k] for k in ("pid", "comm", "ksm_merging_pages", "ksm_zero_pages") if k in p}
        for p in ksm_processes(fs, exclude=ours)
        if p.get("ksm_merging_pages", 0) or p.get("ksm_zero_pages", 0)
    ]
    found.sort(key=lambda p: -int(p.get("ksm_merging_pages", 0)))
    return {
        "processes": len(found),
        "merging_pages": sum(int(p.get("ksm_merging_pages", 0)) for p in found),
        "zero_pages": sum(int(p.get("ksm_zero_pages", 0)) for p in found),
        "largest": found[:top],
    }


_COUNTERS = ("pages_shared", "pages_sharing", "ksm_zero_pages", "full_scans")
DEFINITIONS = {
    "pairs": "pairs[i][j]: KSM frames both guests map; pairs[i][i]: KSM frames guest i maps",
    "self_only": "KSM frames only this guest maps, at least twice (its own duplicates)",
    "frames": "distinct KSM frames the guests map (pages_shared when only they use KSM)",
    "mappings": "guest pages mapped to a KSM frame (pages_shared + pages_sharing)",
    "saved": "mappings - frames: the pages KSM saves (pages_sharing)",
    "frames_by_sharers": "how many KSM frames are mapped by 1, 2, ... guests",
    "frames_mapped_once": "KSM frames with a single mapping left (counted in pages_shared)",
    "foreign_mappings": "mappings of these frames by processes that are not these guests",
}

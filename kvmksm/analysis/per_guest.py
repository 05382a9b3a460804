"""Per-guest KSM figures from the per-guest samples, and how they add up to the global counters.

The samples are long (one row per guest per tick): a week of 200 guests is 121 million rows,
more than this should hold. So nothing is pivoted: the rows are read in chunks
(kvmksm.results.guest_samples) and aggregated as they come, in one pass over everything:

- per tick, the sum over guests of ksm_merging_pages, ksm_zero_pages and ksm_process_profit
  (the reconciliation against the global counters takes their median over the plateau);
- per guest, its last pid, and its ksm_merging_pages summed into at most BUCKETS stretches of
  the run (the stacked chart draws the bucket means: the same means a chart of every tick
  would reduce to);
- per guest and column, the count, minimum and maximum of its plateau values.

The plateau medians per guest are then exact, by selection (kvmksm.analysis.group_median):
the plateau rows are kept from the first pass when they are few, or read again (only the
plateau's row groups) when they are many.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvmksm.analysis.group_median import Stats, empty_stats, group_medians, group_stats, merge_stats
from kvmksm.analysis.windows import (
    MIB,
    Windows,
    column,
    page_size,
    plateau_column,
    plateau_value,
    ratio,
    scaled,
    windows,
)
from kvmksm.results.guest_samples import Chunk, GuestSamples
from kvmksm.results.record import Record

VM_COLUMNS = (
    "ksm_merging_pages",
    "ksm_zero_pages",
    "ksm_process_profit",
    "ksm_rmap_items",
    "rss_kb",
    "pid",
)
MEDIAN_COLUMNS = VM_COLUMNS[:5]
SUM_COLUMNS = VM_COLUMNS[:3]  # summed per tick for the reconciliation
BUCKETS = 600  # stretches of the run the stacked chart shows (views.charts.STACK_BUCKETS)
KEEP_PLATEAU_ROWS = 4_000_000  # plateau rows kept from the first pass; more are read again


def natural_key(name: str) -> list[Any]:
    """clone2 before clone10, as a person sorts guest names."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


@dataclass
class VmMatrix:
    """One per-guest column as a (time x guest) matrix; NaN where a guest has no row. For the
    stacked chart each time is a bucket: its mean time, and each guest's mean over its ticks
    (a tick without the guest counts as 0, as the chart draws it)."""

    t: np.ndarray
    domains: list[str]
    values: np.ndarray


@dataclass
class VmAnalysis:
    rows: list[dict[str, Any]]  # one per guest, values on the plateau
    reconciliation: list[dict[str, Any]]  # sum over guests against the global counter
    coverage_pct: float | None
    merging: VmMatrix | None  # for the stacked chart


def row_sums(block: np.ndarray) -> np.ndarray:
    """Sum of each row over guests; np.nansum copies, so only when there are NaNs."""
    return np.nansum(block, axis=1) if np.isnan(block).any() else block.sum(axis=1)


# -- one pass over every row ------------------------------------------------------------------
@dataclass
class _Guests:
    """Guest names met so far, each with a global index."""

    names: list[str] = field(default_factory=list)
    index: dict[str, int] = field(default_factory=dict)

    def codes(self, chunk: Chunk) -> np.ndarray:
        local = np.array([self._of(n) for n in chunk.names], dtype=np.int64)
        return local[chunk.codes] if len(local) else np.zeros(0, dtype=np.int64)

    def _of(self, name: str) -> int:
        i = self.index.get(name)
        if i is None:
            i = self.index[name] = len(self.names)
            self.names.append(name)
        return i


class _Grow:
    """A (guest x n) float array that grows a row per new guest."""

    def __init__(self, n: int) -> None:
        self.a = np.zeros((0, n))

    def add(self, rows: np.ndarray, block: np.ndarray) -> None:
        need = int(rows.max()) + 1 if len(rows) else 0
        if need > self.a.shape[0]:
            self.a = np.vstack([self.a, np.zeros((need - self.a.shape[0], self.a.shape[1]))])
        self.a[rows] += block

    def rows(self, n: int) -> np.ndarray:
        if self.a.shape[0] < n:
            self.add(np.array([n - 1]), np.zeros((1, self.a.shape[1])))
        return self.a[:n]


class _Pass:
    """What the first pass keeps: sums per tick, bucket sums per guest, last pids, plateau
    statistics (and the plateau rows themselves while they are few)."""

    def __init__(self, axis: np.ndarray, start: float | None, end: float | None) -> None:
        self.axis = axis
        self.axis_ms = np.rint(axis * 1000).astype(np.int64)
        self.start, self.end = start, end
        # the plateau in ms: rows at start <= t < end (t is kept to the millisecond)
        self.start_ms = None if start is None else int(np.ceil(round(start * 1000, 6)))
        self.end_ms = None if end is None else int(np.ceil(round(end * 1000, 6)))
        n = len(axis)
        self.size = max(1, -(-n // BUCKETS))
        self.nb = -(-n // self.size) if n else 0
        self.guests = _Guests()
        self.tick_rows = np.zeros(n)
        self.tick_sums: dict[str, np.ndarray] = {}
        self.bucket_sum = _Grow(self.nb)
        self.bucket_rows = _Grow(self.nb)
        self.last_t = np.full(0, np.iinfo(np.int64).min)
        self.last_pid = np.full(0, np.nan)
        self.stats: dict[str, Stats] = {}
        self.kept: list[tuple[np.ndarray, dict[str, np.ndarray]]] | None = []
        self.kept_rows = 0
        self.columns: set[str] = set()

    def _ticks(self, t_ms: np.ndarray) -> np.ndarray:
        """Each row's tick: its place on the axis, through a table over the chunk's span of
        milliseconds (a gather, where a binary search per row costs ten times more)."""
        lo, hi = int(t_ms.min()), int(t_ms.max())
        a0, a1 = np.searchsorted(self.axis_ms, [lo, hi + 1])
        if hi - lo < 8 * len(t_ms) + 1_000_000:
            table = np.full(hi - lo + 1, -1, dtype=np.int64)
            table[self.axis_ms[a0:a1] - lo] = np.arange(a0, a1)
            idx = table[t_ms - lo]
            off = idx < 0  # a row at a time no host sample has: the next tick
            if off.any():
                idx[off] = np.searchsorted(self.axis_ms, t_ms[off])
        else:
            idx = np.searchsorted(self.axis_ms, t_ms)
        return np.minimum(idx, len(self.axis_ms) - 1)

    def add(self, chunk: Chunk) -> None:
        g = self.guests.codes(chunk)
        ng = len(self.guests.names)
        idx = self._ticks(chunk.t_ms)
        i0 = int(idx.min())
        rel = idx - i0
        span = int(rel.max()) + 1
        self.tick_rows[i0 : i0 + span] += np.bincount(rel, minlength=span)
        self.columns.update(chunk.values)
        for name in SUM_COLUMNS:
            v = chunk.values.get(name)
            if v is None:
                continue
            sums = self.tick_sums.setdefault(name, np.zeros(len(self.axis)))
            sums[i0 : i0 + span] += np.bincount(rel, _filled(v), minlength=span)
        merging = chunk.values.get("ksm_merging_pages")
        if merging is not None:
            key = g * self.nb + idx // self.size
            present = np.flatnonzero(np.bincount(g, minlength=ng))
            flat = np.bincount(key, _filled(merging), minlength=ng * self.nb)
            self.bucket_sum.add(present, flat.reshape(ng, self.nb)[present])
            has = None if merging.dtype.kind != "f" else ~np.isnan(merging)
            flat = np.bincount(key, has, minlength=ng * self.nb)
            self.bucket_rows.add(present, flat.reshape(ng, self.nb)[present])
        self._pids(chunk, g, ng)
        self._plateau(chunk, g, ng)

    def _pids(self, chunk: Chunk, g: np.ndarray, ng: int) -> None:
        pid = chunk.values.get("pid")
        if pid is None:
            return
        if len(self.last_t) < ng:
            grow = ng - len(self.last_t)
            self.last_t = np.r_[self.last_t, np.full(grow, np.iinfo(np.int64).min)]
            self.last_pid = np.r_[self.last_pid, np.full(grow, np.nan)]
        # each guest's row with the latest t in this chunk (rows are in time order per guest)
        pos = np.full(ng, -1)
        if chunk.by_guest:  # the last row of each guest's run(s)
            ends = np.flatnonzero(np.r_[g[1:] != g[:-1], True])
            np.maximum.at(pos, g[ends], ends)
        else:
            np.maximum.at(pos, g, np.arange(len(g)))
        have = np.flatnonzero(pos >= 0)
        t = chunk.t_ms[pos[have]]
        newer = t >= self.last_t[have]
        self.last_t[have[newer]] = t[newer]
        self.last_pid[have[newer]] = pid[pos[have[newer]]]

    def _plateau(self, chunk: Chunk, g: np.ndarray, ng: int) -> None:
        if self.start is None or self.end is None:
            return
        inside = (chunk.t_ms >= self.start_ms) & (chunk.t_ms < self.end_ms)
        if not inside.any():
            return
        cols = {c: v for c, v in chunk.values.items() if c in MEDIAN_COLUMNS}
        gi = g
        if not inside.all():
            gi = g[inside]
            cols = {c: v[inside] for c, v in cols.items()}
        for name, v in cols.items():
            one = group_stats(gi, v, ng, chunk.by_guest)
            old = self.stats.get(name)
            if old is not None and len(old[0]) < ng:
                pad = empty_stats(ng - len(old[0]))
                old = tuple(np.r_[a, b] for a, b in zip(old, pad, strict=True))  # type: ignore[assignment]
            self.stats[name] = merge_stats(old, one) if old is not None else one
        if self.kept is not None:
            self.kept_rows += len(gi)
            if self.kept_rows > KEEP_PLATEAU_ROWS:
                self.kept = None  # too many: read them again instead
            else:
                self.kept.append((gi, cols))


def _filled(v: np.ndarray) -> np.ndarray:
    """Values to add up: NaN (no value) as 0; integer columns as they are."""
    return np.nan_to_num(v) if v.dtype.kind == "f" else v


def _axis(record: Record, guests: GuestSamples) -> np.ndarray:
    """The ticks: the host samples' times (every per-guest row was taken at one of them), or
    the per-guest rows' own times when the record has no host samples."""
    t = record.samples["t"].to_numpy(float) if "t" in record.samples else np.zeros(0)
    t = t[~np.isnan(t)]
    if len(t):
        return np.unique(t)
    return np.unique(np.concatenate([c.t for c in guests.chunks([])] or [np.zeros(0)]))


def vm_analysis(record: Record, w: Windows | None = None) -> VmAnalysis | None:
    """Per-guest values on the plateau and how their sum reconciles with the global counters."""
    guests = record.guests
    if guests is None or "domain" not in guests.columns():
        return None
    w = w or windows(record)
    axis = _axis(record, guests)
    if not len(axis):
        return None
    first = _Pass(axis, w.plateau_start, w.plateau_end)
    for chunk in guests.chunks(VM_COLUMNS):
        if len(chunk):
            first.add(chunk)
    names = first.guests.names
    if not names or not first.columns:
        return None
    ticks = np.flatnonzero(first.tick_rows > 0)  # the ticks with per-guest rows
    window = _plateau_ticks(axis[ticks], w)
    medians = _medians(guests, first, axis[ticks], window)
    order = np.array(sorted(range(len(names)), key=lambda i: natural_key(names[i])), dtype=int)
    domains = [names[i] for i in order]
    medians = {k: v[order] for k, v in medians.items()}
    pids = _padded_pids(first.last_pid, len(names))[order] if len(first.last_pid) else None
    rows = _guest_rows(record, w, domains, medians, pids)
    recon = _reconcile(record, w, first, ticks[window])
    coverage = recon[0]["pct"] if recon and recon[0]["global"].startswith("pages_") else None
    return VmAnalysis(rows, recon, coverage, _stacked(first, axis, order, domains))


def _plateau_ticks(t: np.ndarray, w: Windows) -> slice:
    """Ticks on the plateau [start, end), or the last one before end when none is inside."""
    if w.plateau_start is None or w.plateau_end is None:
        return slice(0, 0)
    i0, i1 = np.searchsorted(t, [w.plateau_start, w.plateau_end], side="left")
    if i0 >= i1:
        i0 = max(int(i1) - 1, 0)
    return slice(int(i0), int(i1))


def _medians(
    guests: GuestSamples, first: _Pass, t: np.ndarray, window: slice
) -> dict[str, np.ndarray]:
    """Each guest's median of each column over the plateau ticks, exactly."""
    ng = len(first.guests.names)
    if window.stop <= window.start:
        return {}
    lo, hi = float(t[window.start]), float(t[window.stop - 1])
    # The first pass took the rows in [plateau start, end): the same rows unless the plateau
    # held no tick and the last one before it stands in.
    same = first.start is not None and lo >= first.start
    stats = {k: _padded(s, ng) for k, s in first.stats.items()} if same else None
    kept = first.kept if same else None

    def blocks(columns: set[str] | None) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        names = MEDIAN_COLUMNS if columns is None else [c for c in MEDIAN_COLUMNS if c in columns]
        if kept is not None:
            for codes, cols in kept:
                yield codes, {c: cols[c] for c in names if c in cols}
            return
        # read again: the plateau's rows only (row groups wholly outside it are skipped)
        for chunk in guests.chunks(names, lo, hi):
            yield (
                first.guests.codes(chunk),
                {c: chunk.values[c] for c in names if c in chunk.values},
            )

    return group_medians(blocks, ng, stats)


def _padded_pids(pids: np.ndarray, n: int) -> np.ndarray:
    return np.r_[pids, np.full(n - len(pids), np.nan)] if len(pids) < n else pids


def _padded(s: Stats, n: int) -> Stats:
    if len(s[0]) >= n:
        return s
    pad = empty_stats(n - len(s[0]))
    return (np.r_[s[0], pad[0]], np.r_[s[1], pad[1]], np.r_[s[2], pad[2]])


def _stacked(first: _Pass, axis: np.ndarray, order: np.ndarray, domains: list[str]) -> VmMatrix:
    """ksm_merging_pages per guest as bucket means over the ticks with per-guest rows."""
    ng = len(first.guests.names)
    present = (first.tick_rows > 0).astype(float)
    b = np.arange(len(axis)) // first.size
    nticks = np.bincount(b, present, minlength=first.nb)
    tsum = np.bincount(b, axis * present, minlength=first.nb)
    keep = nticks > 0
    sums = first.bucket_sum.rows(ng)[order][:, keep]
    counts = first.bucket_rows.rows(ng)[order][:, keep]
    with np.errstate(invalid="ignore", divide="ignore"):
        values = np.where(counts > 0, sums / nticks[keep], np.nan)
    return VmMatrix(tsum[keep] / nticks[keep], domains, values.T)


def _global_plateau(record: Record, w: Windows) -> dict[str, float | None]:
    """pages_shared, pages_sharing and their sum on the plateau (None when missing)."""
    shared = column(record.samples, "pages_shared")
    sharing = column(record.samples, "pages_sharing")
    both = shared + sharing if shared is not None and sharing is not None else None
    return {
        "shared": plateau_value(record, shared, w) if shared is not None else None,
        "sharing": plateau_value(record, sharing, w) if sharing is not None else None,
        "merged": plateau_value(record, both, w) if both is not None else None,
    }


def _guest_rows(
    record: Record,
    w: Windows,
    domains: list[str],
    medians: dict[str, np.ndarray],
    pids: np.ndarray | None,
) -> list[dict[str, Any]]:
    ps = page_size(record)
    g = _global_plateau(record, w)
    saving_share = ratio(g["sharing"], g["merged"])  # merged mappings that are savings
    memory = {g.name: g.memory_kb for g in record.meta.guests}

    def value(key: str, i: int) -> float | None:
        arr = medians.get(key)
        return None if arr is None or np.isnan(arr[i]) else float(arr[i])

    out = []
    for i, dom in enumerate(domains):
        merging, zero = value("ksm_merging_pages", i), value("ksm_zero_pages", i)
        mem_kb = memory.get(dom)
        saved = None
        if merging is not None and saving_share is not None:
            # The guest's share of the global saving: its merged pages times the fraction of
            # all merged mappings that are pages_sharing, plus its zero pages.
            saved = (merging * saving_share + (zero or 0)) * ps / MIB
        pid = pids[i] if pids is not None else np.nan
        out.append(
            {
                "domain": dom,
                "pid": None if np.isnan(pid) else int(pid),
                "memory_mib": mem_kb / 1024 if mem_kb else None,
                "rss_mib": scaled(value("rss_kb", i), 1 / 1024),
                "merging_pages": merging,
                "merged_mib": scaled(merging, ps / MIB),
                "merged_pct": ratio(scaled(merging, ps / 1024), mem_kb, 100.0),
                "zero_pages": zero,
                "saved_mib": saved,
                "profit_mib": scaled(value("ksm_process_profit", i), 1 / MIB),
                "rmap_items": value("ksm_rmap_items", i),
            }
        )
    return out


def _reconcile(record: Record, w: Windows, first: _Pass, ticks: np.ndarray) -> list[dict[str, Any]]:
    """Median over the plateau of each tick's sum over guests, against the global counter."""
    ps = page_size(record)
    g = _global_plateau(record, w)
    merged, kept = g["merged"], g["shared"]
    profit = plateau_column(record, "general_profit", w)
    pairs = (  # guests' column, global counter, its plateau value, unit shown
        ("ksm_merging_pages", "pages_shared + pages_sharing", merged, "pages"),
        ("ksm_zero_pages", "ksm_zero_pages", plateau_column(record, "ksm_zero_pages", w), "pages"),
        ("ksm_process_profit", "general_profit", scaled(profit, 1 / MIB), "MiB"),
    )
    out = []
    for name, global_name, global_value, unit in pairs:
        sums = first.tick_sums.get(name)
        if sums is None or global_value is None:
            continue
        summed = float(np.median(sums[ticks])) if len(ticks) else None
        label = f"sum of {name}"
        if name == "ksm_process_profit":
            # A process's profit counts all its merged pages, the copy KSM keeps included;
            # general_profit counts only pages_sharing, so take the kept copies off.
            if kept is None or summed is None:
                continue
            summed = (summed - kept * ps) / MIB
            label += " - pages_shared x page size"
        out.append(
            {
                "guests": label,
                "global": global_name,
                "unit": unit,
                "sum": summed,
                "global_value": global_value,
                "difference": None if summed is None else summed - global_value,
                "pct": ratio(summed, global_value, 100.0),
            }
        )
    return out

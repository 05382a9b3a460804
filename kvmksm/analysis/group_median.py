"""Exact medians of many groups of integers in bounded memory, reading the data more than once.

A week of 200 guests on a plateau is over 100 million values per column: too many to hold,
and a median does not add up from pieces. So it is found by selection: the median of a group
of n values is the value at rank (n-1)//2 (averaged with the one at rank n//2 when n is even).
A first pass gives each group's count, minimum and maximum; each further pass counts the values
inside every group's current range in ``bins`` equal bins and narrows the range to the bin
holding the rank. When the range is one integer wide the value is known. Values that move
little (counters on a plateau) are settled by a single pass; any int64 range by a few.

``blocks(columns)`` yields ``(group codes, {column: values})`` and is called once per pass
with the columns still unsettled, so it can read just those from disk each time. NaN values are
skipped. Memory: groups x bins counts per column per pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

# blocks(columns) -> (group codes, {column: values}) for those columns (None: all of them)
Blocks = Callable[[set[str] | None], Iterable[tuple[np.ndarray, dict[str, np.ndarray]]]]
Stats = tuple[np.ndarray, np.ndarray, np.ndarray]
BINS = 4096
MAX_COUNTS = 1 << 23  # histograms x bins per pass: 64 MiB of counts at most


def group_stats(
    codes: np.ndarray, values: np.ndarray, groups: int, sorted_by_group: bool = False
) -> Stats:
    """(count, minimum, maximum) of each group's non-NaN values in one block (min > max where a
    group has none)."""
    if values.dtype.kind == "f":
        keep = ~np.isnan(values)
        if not keep.all():
            codes, values = codes[keep], values[keep]
    count = np.bincount(codes, minlength=groups)
    lo = np.full(groups, np.inf)
    hi = np.full(groups, -np.inf)
    if not len(values):
        return count, lo, hi
    if sorted_by_group:  # contiguous runs (one or a few a group): reduceat, then few scatters
        starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
        present = codes[starts]
        np.minimum.at(lo, present, np.minimum.reduceat(values, starts).astype(float))
        np.maximum.at(hi, present, np.maximum.reduceat(values, starts).astype(float))
    else:
        np.minimum.at(lo, codes, values)
        np.maximum.at(hi, codes, values)
    return count, lo, hi


def merge_stats(a: Stats, b: Stats) -> Stats:
    return a[0] + b[0], np.minimum(a[1], b[1]), np.maximum(a[2], b[2])


def empty_stats(groups: int) -> Stats:
    return (
        np.zeros(groups, dtype=np.int64),
        np.full(groups, np.inf),
        np.full(groups, -np.inf),
    )


def group_medians(
    blocks: Blocks,
    groups: int,
    stats: Stats | None = None,
    bins: int = BINS,
) -> dict[str, np.ndarray]:
    """The median of each group's values, for each column (NaN for a group with none).
    ``blocks(columns)`` yields ``(codes, {column: values})``; ``stats`` are each column's
    (count, min, max) when a pass already gave them, otherwise a first pass takes them."""
    if stats is None:
        stats = {}
        for codes, cols in blocks(None):
            for name, values in cols.items():
                one = group_stats(codes, values, groups)
                stats[name] = merge_stats(stats[name], one) if name in stats else one
    targets = {name: _Targets(s) for name, s in stats.items()}
    bins = max(2, min(bins, MAX_COUNTS // max(1, 2 * groups * max(1, len(stats)))))
    while any(t.unsettled() for t in targets.values()):
        _narrow(blocks, groups, targets, bins)
    return {name: t.medians(groups) for name, t in targets.items()}


class _Targets:
    """The ranks sought in each group: (n-1)//2 and n//2 (one target when n is odd), each
    with the integer range [lo, hi] known to hold it and its rank within that range."""

    def __init__(self, stats: Stats) -> None:
        count, vmin, vmax = stats
        has = count > 0
        even = has & (count % 2 == 0)
        self.group = np.concatenate([np.flatnonzero(has), np.flatnonzero(even)])
        self.rank = np.concatenate([(count[has] - 1) // 2, count[even] // 2]).astype(np.int64)
        self.lo = vmin[self.group].astype(np.int64)
        self.hi = vmax[self.group].astype(np.int64)
        self.has = has

    def unsettled(self) -> bool:
        return bool((self.lo < self.hi).any())

    def medians(self, groups: int) -> np.ndarray:
        out = np.full(groups, np.nan)
        total = np.bincount(self.group, weights=self.lo.astype(float), minlength=groups)
        n = np.bincount(self.group, minlength=groups)
        out[self.has] = total[self.has] / n[self.has]
        return out


class _Pass:
    """One column's histograms for one pass: targets of one group with the same range share
    one (at most two a group)."""

    def __init__(self, t: _Targets, groups: int, bins: int) -> None:
        self.t = t
        self.bins = bins
        self.active = np.flatnonzero(t.lo < t.hi)
        keys = np.stack([t.group[self.active], t.lo[self.active], t.hi[self.active]], axis=1)
        hkeys, which = np.unique(keys, axis=0, return_inverse=True)
        self.which = which.reshape(-1)
        self.hg, self.hlo, self.hhi = hkeys[:, 0], hkeys[:, 1], hkeys[:, 2]
        self.width = (self.hhi - self.hlo) // bins + 1  # bins x width covers the range
        self.slots = [np.full(groups, -1, dtype=np.int64), np.full(groups, -1, dtype=np.int64)]
        for h, g in enumerate(self.hg):
            self.slots[0 if self.slots[0][g] < 0 else 1][g] = h
        if not (self.slots[1] >= 0).any():
            self.slots.pop()
        self.counts = np.zeros(len(hkeys) * bins, dtype=np.int64)

    def add(self, codes: np.ndarray, values: np.ndarray) -> None:
        if values.dtype.kind == "f":
            keep = ~np.isnan(values)
            if not keep.all():
                codes, values = codes[keep], values[keep]
        v = values.astype(np.int64, copy=False)
        span = (self.hhi - self.hlo).astype(np.uint64)
        unit = bool((self.width == 1).all())
        for slot in self.slots:
            h = slot[codes]
            rel = v - self.hlo[h]
            # one unsigned comparison: 0 <= rel <= hi - lo
            inside = rel.view(np.uint64) <= span[h]
            if len(self.slots) > 1 or not (slot >= 0).all():
                inside &= h >= 0
            if not inside.all():
                h, rel = h[inside], rel[inside]
            idx = h * self.bins + (rel if unit else rel // self.width[h])
            self.counts += np.bincount(idx, minlength=len(self.counts))

    def narrow(self) -> None:
        t = self.t
        cum = self.counts.reshape(len(self.hg), self.bins).cumsum(axis=1)
        for j, i in enumerate(self.active):
            h = self.which[j]
            b = int(np.searchsorted(cum[h], t.rank[i], side="right"))
            t.rank[i] -= int(cum[h][b - 1]) if b else 0
            t.lo[i] = self.hlo[h] + b * self.width[h]
            t.hi[i] = min(int(self.hhi[h]), int(t.lo[i] + self.width[h] - 1))


def _narrow(blocks: Blocks, groups: int, targets: dict[str, _Targets], bins: int) -> None:
    """One pass over the data: every unsettled range narrowed to the bin holding its rank."""
    passes = {n: _Pass(t, groups, bins) for n, t in targets.items() if t.unsettled()}
    for codes, cols in blocks(set(passes)):
        for name, p in passes.items():
            if name in cols:
                p.add(codes, cols[name])
    for p in passes.values():
        p.narrow()

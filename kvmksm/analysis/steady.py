"""Deciding that the merge curve has levelled off.

Scans, not seconds, are the natural clock. ksmd visits every mergeable page once a pass, in
the same order each pass. A page needs a pass for a stable checksum and a pass to meet its
twin; pages whose merge failed (a huge page KSM had to split first, a twin not yet stable)
try again in the next pass, and their merges can let pages visited earlier in the pass merge
in the pass after. Recorded tiny3 curves show it: nothing in pass 1, the bulk in pass 2,
about 15 % more in pass 3, and 2 % more still in pass 4, in a clump a quarter of the way in.

So a flat stretch shorter than a pass proves nothing: the pages still to merge may lie in
the part of the pass not yet seen. What does prove it is a whole pass with (almost) no
merges: after the last merge, every page has been visited once more in the state that merge
left, and found nothing. The detector therefore waits until `pages_sharing` has moved by no
more than `threshold` over the last `scan_fraction` (default 1) of a full pass, measured in
pages scanned (`pages_scanned`, Linux 6.7+; the time of the last pass where it is missing),
and never counts the first pass, which cannot merge anything, as evidence. At best that is
the end of pass `min_full_scans`, when that pass itself added nothing.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field

from kvmksm.scenario.model import Steady


@dataclass
class SteadyDetector:
    spec: Steady
    # What the readings are: the host's pages_sharing, or e.g. a run's guests' own merged
    # pages (the same curve, without other users of KSM on the host).
    curve: str = "pages_sharing"
    start_scans: int | None = None
    # (t, full_scans, pages_sharing, position) when KSM went on and at each pass end; the
    # position is pages_scanned, or t on kernels without it.
    scan_ends: list[tuple[float, int, int, float]] = field(default_factory=list)
    # Every reading: positions (never decreasing), times, pages_sharing.
    _x: list[float] = field(default_factory=list)
    _t: list[float] = field(default_factory=list)
    _p: list[int] = field(default_factory=list)
    reason: str = ""

    def update(
        self, t: float, full_scans: int, pages_sharing: int, pages_scanned: int | None = None
    ) -> bool:
        """Feed one reading; True once the curve is steady (`reason` says why)."""
        x = float(pages_scanned) if pages_scanned is not None else t
        if self._x and x < self._x[-1]:
            x = self._x[-1]  # a counter reset (another user wrote run=2): never go back
        self._x.append(x)
        self._t.append(t)
        self._p.append(pages_sharing)
        if self.start_scans is None:
            self.start_scans = full_scans
            self.scan_ends.append((t, full_scans, pages_sharing, x))
            return False
        if full_scans > self.scan_ends[-1][1]:
            self.scan_ends.append((t, full_scans, pages_sharing, x))
        done = full_scans - self.start_scans
        # A pass's length is known from the second pass on: the first may have started
        # mid-pass (ksmd resumes where it stopped), so it never measures one.
        if done < self.spec.min_full_scans or len(self.scan_ends) < 3:
            return False
        (_, _, _, x0), (_, _, _, x1) = self.scan_ends[-2], self.scan_ends[-1]
        span = self.spec.scan_fraction * (x1 - x0)
        if span <= 0:
            return False
        if x - span < self.scan_ends[1][3]:
            return False  # the first pass merges nothing: a flat stretch there proves nothing
        lo, hi = self._range_since(self._x, x - span)
        if lo is None or hi is None:
            return False
        if not _small(hi - lo, pages_sharing, self.spec.threshold):
            return False
        if self.spec.window > 0:
            wlo, whi = self._range_since(self._t, t - self.spec.window)
            if (
                wlo is None
                or whi is None
                or not _small(whi - wlo, pages_sharing, self.spec.threshold)
            ):
                return False
        i = bisect_right(self._x, x - span) - 1
        unit = "pages scanned" if pages_scanned is not None else "s of scanning"
        self.reason = (
            f"{done} full scans since KSM on; {self.curve} stayed within {hi - lo} "
            f"({(hi - lo) / max(pages_sharing, 1):.2%}) of {pages_sharing} over the last "
            f"{x - self._x[i]:.0f} {unit} ({self.spec.scan_fraction:g} of a full scan, "
            f"{t - self._t[i]:.1f}s)"
        )
        return True

    def _range_since(self, axis: list[float], start: float) -> tuple[int | None, int | None]:
        """Min and max pages_sharing from the last reading at or before `start` on `axis`
        (positions or times) to now; (None, None) when no reading is that old."""
        i = bisect_right(axis, start) - 1
        if i < 0:
            return None, None
        window = self._p[i:]
        return min(window), max(window)


def _small(delta: int, value: int, threshold: float) -> bool:
    return abs(delta) <= threshold * max(value, 1)

"""Deciding that the merge curve has levelled off.

Scans, not seconds, are the natural clock. A page needs a pass to get a stable checksum, a
pass to meet its twin in the unstable tree, and, for huge pages KSM must split first or
twins met in the wrong order, one more to join the stable tree: merging is done after three
full scans. Waiting for a whole fourth scan to confirm costs a third more; instead, once
`min_full_scans` are done, a fraction of the next scan that adds (almost) nothing is enough.
A time window can be required as well, for guests whose memory keeps changing.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from kvmksm.scenario.model import Steady


@dataclass
class SteadyDetector:
    spec: Steady
    start_scans: int | None = None
    # (t, full_scans, pages_sharing) when KSM went on and at the end of each full scan
    scan_ends: list[tuple[float, int, int]] = field(default_factory=list)
    history: deque[tuple[float, int]] = field(default_factory=deque)
    reason: str = ""

    def update(self, t: float, full_scans: int, pages_sharing: int) -> bool:
        """Feed one reading; True once the curve is steady (`reason` says why)."""
        if self.start_scans is None:
            self.start_scans = full_scans
            self.scan_ends.append((t, full_scans, pages_sharing))
        elif full_scans > self.scan_ends[-1][1]:
            self.scan_ends.append((t, full_scans, pages_sharing))
        self.history.append((t, pages_sharing))
        if self.spec.window > 0:
            while len(self.history) > 1 and self.history[1][0] <= t - self.spec.window:
                self.history.popleft()
        done = full_scans - self.start_scans
        if done < self.spec.min_full_scans or len(self.scan_ends) < 3:
            return False
        ref = self._reference(t)
        if ref is None:
            return False
        (t0, _, _), (t1, _, p1) = ref
        if not _small(pages_sharing - p1, pages_sharing, self.spec.threshold):
            return False
        if self.spec.window > 0:
            t_first, p_first = self.history[0]
            if t - t_first < self.spec.window or not _small(
                pages_sharing - p_first, pages_sharing, self.spec.threshold
            ):
                return False
        self.reason = (
            f"{done} full scans since KSM on, then pages_sharing {p1} -> {pages_sharing} "
            f"over {t - t1:.1f}s ({(t - t1) / max(t1 - t0, 1e-9):.0%} of a full scan)"
        )
        return True

    def _reference(self, t: float) -> tuple[tuple[float, int, int], tuple[float, int, int]] | None:
        """The latest scan end, at least `min_full_scans` in, that lies `scan_fraction` of a
        scan (the one before it) in the past; with the scan end before it."""
        assert self.start_scans is not None
        for i in range(len(self.scan_ends) - 1, 0, -1):
            prev, end = self.scan_ends[i - 1], self.scan_ends[i]
            if end[1] - self.start_scans < self.spec.min_full_scans:
                return None
            # The first interval may have started mid-pass: never measure a scan by it.
            if i == 1:
                return None
            if t - end[0] >= self.spec.scan_fraction * (end[0] - prev[0]):
                return prev, end
        return None


def _small(delta: int, value: int, threshold: float) -> bool:
    return abs(delta) <= threshold * max(value, 1)

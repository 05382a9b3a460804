"""Deciding that the merge curve has levelled off.

Scans, not seconds, are the natural clock: KSM merges a page on its second pass (unstable
tree, then stable tree), so once a full pass adds (almost) nothing, more waiting adds nothing
either. A time window can be added for guests whose memory keeps changing.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from kvmksm.scenario import Steady


@dataclass
class SteadyDetector:
    spec: Steady
    start_scans: int | None = None
    # (t, full_scans, pages_sharing) at the end of each completed full scan
    scan_ends: list[tuple[float, int, int]] = field(default_factory=list)
    history: deque[tuple[float, int]] = field(default_factory=deque)
    reason: str = ""

    def update(self, t: float, full_scans: int, pages_sharing: int) -> bool:
        """Feed one reading; True once the curve is steady (reason says why)."""
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
        if done < self.spec.min_full_scans or len(self.scan_ends) < 2:
            return False
        (_, s0, p0), (_, s1, p1) = self.scan_ends[-2], self.scan_ends[-1]
        if not _small(p1 - p0, p1, self.spec.threshold):
            return False
        if self.spec.window > 0:
            t_first, p_first = self.history[0]
            if t - t_first < self.spec.window or not _small(
                pages_sharing - p_first, pages_sharing, self.spec.threshold
            ):
                return False
        self.reason = (
            f"{done} full scans since KSM on; pages_sharing {p0} -> {p1} over the last "
            f"({s1 - s0} scan{'s' if s1 - s0 > 1 else ''})"
        )
        return True


def _small(delta: int, value: int, threshold: float) -> bool:
    return abs(delta) <= threshold * max(value, 1)

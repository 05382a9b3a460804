from __future__ import annotations

from kvmksm.analysis.steady import SteadyDetector
from kvmksm.scenario.model import Steady


def feed(det: SteadyDetector, readings: list[tuple[float, int, int]]) -> float | None:
    for t, scans, sharing in readings:
        if det.update(t, scans, sharing):
            return t
    return None


def ramp(
    merge_until: float, seconds: float = 20, step: float = 0.1
) -> list[tuple[float, int, int]]:
    """KSM on at t=0 with full_scans=10, one full scan per second, pages_sharing rising
    linearly to 100000 at `merge_until`, flat afterwards."""
    out = []
    for i in range(int(seconds / step) + 1):
        t = round(i * step, 3)
        out.append((t, 10 + int(t), int(min(t / merge_until, 1.0) * 100_000)))
    return out


def test_steady_a_quarter_scan_after_the_third() -> None:
    det = SteadyDetector(Steady(min_full_scans=3, threshold=0.01, scan_fraction=0.25))
    assert feed(det, ramp(merge_until=2.5)) == 3.3  # 3 scans, then 0.25 s flat (+ one tick)
    assert det.reason.startswith("3 full scans since KSM on, then pages_sharing 100000 -> 100000")


def test_still_merging_in_the_fourth_scan_waits() -> None:
    det = SteadyDetector(Steady(min_full_scans=3, threshold=0.01, scan_fraction=0.25))
    # Scan 4 ends at t=4 mid-rise: not until a quarter into scan 6 (after flat scan 5).
    assert feed(det, ramp(merge_until=4.5)) == 5.3


def test_whole_scan_fraction() -> None:
    det = SteadyDetector(Steady(min_full_scans=3, threshold=0.01, scan_fraction=1.0))
    assert feed(det, ramp(merge_until=2.5)) == 4.0  # all of scan 4 flat


def test_not_steady_while_still_merging() -> None:
    readings = [(float(i), 10 + i, i * 10_000) for i in range(20)]
    assert feed(SteadyDetector(Steady(min_full_scans=3)), readings) is None


def test_not_steady_without_full_scans() -> None:
    # ksmd stalled: the count does not move, so nothing can be concluded.
    readings = [(float(i) / 10, 10, 5000) for i in range(300)]
    assert feed(SteadyDetector(Steady(min_full_scans=1)), readings) is None


def test_threshold_is_relative() -> None:
    # +3% within the quarter scan after the 3rd: steady at 5%, not at 1%.
    readings = [(0, 0, 0), (1, 1, 50_000), (2, 2, 90_000), (3, 3, 100_000), (3.3, 3, 103_000)]
    assert feed(SteadyDetector(Steady(min_full_scans=3, threshold=0.05)), readings) == 3.3
    assert feed(SteadyDetector(Steady(min_full_scans=3, threshold=0.01)), readings) is None


def test_time_window_also_required() -> None:
    det = SteadyDetector(Steady(min_full_scans=2, threshold=0.01, window=5))
    readings = [(float(t), t, 1000) for t in range(0, 10)]
    # Flat from the start, but the window needs 5 s of history.
    assert feed(det, readings) == 5.0

from __future__ import annotations

from kvmksm.scenario import Steady
from kvmksm.steady import SteadyDetector


def feed(det: SteadyDetector, readings: list[tuple[float, int, int]]) -> float | None:
    for t, scans, sharing in readings:
        if det.update(t, scans, sharing):
            return t
    return None


def test_steady_after_a_scan_that_adds_nothing() -> None:
    # KSM on at t=0 with full_scans=10; one scan per second; merging ends in scan 2.
    readings = []
    for i in range(0, 61):
        t = i / 10
        scans = 10 + int(t)
        sharing = min(int(t * 50_000), 100_000)
        readings.append((t, scans, sharing))
    det = SteadyDetector(Steady(min_full_scans=3, threshold=0.01))
    assert feed(det, readings) == 3.0
    assert "3 full scans since KSM on; pages_sharing 100000 -> 100000" in det.reason


def test_not_steady_while_still_merging() -> None:
    readings = [(float(i), 10 + i, i * 10_000) for i in range(20)]
    assert feed(SteadyDetector(Steady(min_full_scans=3)), readings) is None


def test_not_steady_without_full_scans() -> None:
    # ksmd stalled: the count does not move, so nothing can be concluded.
    readings = [(float(i), 10, 5000) for i in range(30)]
    assert feed(SteadyDetector(Steady(min_full_scans=1)), readings) is None


def test_threshold_is_relative() -> None:
    det = SteadyDetector(Steady(min_full_scans=2, threshold=0.05))
    # +4% during the last scan: steady at 5%, not at 1%.
    assert feed(det, [(0, 0, 0), (1, 1, 100_000), (2, 2, 104_000)]) == 2
    det = SteadyDetector(Steady(min_full_scans=2, threshold=0.01))
    assert feed(det, [(0, 0, 0), (1, 1, 100_000), (2, 2, 104_000)]) is None


def test_time_window_also_required() -> None:
    det = SteadyDetector(Steady(min_full_scans=2, threshold=0.01, window=5))
    readings = [(float(t), t, 1000) for t in range(0, 10)]
    # Scans are flat from the start, but the window needs 5 s of history.
    assert feed(det, readings) == 5.0

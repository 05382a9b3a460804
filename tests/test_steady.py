"""The steady-state detector against synthetic curves and against merge curves recorded on
real tiny3 runs (tests/fixtures/steady/: the 0.1 s samples of `kvmksm bench` on tiny3 with
`sample_interval: 0.1s`, cut to KSM on .. end of plateau; `guests_merging` is the sum of the
three guests' ksm_merging_pages, which other users of this shared host's KSM cannot touch)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from kvmksm.analysis.steady import SteadyDetector
from kvmksm.scenario.model import Steady

FIXTURES = Path(__file__).parent / "fixtures" / "steady"
REAL = sorted(FIXTURES.glob("tiny3-*.csv"))

Reading = tuple[float, int, int, int | None]  # t, full_scans, pages_sharing, pages_scanned


def feed(det: SteadyDetector, readings: list[Reading]) -> float | None:
    for t, scans, sharing, scanned in readings:
        if det.update(t, scans, sharing, scanned):
            return t
    return None


def curve(
    sharing_at: object,
    seconds: float = 30,
    step: float = 0.1,
    pass_pages: int = 100_000,
    scanned: bool = True,
) -> list[Reading]:
    """KSM on at t=0 with full_scans=10; one full pass of `pass_pages` pages a second;
    pages_sharing = sharing_at(position in passes since KSM on)."""
    out: list[Reading] = []
    for i in range(int(seconds / step) + 1):
        t = round(i * step, 3)
        out.append(
            (
                t,
                10 + int(t),
                int(sharing_at(t)),  # type: ignore[operator]
                5_000_000 + int(t * pass_pages) if scanned else None,
            )
        )
    return out


def bulk_then(extra: dict[int, tuple[float, float, float]]):
    """Nothing in pass 1, 100,000 merged through pass 2; then `extra[k] = (start, end,
    amount)`: `amount` more merged linearly between fractions start..end of pass k."""

    def at(x: float) -> float:
        v = min(max(x - 1, 0), 1) * 100_000
        for k, (a, b, amount) in extra.items():
            lo, hi = k - 1 + a, k - 1 + b
            v += amount * min(max((x - lo) / (hi - lo), 0), 1)
        return v

    return at


SPEC = Steady(min_full_scans=3, threshold=0.01)


def test_flat_third_pass_is_steady_at_its_end() -> None:
    # Everything merged in pass 2: pass 3 is a whole pass with nothing new.
    det = SteadyDetector(SPEC)
    assert feed(det, curve(bulk_then({}))) == 3.0
    assert det.reason.startswith("3 full scans since KSM on; pages_sharing stayed within 0 (0.00%)")
    assert "over the last 100000 pages scanned (1 of a full scan, 1.0s)" in det.reason


def test_a_clump_in_the_fourth_pass_is_waited_for() -> None:
    """What tiny3 does: 15% more in pass 3, then 2% in a clump a quarter into pass 4. A
    quarter-pass window (the old rule) stops at 3.25, before the clump; a whole pass after
    the clump is needed to know nothing more comes."""
    readings = curve(bulk_then({3: (0.1, 0.9, 15_000), 4: (0.25, 0.45, 2_300)}))
    quarter = Steady(min_full_scans=3, threshold=0.01, scan_fraction=0.25)
    early = feed(SteadyDetector(quarter), readings)
    assert early is not None and early < 3.45  # stopped before the clump had merged
    t = feed(SteadyDetector(SPEC), readings)
    assert t is not None and 4.3 <= t <= 4.5  # the clump's bulk + one pass
    final = readings[-1][2]
    at_steady = next(r[2] for r in readings if r[0] == t)
    assert final - at_steady <= 0.01 * at_steady


def test_a_slow_late_rise_is_not_steady() -> None:
    """From pass 3 on, 2% more a pass for six passes (a guest still filling memory slowly):
    every quarter pass moves only 0.5%, so a quarter-pass window calls it steady at once; a
    whole pass sees the 2%."""
    readings = curve(bulk_then({k: (0.0, 1.0, 2_300) for k in range(3, 9)}))
    quarter = Steady(min_full_scans=3, threshold=0.01, scan_fraction=0.25)
    early = feed(SteadyDetector(quarter), readings)
    assert early is not None and early < 4.0
    t = feed(SteadyDetector(SPEC), readings)
    assert t is not None and t > 8.0  # not while it rises (until the end of pass 8)


def test_never_steady_while_merging() -> None:
    readings = curve(lambda t: t * 10_000)
    assert feed(SteadyDetector(SPEC), readings) is None


def test_not_steady_without_full_scans() -> None:
    # ksmd stalled: neither full_scans nor pages_scanned moves, so nothing can be concluded.
    readings: list[Reading] = [(i / 10, 10, 5000, 123) for i in range(300)]
    assert feed(SteadyDetector(Steady(min_full_scans=1)), readings) is None


def test_the_first_pass_is_no_evidence() -> None:
    # min_full_scans=1 and a flat curve: pass 1 cannot merge, pass 2 must be watched whole.
    readings = curve(lambda t: 0.0)
    assert feed(SteadyDetector(Steady(min_full_scans=1)), readings) == 2.0


def test_threshold_is_relative() -> None:
    # +3% over pass 3: steady at its end with 5%, not with 1%.
    readings = curve(bulk_then({3: (0.2, 0.5, 3_000)}), seconds=3.05)
    assert feed(SteadyDetector(Steady(min_full_scans=3, threshold=0.05)), readings) == 3.0
    assert feed(SteadyDetector(Steady(min_full_scans=3, threshold=0.01)), readings) is None


def test_without_pages_scanned_a_pass_is_measured_in_time() -> None:
    # Before Linux 6.7: the window is the duration of the last full pass.
    readings = curve(bulk_then({3: (0.1, 0.9, 15_000), 4: (0.25, 0.45, 2_300)}), scanned=False)
    det = SteadyDetector(SPEC)
    t = feed(det, readings)
    assert t is not None and 4.3 <= t <= 4.5
    assert "s of scanning" in det.reason


def test_passes_in_pages_not_seconds() -> None:
    """ksmd slows down (another load) in pass 4, just after pass 3 merged until its end: the
    window is a pass of pages however long it takes, so the slow, flat start of pass 4 is
    not mistaken for a whole pass (a window of pass 3's duration would end before the clump
    half-way through pass 4)."""
    out: list[Reading] = []
    x = 0.0
    at = bulk_then({3: (0.0, 1.0, 10_000), 4: (0.5, 0.6, 5_000)})
    for i in range(600):
        t = round(i * 0.1, 3)
        out.append((t, 10 + int(x + 1e-9), int(at(x)), int(x * 100_000)))
        x += 0.1 * (0.2 if 3.0 <= x < 5.0 else 1.0)  # passes per second
    t = feed(SteadyDetector(SPEC), out)
    assert t is not None
    x_steady = next(r[3] for r in out if r[0] == t) / 100_000
    assert x_steady >= 4.5  # most of a pass of scanning after the clump (3.5..3.6)


def test_time_window_also_required() -> None:
    det = SteadyDetector(Steady(min_full_scans=2, threshold=0.01, window=5))
    readings: list[Reading] = [(float(t), t, 1000, t * 1000) for t in range(0, 10)]
    # Flat from the start, two passes done at t=2, but the window needs 5 s of history.
    assert feed(det, readings) == 5.0


# -- recorded curves --------------------------------------------------------------------------
def load(path: Path) -> pd.DataFrame:
    return pd.read_csv(path)


def replay(df: pd.DataFrame, spec: Steady, column: str, poll: float = 0.1) -> float | None:
    """When the detector, polled every `poll` s on `column`, calls the recording steady."""
    det = SteadyDetector(spec, curve=column)
    next_t = 0.0
    for r in df.itertuples():
        if r.t + 1e-9 < next_t:
            continue
        next_t = r.t + poll
        if det.update(r.t, int(r.full_scans), int(getattr(r, column)), int(r.pages_scanned)):
            return float(r.t)
    return None


def rise_after(df: pd.DataFrame, t: float, column: str) -> float:
    """How much `column` rose after time t, as a fraction of its value at t."""
    at = df.loc[df.t == t, column].iloc[0]
    return (df.loc[df.t >= t, column].max() - at) / at


@pytest.mark.parametrize("path", REAL, ids=[p.stem for p in REAL])
def test_recorded_tiny3_curves_are_steady_only_once_merging_is_over(path: Path) -> None:
    df = load(path)
    start = int(df.full_scans.iloc[0])
    # What a run watches: its guests' own merged pages.
    t = replay(df, SPEC, "guests_merging")
    assert t is not None, "never steady"
    assert df.loc[df.t == t, "full_scans"].iloc[0] - start >= 3
    assert rise_after(df, t, "guests_merging") <= 0.01


def test_the_guests_curve_is_immune_to_other_users_of_ksm() -> None:
    """Run 2 shared the host with other sessions' guests: host-wide pages_sharing rose 14%
    more after the run's own guests had stopped merging. Watching it, no run could ever be
    sure; the guests' own ksm_merging_pages says when this run's curve is flat."""
    df = load(FIXTURES / "tiny3-2.csv")
    t = replay(df, SPEC, "guests_merging")
    assert t is not None and rise_after(df, t, "guests_merging") <= 0.01
    assert rise_after(df, t, "pages_sharing") > 0.10


def test_a_quarter_pass_stops_early_on_a_recorded_curve() -> None:
    """Run 1: the guests merged 15% more in pass 3 and 1.9% more in a clump a quarter into
    pass 4. Watching a quarter of a pass (the former rule) stops just before the clump."""
    df = load(FIXTURES / "tiny3-1.csv")
    quarter = Steady(min_full_scans=3, threshold=0.01, scan_fraction=0.25)
    early = replay(df, quarter, "guests_merging")
    assert early is not None and rise_after(df, early, "guests_merging") > 0.015
    t = replay(df, SPEC, "guests_merging")
    assert t is not None and t > early + 5


def test_recorded_fixtures_exist() -> None:
    assert len(REAL) >= 3

"""The windows every metric is taken over, and the small helpers they share.

merge window   KSM on .. the first plateau_done/unmerge/stop/teardown after it (or the last
               sample); what a VM run measures after plateau_done is kept out of it
plateau        the `steady` event .. the end of the merge window; without a steady event,
               the last 10% of the merge window
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from kvmksm.results.record import Record

MIB = 1024 * 1024
DEFAULT_PAGE = 4096
PLATEAU_TAIL = 0.10  # share of the merge window taken as the plateau without a steady event
# Events that end the merge window (the first one after KSM went on).
END_KINDS = (
    "plateau_done",
    "unmerge",
    "ksm_off",
    "stop",
    "teardown",
    "interrupted",
    "error",
    "run_end",
)


def page_size(record: Record) -> int:
    return int(record.meta.get("host", {}).get("page_size") or DEFAULT_PAGE)


def column(df: pd.DataFrame, name: str) -> pd.Series | None:
    """A numeric column, or None when this kernel (or this record) lacks it."""
    if name not in df.columns:
        return None
    return pd.to_numeric(df[name], errors="coerce")


def saved_pages(samples: pd.DataFrame) -> pd.Series:
    """Pages saved each sample: pages_sharing plus ksm_zero_pages (zero pages KSM mapped)."""
    total = pd.Series(0.0, index=samples.index)
    for name in ("pages_sharing", "ksm_zero_pages"):
        col = column(samples, name)
        if col is not None:
            total = total + col.fillna(0)
    return total


# -- windows --------------------------------------------------------------------------
@dataclass(frozen=True)
class Windows:
    t_on: float | None
    on_source: str
    merge_end: float | None
    plateau_start: float | None
    plateau_end: float | None
    plateau_source: str


def windows(record: Record) -> Windows:
    t = record.samples["t"].astype(float)
    if t.empty:
        return Windows(None, "no samples", None, None, None, "no samples")
    t_on = record.event_time("ksm_on")
    on_source = "ksm_on event"
    if t_on is None:
        run = column(record.samples, "run")
        on = t[run == 1] if run is not None else t.iloc[:0]
        t_on = float(on.iloc[0]) if len(on) else float(t.iloc[0])
        on_source = "first sample with run=1" if len(on) else "first sample (no run column)"
        if len(on) and t_on == float(t.iloc[0]):
            on_source = "KSM was already on at the first sample"
    ends = [e["t"] for e in record.events if e["kind"] in END_KINDS and e["t"] > t_on]
    merge_end = min(ends) if ends else float(t.iloc[-1])
    steady = [
        e["t"] for e in record.events if e["kind"] == "steady" and t_on <= e["t"] <= merge_end
    ]
    if steady:
        start, source = steady[0], "steady event to the end of the merge window"
    else:
        start = merge_end - PLATEAU_TAIL * (merge_end - t_on)
        source = "no steady event: the last 10% of the merge window"
    return Windows(float(t_on), on_source, float(merge_end), float(start), merge_end, source)


def in_window(t: pd.Series, start: float, end: float) -> pd.Series:
    """Samples in [start, end); the last sample before `end` when none falls inside."""
    mask = (t >= start) & (t < end)
    if not mask.any():
        before = t[t < end]
        if len(before):
            mask = t == before.iloc[-1]
    return mask


def plateau_value(record: Record, series: pd.Series, w: Windows) -> float | None:
    """Median of a per-sample series over the plateau."""
    if w.plateau_start is None or w.plateau_end is None:
        return None
    values = series[in_window(record.samples["t"], w.plateau_start, w.plateau_end)].dropna()
    return float(values.median()) if len(values) else None


def ratio(a: float | None, b: float | None, scale: float = 1.0) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b * scale


def scaled(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor


def plateau_column(record: Record, name: str, w: Windows) -> float | None:
    col = column(record.samples, name)
    return plateau_value(record, col, w) if col is not None else None

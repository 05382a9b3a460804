"""The windows every metric is taken over, and the small helpers they share.

merge window   KSM on .. the first plateau_done/unmerge/stop/teardown after it (or the last
               sample): what a VM run measures after its plateau is kept out of it
plateau        where the savings are taken:
               VM runs and watches: the `steady` event .. the end of the merge window; without
               a steady event, the last 10% of the merge window;
               processes runs: the end of the last fill step, i.e. from that step's
               `scans_done` (ksmd finished the full scans it waits for) to the start of the
               next step, during which the counters hold still.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd

from kvmksm.results.events import ENDS_MERGE, Kind
from kvmksm.results.meta import Event
from kvmksm.results.record import Record

MIB = 1024 * 1024
PLATEAU_TAIL = 0.10  # share of the merge window taken as the plateau without a steady event
# Events that end a processes run's savings window: the next step began, or the run ended.
ENDS_FILL = (Kind.ROUND_FILLED, *ENDS_MERGE)
SAVED_COLUMNS = ("pages_sharing", "ksm_zero_pages")


def page_size(record: Record) -> int:
    return record.meta.host.page_size


def column(df: pd.DataFrame, name: str) -> pd.Series | None:
    """A numeric column, or None when this kernel (or this record) lacks it."""
    if name not in df.columns:
        return None
    return pd.to_numeric(df[name], errors="coerce")


def saved_pages(samples: pd.DataFrame) -> pd.Series:
    """Pages saved each sample: pages_sharing plus ksm_zero_pages (zero pages KSM mapped)."""
    total = pd.Series(0.0, index=samples.index)
    for name in SAVED_COLUMNS:
        col = column(samples, name)
        if col is not None:
            total = total + col.fillna(0)
    return total


def saved_bytes(row: Mapping[str, Any], page_size: int) -> int | None:
    """Memory saved in one sample row, counted as saved_pages counts it."""
    if row.get("pages_sharing") is None:
        return None
    return sum(int(row.get(name) or 0) for name in SAVED_COLUMNS) * page_size


# -- windows --------------------------------------------------------------------------
@dataclass(frozen=True)
class Windows:
    t_on: float | None
    on_source: str
    merge_end: float | None
    plateau_start: float | None
    plateau_end: float | None
    plateau_source: str
    where: str = "at the plateau"  # how labels name the savings window
    # ksmd's running cost is averaged over (cost_start, cost_end]: the plateau for guests (the
    # cost of keeping the savings); KSM on .. the savings for processes, which have no rest.
    cost_start: float | None = None
    cost_end: float | None = None
    cost_what: str = "on the plateau"


NO_SAMPLES = Windows(None, "no samples", None, None, None, "no samples")


def windows(record: Record) -> Windows:
    t = record.samples["t"].astype(float)
    if t.empty:
        return NO_SAMPLES
    t_on, on_source = _ksm_on(record, t)
    ends = [e.t for e in record.events if e.kind in ENDS_MERGE and e.t > t_on]
    merge_end = min(ends) if ends else float(t.iloc[-1])
    if record.meta.workload.type == "processes":
        return _after_last_fill(record, t_on, on_source, float(t.iloc[-1]))
    steady = [e.t for e in record.events if e.kind == Kind.STEADY and t_on <= e.t <= merge_end]
    if steady:
        start, source = steady[0], "steady event to the end of the merge window"
    else:
        start = merge_end - PLATEAU_TAIL * (merge_end - t_on)
        source = "no steady event: the last 10% of the merge window"
    return Windows(
        float(t_on),
        on_source,
        float(merge_end),
        float(start),
        merge_end,
        source,
        cost_start=float(start),
        cost_end=merge_end,
    )


def _ksm_on(record: Record, t: pd.Series) -> tuple[float, str]:
    t_on = record.event_time(Kind.KSM_ON)
    if t_on is not None:
        return t_on, "ksm_on event"
    run = column(record.samples, "run")
    on = t[run == 1] if run is not None else t.iloc[:0]
    if not len(on):
        return float(t.iloc[0]), "first sample (no run column)"
    if float(on.iloc[0]) == float(t.iloc[0]):
        return float(on.iloc[0]), "KSM was already on at the first sample"
    return float(on.iloc[0]), "first sample with run=1"


def _after_last_fill(record: Record, t_on: float, on_source: str, t_last: float) -> Windows:
    where = "at the end of the last fill"
    fills = [e for e in record.events if e.kind == Kind.ROUND_FILLED]
    if not fills:
        return Windows(t_on, on_source, None, None, None, "no fill step in the record", where)
    step = fills[-1].step
    done = next((e for e in record.events if e.kind == Kind.SCANS_DONE and e.step == step), None)
    if done is None:
        why = "the last fill step never finished its scans"
        return Windows(t_on, on_source, None, None, None, why, where)
    later = [_start_of(e) for e in record.events if e.kind in ENDS_FILL and e.t > done.t]
    end = min(later, default=t_last)
    source = f"step {step}'s scans_done to the start of the next step"
    return Windows(
        t_on,
        on_source,
        end,
        done.t,
        end,
        source,
        where,
        cost_start=t_on,
        cost_end=done.t,
        cost_what="while merging",
    )


def _start_of(e: Event) -> float:
    """When an event's action began: a fill or an unmerge is logged once it is done."""
    took = e.seconds if e.kind in (Kind.UNMERGE, Kind.ROUND_FILLED) else None
    return e.t - (took or 0.0)


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


def plateau_column(record: Record, name: str, w: Windows) -> float | None:
    col = column(record.samples, name)
    return plateau_value(record, col, w) if col is not None else None


def ratio(a: float | None, b: float | None, scale: float = 1.0) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b * scale


def scaled(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor

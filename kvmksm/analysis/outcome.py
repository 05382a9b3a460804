"""The figures experiments compare: one value per record for savings, speed and cost, taken
the same way whichever workload made the record.

VM runs take analysis.py's plateau metrics as they are. A processes run has no plateau: it
fills round by round and waits for full scans, so its savings are taken at the end of its last
fill step (once ksmd finished the scans the step waits for), and its speed and cost are
measured from KSM on to that moment. The keys and the metric format are analysis.py's, so
a table can hold records of both workloads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from kvmksm.analysis.metrics import (
    MIB,
    analyse,
    column,
    crossing_time,
    guest_memory,
    ksmd_cpu_mean,
    ksmd_cpu_seconds,
    page_size,
    saved_pages,
    unmerge_seconds,
)
from kvmksm.results.record import Record

# The metrics an experiment compares, and which way is better.
COMPARED: dict[str, str] = {
    "plateau_saved_mib": "higher",
    "plateau_saved_pct": "higher",
    "time_to_50pct_s": "lower",
    "time_to_90pct_s": "lower",
    "ksmd_cpu_to_plateau_s": "lower",
    "ksmd_cpu_plateau_pct": "lower",
    "mib_per_cpu_s": "higher",
    "general_profit_mib": "higher",
    "unmerge_s": "lower",
}
# Events after which a processes run's counters may change (the next step or the end).
_NEXT_STEP = ("round_filled", "unmerge", "stop", "teardown", "interrupted", "error", "run_end")


@dataclass
class Outcome:
    workload: str  # processes | vms | ?
    guests: int | None  # guests or processes
    guest_bytes: int | None  # memory of each one
    t_on: float | None  # KSM on, seconds since the run started
    t_saved: float | None  # when the savings were taken
    metrics: dict[str, dict[str, Any]]  # analysis format: {key: {label, value, unit, ...}}

    def value(self, key: str) -> float | None:
        v = self.metrics.get(key, {}).get("value")
        return float(v) if isinstance(v, int | float) else None


def outcome(record: Record) -> Outcome:
    w = (record.meta.get("scenario") or {}).get("workload") or {}
    kind = str(w.get("type") or "?")
    total, n = guest_memory(record)
    each = total // n if total and n else None
    a = analyse(record)
    metrics = {k: a.metrics[k] for k in COMPARED if k in a.metrics}
    t_on, t_saved = a.windows.t_on, a.windows.plateau_start
    if kind == "processes":
        t_saved, metrics = _processes(record, a.windows.t_on, total, metrics)
    return Outcome(kind, n, each, t_on, t_saved, metrics)


def _processes(
    record: Record, t_on: float | None, total: int | None, metrics: dict[str, dict[str, Any]]
) -> tuple[float | None, dict[str, dict[str, Any]]]:
    s = record.samples
    saved_mib, t_saved, how = savings_at_last_fill(record)
    out = dict(metrics)
    where = f"processes: at the end of the last fill step ({how})"
    out["plateau_saved_mib"] = _metric(
        "Memory saved at the end of the last fill",
        saved_mib,
        "MiB",
        "(pages_sharing + ksm_zero_pages) x page size once ksmd finished the full scans the "
        "last fill step waits for.",
        where,
    )
    out["plateau_saved_pct"] = _metric(
        "Saved, of process memory",
        _ratio(saved_mib, total / MIB if total else None, 100.0),
        "%",
        "Memory saved as a percentage of all the processes' mappings (count x size).",
    )
    on = t_on is not None and t_saved is not None and not s.empty
    for frac in (50, 90):
        when = None
        if on and saved_mib and saved_mib > 0:
            inside = (s["t"] <= t_saved).to_numpy()
            t = s["t"].to_numpy(dtype=float)[inside]
            y = (saved_pages(s) * page_size(record) / MIB).to_numpy()[inside]
            hit = crossing_time(t, y, saved_mib * frac / 100, float(t_on))  # type: ignore[arg-type]
            when = hit - t_on if hit is not None else None  # type: ignore[operator]
        out[f"time_to_{frac}pct_s"] = _metric(
            f"Time to {frac}% of the savings",
            when,
            "s",
            f"Seconds from KSM on until memory saved first reached {frac}% of the savings at "
            "the end of the last fill (linear between samples).",
        )
    cpu = ksmd_cpu_seconds(s, t_on, t_saved) if on else None
    out["ksmd_cpu_to_plateau_s"] = _metric(
        "ksmd CPU to reach the savings",
        cpu,
        "CPU s",
        "ksmd CPU seconds from KSM on to the end of the last fill step.",
    )
    out["ksmd_cpu_plateau_pct"] = _metric(
        "ksmd CPU while merging",
        ksmd_cpu_mean(s, t_on, t_saved) if on else None,
        "% of one CPU",
        "ksmd's average CPU use from KSM on to the end of the last fill step (a processes "
        "run has no steady plateau to measure the cost of keeping the savings).",
    )
    out["mib_per_cpu_s"] = _metric(
        "Saved per ksmd CPU second",
        _ratio(saved_mib, cpu),
        "MiB/CPU s",
        "Memory saved at the end of the last fill / ksmd CPU seconds spent to get there.",
    )
    profit = column(s, "general_profit")
    out["general_profit_mib"] = _metric(
        "general_profit at the end of the last fill",
        _at(s, profit, t_saved) / MIB if profit is not None and t_saved is not None else None,
        "MiB",
        "Kernel's own net saving (savings minus KSM's rmap_item metadata) in the same sample.",
    )
    out["unmerge_s"] = _metric(
        "Unmerge time",
        unmerge_seconds(record),
        "s",
        "Seconds the write of 2 to /sys/kernel/mm/ksm/run took: breaking every merged page.",
    )
    return t_saved, out


def savings_at_last_fill(record: Record) -> tuple[float | None, float | None, str]:
    """MiB saved at the end of the last fill step, the time it is taken at, and how.

    The first sample after that step's scans_done and before the next step (or the end);
    when the sampler took none there, the step's own check of pages_sharing; failing that,
    the last sample before the scans ended."""
    s, events = record.samples, record.events
    fills = [e for e in events if e["kind"] == "round_filled"]
    if not fills or s.empty:
        return None, None, "no fill step in the record"
    step = fills[-1].get("step")
    done = next((e for e in events if e["kind"] == "scans_done" and e.get("step") == step), None)
    if done is None:
        return None, None, "the last fill step never finished its scans"
    t_done = float(done["t"])
    later = [e for e in events if e["kind"] in _NEXT_STEP and e["t"] > t_done]
    end = min((_start_of(e) for e in later), default=float("inf"))
    t = s["t"].astype(float)
    saved = saved_pages(s) * page_size(record) / MIB
    inside = t[(t >= t_done) & (t <= end)]
    if len(inside):
        i = inside.index[0]
        return float(saved[i]), float(t[i]), f"sample at t={float(t[i]):g}s"
    observed = {
        c["name"].rsplit(": ", 1)[-1]: c.get("observed")
        for c in record.checks
        if c.get("step") == step or str(c.get("name", "")).startswith(f"step {step} ")
    }
    if isinstance(observed.get("pages_sharing"), int):
        pages = observed["pages_sharing"] + int(observed.get("ksm_zero_pages") or 0)
        return pages * page_size(record) / MIB, t_done, "the step's check of pages_sharing"
    before = t[t <= t_done]
    if len(before):
        i = before.index[-1]
        return float(saved[i]), float(t[i]), "last sample before the scans ended"
    return None, None, "no sample"


def _start_of(e: dict[str, Any]) -> float:
    """When an event's action began: a fill or an unmerge is logged once it is done."""
    seconds = e.get("seconds") if e["kind"] in ("unmerge", "round_filled") else None
    return float(e["t"]) - (float(seconds) if isinstance(seconds, int | float) else 0.0)


def _at(s: pd.DataFrame, col: pd.Series, t_at: float) -> float:
    t = s["t"].to_numpy(dtype=float)
    i = int(np.argmin(np.abs(t - t_at)))
    return float(col.iloc[i])


def _metric(label: str, value: Any, unit: str, definition: str, note: str = "") -> dict[str, Any]:
    """One metric in analysis.py's format."""
    if isinstance(value, float):
        value = round(value, 4) if math.isfinite(value) else None
    entry = {"label": label, "value": value, "unit": unit, "definition": definition}
    if note:
        entry["note"] = note
    return entry


def _ratio(a: float | None, b: float | None, scale: float = 1.0) -> float | None:
    return None if a is None or b is None or b == 0 else a / b * scale


def aligned_curve(record: Record, out: Outcome | None = None) -> pd.DataFrame:
    """Memory saved (MiB) and ksmd CPU (%) against seconds since KSM went on."""
    s = record.samples
    out = out or outcome(record)
    t_on = out.t_on if out.t_on is not None else 0.0
    frame = pd.DataFrame({"t": s["t"].astype(float) - t_on})
    frame["saved_mib"] = saved_pages(s) * page_size(record) / MIB
    cpu = column(s, "ksmd_cpu")
    frame["ksmd_cpu"] = cpu if cpu is not None else np.nan
    return frame

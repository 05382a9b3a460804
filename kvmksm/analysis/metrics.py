"""Derived metrics: pure functions of a run record.

Every metric is taken over the merge window or the plateau (kvmksm.analysis.windows). Memory
saved is (pages_sharing + ksm_zero_pages) x page size, as the kernel counts it in
general_profit. Each metric carries its unit and a one-line definition, so the report and
run.json explain themselves. Per-guest figures are in kvmksm.analysis.per_guest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from kvmksm.analysis.per_guest import VmAnalysis, vm_analysis
from kvmksm.analysis.windows import (
    MIB,
    Windows,
    column,
    in_window,
    page_size,
    plateau_value,
    ratio,
    saved_pages,
    windows,
)
from kvmksm.results.record import Record


def crossing_time(t: np.ndarray, y: np.ndarray, level: float, start: float) -> float | None:
    """First time at or after `start` that y reaches `level`, linear between samples."""
    idx = np.flatnonzero((t >= start) & (y >= level))
    if not len(idx):
        return None
    i = int(idx[0])
    if i == 0 or y[i - 1] >= level:
        return max(float(t[i]), start)
    t0, t1, y0, y1 = float(t[i - 1]), float(t[i]), float(y[i - 1]), float(y[i])
    return max(t0 + (level - y0) * (t1 - t0) / (y1 - y0), start)


def ksmd_cpu_seconds(
    samples: pd.DataFrame, after: float | None = None, upto: float | None = None
) -> float | None:
    """CPU seconds ksmd used in (after, upto]: each row's percent covers the time since the
    previous row, so a row counts when it falls inside the window."""
    cpu = column(samples, "ksmd_cpu")
    if cpu is None or samples.empty:
        return None
    t = samples["t"].astype(float)
    dt = t.diff().fillna(0.0)
    mask = pd.Series(True, index=samples.index)
    if after is not None:
        mask &= t > after
    if upto is not None:
        mask &= t <= upto
    return float((cpu.fillna(0.0)[mask] / 100.0 * dt[mask]).sum())


def ksmd_cpu_mean(samples: pd.DataFrame, after: float | None, upto: float | None) -> float | None:
    """ksmd's average percent of one CPU over the rows in (after, upto], weighted by time."""
    cpu = column(samples, "ksmd_cpu")
    if cpu is None or after is None or upto is None:
        return None
    t = samples["t"].astype(float)
    dt = t.diff().fillna(0.0)
    mask = (t > after) & (t <= upto) & cpu.notna() & (dt > 0)
    if not mask.any():
        return None
    return float((cpu[mask] * dt[mask]).sum() / dt[mask].sum())


def guest_memory(record: Record) -> tuple[int | None, int | None]:
    """(bytes of guest memory, number of guests or processes) as the run set them up."""
    guests = record.meta.get("guests")
    if guests:
        kb = [g.get("memory_kb") for g in guests]
        if all(isinstance(k, int | float) for k in kb):
            return int(sum(kb) * 1024), len(guests)
    w = (record.meta.get("scenario") or {}).get("workload") or {}
    if w.get("type") == "processes" and w.get("count") and w.get("size"):
        return int(w["count"]) * int(w["size"]), int(w["count"])
    if w.get("type") == "vms" and w.get("clones"):
        memory = w.get("memory") or (w.get("base") or {}).get("memory")
        return (int(memory) * int(w["clones"]) if memory else None), int(w["clones"])
    return None, None


def configured_scan_rate(record: Record, w: Windows) -> tuple[float | None, str]:
    """pages_to_scan / sleep_millisecs as pages per second, and a note on where it came from."""
    values: dict[str, float] = {}
    notes = []
    for knob in ("pages_to_scan", "sleep_millisecs"):
        col = column(record.samples, knob)
        if col is not None and w.t_on is not None and w.merge_end is not None:
            window = col[in_window(record.samples["t"], w.t_on, w.merge_end)].dropna()
            if len(window):
                values[knob] = float(window.median())
                continue
        for source in ("knobs_during", "knobs_before"):
            value = (record.meta.get(source) or {}).get(knob)
            if isinstance(value, int | float):
                values[knob] = float(value)
                notes.append(f"{knob} from {source}")
                break
    if len(values) < 2:
        return None, "pages_to_scan or sleep_millisecs unknown"
    if values["sleep_millisecs"] <= 0:
        return None, "sleep_millisecs is 0: ksmd never sleeps, only CPU bounds the rate"
    if (record.meta.get("knobs_during") or {}).get("advisor_mode") == "scan-time":
        notes.append("advisor_mode=scan-time tunes pages_to_scan: median of the sampled values")
    rate = values["pages_to_scan"] / (values["sleep_millisecs"] / 1000.0)
    return rate, "; ".join(notes)


# -- metrics --------------------------------------------------------------------------
def _metric(label: str, value: Any, unit: str, definition: str, note: str = "") -> dict[str, Any]:
    if isinstance(value, float):
        value = round(value, 4) if math.isfinite(value) else None
    elif isinstance(value, list):
        value = [round(v, 4) if isinstance(v, float) else v for v in value]
    entry = {"label": label, "value": value, "unit": unit, "definition": definition}
    if note:
        entry["note"] = note
    return entry


@dataclass
class Analysis:
    windows: Windows
    metrics: dict[str, dict[str, Any]]
    vm: VmAnalysis | None


def compute_metrics(record: Record) -> dict[str, dict[str, Any]]:
    """Every derived metric of a record: {key: {label, value, unit, definition[, note]}}."""
    return analyse(record).metrics


def _savings(
    record: Record, w: Windows, saved: pd.Series, plateau: float | None
) -> dict[str, dict[str, Any]]:
    mem, n = guest_memory(record)
    mem_mib = mem / MIB if mem else None
    ceiling = mem_mib * (n - 1) / n if mem_mib and n and n > 1 else None
    m: dict[str, dict[str, Any]] = {}

    m["ksm_on_s"] = _metric(
        "KSM on at", w.t_on, "s", "Seconds after the run started that KSM went on.", w.on_source
    )
    m["plateau_window_s"] = _metric(
        "Plateau window",
        [w.plateau_start, w.plateau_end] if w.plateau_start is not None else None,
        "s",
        "Start and end of the plateau, in seconds since the run started.",
        w.plateau_source,
    )
    m["plateau_saved_mib"] = _metric(
        "Memory saved at the plateau",
        plateau,
        "MiB",
        "Median over the plateau of (pages_sharing + ksm_zero_pages) x page size.",
    )
    m["peak_saved_mib"] = _metric(
        "Peak memory saved",
        float(saved.max()) if len(saved) else None,
        "MiB",
        "Largest (pages_sharing + ksm_zero_pages) x page size of any sample.",
    )
    m["guest_memory_mib"] = _metric(
        "Guest memory",
        mem_mib,
        "MiB",
        "Memory of all guests (or processes) of the workload, as configured.",
        f"{n} guests or processes" if n else "",
    )
    m["plateau_saved_pct"] = _metric(
        "Saved, of guest memory",
        ratio(plateau, mem_mib, 100.0),
        "%",
        "Memory saved at the plateau as a percentage of all guest memory.",
    )
    m["ceiling_pct"] = _metric(
        "Ceiling for identical guests",
        ratio(ceiling, mem_mib, 100.0),
        "%",
        "(N-1)/N: what N identical guests save when every page is merged across guests and "
        "one copy stays (pages repeated inside a guest can push past it).",
    )
    m["plateau_saved_pct_of_ceiling"] = _metric(
        "Saved, of the (N-1)/N ceiling",
        ratio(plateau, ceiling, 100.0),
        "%",
        "Memory saved at the plateau as a percentage of (N-1)/N of guest memory.",
    )
    return m


def _speed(
    record: Record, w: Windows, saved: pd.Series, plateau: float | None
) -> dict[str, dict[str, Any]]:
    s, m = record.samples, {}
    for frac in (50, 90):
        when = None
        if plateau and plateau > 0 and w.t_on is not None and w.merge_end is not None:
            inside = (s["t"] <= w.merge_end).to_numpy()
            t_arr = s["t"].to_numpy(dtype=float)[inside]
            hit = crossing_time(t_arr, saved.to_numpy()[inside], plateau * frac / 100, w.t_on)
            when = hit - w.t_on if hit is not None else None
        m[f"time_to_{frac}pct_s"] = _metric(
            f"Time to {frac}% of the plateau",
            when,
            "s",
            f"Seconds from KSM on until memory saved first reached {frac}% of the plateau "
            "(linear between samples).",
        )
    return m


def _cost(record: Record, w: Windows, plateau: float | None) -> dict[str, dict[str, Any]]:
    s, m = record.samples, {}
    total_cpu = ksmd_cpu_seconds(s)
    to_plateau = ksmd_cpu_seconds(s, w.t_on, w.plateau_start) if w.t_on is not None else None
    on_plateau = ksmd_cpu_mean(s, w.plateau_start, w.plateau_end)
    m["ksmd_cpu_s"] = _metric(
        "ksmd CPU, whole run",
        total_cpu,
        "CPU s",
        "Sum over samples of ksmd's CPU percent / 100 x seconds since the previous sample.",
    )
    m["ksmd_cpu_to_plateau_s"] = _metric(
        "ksmd CPU to reach the plateau",
        to_plateau,
        "CPU s",
        "ksmd CPU seconds from KSM on to the start of the plateau.",
    )
    m["ksmd_cpu_plateau_pct"] = _metric(
        "ksmd CPU on the plateau",
        on_plateau,
        "% of one CPU",
        "ksmd's average CPU use while the savings hold steady: the cost of keeping them.",
    )
    m["mib_per_cpu_s"] = _metric(
        "Saved per ksmd CPU second",
        ratio(plateau, to_plateau),
        "MiB/CPU s",
        "Memory saved at the plateau / ksmd CPU seconds spent from KSM on to the plateau.",
    )
    profit = column(s, "general_profit")
    m["general_profit_mib"] = _metric(
        "general_profit at the plateau",
        plateau_value(record, profit / MIB, w) if profit is not None else None,
        "MiB",
        "Kernel's own net saving: (pages_sharing + ksm_zero_pages) x page size minus KSM's "
        "rmap_item metadata; median over the plateau.",
        "" if profit is not None else "this kernel has no general_profit (added in 6.1)",
    )
    m["unmerge_s"] = _metric(
        "Unmerge time",
        unmerge_seconds(record),
        "s",
        "Seconds the write of 2 to /sys/kernel/mm/ksm/run took: breaking every merged page.",
    )
    return m


def _scanning(record: Record, w: Windows) -> dict[str, dict[str, Any]]:
    s, m = record.samples, {}
    rate = effective_scan_rate(record, w)
    configured, conf_note = configured_scan_rate(record, w)
    m["scan_rate"] = _metric(
        "Effective scan rate",
        rate,
        "pages/s",
        "Growth of pages_scanned over the merge window / its length.",
        "" if rate is not None else "this kernel has no pages_scanned (added in 6.7)",
    )
    m["scan_rate_configured"] = _metric(
        "Configured scan rate",
        configured,
        "pages/s",
        "pages_to_scan / (sleep_millisecs / 1000): ksmd's rate if scanning took no time.",
        conf_note,
    )
    m["scan_rate_pct"] = _metric(
        "Effective of configured",
        ratio(rate, configured, 100.0),
        "%",
        "Effective scan rate as a percentage of the configured one.",
    )
    full = column(s, "full_scans")
    m["full_scans"] = _metric(
        "Full scans",
        _delta(s, full, w.t_on, w.merge_end) if full is not None else None,
        "",
        "Passes ksmd completed over all mergeable memory during the merge window.",
    )
    return m


def analyse(record: Record) -> Analysis:
    w = windows(record)
    s = record.samples
    saved = saved_pages(s) * page_size(record) / MIB if not s.empty else pd.Series(dtype=float)
    plateau = plateau_value(record, saved, w)
    m = _savings(record, w, saved, plateau)
    m |= _speed(record, w, saved, plateau)
    m |= _cost(record, w, plateau)
    m |= _scanning(record, w)
    vm = vm_analysis(record, w)
    if vm is not None:
        m["vm_coverage_pct"] = _metric(
            "Merged pages found in guests",
            vm.coverage_pct,
            "%",
            "Sum over guests of ksm_merging_pages / global (pages_shared + pages_sharing), "
            "on the plateau; below 100% means other processes use KSM too.",
        )
    return Analysis(w, m, vm)


def _delta(s: pd.DataFrame, col: pd.Series, start: float | None, end: float | None) -> float | None:
    if start is None or end is None:
        return None
    window = col[in_window(s["t"], start, end)].dropna()
    return float(window.iloc[-1] - window.iloc[0]) if len(window) else None


def effective_scan_rate(record: Record, w: Windows) -> float | None:
    s = record.samples
    scanned = column(s, "pages_scanned")
    if scanned is None or w.t_on is None or w.merge_end is None:
        return None
    mask = in_window(s["t"], w.t_on, w.merge_end) & scanned.notna()
    t, v = s["t"][mask], scanned[mask]
    if len(t) < 2 or t.iloc[-1] == t.iloc[0]:
        return None
    return float((v.iloc[-1] - v.iloc[0]) / (t.iloc[-1] - t.iloc[0]))


def unmerge_seconds(record: Record) -> float | None:
    start = next((e for e in record.events if e["kind"] == "unmerge"), None)
    if start is None:
        return None
    if isinstance(start.get("seconds"), int | float):
        return float(start["seconds"])
    done = [e["t"] for e in record.events if e["kind"] == "unmerge_done" and e["t"] >= start["t"]]
    return float(done[0] - start["t"]) if done else None


# -- per VM ---------------------------------------------------------------------------

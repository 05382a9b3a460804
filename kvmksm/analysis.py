"""Derived metrics: pure functions of a run record.

Everything hangs on three windows found from the record's events:
  merge window   KSM on .. the first unmerge/stop/teardown after it (or the last sample)
  plateau        the `steady` event .. the end of the merge window; without a steady event,
                 the last 10% of the merge window
Memory saved is (pages_sharing + ksm_zero_pages) x page size, as the kernel counts it in
general_profit. Each metric comes with its unit and a one-line definition so the report and
run.json carry their own explanation.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from kvmksm.record import Record

MIB = 1024 * 1024
DEFAULT_PAGE = 4096
PLATEAU_TAIL = 0.10  # share of the merge window taken as the plateau without a steady event
# Events that end the merge window (the first one after KSM went on).
END_KINDS = ("unmerge", "ksm_off", "stop", "teardown", "interrupted", "error", "run_end")


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


def _in_window(t: pd.Series, start: float, end: float) -> pd.Series:
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
    values = series[_in_window(record.samples["t"], w.plateau_start, w.plateau_end)].dropna()
    return float(values.median()) if len(values) else None


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


def ksmd_cpu_seconds(samples: pd.DataFrame, after: float | None = None, upto: float | None = None):
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


def ksmd_cpu_mean(samples: pd.DataFrame, after: float | None, upto: float | None):
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
            window = col[_in_window(record.samples["t"], w.t_on, w.merge_end)].dropna()
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
    entry = {"label": label, "value": value, "unit": unit, "definition": definition}
    if note:
        entry["note"] = note
    return entry


def _ratio(a: float | None, b: float | None, scale: float = 1.0) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b * scale


@dataclass
class Analysis:
    windows: Windows
    metrics: dict[str, dict[str, Any]]
    vm: VmAnalysis | None


def compute_metrics(record: Record) -> dict[str, dict[str, Any]]:
    """Every derived metric of a record: {key: {label, value, unit, definition[, note]}}."""
    return analyse(record).metrics


def analyse(record: Record) -> Analysis:
    s = record.samples
    w = windows(record)
    ps = page_size(record)
    saved = saved_pages(s) * ps / MIB if not s.empty else pd.Series(dtype=float)
    plateau = plateau_value(record, saved, w)
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
        _ratio(plateau, mem_mib, 100.0),
        "%",
        "Memory saved at the plateau as a percentage of all guest memory.",
    )
    m["ceiling_pct"] = _metric(
        "Ceiling for identical guests",
        _ratio(ceiling, mem_mib, 100.0),
        "%",
        "(N-1)/N: what N identical guests save when every page is merged across guests and "
        "one copy stays (pages repeated inside a guest can push past it).",
    )
    m["plateau_saved_pct_of_ceiling"] = _metric(
        "Saved, of the (N-1)/N ceiling",
        _ratio(plateau, ceiling, 100.0),
        "%",
        "Memory saved at the plateau as a percentage of (N-1)/N of guest memory.",
    )
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
        _ratio(plateau, to_plateau),
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
        _ratio(rate, configured, 100.0),
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


def _delta(s: pd.DataFrame, col: pd.Series, start: float | None, end: float | None):
    if start is None or end is None:
        return None
    window = col[_in_window(s["t"], start, end)].dropna()
    return float(window.iloc[-1] - window.iloc[0]) if len(window) else None


def effective_scan_rate(record: Record, w: Windows) -> float | None:
    s = record.samples
    scanned = column(s, "pages_scanned")
    if scanned is None or w.t_on is None or w.merge_end is None:
        return None
    mask = _in_window(s["t"], w.t_on, w.merge_end) & scanned.notna()
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
@dataclass
class VmMatrix:
    """One vm_samples.csv column as a (time x guest) matrix; NaN where a guest has no row."""

    t: np.ndarray
    domains: list[str]
    values: np.ndarray


def vm_matrices(vm: pd.DataFrame, names: tuple[str, ...]) -> dict[str, VmMatrix | None]:
    """Pivot several long-format columns at once (indexing t and domain only once)."""
    d_codes, d_vals = pd.factorize(vm["domain"].to_numpy(), sort=True)  # NaN -> -1
    t = vm["t"].to_numpy(float)
    keep = ~np.isnan(t) & (d_codes >= 0)
    if not keep.all():
        t, d_codes = t[keep], d_codes[keep]
    steps = np.diff(t)
    if np.all(steps >= 0):  # written tick by tick: a new tick wherever t changes, O(n)
        new_tick = np.concatenate([[True], steps != 0]) if len(t) else np.zeros(0, bool)
        t_axis, t_codes = t[new_tick], np.cumsum(new_tick) - 1
    else:
        t_codes, t_axis = pd.factorize(t, sort=True)
    t_axis, domains = np.asarray(t_axis, dtype=float), [str(d) for d in d_vals]
    out: dict[str, VmMatrix | None] = {}
    for name in names:
        if name not in vm.columns:
            out[name] = None
            continue
        values = np.full((len(t_axis), len(domains)), np.nan)
        col = vm[name]
        if not pd.api.types.is_numeric_dtype(col):
            col = pd.to_numeric(col, errors="coerce")
        values[t_codes, d_codes] = (
            col.to_numpy(float)[keep] if not keep.all() else col.to_numpy(float)
        )
        out[name] = VmMatrix(t_axis, domains, values)
    return out


VM_COLUMNS = (
    "ksm_merging_pages",
    "ksm_zero_pages",
    "ksm_process_profit",
    "ksm_rmap_items",
    "rss_kb",
    "pid",
)


@dataclass
class VmAnalysis:
    rows: list[dict[str, Any]]  # one per guest, values on the plateau
    reconciliation: list[dict[str, Any]]  # sum over guests against the global counter
    coverage_pct: float | None
    merging: VmMatrix | None  # for the stacked chart


def _plateau_rows(t: np.ndarray, w: Windows) -> np.ndarray:
    if w.plateau_start is None or w.plateau_end is None:
        return np.zeros(len(t), dtype=bool)
    mask = (t >= w.plateau_start) & (t < w.plateau_end)
    if not mask.any() and (t < w.plateau_end).any():
        mask = t == t[t < w.plateau_end].max()
    return mask


def _nanmedian(a: np.ndarray, axis: int = 0) -> np.ndarray:
    if a.shape[axis] == 0 or np.isnan(a).all():
        return np.full(a.shape[1 - axis] if a.ndim == 2 else 1, np.nan)
    nans = np.isnan(a)
    if not nans.any():
        return np.median(a, axis=axis)  # vectorised; nanmedian goes column by column
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a guest with no sample: NaN
        return np.nanmedian(a, axis=axis)


def vm_analysis(record: Record, w: Windows | None = None) -> VmAnalysis | None:
    """Per-guest values on the plateau and how their sum reconciles with the global counters."""
    vm = record.vm_samples
    if vm is None or vm.empty or "domain" not in vm.columns:
        return None
    w = w or windows(record)
    ps = page_size(record)
    mats = vm_matrices(vm, VM_COLUMNS)
    any_mat = next((x for x in mats.values() if x is not None), None)
    if any_mat is None:
        return None
    domains, rows_mask = any_mat.domains, _plateau_rows(any_mat.t, w)
    med = {k: (_nanmedian(x.values[rows_mask]) if x is not None else None) for k, x in mats.items()}
    last_pid = mats["pid"].values if mats["pid"] is not None else None

    s = record.samples
    g_shared, g_sharing = column(s, "pages_shared"), column(s, "pages_sharing")
    g_merged = plateau_value(record, g_shared + g_sharing, w) if g_shared is not None else None
    g_sharing_p = plateau_value(record, g_sharing, w) if g_sharing is not None else None
    share = _ratio(g_sharing_p, g_merged)  # fraction of merged mappings that are savings
    memory = {g["name"]: g.get("memory_kb") for g in record.meta.get("guests") or []}

    def val(key: str, i: int) -> float | None:
        arr = med[key]
        return None if arr is None or np.isnan(arr[i]) else float(arr[i])

    rows = []
    for i, dom in enumerate(domains):
        merging, zero = val("ksm_merging_pages", i), val("ksm_zero_pages", i)
        mem_kb = memory.get(dom)
        pid = None
        if last_pid is not None:
            pids = last_pid[:, i][~np.isnan(last_pid[:, i])]
            pid = int(pids[-1]) if len(pids) else None
        attributed = None
        if merging is not None and share is not None:
            attributed = (merging * share + (zero or 0)) * ps / MIB
        rows.append(
            {
                "domain": dom,
                "pid": pid,
                "memory_mib": mem_kb / 1024 if mem_kb else None,
                "rss_mib": _scaled(val("rss_kb", i), 1 / 1024),
                "merging_pages": merging,
                "merged_mib": _scaled(merging, ps / MIB),
                "merged_pct": _ratio(_scaled(merging, ps / 1024), mem_kb, 100.0),
                "zero_pages": zero,
                "saved_mib": attributed,
                "profit_mib": _scaled(val("ksm_process_profit", i), 1 / MIB),
                "rmap_items": val("ksm_rmap_items", i),
            }
        )

    recon = []
    profit = _plateau_col(record, "general_profit", w)
    pairs = (  # guests' column, global counter, its plateau value, unit shown
        ("ksm_merging_pages", "pages_shared + pages_sharing", g_merged, "pages"),
        ("ksm_zero_pages", "ksm_zero_pages", _plateau_col(record, "ksm_zero_pages", w), "pages"),
        ("ksm_process_profit", "general_profit", _scaled(profit, 1 / MIB), "MiB"),
    )
    g_shared_p = plateau_value(record, g_shared, w) if g_shared is not None else None
    for name, global_name, global_value, unit in pairs:
        mat = mats[name]
        if mat is None or global_value is None:
            continue
        total = mat.values[rows_mask]
        summed = float(np.median(np.nansum(total, axis=1))) if len(total) else None
        label = f"sum of {name}"
        if name == "ksm_process_profit":
            # A process's profit counts all its merged pages, the copy KSM keeps included;
            # general_profit counts only pages_sharing, so take the kept copies off.
            if g_shared_p is None or summed is None:
                continue
            summed = (summed - g_shared_p * ps) / MIB
            label += " - pages_shared x page size"
        recon.append(
            {
                "guests": label,
                "global": global_name,
                "unit": unit,
                "sum": summed,
                "global_value": global_value,
                "difference": None if summed is None else summed - global_value,
                "pct": _ratio(summed, global_value, 100.0),
            }
        )
    coverage = recon[0]["pct"] if recon and recon[0]["guests"].endswith("merging_pages") else None
    return VmAnalysis(rows, recon, coverage, mats["ksm_merging_pages"])


def _plateau_col(record: Record, name: str, w: Windows) -> float | None:
    col = column(record.samples, name)
    return plateau_value(record, col, w) if col is not None else None


def _scaled(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor

"""Derived metrics: pure functions of a run record, each defined once.

Every metric is taken over a window of kvmksm.analysis.windows (merge window, plateau, cost
window); the windows depend on the workload (a VM run's steady plateau, a processes run's end
of the last fill), the definitions do not. Memory saved is (pages_sharing + ksm_zero_pages) x
page size, as the kernel counts it in general_profit. Each metric carries its unit and a
one-line definition, so the report and run.json explain themselves; compare and plan take the
figures listed in COMPARED. Per-guest figures are in kvmksm.analysis.per_guest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from kvmksm.analysis.per_guest import VmAnalysis, vm_analysis
from kvmksm.analysis.scan_cost import scan_cost
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
from kvmksm.host.ksm import KNOWN_COUNTERS
from kvmksm.results.events import Kind
from kvmksm.results.record import Record

# The metrics experiments compare, and which way is better.
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
    "ksmd_cpu_per_full_scan_ms": "lower",
    "full_scan_s": "lower",
}


def metric(label: str, value: Any, unit: str, definition: str, note: str = "") -> dict[str, Any]:
    """One metric as run.json keeps it: {label, value, unit, definition[, note]}."""
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
    workload: str  # processes, vms, watch
    guests: int | None  # guests or processes
    guest_bytes: int | None  # memory of each

    def value(self, key: str) -> float | None:
        v = self.metrics.get(key, {}).get("value")
        return float(v) if isinstance(v, int | float) else None


def compute_metrics(record: Record) -> dict[str, dict[str, Any]]:
    """Every derived metric of a record: {key: {label, value, unit, definition[, note]}}."""
    return analyse(record).metrics


def analyse(record: Record) -> Analysis:
    w = windows(record)
    s = record.samples
    saved = saved_pages(s) * page_size(record) / MIB if not s.empty else pd.Series(dtype=float)
    plateau, how = saved_at_plateau(record, saved, w)
    m = _savings(record, w, saved, plateau, how)
    m |= _speed(record, w, saved, plateau)
    m |= _cost(record, w, plateau)
    m |= _scanning(record, w)
    m |= _scan_cost(record)
    vm = vm_analysis(record, w)
    if vm is not None:
        m["vm_coverage_pct"] = metric(
            "Merged pages found in guests",
            vm.coverage_pct,
            "%",
            "Sum over guests of ksm_merging_pages / global (pages_shared + pages_sharing), "
            "on the plateau; below 100% means other processes use KSM too.",
        )
    total, n = guest_memory(record)
    each = total // n if total and n else None
    return Analysis(w, m, vm, record.meta.workload.type, n, each)


# -- the pieces every metric is built from ---------------------------------------------
def saved_at_plateau(record: Record, saved: pd.Series, w: Windows) -> tuple[float | None, str]:
    """MiB saved over the plateau (median), and where the figure came from.

    A short processes run may have no sample between a step's scans and the next step (an
    older record at 1 Hz): the step's own exact check of pages_sharing says it then."""
    if w.plateau_start is None or w.plateau_end is None or saved.empty:
        return None, w.plateau_source
    t = record.samples["t"].astype(float)
    inside = (t >= w.plateau_start) & (t < w.plateau_end)
    if inside.any() or record.meta.workload.type != "processes":
        return plateau_value(record, saved, w), w.plateau_source
    fills = [e for e in record.events if e.kind == Kind.ROUND_FILLED]
    step = fills[-1].step if fills else None
    observed = {
        c.name.rsplit(": ", 1)[-1]: c.observed
        for c in record.checks
        if c.step == step or c.name.startswith(f"step {step} ")
    }
    if isinstance(observed.get("pages_sharing"), int):
        pages = observed["pages_sharing"] + int(observed.get("ksm_zero_pages") or 0)
        return pages * page_size(record) / MIB, "the step's exact check of pages_sharing"
    return plateau_value(record, saved, w), "the last sample before the step ended"


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
    meta, w = record.meta, record.meta.workload
    if meta.guests:
        kb = [g.memory_kb for g in meta.guests]
        if all(isinstance(k, int | float) for k in kb):
            return int(sum(kb) * 1024), len(meta.guests)  # type: ignore[arg-type]
    if w.type == "processes" and w.count and w.size:
        return w.count * w.size, w.count
    if w.type == "vms" and w.clones:
        memory = w.memory or (w.base.memory if w.base else None)
        return (memory * w.clones if memory else None), w.clones
    return None, None


def configured_scan_rate(record: Record, w: Windows) -> tuple[float | None, str]:
    """pages_to_scan / sleep_millisecs as pages per second, and a note on where it came from."""
    values: dict[str, float] = {}
    notes = []
    meta = record.meta
    for knob in ("pages_to_scan", "sleep_millisecs"):
        col = column(record.samples, knob)
        if col is not None and w.t_on is not None and w.merge_end is not None:
            window = col[in_window(record.samples["t"], w.t_on, w.merge_end)].dropna()
            if len(window):
                values[knob] = float(window.median())
                continue
        for source, knobs in (
            ("knobs_during", meta.knobs_during),
            ("knobs_before", meta.knobs_before),
        ):
            value = knobs.get(knob)
            if isinstance(value, int | float):
                values[knob] = float(value)
                notes.append(f"{knob} from {source}")
                break
    if len(values) < 2:
        return None, "pages_to_scan or sleep_millisecs unknown"
    if values["sleep_millisecs"] <= 0:
        return None, "sleep_millisecs is 0: ksmd never sleeps, only CPU bounds the rate"
    if meta.knobs_during.get("advisor_mode") == "scan-time":
        notes.append("advisor_mode=scan-time tunes pages_to_scan: median of the sampled values")
    rate = values["pages_to_scan"] / (values["sleep_millisecs"] / 1000.0)
    return rate, "; ".join(notes)


def unmerge_seconds(record: Record) -> float | None:
    start = next((e for e in record.events if e.kind == Kind.UNMERGE), None)
    if start is None:
        return None
    if start.seconds is not None:
        return float(start.seconds)
    done = [e.t for e in record.events if e.kind == Kind.UNMERGE_DONE and e.t >= start.t]
    return float(done[0] - start.t) if done else None


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


def missing_column(record: Record, name: str) -> str:
    """Why a counter is not in a record, said truthfully: the record's kernel predates it, or
    it simply was not sampled."""
    added = KNOWN_COUNTERS.get(name)
    release = record.meta.host.kernel_release or "?"
    if added and _version(release) < _version(added):
        return f"this kernel ({release}) has no {name}: it appeared in Linux {added}"
    return f"no {name} column in this record (Linux has it from {added or '?'} on)"


def _version(text: str) -> tuple[int, ...]:
    """'6.1.0-test' -> (6, 1, 0): enough to order kernel releases."""
    parts = []
    for piece in text.split("-")[0].split("."):
        if not piece.isdigit():
            break
        parts.append(int(piece))
    return tuple(parts)


def _delta(s: pd.DataFrame, col: pd.Series, start: float | None, end: float | None) -> float | None:
    if start is None or end is None:
        return None
    window = col[in_window(s["t"], start, end)].dropna()
    return float(window.iloc[-1] - window.iloc[0]) if len(window) else None


# -- the metrics, by what they say -----------------------------------------------------
def _savings(
    record: Record, w: Windows, saved: pd.Series, plateau: float | None, how: str
) -> dict[str, dict[str, Any]]:
    mem, n = guest_memory(record)
    mem_mib = mem / MIB if mem else None
    kind = record.meta.workload.type
    # N clones of one base: every page merged across guests and one copy kept. Processes
    # repeat their content inside each mapping, and a watched host's guests are not clones.
    clones = kind == "vms" and mem_mib and n and n > 1
    ceiling = mem_mib * (n - 1) / n if clones else None  # type: ignore[operator]
    no_ceiling = "" if clones else f"not defined for a {kind} run: only for clones of one base"
    noun = "process memory" if kind == "processes" else "guest memory"
    m: dict[str, dict[str, Any]] = {}
    m["ksm_on_s"] = metric(
        "KSM on at", w.t_on, "s", "Seconds after the run started that KSM went on.", w.on_source
    )
    m["plateau_window_s"] = metric(
        "Plateau window",
        [w.plateau_start, w.plateau_end] if w.plateau_start is not None else None,
        "s",
        "Start and end of the window the savings are taken over, in seconds since the run started.",
        w.plateau_source,
    )
    m["plateau_saved_mib"] = metric(
        f"Memory saved {w.where}",
        plateau,
        "MiB",
        f"Median {w.where} of (pages_sharing + ksm_zero_pages) x page size.",
        "" if how == w.plateau_source else f"from {how}",
    )
    m["peak_saved_mib"] = metric(
        "Peak memory saved",
        float(saved.max()) if len(saved) else None,
        "MiB",
        "Largest (pages_sharing + ksm_zero_pages) x page size of any sample.",
    )
    m["guest_memory_mib"] = metric(
        "Guest memory" if kind != "processes" else "Process memory",
        mem_mib,
        "MiB",
        "Memory of all guests (or processes) of the workload, as configured.",
        f"{n} {'processes' if kind == 'processes' else 'guests'}" if n else "",
    )
    m["plateau_saved_pct"] = metric(
        f"Saved, of {noun}",
        ratio(plateau, mem_mib, 100.0),
        "%",
        f"Memory saved {w.where} as a percentage of all {noun}.",
    )
    m["ceiling_pct"] = metric(
        "Ceiling for identical guests",
        ratio(ceiling, mem_mib, 100.0),
        "%",
        "(N-1)/N: what N identical guests save when every page is merged across guests and "
        "one copy stays (pages repeated inside a guest can push past it).",
        no_ceiling,
    )
    m["plateau_saved_pct_of_ceiling"] = metric(
        "Saved, of the (N-1)/N ceiling",
        ratio(plateau, ceiling, 100.0),
        "%",
        f"Memory saved {w.where} as a percentage of (N-1)/N of guest memory.",
        no_ceiling,
    )
    return m


def _speed(
    record: Record, w: Windows, saved: pd.Series, plateau: float | None
) -> dict[str, dict[str, Any]]:
    """Time to 50% and 90% of the savings, from the samples between KSM on and the start of
    the plateau, ended by the plateau's own figure: a curve that reaches its plateau within
    one sample still has a crossing (between that sample and the one before)."""
    s, m = record.samples, {}
    usable = plateau is not None and plateau > 0 and w.t_on is not None
    if usable and w.plateau_start is not None:
        t_all = s["t"].to_numpy(dtype=float)
        keep = t_all < w.plateau_start
        t = np.append(t_all[keep], w.plateau_start)
        y = np.append(saved.to_numpy(dtype=float)[keep], plateau)
    for frac in (50, 90):
        when, note = None, ""
        if usable and w.plateau_start is not None:
            hit = crossing_time(t, y, plateau * frac / 100, w.t_on)  # type: ignore[operator]
            when = hit - w.t_on if hit is not None else None  # type: ignore[operator]
        elif plateau is not None and plateau <= 0:
            note = "nothing was saved"
        else:
            note = f"no savings window: {w.plateau_source}"
        m[f"time_to_{frac}pct_s"] = metric(
            f"Time to {frac}% of the savings",
            when,
            "s",
            f"Seconds from KSM on until memory saved first reached {frac}% of the savings "
            f"{w.where} (linear between samples).",
            note,
        )
    return m


def _cost(record: Record, w: Windows, plateau: float | None) -> dict[str, dict[str, Any]]:
    s, m = record.samples, {}
    to_plateau = ksmd_cpu_seconds(s, w.t_on, w.plateau_start) if w.t_on is not None else None
    source = record.meta.sampler.get("ksmd_cpu_source")
    m["ksmd_cpu_s"] = metric(
        "ksmd CPU, whole run",
        ksmd_cpu_seconds(s),
        "CPU s",
        "Sum over samples of ksmd's CPU percent / 100 x seconds since the previous sample.",
        {
            "schedstat": "from /proc/<ksmd>/schedstat (nanoseconds)",
            "stat": "from /proc/<ksmd>/stat: clock ticks, coarse on short samples",
        }.get(source or "", ""),
    )
    m["ksmd_cpu_to_plateau_s"] = metric(
        "ksmd CPU to reach the savings",
        to_plateau,
        "CPU s",
        f"ksmd CPU seconds from KSM on to the savings {w.where}.",
    )
    m["ksmd_cpu_plateau_pct"] = metric(
        f"ksmd CPU {w.cost_what}",
        ksmd_cpu_mean(s, w.cost_start, w.cost_end),
        "% of one CPU",
        f"ksmd's average CPU use {w.cost_what}, weighted by time.",
    )
    m["mib_per_cpu_s"] = metric(
        "Saved per ksmd CPU second",
        ratio(plateau, to_plateau),
        "MiB/CPU s",
        f"Memory saved {w.where} / ksmd CPU seconds spent from KSM on to get there (a ratio "
        "within one run; compare averages it over repeats).",
    )
    profit = column(s, "general_profit")
    m["general_profit_mib"] = metric(
        f"general_profit {w.where}",
        plateau_value(record, profit / MIB, w) if profit is not None else None,
        "MiB",
        "Kernel's own net saving: (pages_sharing + ksm_zero_pages) x page size minus KSM's "
        f"rmap_item metadata; median {w.where}.",
        "" if profit is not None else missing_column(record, "general_profit"),
    )
    unmerge = unmerge_seconds(record)
    m["unmerge_s"] = metric(
        "Unmerge time",
        unmerge,
        "s",
        "Seconds the write of 2 to /sys/kernel/mm/ksm/run took: breaking every merged page.",
        "" if unmerge is not None else "the run did not unmerge (run=2)",
    )
    return m


def _scan_cost(record: Record) -> dict[str, dict[str, Any]]:
    cost = scan_cost(record, ksmd_cpu_seconds)
    per_scan, note = cost["ksmd_cpu_per_full_scan_ms"]
    wall, _ = cost["full_scan_s"]
    return {
        "ksmd_cpu_per_full_scan_ms": metric(
            "ksmd CPU per full scan",
            per_scan,
            "ms",
            "ksmd CPU time from KSM on to the last round's full scans / the full scans done; "
            "grows with the mergeable areas walked, mapped or not.",
            note,
        ),
        "full_scan_s": metric(
            "Time per full scan",
            wall,
            "s",
            "Wall time from KSM on to the last round's full scans / the full scans done.",
            note,
        ),
    }


def _scanning(record: Record, w: Windows) -> dict[str, dict[str, Any]]:
    s, m = record.samples, {}
    rate = effective_scan_rate(record, w)
    configured, conf_note = configured_scan_rate(record, w)
    if rate is not None:
        why = ""
    elif column(s, "pages_scanned") is None:
        why = missing_column(record, "pages_scanned")
    else:
        why = "fewer than two samples in the merge window"
    m["scan_rate"] = metric(
        "Effective scan rate",
        rate,
        "pages/s",
        "Growth of pages_scanned over the merge window / its length.",
        why,
    )
    m["scan_rate_configured"] = metric(
        "Configured scan rate",
        configured,
        "pages/s",
        "pages_to_scan / (sleep_millisecs / 1000): ksmd's rate if scanning took no time.",
        conf_note,
    )
    m["scan_rate_pct"] = metric(
        "Effective of configured",
        ratio(rate, configured, 100.0),
        "%",
        "Effective scan rate as a percentage of the configured one.",
        "" if rate is not None and configured else "needs both scan rates (see their notes)",
    )
    full = column(s, "full_scans")
    m["full_scans"] = metric(
        "Full scans",
        _delta(s, full, w.t_on, w.merge_end) if full is not None else None,
        "",
        "Passes ksmd completed over all mergeable memory during the merge window.",
    )
    return m


def aligned_curve(record: Record, a: Analysis | None = None) -> pd.DataFrame:
    """Memory saved (MiB) and ksmd CPU (%) against seconds since KSM went on."""
    s = record.samples
    a = a or analyse(record)
    t_on = a.windows.t_on if a.windows.t_on is not None else 0.0
    frame = pd.DataFrame({"t": s["t"].astype(float) - t_on})
    frame["saved_mib"] = saved_pages(s) * page_size(record) / MIB
    cpu = column(s, "ksmd_cpu")
    frame["ksmd_cpu"] = cpu if cpu is not None else np.nan
    return frame

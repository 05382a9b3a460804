"""Per-guest KSM figures from vm_samples.csv, and how they add up to the global counters.

vm_samples.csv is long (one row per guest per tick); it is pivoted to one (time x guest)
matrix per column. A day of 100 guests is 8.6 million rows, so the pivot avoids copies: when
the sampler wrote every guest each tick in the same order, a column reshaped is the matrix.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from kvmksm.analysis.windows import (
    MIB,
    Windows,
    column,
    page_size,
    plateau_column,
    plateau_value,
    ratio,
    scaled,
    windows,
)
from kvmksm.results.record import Record

VM_COLUMNS = (
    "ksm_merging_pages",
    "ksm_zero_pages",
    "ksm_process_profit",
    "ksm_rmap_items",
    "rss_kb",
    "pid",
)


def natural_key(name: str) -> list[Any]:
    """clone2 before clone10, as a person sorts guest names."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


@dataclass
class VmMatrix:
    """One vm_samples.csv column as a (time x guest) matrix; NaN where a guest has no row."""

    t: np.ndarray
    domains: list[str]
    values: np.ndarray  # float with NaN for missing rows, or int when none can be missing


def vm_matrices(vm: pd.DataFrame, names: tuple[str, ...]) -> dict[str, VmMatrix | None]:
    """Pivot several long-format columns at once (indexing t and domain only once)."""
    domain = vm["domain"]
    if isinstance(domain.dtype, pd.CategoricalDtype):  # read as category: codes exist already
        d_codes = domain.cat.codes.to_numpy()
        d_vals = [str(d) for d in domain.cat.categories]
    else:  # a plain object array hashes faster than pandas' string dtype
        codes, uniques = pd.factorize(domain.to_numpy())  # NaN -> -1
        d_codes, d_vals = codes, [str(d) for d in uniques]
    t = vm["t"].to_numpy(float)
    keep = ~np.isnan(t) & (d_codes >= 0)
    complete = bool(keep.all())
    grid = _grid(t, d_codes, len(d_vals)) if complete else None
    if grid is not None:
        t_axis, position = grid
    else:
        t, d_codes = t[keep], d_codes[keep]
        t_codes, uniq_t = pd.factorize(t, sort=True)
        t_axis = np.asarray(uniq_t, dtype=float)
    shape = (len(t_axis), len(d_vals))
    order = np.array(sorted(range(shape[1]), key=lambda i: natural_key(d_vals[i])), dtype=int)
    domains = [d_vals[i] for i in order]
    out: dict[str, VmMatrix | None] = {}
    for name in names:
        if name not in vm.columns:
            out[name] = None
            continue
        col = vm[name]
        if isinstance(col.dtype, np.dtype) and col.dtype.kind in "iu":
            data = col.to_numpy()  # no NaN possible: pandas' own array, neither copied nor cast
        else:
            data = pd.to_numeric(col, errors="coerce").to_numpy(float)
        if grid is not None:
            cols = position[order]
            values = data.reshape(shape)
            if not np.array_equal(cols, np.arange(shape[1])):
                values = values[:, cols]
        else:
            values = np.full(shape, np.nan)
            values[t_codes, d_codes] = data[keep]
            values = values[:, order]
        out[name] = VmMatrix(t_axis, domains, values)
    return out


def _grid(t: np.ndarray, d_codes: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(time axis, each guest code's place within a tick) when every tick holds every guest
    once, in one order, at one time; None otherwise."""
    if n == 0 or len(t) % n:
        return None
    ticks = len(t) // n
    codes = d_codes.reshape(ticks, n)
    first = codes[0]
    if len(np.unique(first)) != n or not (codes == first).all():
        return None
    times = t.reshape(ticks, n)
    if not (times == times[:, :1]).all() or not (np.diff(times[:, 0]) > 0).all():
        return None
    position = np.empty(n, dtype=int)
    position[first] = np.arange(n)
    return times[:, 0].copy(), position


@dataclass
class VmAnalysis:
    rows: list[dict[str, Any]]  # one per guest, values on the plateau
    reconciliation: list[dict[str, Any]]  # sum over guests against the global counter
    coverage_pct: float | None
    merging: VmMatrix | None  # for the stacked chart


def plateau_rows(t: np.ndarray, w: Windows) -> slice:
    """Rows of a sorted time axis on the plateau [start, end), or the last one before end."""
    if w.plateau_start is None or w.plateau_end is None:
        return slice(0, 0)
    i0, i1 = np.searchsorted(t, [w.plateau_start, w.plateau_end], side="left")
    if i0 >= i1:
        i0 = max(int(i1) - 1, 0)
    return slice(int(i0), int(i1))


def column_medians(block: np.ndarray) -> np.ndarray:
    """Median of each column, ignoring NaN (a guest without a sample at some tick)."""
    if block.shape[0] == 0:
        return np.full(block.shape[1], np.nan)
    if not np.isnan(block).any():
        return np.median(block, axis=0)  # vectorised; nanmedian goes column by column
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a guest with no sample: NaN
        return np.nanmedian(block, axis=0)


def row_sums(block: np.ndarray) -> np.ndarray:
    """Sum of each row over guests; np.nansum copies, so only when there are NaNs."""
    return np.nansum(block, axis=1) if np.isnan(block).any() else block.sum(axis=1)


def last_values(block: np.ndarray) -> np.ndarray:
    """Each column's last non-NaN value (NaN when it has none)."""
    valid = ~np.isnan(block)
    last = block.shape[0] - 1 - np.argmax(valid[::-1], axis=0)
    values = block[last, np.arange(block.shape[1])]
    return np.where(valid.any(axis=0), values, np.nan)


def vm_analysis(record: Record, w: Windows | None = None) -> VmAnalysis | None:
    """Per-guest values on the plateau and how their sum reconciles with the global counters."""
    vm = record.vm_samples
    if vm is None or vm.empty or "domain" not in vm.columns or "t" not in vm.columns:
        return None
    w = w or windows(record)
    mats = vm_matrices(vm, VM_COLUMNS)
    some = next((m for m in mats.values() if m is not None), None)
    if some is None:
        return None
    rows = plateau_rows(some.t, w)
    medians = {k: column_medians(m.values[rows]) for k, m in mats.items() if m is not None}
    pids = last_values(mats["pid"].values) if mats["pid"] is not None else None
    guests = _guest_rows(record, w, some.domains, medians, pids)
    recon = _reconcile(record, w, mats, rows)
    coverage = recon[0]["pct"] if recon and recon[0]["global"].startswith("pages_") else None
    return VmAnalysis(guests, recon, coverage, mats["ksm_merging_pages"])


def _global_plateau(record: Record, w: Windows) -> dict[str, float | None]:
    """pages_shared, pages_sharing and their sum on the plateau (None when missing)."""
    shared = column(record.samples, "pages_shared")
    sharing = column(record.samples, "pages_sharing")
    both = shared + sharing if shared is not None and sharing is not None else None
    return {
        "shared": plateau_value(record, shared, w) if shared is not None else None,
        "sharing": plateau_value(record, sharing, w) if sharing is not None else None,
        "merged": plateau_value(record, both, w) if both is not None else None,
    }


def _guest_rows(
    record: Record,
    w: Windows,
    domains: list[str],
    medians: dict[str, np.ndarray],
    pids: np.ndarray | None,
) -> list[dict[str, Any]]:
    ps = page_size(record)
    g = _global_plateau(record, w)
    saving_share = ratio(g["sharing"], g["merged"])  # merged mappings that are savings
    memory = {g.name: g.memory_kb for g in record.meta.guests}

    def value(key: str, i: int) -> float | None:
        arr = medians.get(key)
        return None if arr is None or np.isnan(arr[i]) else float(arr[i])

    out = []
    for i, dom in enumerate(domains):
        merging, zero = value("ksm_merging_pages", i), value("ksm_zero_pages", i)
        mem_kb = memory.get(dom)
        saved = None
        if merging is not None and saving_share is not None:
            # The guest's share of the global saving: its merged pages times the fraction of
            # all merged mappings that are pages_sharing, plus its zero pages.
            saved = (merging * saving_share + (zero or 0)) * ps / MIB
        pid = pids[i] if pids is not None else np.nan
        out.append(
            {
                "domain": dom,
                "pid": None if np.isnan(pid) else int(pid),
                "memory_mib": mem_kb / 1024 if mem_kb else None,
                "rss_mib": scaled(value("rss_kb", i), 1 / 1024),
                "merging_pages": merging,
                "merged_mib": scaled(merging, ps / MIB),
                "merged_pct": ratio(scaled(merging, ps / 1024), mem_kb, 100.0),
                "zero_pages": zero,
                "saved_mib": saved,
                "profit_mib": scaled(value("ksm_process_profit", i), 1 / MIB),
                "rmap_items": value("ksm_rmap_items", i),
            }
        )
    return out


def _reconcile(
    record: Record, w: Windows, mats: dict[str, VmMatrix | None], rows: slice
) -> list[dict[str, Any]]:
    """Median over the plateau of each tick's sum over guests, against the global counter."""
    ps = page_size(record)
    g = _global_plateau(record, w)
    merged, kept = g["merged"], g["shared"]
    profit = plateau_column(record, "general_profit", w)
    pairs = (  # guests' column, global counter, its plateau value, unit shown
        ("ksm_merging_pages", "pages_shared + pages_sharing", merged, "pages"),
        ("ksm_zero_pages", "ksm_zero_pages", plateau_column(record, "ksm_zero_pages", w), "pages"),
        ("ksm_process_profit", "general_profit", scaled(profit, 1 / MIB), "MiB"),
    )
    out = []
    for name, global_name, global_value, unit in pairs:
        mat = mats[name]
        if mat is None or global_value is None:
            continue
        block = mat.values[rows]
        summed = float(np.median(row_sums(block))) if len(block) else None
        label = f"sum of {name}"
        if name == "ksm_process_profit":
            # A process's profit counts all its merged pages, the copy KSM keeps included;
            # general_profit counts only pages_sharing, so take the kept copies off.
            if kept is None or summed is None:
                continue
            summed = (summed - kept * ps) / MIB
            label += " - pages_shared x page size"
        out.append(
            {
                "guests": label,
                "global": global_name,
                "unit": unit,
                "sum": summed,
                "global_value": global_value,
                "difference": None if summed is None else summed - global_value,
                "pct": ratio(summed, global_value, 100.0),
            }
        )
    return out

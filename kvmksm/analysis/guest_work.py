"""Figures of the work done inside the guests of a VM run (``guest_run``, ``churn``, ``probe``):
a pure function of the record, for the report and for benchmarks.

- churn: the host's copy-on-write breaks of KSM pages (``cow_ksm`` in /proc/vmstat), over the
  merge window and per second on the plateau, ``pages_volatile`` on the plateau, and the rate
  the guests' churn achieved;
- probe: the guests' write latency percentiles with KSM off and on, and their ratio;
- guest_run: each command's status per guest.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from kvmksm.analysis.windows import Windows, column, plateau_column, windows
from kvmksm.results.record import Record

LATENCY_KEYS = ("p50_us", "p90_us", "p99_us", "p999_us", "max_us", "mean_us")


def value_at(samples: pd.DataFrame, name: str, t: float | None) -> float | None:
    """The last sample of ``name`` at or before ``t`` (the first one if none is)."""
    col = column(samples, name)
    if col is None or t is None or samples.empty:
        return None
    times = samples["t"].astype(float)
    before = col[(times <= t) & col.notna()]
    if len(before):
        return float(before.iloc[-1])
    after = col.dropna()
    return float(after.iloc[0]) if len(after) else None


def cow_figures(record: Record, w: Windows | None = None) -> dict[str, Any]:
    """Copy-on-write breaks of KSM pages on the host while KSM was on, and on the plateau."""
    w = w or windows(record)
    s = record.samples
    out: dict[str, Any] = {"available": column(s, "cow_ksm") is not None}
    if not out["available"]:
        return out
    on, end = w.t_on, w.merge_end
    a, b = value_at(s, "cow_ksm", on), value_at(s, "cow_ksm", end)
    out["cow_ksm_merge"] = b - a if a is not None and b is not None else None
    ps, pe = w.plateau_start, w.plateau_end
    pa, pb = value_at(s, "cow_ksm", ps), value_at(s, "cow_ksm", pe)
    span = (pe - ps) if ps is not None and pe is not None else None
    out["cow_ksm_plateau"] = pb - pa if pa is not None and pb is not None else None
    out["cow_ksm_per_s_plateau"] = (
        out["cow_ksm_plateau"] / span if span and out["cow_ksm_plateau"] is not None else None
    )
    out["pages_volatile_plateau"] = plateau_column(record, "pages_volatile", w)
    return out


def churn_figures(record: Record, w: Windows | None = None) -> dict[str, Any] | None:
    churn = record.meta.churn
    if not isinstance(churn, dict):
        return None
    guests = churn.get("guests") or {}
    finals = [g.get("final") for g in guests.values() if isinstance(g.get("final"), dict)]
    rates = [f["achieved_rate"] for f in finals if isinstance(f.get("achieved_rate"), int | float)]
    return {
        "size": churn.get("size"),
        "rate": churn.get("rate"),
        "guests": len(guests),
        "achieved_rate_min": min(rates) if rates else None,
        "passes_min": min((f.get("passes") or 0 for f in finals), default=None),
        "errors": [g["error"] for g in guests.values() if g.get("error")],
        **cow_figures(record, w),
    }


def probe_figures(record: Record) -> dict[str, Any] | None:
    probe = record.meta.guest_probe
    if not isinstance(probe, dict) or not probe.get("phases"):
        return None
    phases = probe["phases"]
    rows = []
    for name, ph in phases.items():
        s = ph.get("summary") or {}
        rows.append(
            {
                "phase": name,
                "ksm": ph.get("ksm"),
                "cow_ksm": ph.get("cow_ksm"),
                "writes": s.get("writes"),
                **{k: s.get(k) for k in LATENCY_KEYS},
                "timer_us": s.get("timer_us"),
            }
        )
    ratio = {}
    off, on = phases.get("off", {}).get("summary"), phases.get("on", {}).get("summary")
    if off and on:
        for k in LATENCY_KEYS:
            if off.get(k) and on.get(k) is not None:
                ratio[k] = on[k] / off[k]
    return {"size": probe.get("size"), "rows": rows, "on_over_off": ratio}


def guest_run_rows(record: Record) -> list[dict[str, Any]]:
    return list(record.meta.guest_run or [])

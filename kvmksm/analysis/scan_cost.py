"""What one pass of ksmd costs: ksmd's CPU per full scan and the wall time of a full scan,
from KSM going on to the last round's full scans (processes runs, which wait for them).

A full scan walks every MADV_MERGEABLE area, mapped or not; on kernels that walk a large
sparse area address by address (the scan-cost regression reported on 6.17: ksmd's time in
folio_walk_start on a huge, mostly unmapped mergeable area) this figure grows with the size
of the area, not with the memory in it. The scan-cost-sparse scenario measures exactly that.
"""

from __future__ import annotations

from typing import Any

from kvmksm.analysis.windows import column
from kvmksm.results.events import Kind
from kvmksm.results.record import Record

KEYS = ("ksmd_cpu_per_full_scan_ms", "full_scan_s")


def scan_cost(record: Record, cpu_seconds: Any) -> dict[str, tuple[float | None, str]]:
    """{key: (value, note)} for KEYS; `cpu_seconds(samples, after, upto)` is metrics' own
    ksmd CPU integral (passed in: one definition of it)."""
    none = dict.fromkeys(KEYS, (None, "not a processes run"))
    if record.meta.workload.type != "processes":
        return none
    t_on = record.event_time(Kind.KSM_ON)
    done = [e.t for e in record.events if e.kind == Kind.SCANS_DONE]
    s = record.samples
    full = column(s, "full_scans")
    if t_on is None or not done or full is None or s.empty:
        return dict.fromkeys(KEYS, (None, "no full scans waited for after KSM went on"))
    t = s["t"].astype(float)
    end = done[-1]
    # The run samples right after each event it marks: the first sample at or after the
    # last scans_done holds the count it waited for.
    before, after = full[t <= t_on].dropna(), full[t >= end].dropna()
    if before.empty or after.empty:
        return dict.fromkeys(KEYS, (None, "no samples at KSM on and at the last scans"))
    scans = float(after.iloc[0] - before.iloc[-1])
    if scans <= 0:
        return dict.fromkeys(KEYS, (None, "no full scan completed"))
    t_start = float(t[before.index[-1]])
    t_end = float(t[after.index[0]])
    cpu = cpu_seconds(s, t_start, t_end)
    note = f"{scans:.0f} full scans from KSM on to the last round's scans"
    return {
        "ksmd_cpu_per_full_scan_ms": (cpu / scans * 1000 if cpu is not None else None, note),
        "full_scan_s": ((t_end - t_start) / scans, note),
    }

"""The sharing step of a VM run: after the plateau window, who shares with whom and the
sharing potential, into run.json (`sharing`, `potential`) with one event each.

It reads only (smaps, pagemap, kpageflags, kpagecount, and present pages through
/proc/<pid>/mem), so the counters it is checked against keep their values; it runs after the
`plateau_done` event, which ends the plateau window, so its CPU does not count in it. A failure
here is recorded and the run goes on: the run's own figures do not depend on it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from kvmksm.analysis.potential import guest_totals, measure_potential
from kvmksm.analysis.sharing import measure_sharing
from kvmksm.results.events import Kind
from kvmksm.units import format_size
from kvmksm.workloads.base import RunContext

# `workload.sharing` unset: measure when all guests together have at most this much memory
# (hashing costs about 2 s per GiB on a small host; see bench/bench_sharing.py).
AUTO_LIMIT = 32 << 30


def wanted(setting: bool | None, memory: Mapping[str, int | None]) -> tuple[bool, str]:
    total = sum(v or 0 for v in memory.values())
    if setting is not None:
        return setting, f"workload.sharing: {str(setting).lower()}"
    if total <= AUTO_LIMIT:
        return True, f"guests' memory {format_size(total)} <= {format_size(AUTO_LIMIT)}"
    return False, (
        f"guests' memory {format_size(total)} > {format_size(AUTO_LIMIT)}: "
        "set workload.sharing: true to measure anyway"
    )


def measure(ctx: RunContext, pids: Mapping[str, int], setting: bool | None) -> None:
    memory = {
        g["name"]: g["memory_kb"] * 1024 if isinstance(g.get("memory_kb"), int) else None
        for g in ctx.record.data.get("guests") or []
        if g.get("name") in pids
    }
    on, why = wanted(setting, memory)
    if not on:
        ctx.record.event(Kind.SHARING_SKIPPED, why)
        return
    taken = "after the plateau window (plateau_done), before unmerge; KSM still on"
    try:
        with ctx.phase(f"who shares with whom: reading the pages of {len(pids)} guests"):
            sharing, snap = measure_sharing(ctx.fs, ctx.ksm, pids, memory)
    except Exception as e:  # recorded; the run's own figures do not depend on this step
        _failed(ctx, "sharing", e)
        return
    sharing.update(t=ctx.record.now(), taken=taken)
    ctx.record.update(sharing=sharing)
    failed = [c["name"] for c in sharing["checks"] if c.get("passed") is False]
    ctx.record.event(
        Kind.SHARING_MATRIX,
        f"{sharing['frames']} KSM frames, {sharing['mappings']} mappings in {len(pids)} guests"
        + (f"; off: {', '.join(failed)}" if failed else "; sums match the counters"),
        seconds=sharing["seconds"],
    )
    knobs = _knobs(ctx)
    try:
        with ctx.phase("sharing potential: hashing every present page"):
            t = time.monotonic()
            pot = measure_potential(
                ctx.fs,
                snap,
                use_zero_pages=bool(knobs.get("use_zero_pages")),
                max_page_sharing=knobs.get("max_page_sharing"),
                guest_memory=guest_totals(memory),
            )
    except Exception as e:
        _failed(ctx, "potential", e)
        return
    pot.update(t=ctx.record.now(), taken=taken)
    ctx.record.update(potential=pot)
    ctx.record.event(
        Kind.SHARING_POTENTIAL,
        f"potential {pot['potential']} pages, achieved {pot['achieved']} "
        f"({_pct(pot['achieved_pct_of_potential'])} of it); "
        f"{format_size(pot['bytes_read'])} hashed",
        seconds=round(time.monotonic() - t, 4),
    )


def _knobs(ctx: RunContext) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ("use_zero_pages", "max_page_sharing"):
        try:
            out[name] = ctx.ksm.read(name)
        except OSError:
            out[name] = None
    return out


FAILED = {"sharing": Kind.SHARING_FAILED, "potential": Kind.POTENTIAL_FAILED}


def _failed(ctx: RunContext, key: str, e: Exception) -> None:
    text = str(e) if isinstance(e, OSError) else f"{type(e).__name__}: {e}"
    ctx.record.update(**{key: {"error": text}})
    ctx.record.event(FAILED[key], text)


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{v:.1f} %"

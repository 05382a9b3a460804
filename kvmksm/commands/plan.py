"""kvmksm plan: how many guests fit, from a sweep of the number of guests (clones or processes).

The model (MODEL below) is stated with every plan. A plan is built in steps, each a function
that returns its part and the notes it has to make: the measured points, the savings fit, the
projection of the most guests that fit, ksmd's cost at that density, and the statement of how
far the projection reaches beyond what was measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvmksm.analysis.grouping import SIZE_FIELDS, USABLE, Run, key_of, short_name, show, varying
from kvmksm.analysis.stats import fit_line, mean_sd
from kvmksm.analysis.windows import MIB
from kvmksm.errors import UserError
from kvmksm.host.fs import HostFS
from kvmksm.units import format_size, parse_size

MODEL = """\
saved(N) = (b + a·(N−1)) × m    memory KSM saves with N guests of memory m
a is the share of each added guest's memory that merges with the guests already there, b what
one guest saves alone (pages repeated inside it). Both are fitted by least squares over every
measured record, as shares of guest memory, so a sweep of small guests can be projected to
guests of another size (which is then an extrapolation, and said so). With a single guest
count measured the line goes through b = 0.

  without KSM:  N × (m + o) ≤ H − headroom
  with KSM:     N × (m + o) − saved(N) ≤ H − headroom
o is a per-guest overhead (QEMU, page tables; 0 unless given). ksmd's cost at the projected
density comes from a straight-line fit of ksmd CPU against N."""

DEFAULT_HEADROOM = "10%"
FAR = 4  # projections past this multiple of the largest measured count get a warning


@dataclass
class Inputs:
    guest_bytes: int
    guest_source: str
    host_bytes: int
    host_source: str
    headroom_bytes: int
    headroom_text: str
    overhead_bytes: int

    @property
    def usable_bytes(self) -> int:
        return self.host_bytes - self.headroom_bytes


@dataclass
class DensityPlan:
    label: str
    workload: str
    runs: list[Run]
    inputs: Inputs
    data: dict[str, Any]


def plan(
    runs: list[Run],
    guest_memory: int | None = None,
    host_memory: int | None = None,
    headroom: str = DEFAULT_HEADROOM,
    overhead: int = 0,
) -> list[DensityPlan]:
    """One plan per configuration (records alike in everything but the guest count)."""
    usable = [r for r in runs if r.status in USABLE]
    if not usable:
        raise UserError("nothing to plan from: no finished run records")
    groups: dict[Any, list[Run]] = {}
    for r in usable:
        groups.setdefault(key_of(r.config, SIZE_FIELDS), []).append(r)
    differ = varying([g[0] for g in groups.values()], SIZE_FIELDS)
    plans = []
    for members in groups.values():
        cfg = members[0].config
        label = ", ".join(f"{short_name(k)}={show(k, cfg.get(k, '—'))}" for k in differ[:3])
        plans.append(
            plan_one(members, label or "all runs", guest_memory, host_memory, headroom, overhead)
        )
    return plans


def plan_one(
    runs: list[Run],
    label: str,
    guest_memory: int | None,
    host_memory: int | None,
    headroom: str,
    overhead: int,
) -> DensityPlan:
    kind = runs[0].analysis.workload
    noun = "processes" if kind == "processes" else "guests"
    pts, notes = measured_points(runs, label, noun)
    counts = sorted({p["n"] for p in pts})
    sizes = sorted({p["guest_bytes"] for p in pts})
    inputs = plan_inputs(runs, sizes, guest_memory, host_memory, headroom, overhead)
    if len(sizes) > 1:
        notes.append(
            "the records ran guests of different sizes; savings are fitted as shares of each "
            "guest's memory"
        )
    fit = fit_savings(pts, inputs.guest_bytes, noun, notes)
    n0, n1 = project(fit, inputs, notes)
    cpu_fits, with_cpu = ksmd_cost(pts, n1, notes)
    extrap = extrapolation(counts, sizes, n1, inputs.guest_bytes, len(pts), bool(cpu_fits), notes)
    m, o, u = inputs.guest_bytes, inputs.overhead_bytes, inputs.usable_bytes
    saved = saved_at(fit, m)
    data = {
        "config": label,
        "workload": kind,
        "noun": noun,
        "measured": measured_table(pts, fit, m),
        "points": pts,
        "fit": fit,
        "cpu_fits": cpu_fits,
        "inputs": {
            "guest_memory_mib": m / MIB,
            "guest_memory_source": inputs.guest_source,
            "host_memory_mib": inputs.host_bytes / MIB,
            "host_memory_source": inputs.host_source,
            "headroom_mib": inputs.headroom_bytes / MIB,
            "headroom": inputs.headroom_text,
            "overhead_mib": o / MIB,
            "usable_mib": u / MIB,
        },
        "without_ksm": {"max": n0, "used_mib": n0 * (m + o) / MIB},
        "with_ksm": {
            "max": n1,
            "saved_mib": saved(n1) / MIB if n1 is not None else None,
            "used_mib": (n1 * (m + o) - saved(n1)) / MIB if n1 is not None else None,
            **with_cpu,
        },
        "gain": (n1 - n0) if n1 is not None else None,
        "gain_pct": ((n1 - n0) / n0 * 100) if n1 is not None and n0 else None,
        "extrapolation": extrap,
        "notes": notes,
    }
    return DensityPlan(label, kind, runs, inputs, data)


# -- the steps of a plan -------------------------------------------------------------------
def measured_points(
    runs: list[Run], label: str, noun: str
) -> tuple[list[dict[str, Any]], list[str]]:
    """One point per usable record: count, guest size, savings (also as a share of a guest's
    memory) and ksmd's cost."""
    notes: list[str] = []
    pts = []
    for r in runs:
        a = r.analysis
        saved = a.value("plateau_saved_mib")
        if a.guests is None or not a.guest_bytes or saved is None:
            notes.append(f"{r.name}: left out (no guest count, guest memory or savings)")
            continue
        pts.append(
            {
                "n": a.guests,
                "guest_bytes": a.guest_bytes,
                "saved_mib": saved,
                "share": saved * MIB / a.guest_bytes,  # saved, in guests' worth of memory
                "cpu_pct": a.value("ksmd_cpu_plateau_pct"),
                "cpu_s": a.value("ksmd_cpu_to_plateau_s"),
                "record": r.name,
            }
        )
    if not pts:
        raise UserError(f"{label}: no record with a guest count, guest memory and savings")
    if sorted({p["n"] for p in pts}) == [1]:
        one = "guest" if noun == "guests" else "process"
        raise UserError(
            f"{label}: every record ran 1 {one}: sweep the count (matrix: {{clones: [1, 2, 4, "
            "8]}) to see what each added one saves"
        )
    return pts, notes


def fit_savings(pts: list[dict[str, Any]], m: int, noun: str, notes: list[str]) -> dict[str, Any]:
    """Savings as a share of guest memory against N-1, by least squares."""
    counts = sorted({p["n"] for p in pts})
    through_origin = len(counts) < 2
    a, b, r2 = fit_line([p["n"] - 1 for p in pts], [p["share"] for p in pts], through_origin)
    if len(counts) == 2 and len(pts) == 2:
        notes.append("two runs at two counts: the line passes through both, R² says nothing")
    if through_origin:
        one = "guest" if noun == "guests" else "process"
        notes.append(
            f"only one {one} count measured (N={counts[0]}): the line is drawn through it and "
            "b = 0; R² cannot be given"
        )
    return {
        "model": "saved(N) = (b + a·(N−1)) × guest memory",
        "a": a,
        "b": b,
        "a_mib": a * m / MIB,
        "b_mib": b * m / MIB,
        "a_pct": a * 100,
        "r2": r2,
        "points": len(pts),
        "counts": counts,
        "through_origin": through_origin,
    }


def saved_at(fit: dict[str, Any], m: int) -> Any:
    """saved(N) in bytes for guests of m bytes, by the fit."""

    def saved(n: float) -> float:
        return (fit["b"] + fit["a"] * (n - 1)) * m

    return saved


def project(fit: dict[str, Any], inputs: Inputs, notes: list[str]) -> tuple[int, int | None]:
    """The most guests that fit without KSM and with it (None: memory does not bound it)."""
    m, o, u = inputs.guest_bytes, inputs.overhead_bytes, inputs.usable_bytes
    a, b = fit["a"], fit["b"]
    saved = saved_at(fit, m)
    n0 = max(0, math.floor(u / (m + o)))
    k = m + o - a * m  # memory each added guest costs with KSM
    if k <= m * 1e-9:  # (floating point: a share of exactly 1 may come out a hair under)
        notes.append(
            "each added guest saves as much as it uses by this fit: memory does not bound the "
            "count; CPU, disk and the guests' own writes will"
        )
        return n0, None
    # A guest that fits exactly fits: allow for the fit's rounding (a millionth of a guest, a
    # byte of memory) at the boundary.
    n1 = max(0, math.floor((u + (b - a) * m) / k + 1e-6))
    while n1 > 0 and n1 * (m + o) - saved(n1) > u + 1:
        n1 -= 1
    return n0, n1


def ksmd_cost(
    pts: list[dict[str, Any]], n1: int | None, notes: list[str]
) -> tuple[dict[str, Any], dict[str, float | None]]:
    """Straight-line fits of ksmd's CPU share and CPU seconds against N, and their values at
    the projected density (ksmd is one thread: never above 100% of one CPU)."""
    fits = {}
    for key, unit in (("cpu_pct", "% of one CPU"), ("cpu_s", "CPU s")):
        cp = [(p["n"], p[key]) for p in pts if p[key] is not None]
        if not cp:
            continue
        if len({n for n, _ in cp}) >= 2:
            c1, c0, cr2 = fit_line([n for n, _ in cp], [v for _, v in cp])
        else:
            c1, c0, cr2 = 0.0, float(np.mean([v for _, v in cp])), None
        fits[key] = {"c0": c0, "c1": c1, "r2": cr2, "unit": unit}

    def at(key: str) -> float | None:
        f = fits.get(key)
        if f is None or n1 is None:
            return None
        if f["c1"] < 0:
            # Falling with N is noise (ksmd's share is set by pages_to_scan/sleep_millisecs,
            # not the guest count): a line would go below zero; the measured mean is honest.
            return float(np.mean([p[key] for p in pts if p[key] is not None]))
        return f["c0"] + f["c1"] * n1

    pct = at("cpu_pct")
    if fits.get("cpu_pct", {}).get("c1", 0) < 0:
        notes.append(
            "ksmd's CPU share did not grow with the guest count in these runs (the scan rate, "
            "set by pages_to_scan and sleep_millisecs, decides it): the mean measured share is "
            "given for the projected density"
        )
    if pct is not None and pct > 100:
        notes.append(
            f"the CPU fit asks {pct:,.0f}% of one CPU at N = {n1}, but ksmd is one thread: it "
            "tops out at 100%, so at that density it merges more slowly than measured"
        )
        pct = 100.0
    return fits, {"ksmd_cpu_pct": pct, "ksmd_cpu_s": at("cpu_s")}


def measured_table(pts: list[dict[str, Any]], fit: dict[str, Any], m: int) -> list[dict[str, Any]]:
    """One row per measured count: means over its repeats, and the fit at that count."""
    saved = saved_at(fit, m)
    rows = []
    for n in sorted({p["n"] for p in pts}):
        here = [p for p in pts if p["n"] == n]
        sm, ss = mean_sd([p["saved_mib"] for p in here])
        cm, _ = mean_sd([p["cpu_pct"] for p in here])
        cs, _ = mean_sd([p["cpu_s"] for p in here])
        gm = float(np.mean([p["guest_bytes"] for p in here])) / MIB
        rows.append(
            {
                "n": n,
                "runs": len(here),
                "guest_mib": gm,
                "saved_mib": sm,
                "saved_sd": ss,
                "saved_pct": sm / (n * gm) * 100 if sm is not None else None,
                "fit_mib": saved(n) / MIB * (gm * MIB / m),  # in the measured guests' size
                "cpu_pct": cm,
                "cpu_s": cs,
            }
        )
    return rows


def extrapolation(
    counts: list[int],
    sizes: list[int],
    n1: int | None,
    m: int,
    runs: int,
    has_cpu: bool,
    notes: list[str],
) -> dict[str, Any]:
    """How far the projection reaches beyond what was measured, said in words."""
    top = max(counts)
    said = f"measured at N = {', '.join(str(n) for n in counts)} ({runs} runs)"
    if n1 is not None and n1 > top:
        said += f"; the projection at N = {n1} is {n1 / top:,.1f}x the largest measured count"
        if n1 > FAR * top:
            notes.append(
                f"the projection goes {n1 / top:,.0f}x past the largest count measured: a "
                "straight line that far out is a hope, not a measurement; sweep closer to the "
                "density you plan for"
            )
    elif n1 is not None:
        said += f"; the projection at N = {n1} lies within the measured counts"
    if len(sizes) == 1 and m != sizes[0]:
        said += (
            f"; measured with {format_size(sizes[0])} guests, projected for {format_size(m)} "
            f"({m / sizes[0]:.3g}x): assumes the same share of their memory merges"
        )
    if n1 is not None and m != sizes[-1] and has_cpu:
        notes.append(
            "ksmd's cost was measured with guests of another size: its CPU share follows "
            "pages_to_scan / sleep_millisecs more than memory, its CPU seconds to the plateau "
            "grow with the memory to scan"
        )
    return {
        "measured_counts": [min(counts), top],
        "projected": n1,
        "count_factor": (n1 / top) if n1 else None,
        "guest_measured_mib": [s / MIB for s in sizes],
        "guest_factor": m / sizes[-1],
        "statement": said,
    }


# -- inputs ---------------------------------------------------------------------------------
def parse_headroom(text: str, host_bytes: int) -> int:
    """'10%' of the host's memory, or a size such as 8GiB."""
    t = str(text).strip()
    try:
        if t.endswith("%"):
            pct = float(t[:-1])
            if not 0 <= pct < 100:
                raise ValueError
            return int(host_bytes * pct / 100)
        return parse_size(t)
    except ValueError:
        raise UserError(
            f"--headroom: expected a percentage of host memory (10%) or a size (8GiB), got {t!r}"
        ) from None


def parse_size_arg(text: str | None, flag: str) -> int | None:
    if text is None:
        return None
    try:
        return parse_size(text)
    except ValueError as e:
        raise UserError(f"{flag}: {e}") from None


def plan_inputs(
    runs: list[Run],
    measured_bytes: list[int],
    guest_memory: int | None,
    host_memory: int | None,
    headroom: str,
    overhead: int,
) -> Inputs:
    if guest_memory is not None:
        m, m_src = guest_memory, "--guest-memory"
    elif len(measured_bytes) == 1:
        m, m_src = measured_bytes[0], "from the records: each one's configured memory"
    else:
        raise UserError(
            "the records ran guests of different sizes "
            f"({', '.join(format_size(b) for b in measured_bytes)}): say which to plan for "
            "with --guest-memory"
        )
    if host_memory is not None:
        h, h_src = host_memory, "--host-memory"
    else:
        totals = {r.record.meta.host.mem_total_kb for r in runs} - {None}
        if len(totals) == 1:
            h, h_src = int(totals.pop()) * 1024, "MemTotal of the records' host"  # type: ignore[arg-type]
        else:
            h, h_src = _this_host_memory(), "MemTotal of this host"
    if m <= 0 or h <= 0:
        raise UserError("guest and host memory must be more than 0")
    room = parse_headroom(headroom, h)
    if room >= h:
        raise UserError(f"--headroom {headroom} leaves no memory for guests")
    return Inputs(m, m_src, h, h_src, room, headroom, overhead)


def _this_host_memory() -> int:
    kb = HostFS().meminfo().get("MemTotal")
    if not kb:
        raise UserError("cannot tell the host's memory: give --host-memory")
    return int(kb) * 1024


# -- as data ---------------------------------------------------------------------------------
def to_json(plans: list[DensityPlan]) -> dict[str, Any]:
    return {
        "model": MODEL,
        "plans": [p.data | {"records": [str(r.record.dir) for r in p.runs]} for p in plans],
    }


def plan_title(plans: list[DensityPlan]) -> str:
    names = sorted({r.record.meta.scenario.name for p in plans for r in p.runs})
    return f"Density plan from {', '.join(names)}"

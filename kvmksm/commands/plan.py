"""kvmksm plan: how many guests fit, from a sweep of the number of guests (clones or processes).

The model (MODEL below) is stated with every plan. A plan is built in steps, each a function
that returns its part and the notes it has to make: the measured points, the savings fit with
its prediction intervals (kvmksm.analysis.fit), the projection of the most guests that fit and
the range the intervals allow, ksmd's cost at that density, and the statement of how far the
projection reaches beyond what was measured. Records of a single count are shown, not
projected: one count says nothing about what each added guest saves.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvmksm.analysis.fit import LEVEL, LineFit, fit_line
from kvmksm.analysis.grouping import SIZE_FIELDS, USABLE, Run, key_of, short_name, show, varying
from kvmksm.analysis.stats import mean_sd
from kvmksm.analysis.windows import MIB
from kvmksm.errors import UserError
from kvmksm.host.fs import HostFS
from kvmksm.units import format_size, parse_size

JSON_FORMAT = 1  # version of the document `kvmksm plan --json` prints

MODEL = """\
saved(N) = (b + a·(N−1)) × m    memory KSM saves with N guests of memory m
a is the share of each added guest's memory that merges with the guests already there, b what
one guest saves alone (pages repeated inside it). Both are fitted by ordinary least squares
over every measured record, repeats included, as shares of guest memory, so a sweep of small
guests can be projected to guests of another size (which is then an extrapolation, and said
so). The 95% prediction interval of saved(N) (statsmodels) is where one more run at N would
land, by the scatter of the measured runs around the line; it needs more runs than the line
has parameters (two).

  without KSM:  N × (m + o) ≤ H − headroom
  with KSM:     N × (m + o) − saved(N) ≤ H − headroom
o is a per-guest overhead (QEMU, page tables; 0 unless given). The range of the most guests
that fit is where the lower and the upper bound of saved(N) meet the memory limit (a saving
is taken as never below 0 nor above all the guests' memory). ksmd's cost at the projected
density comes from a straight-line fit of ksmd CPU against N, with its interval too."""

DEFAULT_HEADROOM = "10%"
FAR = 4  # projections past this multiple of the largest measured count get a warning
CAP = 10**12  # guests: a bound of saved(N) that still fits this many does not bound the count
AXIS = {"processes": "count", "vms": "clones"}


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
    inputs: Inputs | None  # None when the plan refused to project
    data: dict[str, Any]
    key: tuple[tuple[str, str], ...] = ()  # the configuration, guest count aside
    line: LineFit | None = None  # saved, as a share of one guest's memory, against N - 1
    cpu_lines: dict[str, LineFit] = field(default_factory=dict)  # ksmd cost against N

    @property
    def refused(self) -> str | None:
        """Why this plan shows what was measured and projects nothing (None: it projects)."""
        return self.data.get("refused")

    def saved_band(self, n: Any, guest_bytes: int | None = None) -> tuple[Any, Any, Any]:
        """saved(N) in MiB for guests of `guest_bytes` (default the planned size): the fit and
        the bounds of its prediction interval (NaN without one)."""
        assert self.line is not None and self.inputs is not None
        m = guest_bytes or self.inputs.guest_bytes
        return saved_band(self.line, np.asarray(n, float), m)


# Guests' savings intervals: at least this fraction of the prediction either side
# (analysis/fit). Guests identical to the page scatter little in a small sweep, yet a larger
# run can differ by chance: two tiny guests that came up in the same millisecond merged 13%
# more pages each than their four siblings (a 6-clone run 2.3% above its 1, 2, 4 line).
SAVED_FLOOR = 0.03


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
    for key, members in groups.items():
        cfg = members[0].config
        label = ", ".join(f"{short_name(k)}={show(k, cfg.get(k, '—'))}" for k in differ[:3])
        p = plan_one(members, label or "all runs", guest_memory, host_memory, headroom, overhead)
        p.key = key
        plans.append(p)
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
    if len(counts) < 2:
        return refused_plan(runs, label, kind, noun, pts, notes)
    inputs = plan_inputs(runs, sizes, guest_memory, host_memory, headroom, overhead, noun)
    if len(sizes) > 1:
        notes.append(
            "the records ran guests of different sizes; savings are fitted as shares of each "
            "guest's memory"
        )
    # Guests (kernels, page tables, page cache) add pages a line cannot see; processes with
    # known contents merge exactly as counted: only guests' intervals get the floor.
    floor = SAVED_FLOOR if kind == "vms" else 0.0
    line, fit = fit_savings(pts, inputs.guest_bytes, notes, floor)
    n0, n1, n_range = project(line, inputs, notes)
    cpu_fits, cpu_lines, with_cpu = ksmd_cost(pts, n1, notes)
    extrap = extrapolation(counts, sizes, n1, inputs.guest_bytes, len(pts), bool(cpu_fits), notes)
    m, o, u = inputs.guest_bytes, inputs.overhead_bytes, inputs.usable_bytes
    saved = saved_at(fit, m)
    saved_pi = None
    if n1 is not None and line.has_interval:
        _, lo, hi = saved_band(line, np.array([n1], float), m)
        saved_pi = [float(lo[0]), float(hi[0])]
    data = {
        "config": label,
        "workload": kind,
        "noun": noun,
        "refused": None,
        "measured": measured_table(pts, line, m),
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
            # [fewest, most] by the lower and upper bound of saved(N); most None: unbounded
            "max_interval": n_range,
            "saved_mib": saved(n1) / MIB if n1 is not None else None,
            "saved_interval_mib": saved_pi,
            "used_mib": (n1 * (m + o) - saved(n1)) / MIB if n1 is not None else None,
            **with_cpu,
        },
        "interval": interval_statement(line),
        "gain": (n1 - n0) if n1 is not None else None,
        "gain_pct": ((n1 - n0) / n0 * 100) if n1 is not None and n0 else None,
        "extrapolation": extrap,
        "notes": notes,
        "checks": [],
    }
    return DensityPlan(label, kind, runs, inputs, data, line=line, cpu_lines=cpu_lines)


def refused_plan(
    runs: list[Run],
    label: str,
    kind: str,
    noun: str,
    pts: list[dict[str, Any]],
    notes: list[str],
) -> DensityPlan:
    """What a single guest count measured, and why nothing is projected from it."""
    (n,) = sorted({p["n"] for p in pts})
    one = noun if n != 1 else ("guest" if noun == "guests" else "process")
    where = "" if label == "all runs" else f"{label}: "
    why = (
        f"{where}every record ran {n} {one}: one count cannot tell what each added one saves; "
        f"sweep the count (matrix: {{{AXIS.get(kind, 'clones')}: [1, 2, 4, 8]}}) to plan"
    )
    data = {
        "config": label,
        "workload": kind,
        "noun": noun,
        "refused": why,
        "measured": measured_table(pts, None, None),
        "points": pts,
        "notes": notes,
        "checks": [],
    }
    return DensityPlan(label, kind, runs, None, data)


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
    return pts, notes


def fit_savings(
    pts: list[dict[str, Any]], m: int, notes: list[str], floor: float = 0.0
) -> tuple[LineFit, dict[str, Any]]:
    """Savings as a share of guest memory against N-1, by least squares, with the scatter
    that the prediction intervals come from."""
    counts = sorted({p["n"] for p in pts})
    line = fit_line([p["n"] - 1 for p in pts], [p["share"] for p in pts], rel_floor=floor)
    r2_note = None
    if not line.has_interval:
        r2_note = (
            f"{len(pts)} runs at {len(counts)} counts: the line passes through both points, so "
            "R² would be 1 whatever was measured, and there is no scatter to give an interval "
            "from: repeat the runs or add a count"
        )
        notes.append(r2_note)
    elif line.r2 is None:
        r2_note = (
            "every run saved the same share: R² (the share of the spread the line explains) is 0/0"
        )
    sd = line.resid_sd
    return line, {
        "model": "saved(N) = (b + a·(N−1)) × guest memory",
        "a": line.slope,
        "b": line.intercept,
        "a_mib": line.slope * m / MIB,
        "b_mib": line.intercept * m / MIB,
        "a_pct": line.slope * 100,
        "r2": line.r2,
        "r2_note": r2_note,
        "points": len(pts),
        "counts": counts,
        "df_resid": line.df_resid,
        # the scatter of one run around the line, in MiB of a planned guest's savings
        "resid_sd_mib": sd * m / MIB if sd is not None else None,
    }


def saved_at(fit: dict[str, Any], m: int) -> Callable[[float], float]:
    """saved(N) in bytes for guests of m bytes, by the fit."""

    def saved(n: float) -> float:
        return (fit["b"] + fit["a"] * (n - 1)) * m

    return saved


def saved_band(line: LineFit, n: np.ndarray, m: int) -> tuple[Any, Any, Any]:
    """saved(N) in MiB for guests of m bytes and the bounds of its prediction interval, the
    bounds held between 0 and all of the N guests' memory (what KSM can save at all)."""
    mean, lo, hi = line.predict(n - 1)
    return (
        mean * m / MIB,
        np.clip(lo, 0.0, n) * m / MIB,
        np.clip(hi, 0.0, n) * m / MIB,
    )


def interval_statement(line: LineFit) -> dict[str, Any]:
    """How the intervals were made, or why there are none."""
    if not line.has_interval:
        return {
            "level": None,
            "method": None,
            "why_none": "as many runs as the line has parameters: no scatter to measure",
        }
    return {
        "level": line.level,
        "method": (
            "prediction interval of ordinary least squares (statsmodels OLS get_prediction, "
            f"obs=True): where one more run would land; {line.runs} runs, "
            f"{line.df_resid} residual degrees of freedom"
        ),
        "why_none": None,
    }


def project(
    line: LineFit, inputs: Inputs, notes: list[str]
) -> tuple[int, int | None, list[int | None] | None]:
    """The most guests that fit without KSM and with it (None: memory does not bound it), and
    the range of the latter by the bounds of saved(N) ([fewest, most]; most None: unbounded)."""
    m, o, u = inputs.guest_bytes, inputs.overhead_bytes, inputs.usable_bytes
    a, b = line.slope, line.intercept
    n0 = max(0, math.floor(u / (m + o)))
    k = m + o - a * m  # memory each added guest costs with KSM
    n1: int | None
    if k <= m * 1e-9:  # (floating point: a share of exactly 1 may come out a hair under)
        notes.append(
            "each added guest saves as much as it uses by this fit: memory does not bound the "
            "count; CPU, disk and the guests' own writes will"
        )
        n1 = None
    else:
        # A guest that fits exactly fits: allow for the fit's rounding (a millionth of a
        # guest, a byte of memory) at the boundary.
        n1 = max(0, math.floor((u + (b - a) * m) / k + 1e-6))
        while n1 > 0 and n1 * (m + o) - (b + a * (n1 - 1)) * m > u + 1:
            n1 -= 1
    if not line.has_interval:
        return n0, n1, None

    def used(bound: int) -> Callable[[int], float]:
        def f(n: int) -> float:
            band = saved_band(line, np.array([n], float), m)
            return n * (m + o) - float(band[bound][0]) * MIB

        return f

    fewest = most_that_fit(used(1), u)
    most = most_that_fit(used(2), u)
    if n1 is not None:
        fewest = n1 if fewest is None else min(fewest, n1)
        most = None if most is None else max(most, n1)
    return n0, n1, [fewest, most]


def most_that_fit(used: Callable[[int], float], limit: float) -> int | None:
    """The largest N with used(N) <= limit, given that one guest fits (None: even CAP fits).
    Both bounds of the memory used are monotone past their turn (a line less a convex or
    concave interval), so a bisection finds where they cross the limit."""
    if used(CAP) <= limit + 1:
        return None
    lo, hi = 1, CAP  # used(lo) fits, used(hi) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if used(mid) <= limit + 1:
            lo = mid
        else:
            hi = mid
    return lo


def ksmd_cost(
    pts: list[dict[str, Any]], n1: int | None, notes: list[str]
) -> tuple[dict[str, Any], dict[str, LineFit], dict[str, Any]]:
    """Straight-line fits of ksmd's CPU share and CPU seconds against N, and their values (with
    prediction intervals) at the projected density (ksmd is one thread: never above 100% of one
    CPU). A share that falls with N is noise: the mean of the runs is used instead."""
    fits, lines = {}, {}
    for key, unit in (("cpu_pct", "% of one CPU"), ("cpu_s", "CPU s")):
        cp = [(p["n"], p[key]) for p in pts if p[key] is not None]
        if not cp:
            continue
        ns, vs = [n for n, _ in cp], [v for _, v in cp]
        line = fit_line(ns, vs) if len(set(ns)) >= 2 else None
        mean_only = line is None or line.slope < 0
        if mean_only:
            # Falling with N is noise (ksmd's share is set by pages_to_scan/sleep_millisecs,
            # not the guest count): a line would go below zero; the measured mean is honest.
            line = fit_line(ns, vs, constant_only=True)
        assert line is not None
        lines[key] = line
        fits[key] = {
            "c0": line.intercept,
            "c1": line.slope,
            "r2": line.r2,
            "unit": unit,
            "mean_only": mean_only,
        }
    out: dict[str, Any] = {}
    for key, top in (("cpu_pct", 100.0), ("cpu_s", math.inf)):
        value, interval = cost_at(lines.get(key), n1, top)
        out[f"ksmd_{key}"], out[f"ksmd_{key}_interval"] = value, interval
    if fits.get("cpu_pct", {}).get("mean_only") and len({p["n"] for p in pts}) >= 2:
        notes.append(
            "ksmd's CPU share did not grow with the guest count in these runs (the scan rate, "
            "set by pages_to_scan and sleep_millisecs, decides it): the mean measured share is "
            "given for the projected density"
        )
    line = lines.get("cpu_pct")
    if line is not None and n1 is not None and line.intercept + line.slope * n1 > 100:
        notes.append(
            f"the CPU fit asks {line.intercept + line.slope * n1:,.0f}% of one CPU at "
            f"N = {n1}, but ksmd is one thread: it tops out at 100%, so at that density it "
            "merges more slowly than measured"
        )
    return fits, lines, out


def cost_at(
    line: LineFit | None, n: int | None, top: float
) -> tuple[float | None, list[float] | None]:
    """A ksmd cost at N by its fit, and its prediction interval, held within [0, top]."""
    if line is None or n is None:
        return None, None
    mean, lo, hi = line.at(n)
    value = min(max(mean, 0.0), top)
    if lo is None or hi is None:
        return value, None
    return value, [min(max(lo, 0.0), top), min(max(hi, 0.0), top)]


def measured_table(
    pts: list[dict[str, Any]], line: LineFit | None, m: int | None
) -> list[dict[str, Any]]:
    """One row per measured count: means over its repeats, and the fit at that count (with
    its prediction interval) in the measured guests' size."""
    rows = []
    for n in sorted({p["n"] for p in pts}):
        here = [p for p in pts if p["n"] == n]
        sm, ss = mean_sd([p["saved_mib"] for p in here])
        cm, _ = mean_sd([p["cpu_pct"] for p in here])
        cs, _ = mean_sd([p["cpu_s"] for p in here])
        gm = float(np.mean([p["guest_bytes"] for p in here])) / MIB
        row = {
            "n": n,
            "runs": len(here),
            "guest_mib": gm,
            "saved_mib": sm,
            "saved_sd": ss,
            "saved_pct": sm / (n * gm) * 100 if sm is not None else None,
            "fit_mib": None,
            "fit_interval_mib": None,
            "cpu_pct": cm,
            "cpu_s": cs,
        }
        if line is not None:
            mean, lo, hi = saved_band(line, np.array([n], float), int(gm * MIB))
            row["fit_mib"] = float(mean[0])
            if line.has_interval:
                row["fit_interval_mib"] = [float(lo[0]), float(hi[0])]
        rows.append(row)
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
        said += f"; the projection at N = {n1:,} is {n1 / top:,.1f}x the largest measured count"
        if n1 > FAR * top:
            notes.append(
                f"the projection goes {n1 / top:,.0f}x past the largest count measured: a "
                "straight line that far out is a hope, not a measurement; sweep closer to the "
                "density you plan for"
            )
    elif n1 is not None:
        said += f"; the projection at N = {n1:,} lies within the measured counts"
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
    noun: str = "guests",
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
    if m + overhead > h - room:
        one = "a guest" if noun == "guests" else "a process"
        each = f"{format_size(m)}" + (f" + {format_size(overhead)} overhead" if overhead else "")
        raise UserError(
            f"{one} of {each} does not fit in the {format_size(h - room)} usable "
            f"({format_size(h)} host less {headroom} headroom): not even one fits; check "
            "--guest-memory and --host-memory"
        )
    return Inputs(m, m_src, h, h_src, room, headroom, overhead)


def _this_host_memory() -> int:
    kb = HostFS().meminfo().get("MemTotal")
    if not kb:
        raise UserError("cannot tell the host's memory: give --host-memory")
    return int(kb) * 1024


# -- as data ---------------------------------------------------------------------------------
def to_json(plans: list[DensityPlan]) -> dict[str, Any]:
    return {
        "format": JSON_FORMAT,
        "model": MODEL,
        "interval_level": LEVEL,
        "plans": [p.data | {"records": [str(r.record.dir) for r in p.runs]} for p in plans],
    }


def plan_title(plans: list[DensityPlan]) -> str:
    names = sorted({r.record.meta.scenario.name for p in plans for r in p.runs})
    return f"Density plan from {', '.join(names)}"

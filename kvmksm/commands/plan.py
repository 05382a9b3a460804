"""kvmksm plan: how many guests fit, from a sweep of the number of guests (clones or processes).

Model, stated with every plan:
  saved(N) = (b + a·(N−1)) × m    memory KSM saves with N guests of memory m
a is the share of each added guest's memory that merges with the guests already there, b what
one guest saves alone (pages repeated inside it). Both are fitted by least squares over every
measured record, as shares of guest memory, so a sweep of small guests can be projected to
guests of another size (which is then an extrapolation, and said so). With a single guest
count measured the line goes through b = 0.

  without KSM:  N × (m + o) ≤ H − headroom
  with KSM:     N × (m + o) − saved(N) ≤ H − headroom
o is a per-guest overhead (QEMU, page tables; 0 unless given). ksmd's cost at the projected
density comes from a straight-line fit of ksmd CPU against N.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from kvmksm.analysis.metrics import MIB
from kvmksm.commands.compare import SOFT, Run, mean_sd, short_name, show
from kvmksm.errors import UserError
from kvmksm.units import format_size, parse_size

GIB = 1024 * MIB
DEFAULT_HEADROOM = "10%"
FAR = 4  # projections past this multiple of the largest measured count get a warning
# Fields that vary along a size sweep and so do not split records into configurations.
SIZE_FIELDS = ("scenario.workload.count", "scenario.workload.clones")


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


def fit_line(x: Sequence[float], y: Sequence[float], through_origin: bool = False):
    """(slope, intercept, R²) by least squares; R² is None when y does not vary."""
    xa, ya = np.asarray(x, float), np.asarray(y, float)
    if through_origin:
        slope, icpt = float((xa * ya).sum() / (xa * xa).sum()), 0.0
    else:
        slope, icpt = (float(v) for v in np.polyfit(xa, ya, 1))
    resid = ya - (icpt + slope * xa)
    sst = float(((ya - ya.mean()) ** 2).sum())
    # Through the origin with one x, R² would only measure the spread of the repeats.
    r2 = None if through_origin or sst == 0 else 1.0 - float((resid**2).sum()) / sst
    return slope, icpt, r2


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
    usable = [r for r in runs if r.status in ("passed", "failed")]
    if not usable:
        raise UserError("nothing to plan from: no finished run records")
    groups: dict[Any, list[Run]] = {}
    for r in usable:
        key = tuple(
            sorted((k, v) for k, v in r.config.items() if k not in SOFT and k not in SIZE_FIELDS)
        )
        groups.setdefault(key, []).append(r)
    varying = _varying([g[0] for g in groups.values()])
    plans = []
    for members in groups.values():
        cfg = members[0].config
        label = ", ".join(f"{short_name(k)}={show(k, cfg.get(k, '—'))}" for k in varying[:3])
        plans.append(
            _plan_one(members, label or "all runs", guest_memory, host_memory, headroom, overhead)
        )
    return plans


def _varying(runs: list[Run]) -> list[str]:
    names = list(dict.fromkeys(k for r in runs for k in r.config))
    return [
        k
        for k in names
        if k not in SOFT and k not in SIZE_FIELDS and len({r.config.get(k) for r in runs}) > 1
    ]


def _plan_one(
    runs: list[Run],
    label: str,
    guest_memory: int | None,
    host_memory: int | None,
    headroom: str,
    overhead: int,
) -> DensityPlan:
    kind = runs[0].outcome.workload
    noun = "processes" if kind == "processes" else "guests"
    notes: list[str] = []
    pts = []
    for r in runs:
        o = r.outcome
        saved = o.value("plateau_saved_mib")
        if o.guests is None or not o.guest_bytes or saved is None:
            notes.append(f"{r.name}: left out (no guest count, guest memory or savings)")
            continue
        pts.append(
            {
                "n": o.guests,
                "guest_bytes": o.guest_bytes,
                "saved_mib": saved,
                "share": saved * MIB / o.guest_bytes,  # saved, in guests' worth of memory
                "cpu_pct": o.value("ksmd_cpu_plateau_pct"),
                "cpu_s": o.value("ksmd_cpu_to_plateau_s"),
                "record": r.name,
            }
        )
    if not pts:
        raise UserError(f"{label}: no record with a guest count, guest memory and savings")
    ns = sorted({p["n"] for p in pts})
    if ns == [1]:
        raise UserError(
            f"{label}: every record ran 1 {noun[:-1] if noun == 'guests' else 'process'}: "
            "sweep the count (matrix: {clones: [1, 2, 4, 8]}) to see what each added one saves"
        )
    measured_bytes = sorted({p["guest_bytes"] for p in pts})
    inputs = _inputs(runs, measured_bytes, guest_memory, host_memory, headroom, overhead)
    if len(measured_bytes) > 1:
        notes.append(
            "the records ran guests of different sizes; savings are fitted as shares of each "
            "guest's memory"
        )
    m, o_b, u = inputs.guest_bytes, inputs.overhead_bytes, inputs.usable_bytes

    # Savings: share of guest memory against N-1.
    through_origin = len(ns) < 2
    a, b, r2 = fit_line([p["n"] - 1 for p in pts], [p["share"] for p in pts], through_origin)
    fit = {
        "model": "saved(N) = (b + a·(N−1)) × guest memory",
        "a": a,
        "b": b,
        "a_mib": a * m / MIB,
        "b_mib": b * m / MIB,
        "a_pct": a * 100,
        "r2": r2,
        "points": len(pts),
        "counts": ns,
        "through_origin": through_origin,
    }
    if len(ns) == 2 and len(pts) == 2:
        notes.append("two runs at two counts: the line passes through both, R² says nothing")
    if through_origin:
        notes.append(
            f"only one {noun[:-1] if noun == 'guests' else 'process'} count measured "
            f"(N={ns[0]}): the line is drawn through it and b = 0; R² cannot be given"
        )

    def saved(n: float) -> float:
        return (b + a * (n - 1)) * m

    n0 = max(0, math.floor(u / (m + o_b)))
    k = m + o_b - a * m  # memory each added guest costs with KSM
    n1: int | None
    if k <= m * 1e-9:  # (floating point: a share of exactly 1 may come out a hair under)
        n1 = None
        notes.append(
            "each added guest saves as much as it uses by this fit: memory does not bound the "
            "count; CPU, disk and the guests' own writes will"
        )
    else:
        # A guest that fits exactly fits: allow for the fit's rounding (a millionth of a
        # guest, a byte of memory) at the boundary.
        n1 = max(0, math.floor((u + (b - a) * m) / k + 1e-6))
        while n1 > 0 and n1 * (m + o_b) - saved(n1) > u + 1:
            n1 -= 1

    # ksmd's cost against N.
    cpu_fits = {}
    for key, what in (("cpu_pct", "% of one CPU"), ("cpu_s", "CPU s")):
        cp = [(p["n"], p[key]) for p in pts if p[key] is not None]
        if not cp:
            continue
        if len({n for n, _ in cp}) >= 2:
            c1, c0, cr2 = fit_line([n for n, _ in cp], [v for _, v in cp])
        else:
            c1, c0, cr2 = 0.0, float(np.mean([v for _, v in cp])), None
        cpu_fits[key] = {"c0": c0, "c1": c1, "r2": cr2, "unit": what}

    def cpu_at(key: str, n: float | None) -> float | None:
        f = cpu_fits.get(key)
        if f is None or n is None:
            return None
        if f["c1"] < 0:
            # Falling with N is noise (ksmd's share is set by pages_to_scan/sleep_millisecs,
            # not the guest count): a line would go below zero; the measured mean is honest.
            return float(np.mean([p[key] for p in pts if p[key] is not None]))
        return f["c0"] + f["c1"] * n

    cpu_pct_at = cpu_at("cpu_pct", n1)
    if cpu_fits.get("cpu_pct", {}).get("c1", 0) < 0:
        notes.append(
            "ksmd's CPU share did not grow with the guest count in these runs (the scan rate, "
            "set by pages_to_scan and sleep_millisecs, decides it): the mean measured share is "
            "given for the projected density"
        )
    if cpu_pct_at is not None and cpu_pct_at > 100:
        notes.append(
            f"the CPU fit asks {cpu_pct_at:,.0f}% of one CPU at N = {n1}, but ksmd is one "
            "thread: it tops out at 100%, so at that density it merges more slowly than measured"
        )
        cpu_pct_at = 100.0

    measured = []
    for n in ns:
        here = [p for p in pts if p["n"] == n]
        sm, ss = mean_sd([p["saved_mib"] for p in here])
        cm, _ = mean_sd([p["cpu_pct"] for p in here])
        cs, _ = mean_sd([p["cpu_s"] for p in here])
        gm = float(np.mean([p["guest_bytes"] for p in here])) / MIB
        fitted = saved(n) / MIB * (gm * MIB / m)  # the fit, in the measured guests' size
        measured.append(
            {
                "n": n,
                "runs": len(here),
                "guest_mib": gm,
                "saved_mib": sm,
                "saved_sd": ss,
                "saved_pct": sm / (n * gm) * 100 if sm is not None else None,
                "fit_mib": fitted,
                "cpu_pct": cm,
                "cpu_s": cs,
            }
        )
    top = max(ns)
    extrap = {
        "measured_counts": [min(ns), top],
        "projected": n1,
        "count_factor": (n1 / top) if n1 else None,
        "guest_measured_mib": [b_ / MIB for b_ in measured_bytes],
        "guest_factor": m / measured_bytes[-1],
    }
    said = f"measured at N = {', '.join(str(n) for n in ns)} ({len(pts)} runs)"
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
    if len(measured_bytes) == 1 and m != measured_bytes[0]:
        said += (
            f"; measured with {format_size(measured_bytes[0])} guests, projected for "
            f"{format_size(m)} ({m / measured_bytes[0]:.3g}x): assumes the same share of "
            "their memory merges"
        )
    extrap["statement"] = said
    if n1 is not None and m != measured_bytes[-1] and cpu_fits:
        notes.append(
            "ksmd's cost was measured with guests of another size: its CPU share follows "
            "pages_to_scan / sleep_millisecs more than memory, its CPU seconds to the plateau "
            "grow with the memory to scan"
        )
    data = {
        "config": label,
        "workload": kind,
        "noun": noun,
        "measured": measured,
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
            "overhead_mib": o_b / MIB,
            "usable_mib": u / MIB,
        },
        "without_ksm": {"max": n0, "used_mib": n0 * (m + o_b) / MIB},
        "with_ksm": {
            "max": n1,
            "saved_mib": saved(n1) / MIB if n1 is not None else None,
            "used_mib": (n1 * (m + o_b) - saved(n1)) / MIB if n1 is not None else None,
            "ksmd_cpu_pct": cpu_pct_at,
            "ksmd_cpu_s": cpu_at("cpu_s", n1),
        },
        "gain": (n1 - n0) if n1 is not None else None,
        "gain_pct": ((n1 - n0) / n0 * 100) if n1 is not None and n0 else None,
        "extrapolation": extrap,
        "notes": notes,
    }
    return DensityPlan(label, kind, runs, inputs, data)


def _inputs(
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
        totals = {(r.record.meta.get("host") or {}).get("mem_total_kb") for r in runs} - {None}
        if len(totals) == 1:
            h, h_src = int(totals.pop()) * 1024, "MemTotal of the records' host"
        else:
            h, h_src = _this_host_memory(), "MemTotal of this host"
    if m <= 0 or h <= 0:
        raise UserError("guest and host memory must be more than 0")
    room = parse_headroom(headroom, h)
    if room >= h:
        raise UserError(f"--headroom {headroom} leaves no memory for guests")
    return Inputs(m, m_src, h, h_src, room, headroom, overhead)


def _this_host_memory() -> int:
    from kvmksm.host.fs import HostFS

    kb = HostFS().meminfo().get("MemTotal")
    if not kb:
        raise UserError("cannot tell the host's memory: give --host-memory")
    return int(kb) * 1024


# -- output -----------------------------------------------------------------------------
def to_json(plans: list[DensityPlan]) -> dict[str, Any]:
    return {
        "model": __doc__.split("Model, stated with every plan:")[1].strip() if __doc__ else "",
        "plans": [p.data | {"records": [str(r.record.dir) for r in p.runs]} for p in plans],
    }


def terminal(plans: list[DensityPlan], console: Console) -> None:
    from kvmksm.views.report import fmt_num

    for p in plans:
        d, f, i = p.data, p.data["fit"], p.data["inputs"]
        noun = d["noun"]
        t = Table(title=f"Measured ({d['config']})", title_justify="left")
        for col in ("N", "runs", "saved MiB", "saved %", "fit MiB", "ksmd CPU %", "ksmd CPU s"):
            t.add_column(col, justify="right")
        for row in d["measured"]:
            saved = fmt_num(row["saved_mib"])
            if row["saved_sd"] is not None:
                saved += f" ± {fmt_num(row['saved_sd'])}"
            t.add_row(
                str(row["n"]),
                str(row["runs"]),
                saved,
                fmt_num(row["saved_pct"]),
                fmt_num(row["fit_mib"]),
                fmt_num(row["cpu_pct"]),
                fmt_num(row["cpu_s"]),
            )
        console.print(t)
        r2 = "R² n/a" if f["r2"] is None else f"R² = {f['r2']:.4f}"
        console.print(
            f"fit: saved(N) = {fmt_num(f['b_mib'])} + {fmt_num(f['a_mib'])} x (N-1) MiB for "
            f"{fmt_num(i['guest_memory_mib'])} MiB {noun}; each added one saves "
            f"{fmt_num(f['a_pct'])}% of its memory ({r2}, {f['points']} runs)",
            soft_wrap=True,
        )
        w, k = d["without_ksm"], d["with_ksm"]
        t = Table(title="Projection", title_justify="left", show_header=False)
        t.add_column("what")
        t.add_column("value", justify="right")
        t.add_row("host memory", f"{fmt_num(i['host_memory_mib'] / 1024)} GiB")
        t.add_row(f"headroom ({i['headroom']})", f"{fmt_num(i['headroom_mib'] / 1024)} GiB")
        t.add_row(
            f"memory per {noun[:-1] if noun == 'guests' else 'process'}",
            f"{fmt_num(i['guest_memory_mib'])} MiB + {fmt_num(i['overhead_mib'])} MiB overhead",
        )
        t.add_row(f"max {noun} without KSM", str(w["max"]))
        t.add_row(
            f"max {noun} with KSM", "unbounded by memory" if k["max"] is None else str(k["max"])
        )
        if d["gain"] is not None:
            t.add_row("gain", f"+{d['gain']} ({fmt_num(d['gain_pct'])}%)")
        if k["saved_mib"] is not None:
            t.add_row("saved at that density", f"{fmt_num(k['saved_mib'] / 1024)} GiB")
        if k["ksmd_cpu_pct"] is not None:
            t.add_row("ksmd CPU at that density", f"{fmt_num(k['ksmd_cpu_pct'])}% of one CPU")
        if k["ksmd_cpu_s"] is not None:
            t.add_row("ksmd CPU to reach the savings", f"{fmt_num(k['ksmd_cpu_s'])} CPU s")
        console.print(t)
        console.print(d["extrapolation"]["statement"], soft_wrap=True)
        for n in d["notes"]:
            console.print(f"[yellow]note:[/] {n}", soft_wrap=True)


def write_html(plans: list[DensityPlan], path: Path) -> Path:
    from kvmksm.views.report import html_env

    path = Path(path)
    items = [{"data": p.data, "svg": plan_chart(p, i)} for i, p in enumerate(plans)]
    html = (
        html_env()
        .get_template("plan.html.j2")
        .render(plans=items, model=to_json(plans)["model"], title=_title(plans))
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(html, encoding="utf-8")
    os.replace(tmp, path)
    return path


def _title(plans: list[DensityPlan]) -> str:
    names = sorted(
        {str((r.record.meta.get("scenario") or {}).get("name")) for p in plans for r in p.runs}
    )
    return f"Density plan from {', '.join(names)}"


def plan_chart(p: DensityPlan, i: int = 0) -> str:
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    from kvmksm.views import charts, plots

    d = p.data
    f, inp = d["fit"], d["inputs"]
    m, o = inp["guest_memory_mib"], inp["overhead_mib"]
    n0, n1 = d["without_ksm"]["max"], d["with_ksm"]["max"]
    top = max(f["counts"])
    hi = max(n0, n1 if n1 is not None else 2 * top, top) * 1.15 + 1
    n = np.linspace(1, hi, 400)
    saved = (f["b"] + f["a"] * (n - 1)) * m
    cpu = d["cpu_fits"].get("cpu_pct")

    def build() -> Figure:
        rows = 2 if cpu else 1
        fig = Figure(figsize=(charts.WIDTH, 4.6 * rows), layout="constrained")
        axes = fig.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
        ax = axes[0]
        gib = 1024.0
        ax.plot(n, n * (m + o) / gib, color="#c62828", label="needed without KSM")
        ax.plot(n, (n * (m + o) - saved) / gib, color="#2e7d32", label="needed with KSM (fit)")
        ax.axhline(
            inp["usable_mib"] / gib,
            color="#212121",
            ls="--",
            lw=1.2,
            label=f"host memory less headroom ({inp['headroom']})",
        )
        ax.axhline(
            inp["host_memory_mib"] / gib, color="#757575", ls=":", lw=1.0, label="host memory"
        )
        scale = m / np.array([p_["guest_bytes"] / MIB for p_ in d["points"]])
        xs = np.array([p_["n"] for p_ in d["points"]], float)
        ys = (xs * (m + o) - np.array([p_["saved_mib"] for p_ in d["points"]]) * scale) / gib
        ax.plot(xs, ys, "o", color="#1b5e20", ms=6, label="measured (scaled to the guest size)")
        for x, colour, text in ((n0, "#c62828", "without"), (n1, "#2e7d32", "with KSM")):
            if x:
                ax.axvline(x, color=colour, ls=":", lw=1.2)
                ax.annotate(
                    f"{text}: {x}",
                    (x, inp["usable_mib"] / gib),
                    xytext=(4, 6),
                    textcoords="offset points",
                    color=colour,
                )
        for a in axes:
            a.axvspan(top, hi, color="#9e9e9e", alpha=0.08, lw=0)
        # x in data, y in axes fractions: stays at the top whatever the y limits become
        ax.text(
            top,
            0.97,
            "  extrapolated",
            va="top",
            color="#616161",
            transform=ax.get_xaxis_transform(),
        )
        # Up to a little past the host: where the lines cross the usable memory is the point.
        ax.set_ylim(0, max(inp["host_memory_mib"] * 1.3 / gib, float(ys.max()) * 1.1))
        ax.set_ylabel("memory needed (GiB)")
        ax.yaxis.set_major_formatter(FuncFormatter(plots.thousands))
        ax.set_title(f"{d['noun'].capitalize()} that fit ({d['config']})")
        ax.legend(loc="center left", fontsize=8)
        if cpu:
            ax2 = axes[1]
            cp = [(p_["n"], p_["cpu_pct"]) for p_ in d["points"] if p_["cpu_pct"] is not None]
            ax2.plot([c[0] for c in cp], [c[1] for c in cp], "o", color="#c62828", label="measured")
            # ksmd is one thread: the fit is drawn up to 100% of one CPU, where it tops out.
            # A share falling with N is drawn as the measured mean, as the projection uses.
            if cpu["c1"] < 0:
                fitted = np.full_like(n, float(np.mean([c[1] for c in cp])), dtype=float)
                label = "mean measured (no growth with N)"
            else:
                fitted = np.clip(cpu["c0"] + cpu["c1"] * n, 0.0, 100.0)
                label = "fit (ksmd tops out at 100%)"
            ax2.plot(n, fitted, color="#c62828", lw=1.2, label=label)
            at = d["with_ksm"]["ksmd_cpu_pct"]
            if n1 and at is not None:
                ax2.plot([n1], [at], "s", color="#2e7d32", label=f"at {n1} with KSM")
            ax2.set_ylim(bottom=0)
            ax2.set_ylabel("ksmd, % of one CPU")
            ax2.legend(loc="upper left", fontsize=8)
        axes[-1].set_xlabel(f"number of {d['noun']} (N)")
        axes[-1].set_xlim(0, hi)
        axes[-1].xaxis.set_major_formatter(FuncFormatter(plots.thousands))
        return fig

    return plots.render(f"plan{i}", "Density plan", build)


def parse_size_arg(text: str | None, flag: str) -> int | None:
    if text is None:
        return None
    try:
        return parse_size(text)
    except ValueError as e:
        raise UserError(f"{flag}: {e}") from None

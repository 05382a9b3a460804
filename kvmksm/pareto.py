"""Cost against benefit for a knob sweep: memory saved against the ksmd CPU spent to get it.

A configuration is on the Pareto front when no other one saves at least as much for at most
as much CPU (and is better in one of the two). Off the front, some other setting of the knobs
does as well for less or better for the same: the front is where to pick tunables from.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvmksm.compare import Group

COST = "ksmd_cpu_to_plateau_s"
BENEFIT = "plateau_saved_mib"


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For (cost, benefit) points, which are not dominated (lower cost and higher benefit win)."""
    flags = []
    for i, (c, b) in enumerate(points):
        dominated = any(
            c2 <= c and b2 >= b and (c2 < c or b2 > b)
            for j, (c2, b2) in enumerate(points)
            if j != i
        )
        flags.append(not dominated)
    return flags


def cost_benefit(groups: Sequence[Group]) -> dict[str, Any] | None:
    """Each group's mean cost and benefit, with the front marked; None without both."""
    from kvmksm.compare import mean_sd

    rows = []
    for g in groups:
        x, x_sd = mean_sd(g.values(COST))
        y, y_sd = mean_sd(g.values(BENEFIT))
        if x is None or y is None:
            continue
        rows.append({"group": g.id, "label": g.label, "x": x, "x_sd": x_sd, "y": y, "y_sd": y_sd})
    if len(rows) < 2:
        return None
    for row, front in zip(rows, pareto_front([(r["x"], r["y"]) for r in rows]), strict=True):
        row["front"] = front
        row["mib_per_cpu_s"] = row["y"] / row["x"] if row["x"] else None
    return {
        "x": COST,
        "x_label": "ksmd CPU seconds from KSM on to the savings",
        "y": BENEFIT,
        "y_label": "memory saved (MiB)",
        "points": rows,
    }


def pareto_chart(data: dict[str, Any]) -> str:
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    from kvmksm import charts, plots

    pts = data["points"]

    def build() -> Figure:
        fig = Figure(figsize=(charts.WIDTH * 0.75, 5.0), layout="constrained")
        ax = fig.subplots()
        front = sorted((p for p in pts if p["front"]), key=lambda p: p["x"])
        ax.plot(
            [p["x"] for p in front],
            [p["y"] for p in front],
            color="#2e7d32",
            lw=1.4,
            ls="--",
            label="Pareto front",
            zorder=2,
        )
        for i, p in enumerate(pts):
            colour = plots.colour(i)
            ax.errorbar(
                p["x"],
                p["y"],
                xerr=p["x_sd"] or 0,
                yerr=p["y_sd"] or 0,
                fmt="o",
                ms=8,
                color=colour,
                mfc=colour if p["front"] else "white",
                mew=1.6,
                capsize=3,
                zorder=3,
                label=f"{p['group']}: {p['label']}" + (" (front)" if p["front"] else ""),
            )
            ax.annotate(p["group"], (p["x"], p["y"]), xytext=(6, 6), textcoords="offset points")
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.set_xlabel(data["x_label"] + " (lower is better)")
        ax.set_ylabel(data["y_label"] + " (higher is better)")
        ax.yaxis.set_major_formatter(FuncFormatter(plots.thousands))
        ax.set_title("Cost against benefit: filled points are on the Pareto front")
        ax.legend(loc="lower right", fontsize=8)
        return fig

    return plots.render("pareto", "Memory saved against ksmd CPU", build)

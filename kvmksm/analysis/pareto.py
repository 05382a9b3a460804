"""Cost against benefit for a knob sweep: memory saved against the ksmd CPU spent to get it.

A configuration is on the Pareto front when no other one saves at least as much for at most
as much CPU (and is better in one of the two). Off the front, some other setting of the knobs
does as well for less or better for the same: the front is where to pick tunables from.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kvmksm.analysis.grouping import SOFT, Group, short_name, show
from kvmksm.analysis.stats import mean_sd

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
    """Each group's mean cost and benefit, the front marked among groups that ran the same
    workload on the same kernel and host (only their knobs differ); None when no such set
    has two groups with both figures."""

    def same_but_knobs(g: Group) -> tuple[tuple[str, str], ...]:
        return tuple(
            sorted(
                (k, v) for k, v in g.config.items() if not k.startswith("knobs.") and k not in SOFT
            )
        )

    sets: dict[Any, list[dict[str, Any]]] = {}
    for g in groups:
        x, x_sd = mean_sd(g.values(COST))
        y, y_sd = mean_sd(g.values(BENEFIT))
        if x is None or y is None:
            continue
        row = {"group": g.id, "label": g.label, "x": x, "x_sd": x_sd, "y": y, "y_sd": y_sd}
        row["mib_per_cpu_s"] = y / x if x else None
        sets.setdefault(same_but_knobs(g), []).append(row)
    sets = {k: rows for k, rows in sets.items() if len(rows) >= 2}
    if not sets:
        return None
    varying = [
        name for name in dict(next(iter(sets))).keys() if len({dict(k).get(name) for k in sets}) > 1
    ]
    points = []
    for i, (key, rows) in enumerate(sets.items()):
        fields = dict(key)
        label = ", ".join(f"{short_name(n)}={show(n, str(fields.get(n)))}" for n in varying[:3])
        for row, front in zip(rows, pareto_front([(r["x"], r["y"]) for r in rows]), strict=True):
            points.append(row | {"front": front, "set": i, "set_label": label or "all"})
    return {
        "x": COST,
        "x_label": "ksmd CPU seconds from KSM on to the savings",
        "y": BENEFIT,
        "y_label": "memory saved (MiB)",
        # Unlike compare's per-run "saved per ksmd CPU second" (a mean of each run's ratio),
        # the front's is the ratio of the group's means.
        "mib_per_cpu_s_label": "MiB per ksmd CPU s (ratio of means)",
        "mib_per_cpu_s_aggregation": "ratio of means: the group's mean memory saved / its mean "
        "ksmd CPU seconds to get there",
        "sets": len(sets),
        "points": points,
    }

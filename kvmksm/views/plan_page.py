"""plan.html: per configuration, the fit with its intervals, the projection, any check runs and
the chart of what was measured and how far it was projected."""

from __future__ import annotations

from pathlib import Path

from kvmksm.commands.plan import MODEL, DensityPlan, plan_title
from kvmksm.views.html import write_page
from kvmksm.views.plan_chart import plan_chart


def plan_page(plans: list[DensityPlan], path: Path) -> Path:
    """plan.html: per configuration the fit, the projection and the chart (a plan that refused
    to project shows what was measured and why)."""
    items = [
        {"data": p.data, "svg": None if p.refused else plan_chart(p, i)}
        for i, p in enumerate(plans)
    ]
    return write_page(path, "plan.html.j2", plans=items, model=MODEL, title=plan_title(plans))

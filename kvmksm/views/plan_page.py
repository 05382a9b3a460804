"""plan.html: per configuration, the fit, the projection and the chart of memory needed."""

from __future__ import annotations

from pathlib import Path

from kvmksm.commands.plan import MODEL, DensityPlan, plan_title
from kvmksm.views import charts
from kvmksm.views.html import write_page


def plan_page(plans: list[DensityPlan], path: Path) -> Path:
    """plan.html: per configuration the fit, the projection and the chart."""
    items = [{"data": p.data, "svg": charts.plan_chart(p.data, i)} for i, p in enumerate(plans)]
    return write_page(path, "plan.html.j2", plans=items, model=MODEL, title=plan_title(plans))

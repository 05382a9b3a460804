"""The summaries of an experiment folder: compare.html of every point, and plan.html when the
size of the workload (clones or count) was swept."""

from __future__ import annotations

from pathlib import Path

from kvmksm.commands.compare import collect, compare
from kvmksm.commands.plan import plan
from kvmksm.results import experiment as folder
from kvmksm.scenario.model import SIZE_AXES
from kvmksm.views.compare_page import compare_page
from kvmksm.views.plan_page import plan_page


def write_summaries(exp_dir: Path) -> list[Path]:
    """compare.html of all points, and plan.html for a sweep of the guest count."""
    runs = collect([exp_dir])
    if not runs:
        return []
    written = [compare_page(compare(runs), exp_dir / "compare.html")]
    index = folder.load_index(exp_dir)
    size_axis, _ = SIZE_AXES.get(index.scenario.workload.type, ("", 0))
    if len(index.axes.get(size_axis, [])) >= 2:
        written.append(plan_page(plan(runs), exp_dir / "plan.html"))
    return written

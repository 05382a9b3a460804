"""compare.html: the groups, what differs, the metrics with their verdicts, every run's curve
aligned at KSM on, and the Pareto front of a knob sweep."""

from __future__ import annotations

import os
from pathlib import Path

from kvmksm.analysis.stats import MIN_REPEATS
from kvmksm.commands.compare import AGGREGATION, Comparison, title
from kvmksm.views import charts
from kvmksm.views.html import write_page


def compare_page(cmp: Comparison, path: Path) -> Path:
    """compare.html: groups, what differs, metrics with verdicts, curves, the Pareto front."""
    path = Path(path)
    here = path.parent.resolve()
    groups = []
    for g in cmp.groups:
        rows = []
        for r in g.runs:
            report = r.record.dir / "report.html"
            meta = r.record.meta
            rows.append(
                {
                    "name": r.name,
                    "status": r.status,
                    "started": meta.started,
                    "kernel": meta.host.kernel_release,
                    "host": meta.host.hostname,
                    "link": os.path.relpath(report.resolve(), here) if report.exists() else None,
                }
            )
        groups.append({"id": g.id, "label": g.label, "n": len(g.runs), "runs": rows})
    return write_page(
        path,
        "compare.html.j2",
        title=title(cmp),
        groups=groups,
        differences=cmp.differences,
        warnings=cmp.warnings,
        metrics=cmp.metrics,
        ids=[g.id for g in cmp.groups],
        base=cmp.base.id,
        pareto=cmp.pareto,
        alpha=cmp.alpha,
        aggregation=AGGREGATION,
        min_repeats=MIN_REPEATS,
        overlay=charts.overlay_chart(cmp.groups),
        pareto_svg=charts.pareto_chart(cmp.pareto) if cmp.pareto else None,
        sources=cmp.sources,
        colours={g.id: charts.palette(i) for i, g in enumerate(cmp.groups)},
    )

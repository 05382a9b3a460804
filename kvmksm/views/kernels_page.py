"""kernels.html: kernels side by side (kvmksm.commands.kernels): the machines they ran on
and which of their timings are comparable, which differences are real, the figures, the
merge curves overlaid, the exact counts and what else differs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from kvmksm.analysis.stats import MIN_REPEATS
from kvmksm.commands.compare import Comparison, collect, compare, title
from kvmksm.commands.kernels import KernelComparison, kernel_comparison
from kvmksm.views import charts
from kvmksm.views.html import write_page


def kernels_page(kc: KernelComparison, path: Path) -> Path:
    cmp: Comparison = kc.cmp
    return write_page(
        Path(path),
        "kernels.html.j2",
        title=title(cmp).replace("configuration(s) compared", "kernel group(s)"),
        warnings=cmp.warnings,
        kernels=kc.kernels,
        classes=kc.classes,
        statements=kc.statements,
        figures=kc.figures,
        counts=kc.counts,
        differences=cmp.differences,
        base=cmp.base.id,
        alpha=cmp.alpha,
        min_repeats=MIN_REPEATS,
        overlay=charts.overlay_chart(cmp.groups),
        colours={g.id: charts.palette(i) for i, g in enumerate(cmp.groups)},
    )


def write_kernels_page(paths: Sequence[str | Path], out: Path) -> Path:
    return kernels_page(kernel_comparison(compare(collect(paths))), out)

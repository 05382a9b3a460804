"""The chart of a density plan: what was measured, and how far it was projected.

Two columns. Left, the measured counts at their own scale: each run, the fit and its 95%
prediction band, any check run, and ksmd's CPU below. Right, the projection out to the most
guests that fit: memory needed with and without KSM, the band around it, the memory limit.
A projection can reach hundreds of thousands of guests from a sweep of 1 to 8; drawn on one
linear axis the measured runs would sit in the first pixel, and a log axis would bend the
model's straight lines into curves that are hard to read against the limit. Two panels keep
both straight and both readable.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from kvmksm.analysis.windows import MIB
from kvmksm.commands.plan import DensityPlan
from kvmksm.views.charts import _count_axis, render, thousands

GIB = 1024.0
WITH, WITHOUT, BAND, CHECK = "#2e7d32", "#c62828", "#a5d6a7", "#6a1b9a"
CPU = "#c62828"


def plan_chart(p: DensityPlan, i: int = 0) -> str:
    """Measured range (left) and projection (right); ksmd's CPU below when it was sampled."""
    d = p.data
    f, inp = d["fit"], d["inputs"]
    m, o = inp["guest_memory_mib"], inp["overhead_mib"]
    n0, n1 = d["without_ksm"]["max"], d["with_ksm"]["max"]
    most = (d["with_ksm"]["max_interval"] or [None, None])[1]
    top = max(f["counts"])
    checks = d["checks"]
    near = max([top, *(c["n"] for c in checks)]) * 1.25 + 0.5
    far = max(n0, n1 if n1 is not None else 2 * top, most or 0, top) * 1.15 + 1
    sizes = sorted({pt["guest_bytes"] for pt in d["points"]})
    # The measured panel shows savings at the measured size when there is one; else all
    # scaled to the planned size.
    shown = sizes[0] if len(sizes) == 1 else int(m * MIB)
    shown_mib = shown / MIB
    cpu = p.cpu_lines.get("cpu_pct")

    def build() -> Figure:
        rows = 2 if cpu is not None else 1
        fig = Figure(figsize=(11.0, 4.2 * rows), layout="constrained")
        axes = fig.subplots(rows, 2, squeeze=False, width_ratios=[1, 1.35])
        left, right = axes[0]
        _measured(left)
        _projection(right)
        if cpu is not None:
            _cpu(axes[1][0], near, measured=True)
            _cpu(axes[1][1], far, measured=False)
        for col, hi in ((0, near), (1, far)):
            axes[-1][col].set_xlabel(f"number of {d['noun']} (N)")
            for ax in axes[:, col]:
                ax.set_xlim(0, hi)
                _count_axis(ax.xaxis)
        return fig

    def _measured(ax: Any) -> None:
        n = np.linspace(1, near, 200)
        mean, lo, hi = p.saved_band(n, shown)
        if not np.isnan(lo).all():
            ax.fill_between(n, lo, hi, color=BAND, alpha=0.6, lw=0, label="95% prediction band")
        ax.plot(n, mean, color=WITH, label="fit")
        xs = np.array([pt["n"] for pt in d["points"]], float)
        ys = np.array([pt["share"] for pt in d["points"]]) * shown_mib
        ax.plot(xs, ys, "o", color="#1b5e20", ms=5, label="measured runs")
        for c in checks:
            row = next(r for r in c["figures"] if r["key"] == "saved_mib")
            if row["measured"] is not None:
                scale = shown_mib / c["guest_mib"]
                ax.plot(
                    [c["n"]], [row["measured"] * scale], "D", color=CHECK, ms=7, label="check run"
                )
        ax.set_ylim(bottom=0)
        ax.set_ylabel(f"memory saved (MiB, {shown_mib:,.0f} MiB {d['noun']})")
        ax.yaxis.set_major_formatter(FuncFormatter(thousands))
        ax.set_title("Measured: savings against N")
        ax.legend(loc="upper left", fontsize=8)

    def _projection(ax: Any) -> None:
        n = np.linspace(1, far, 400)
        mean, lo, hi = p.saved_band(n)
        need = n * (m + o)
        ax.plot(n, need / GIB, color=WITHOUT, label="needed without KSM")
        if not np.isnan(lo).all():
            ax.fill_between(
                n, (need - hi) / GIB, (need - lo) / GIB, color=BAND, alpha=0.6, lw=0,
                label="with KSM, 95% prediction band",
            )  # fmt: skip
        ax.plot(n, (need - mean) / GIB, color=WITH, label="needed with KSM (fit)")
        ax.axhline(
            inp["usable_mib"] / GIB, color="#212121", ls="--", lw=1.2,
            label=f"host memory less headroom ({inp['headroom']})",
        )  # fmt: skip
        ax.axhline(inp["host_memory_mib"] / GIB, color="#757575", ls=":", lw=1.0, label="host")
        for x, colour, text in ((n0, WITHOUT, "without"), (n1, WITH, "with KSM")):
            if x:
                ax.axvline(x, color=colour, ls=":", lw=1.2)
                ax.annotate(
                    f"{text}: {x:,}", (x, inp["usable_mib"] / GIB), xytext=(4, 6),
                    textcoords="offset points", color=colour,
                )  # fmt: skip
        ax.axvspan(top, far, color="#9e9e9e", alpha=0.08, lw=0)
        ax.text(top, 0.02, "  extrapolated", va="bottom", color="#616161",
                transform=ax.get_xaxis_transform())  # fmt: skip
        ax.set_ylim(0, inp["host_memory_mib"] * 1.3 / GIB)
        ax.set_ylabel(f"memory needed (GiB, {m:,.0f} MiB {d['noun']})")
        ax.yaxis.set_major_formatter(FuncFormatter(thousands))
        ax.set_title(f"Projection: {d['noun']} that fit ({d['config']})")
        # The lines rise from the origin: the lower right is where they are not.
        ax.legend(loc="lower right", fontsize=8)

    def _cpu(ax: Any, hi: float, measured: bool) -> None:
        assert cpu is not None
        n = np.linspace(1, hi, 300)
        mean, lo, up = cpu.predict(n)
        if not np.isnan(lo).all():
            ax.fill_between(
                n, np.clip(lo, 0, 100), np.clip(up, 0, 100), color="#ef9a9a", alpha=0.45, lw=0,
                label="95% prediction band",
            )  # fmt: skip
        # ksmd is one thread: the fit is drawn up to 100% of one CPU, where it tops out.
        label = (
            "mean measured (no growth with N)"
            if d["cpu_fits"]["cpu_pct"]["mean_only"]
            else "fit (ksmd tops out at 100%)"
        )
        ax.plot(n, np.clip(mean, 0, 100), color=CPU, lw=1.2, label=label)
        cp = [(pt["n"], pt["cpu_pct"]) for pt in d["points"] if pt["cpu_pct"] is not None]
        ax.plot([c[0] for c in cp], [c[1] for c in cp], "o", color=CPU, ms=4, label="measured")
        if measured:
            for c in checks:
                row = next(r for r in c["figures"] if r["key"] == "cpu_pct")
                if row["measured"] is not None:
                    ax.plot([c["n"]], [row["measured"]], "D", color=CHECK, ms=7, label="check")
        else:
            at = d["with_ksm"]["ksmd_cpu_pct"]
            if n1 and at is not None:
                ax.plot([n1], [at], "s", color=WITH, label=f"at {n1:,} with KSM")
        ax.set_ylim(bottom=0)
        ax.set_ylabel("ksmd, % of one CPU")
        ax.legend(loc="upper left", fontsize=8)

    return render(f"plan{i}", "Density plan", build)

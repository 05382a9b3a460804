"""The time charts are laid out at fixed margins (charts._place), not by matplotlib's
constrained layout: every label must still sit inside the figure and clear of the others."""

from __future__ import annotations

import itertools

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Text

from kvmksm.views import charts
from kvmksm.views.report import write_report

from .recordgen import ltp_record, vm_record


def drawn_figures(monkeypatch, tmp_path, make) -> dict[str, Figure]:
    figures: dict[str, Figure] = {}
    real = charts.to_svg

    def keep(fig: Figure, name: str, title: str) -> str:
        figures[name] = fig
        return real(fig, name, title)

    monkeypatch.setattr(charts, "to_svg", keep)
    write_report(make(tmp_path))
    return figures


def texts(fig: Figure, track: bool) -> list[Text]:
    """The texts drawn: titles, axis labels, the tick labels in view, texts placed on the
    axes; those of the event track (the top axes) only when `track`."""
    top = fig.axes[0]
    out: list[Text] = []
    for ax in fig.axes + [c for a in fig.axes for c in a.child_axes]:
        if ax is top and not track:
            continue
        out += [ax.title, ax._left_title, ax._right_title, ax.xaxis.label, ax.yaxis.label]
        out += in_view(ax.xaxis, 0) + in_view(ax.yaxis, 1)
        out += ax.texts
    return [t for t in out if t.get_visible() and t.get_text().strip()]


def in_view(axis, coord: int) -> list[Text]:
    """The tick labels matplotlib draws: the locator may give one beyond the view."""
    if not axis.get_visible():  # a twin's shared x axis
        return []
    lo, hi = sorted(axis.get_view_interval())
    slack = (hi - lo) * 1e-6
    labels = axis.get_majorticklabels()
    return [t for t in labels if lo - slack <= t.get_position()[coord] <= hi + slack]


@pytest.mark.parametrize("make", [vm_record, ltp_record], ids=["vms", "ltp"])
def test_labels_inside_and_apart(monkeypatch, tmp_path, make):
    figures = drawn_figures(monkeypatch, tmp_path, make)
    assert {"merge", "cost", "memory"} <= set(figures)
    for name, fig in figures.items():
        if name in ("sharing", "pareto", "overlay"):
            continue  # not a time chart: matplotlib's layout engine places these
        renderer = FigureCanvasAgg(fig).get_renderer()
        fig.draw(renderer)
        whole = fig.bbox
        for t in texts(fig, track=True):
            box = t.get_window_extent(renderer)
            assert whole.x0 - 1 <= box.x0 and box.x1 <= whole.x1 + 1, (name, t.get_text())
            assert whole.y0 - 1 <= box.y0 and box.y1 <= whole.y1 + 1, (name, t.get_text())
        boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in texts(fig, track=False)]
        legend = [lg.get_window_extent(renderer) for lg in fig.legends]
        for (a, box_a), (b, box_b) in itertools.combinations(boxes, 2):
            assert not box_a.overlaps(box_b), f"{name}: {a!r} overlaps {b!r}"
        for text, box in boxes:
            if any(box.overlaps(lb) for lb in legend):
                # the legend's own entries lie inside it; nothing else may
                assert any(text == t.get_text() for lg in fig.legends for t in lg.get_texts())
        for ax in fig.axes[1:]:
            area = ax.get_window_extent(renderer)
            for lb in legend:
                assert not area.overlaps(lb), f"{name}: the legend covers a panel"

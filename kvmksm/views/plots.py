"""Shared plumbing for the experiment pages (compare, plan): charts rendered the way
charts.py renders a run's, and the Jinja2 environment with the report's number formats."""

from __future__ import annotations

from collections.abc import Callable

import matplotlib
from matplotlib.figure import Figure

from kvmksm.views import charts


def render(name: str, title: str, build: Callable[[], Figure]) -> str:
    """An inline <svg> (ids prefixed by `name`) of the figure `build` makes."""
    with matplotlib.rc_context(charts.RC):
        fig = build()
    return charts.to_svg(fig, name, title)


def thousands(v: float, _pos: object = None) -> str:
    return f"{v:,.0f}" if abs(v) >= 10 or v == int(v) else f"{v:,.1f}"


def colour(i: int) -> str:
    return charts.GUEST_COLOURS[i % len(charts.GUEST_COLOURS)]

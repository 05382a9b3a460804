"""Charts of a run record as inline SVG strings (matplotlib, no pyplot, no global state).

Long series are reduced before plotting: a line keeps each bucket's minimum and maximum, so
a one-second spike in a day-long record still shows; stacked areas use bucket means. The full
data stays in the record's CSV files.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter

from kvmksm.analysis.grouping import Group
from kvmksm.analysis.metrics import aligned_curve
from kvmksm.analysis.per_guest import VmAnalysis, row_sums
from kvmksm.analysis.windows import MIB, Windows, column, saved_pages
from kvmksm.results.meta import Check, Event

# Figures are built with Figure() and saved straight to SVG, never shown; Agg keeps a caller's
# later pyplot import from looking for a display.
matplotlib.use("Agg")

MAX_POINTS = 2000  # per line: about two per horizontal pixel of a full-width chart
STACK_BUCKETS = 600
TOP_GUESTS = 10  # guests drawn one by one in the stack; the rest are summed as "others"
WIDTH = 11.0  # inches; the page scales the SVG to its width

RC = {
    "svg.fonttype": "none",  # text stays text: smaller files, the page's own font
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans", "Liberation Sans", "Arial", "Helvetica"],
    "font.size": 10,
    "axes.titlesize": 12,
    "axes.titleweight": "bold",
    "axes.titlelocation": "left",
    "axes.grid": True,
    "grid.color": "#e3e3e3",
    "grid.linewidth": 0.7,
    "axes.spines.top": False,
    "axes.edgecolor": "#888888",
    "legend.frameon": False,
    "legend.fontsize": 9,
    "lines.linewidth": 1.6,
}
SERIES = {  # KSM counters: colour and what the legend says
    "pages_sharing": ("#2e7d32", "pages_sharing (mappings saved)"),
    "pages_shared": ("#1565c0", "pages_shared (KSM pages kept)"),
    "pages_unshared": ("#ef6c00", "pages_unshared (unique, rechecked)"),
    "pages_volatile": ("#8e24aa", "pages_volatile (changing too fast)"),
    "ksm_zero_pages": ("#6d4c41", "ksm_zero_pages (mapped to the zero page)"),
}
EVENTS = {  # event kind: legend text, colour, line style
    "ksm_off": ("KSM off", "#757575", "--"),
    "all_up": ("guests up", "#1565c0", "-"),
    "settle_done": ("settled", "#00838f", ":"),
    "ksm_on": ("KSM on", "#2e7d32", "-"),
    "round_filled": ("round filled", "#ef6c00", ":"),
    "steady": ("steady", "#6a1b9a", "-"),
    "unmerge": ("unmerge", "#c62828", "-"),
    "unmerge_done": ("unmerge done", "#c62828", ":"),
    "stop": ("KSM stop", "#212121", ":"),
    "interrupted": ("interrupted", "#b71c1c", "--"),
    "guest_lost": ("guest lost", "#b71c1c", "-"),
    "error": ("error", "#b71c1c", "--"),
}
MEMINFO = {  # /proc/meminfo lines charted, and their colours
    "MemTotal": "#212121",
    "MemAvailable": "#2e7d32",
    "MemFree": "#66bb6a",
    "AnonPages": "#1565c0",
    "AnonHugePages": "#64b5f6",
    "Cached": "#ef6c00",
    "Shmem": "#8e24aa",
}
SAVED = "#a5d6a7"
PLATEAU = "#6a1b9a"
GUEST_COLOURS = [
    "#4e79a7",
    "#f28e2b",
    "#59a14f",
    "#e15759",
    "#76b7b2",
    "#edc948",
    "#b07aa1",
    "#ff9da7",
    "#9c755f",
    "#86bcb6",
]


# -- data reduction -------------------------------------------------------------------
def reduce_minmax(x: np.ndarray, y: np.ndarray, max_points: int = MAX_POINTS):
    """At most `max_points` points keeping each bucket's min and max in time order."""
    n = len(x)
    if n <= max_points:
        return x, y
    buckets = max(1, max_points // 2)
    size = -(-n // buckets)
    pad = buckets * size - n
    yy = np.concatenate([y.astype(float), np.full(pad, np.nan)]).reshape(buckets, size)
    lo = np.where(np.isnan(yy), np.inf, yy).argmin(axis=1)
    hi = np.where(np.isnan(yy), -np.inf, yy).argmax(axis=1)
    base = np.arange(buckets) * size
    idx = np.unique(np.concatenate([base + lo, base + hi, [0, n - 1]]))
    idx = idx[idx < n]
    return x[idx], y[idx]


def reduce_mean(x: np.ndarray, ys: np.ndarray, buckets: int = STACK_BUCKETS):
    """Bucket means of the rows of `ys` (time x series), for stacked areas."""
    n = len(x)
    if n <= buckets:
        return x, ys
    size = -(-n // buckets)
    pad = buckets * size - n
    xx = np.concatenate([x, np.full(pad, np.nan)]).reshape(buckets, size)
    yy = np.concatenate([ys, np.full((pad, ys.shape[1]), np.nan)]).reshape(buckets, size, -1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN bucket is simply NaN
        return np.nanmean(xx, axis=1), np.nanmean(yy, axis=1)


# -- helpers --------------------------------------------------------------------------
def thousands(v: float, _pos: object = None) -> str:
    """Axis tick labels with thousands separators."""
    return f"{v:,.0f}" if abs(v) >= 10 or v == int(v) else f"{v:,.1f}"


def palette(i: int) -> str:
    """The i-th colour of the palette every chart shares (guests, groups, plans)."""
    return GUEST_COLOURS[i % len(GUEST_COLOURS)]


def time_scale(t_max: float) -> tuple[float, str]:
    if t_max <= 900:
        return 1.0, "s"
    if t_max <= 3 * 3600:
        return 60.0, "min"
    return 3600.0, "h"


def _count_axis(axis: Any) -> None:
    """Tick labels with thousands separators, or in millions when the axis goes past 2M."""

    def fmt(v: float, _pos: object = None) -> str:
        if axis.get_view_interval().max() >= 2e6:
            return f"{v / 1e6:,.10g}M" if v else "0"
        return f"{v:,.0f}" if abs(v) >= 10 or v == int(v) else f"{v:,.1f}"

    axis.set_major_formatter(FuncFormatter(fmt))


EVENT_PRIORITY = ("ksm_on", "steady", "unmerge", "all_up", "round_filled", "error", "interrupted")
TRACK_ROWS = 4


@dataclass
class Frame:
    """A figure with an event track on top and one or more panels sharing the time axis."""

    fig: Figure
    track: Axes
    panels: list[Axes]
    scale: float


def _frame(
    title: str,
    t: np.ndarray,
    events: Sequence[Event],
    w: Windows | None,
    height: float,
    rows: int = 1,
) -> Frame:
    # No layout engine: _legend places everything at fixed margins (see _place).
    fig = Figure(figsize=(WIDTH, height))
    ratios = [0.22 * TRACK_ROWS] + [3.0] * rows
    axes = fig.subplots(len(ratios), 1, sharex=True, height_ratios=ratios)
    track, panels = axes[0], list(axes[1:])
    scale, unit = time_scale(float(t.max()) if len(t) else 0.0)
    lo, hi = (float(t.min()) / scale, float(t.max()) / scale) if len(t) else (0.0, 1.0)
    panels[-1].set_xlim(lo, hi if hi > lo else lo + 1)
    panels[-1].set_xlabel(f"time since run start ({unit})")
    for ax in panels:
        _event_lines(ax, events, scale)
        if w is not None and w.plateau_start is not None and w.plateau_end is not None:
            ax.axvspan(w.plateau_start / scale, w.plateau_end / scale, color=PLATEAU, alpha=0.07)
    _event_track(track, events, scale, (lo, hi), w)
    track.set_title(title)
    return Frame(fig, track, panels, scale)


def _legend(frame: Frame, handles: list[Any]) -> Figure:
    handles = _unique(handles)
    longest = max((len(h.get_label()) for h in handles), default=1)
    # Columns that fit the figure's width: about 5.4 pt a character plus the handle.
    ncol = max(1, min(4, len(handles), int(WIDTH * 72 * 0.95 // (longest * 5.4 + 45))))
    height = frame.fig.get_size_inches()[1]
    frame.fig.legend(
        handles=handles, loc="lower center", bbox_to_anchor=(0.5, 0.04 / height), ncol=ncol
    )
    _place(frame, legend_rows=-(-len(handles) // ncol))
    return frame.fig


# Margins of the time charts, in inches.
_CHAR = 0.085  # a tick label's character at 10 pt (DejaVu Sans digits are 0.64 em)
_LEGEND_ROW = 0.25
_PANEL_TITLE = 0.34  # the gap above a lower panel that has a title of its own
_TRACK_GAP = 0.08  # between the event track and the panel below it


def _place(frame: Frame, legend_rows: int) -> None:
    """Fixed margins, worked out from the tick labels and the legend's rows. matplotlib's
    constrained layout finds them by measuring every artist, which took 0.24 s of the 0.53 s
    that the three charts of a ksm03 report cost (issue 14: the whole command in 3 s)."""
    fig = frame.fig
    w, h = fig.get_size_inches()
    labels = max((_label_chars(ax.yaxis) for ax in frame.panels), default=4)
    left = 0.56 + _CHAR * labels
    right = 0.95 if _has_right_axis(frame) else 0.3
    top = 0.42
    bottom = 0.62 + _LEGEND_ROW * legend_rows
    titled = any(ax.get_title(loc) for ax in frame.panels[1:] for loc in ("left", "center"))
    gap = _PANEL_TITLE if titled else _TRACK_GAP
    n = 1 + len(frame.panels)
    room = h - top - bottom
    fig.subplots_adjust(
        left=left / w,
        right=1 - right / w,
        top=1 - top / h,
        bottom=bottom / h,
        hspace=gap * n / max(room - gap * (n - 1), 0.1),
    )
    if gap > _TRACK_GAP:  # the track keeps its small gap above the first panel
        track = frame.track.get_position()
        bottom = frame.panels[0].get_position().y1 + _TRACK_GAP / h
        frame.track.set_position((track.x0, bottom, track.width, track.y1 - bottom))


def _label_chars(axis: Any) -> int:
    """The longest tick label of a y axis, in characters."""
    lo, hi = sorted(axis.get_view_interval())
    fmt = axis.get_major_formatter()
    ticks = [v for v in axis.get_majorticklocs() if lo <= v <= hi]
    return max((len(str(fmt(v, i))) for i, v in enumerate(ticks)), default=4)


def _has_right_axis(frame: Frame) -> bool:
    """A second y scale on the right: a secondary axis or a twin."""
    panels = frame.panels
    return any(ax.child_axes for ax in panels) or len(frame.fig.axes) > 1 + len(panels)


def _event_lines(ax: Axes, events: Sequence[Event], scale: float) -> None:
    """A vertical line at each event, all in one collection: an axvline each (Line2D and a
    data-limits update apiece) was a third of a ksm03 chart's time."""
    styled = [(e.t / scale, EVENTS[e.kind]) for e in events if e.kind in EVENTS]
    if not styled:
        return
    lines = LineCollection(
        [[(x, 0.0), (x, 1.0)] for x, _ in styled],
        colors=[style[1] for _, style in styled],
        linestyles=[style[2] for _, style in styled],
        linewidths=1.0,
        alpha=0.8,
        zorder=1,
        transform=ax.get_xaxis_transform(),  # x in data, y from the bottom to the top
    )
    ax.add_collection(lines, autolim=False)


def _event_label(e: Event) -> str:
    label = EVENTS[e.kind][0]
    if e.kind == "round_filled" and e.step is not None:
        return f"round {e.step + 1}"
    return label


def _event_track(
    ax: Axes,
    events: Sequence[Event],
    scale: float,
    xlim: tuple[float, float],
    w: Windows | None,
) -> None:
    """Event names above the chart, each on the first of a few rows where it fits, so that
    events close in time stack instead of overlapping; per-guest events are ticks."""
    ax.set_ylim(0, TRACK_ROWS)
    ax.set_yticks([])
    ax.tick_params(axis="x", which="both", bottom=False, labelbottom=False)
    ax.grid(False)
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    span = (xlim[1] - xlim[0]) or 1.0
    char = 0.0062 * 11.0 / WIDTH  # width of one label character, as a fraction of the axes
    # Only events inside the time axis: a label outside would stretch the figure's layout.
    inside = [e for e in events if xlim[0] <= e.t / scale <= xlim[1]]
    keyed = [e for e in inside if e.kind in EVENTS]
    rank = {k: i for i, k in enumerate(EVENT_PRIORITY)}
    keyed.sort(key=lambda e: (rank.get(e.kind, len(rank)), e.t))
    taken: list[list[tuple[float, float]]] = [[] for _ in range(TRACK_ROWS)]
    for e in keyed:
        label = _event_label(e)
        x = (e.t / scale - xlim[0]) / span
        width = char * len(label) + 0.012
        a, b = (x, x + width) if x + width <= 1.0 else (x - width, x)
        for row in range(TRACK_ROWS - 1, 0, -1):  # top row first; row 0 is for guest ticks
            if all(b < c or a > d for c, d in taken[row]):
                taken[row].append((a, b))
                colour = EVENTS[e.kind][1]
                ax.plot([e.t / scale] * 2, [row, row + 0.8], color=colour, lw=1.0)
                left = x + width <= 1.0
                ax.text(
                    e.t / scale + (0.004 if left else -0.004) * span,
                    row + 0.4,
                    label,
                    color=colour,
                    fontsize=8.5,
                    va="center",
                    ha="left" if left else "right",
                )
                break
    for kind, colour, y in (("guest_started", "#90a4ae", 0.25), ("guest_up", "#1565c0", 0.6)):
        ts = [e.t / scale for e in inside if e.kind == kind]
        if ts:
            ax.plot(ts, [y] * len(ts), ls="", marker="|", ms=6, color=colour)
            if kind == "guest_up":
                text = f"{len(ts)} guest{'s' * (len(ts) > 1)} up"
                ax.text(max(ts) + 0.006 * span, y, text, color=colour, fontsize=8, va="center")
    if w is not None and w.plateau_start is not None and w.plateau_end is not None:
        ax.axvspan(w.plateau_start / scale, w.plateau_end / scale, color=PLATEAU, alpha=0.07)


def to_svg(fig: Figure, name: str, title: str) -> str:
    """The figure as an <svg> element for inlining: ids prefixed by `name` so several charts
    share one page, no XML prolog or metadata, width from CSS."""
    buf = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": name, **RC}):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    svg = buf.getvalue()
    svg = svg[svg.index("<svg") :]
    svg = re.sub(r"<metadata>.*?</metadata>\s*", "", svg, flags=re.S)
    svg = re.sub(r' xmlns(:xlink)?="[^"]*"', "", svg, count=2)
    svg = re.sub(r'(<svg[^>]*?) width="[^"]*" height="[^"]*"', r"\1", svg, count=1)
    svg = svg.replace("<svg ", f'<svg class="chart" role="img" aria-label="{title}" ', 1)
    # matplotlib derives clip-path ids from unrounded float bounds, which can differ in the
    # last bit between builds: number the ids in order of appearance instead.
    ids: dict[str, str] = {}
    for m in re.finditer(r'\bid="([^"]+)"', svg):
        ids.setdefault(m.group(1), f"{name}-{len(ids) + 1}")
    return re.sub(
        r'(\bid="|xlink:href="#|url\(#)([^")]+)',
        lambda m: m.group(1) + ids.get(m.group(2), m.group(2)),
        svg,
    )


def warm_up() -> None:
    """Draw a small chart and throw it away. A process's first chart pays one-time costs
    (numpy's and matplotlib's lazy set-up, fonts) that a thread can pay while a run waits on
    the kernel. Not thread-safe with another draw: the
    caller joins that thread before drawing (kvmksm.cli)."""

    def build() -> Figure:
        t = np.array([0.0, 1.0, 2.0])
        frame = _frame("warm-up", t, [Event(t=1.0, kind="ksm_on")], None, 2.0)
        (line,) = frame.panels[0].plot(t, t, label="warm-up")
        return _legend(frame, [line])

    render("warm-up", "warm-up", build)


def render(name: str, title: str, build: Callable[[], Figure]) -> str:
    """An inline <svg> (ids prefixed by `name`) of the figure `build` makes."""
    with matplotlib.rc_context(RC):
        fig = build()
    return to_svg(fig, name, title)


# -- the charts -----------------------------------------------------------------------
def merge_chart(
    samples: pd.DataFrame,
    events: list[Event],
    w: Windows,
    ps: int,
    zoom: tuple[float, float] | None = None,
    checks: Sequence[Check] = (),
) -> str:
    """KSM counters in pages (left) and the same scale in MiB (right), saved memory shaded;
    with `zoom` (start, end in s), only that part of the run. A counter holds its value until
    the next sample, so the curves are steps; the exact checks a scenario states are marked
    where they were taken (filled: passed, a cross: failed)."""
    title = "Merge curves: KSM counters and memory saved"
    if zoom is not None:
        keep = samples["t"].between(*zoom)
        samples = samples[keep]
        events = [e for e in events if zoom[0] <= e.t <= zoom[1]]
        checks = [c for c in checks if c.t is not None and zoom[0] <= c.t <= zoom[1]]
        title = "Merge curves, zoomed on the rise after KSM went on"

    def build() -> Figure:
        t = samples["t"].to_numpy(float)
        f = _frame(title, t, events, w, 5.2)
        ax = f.panels[0]
        x = t / f.scale
        xs, ys = reduce_minmax(x, saved_pages(samples).to_numpy(float))
        ax.fill_between(xs, ys, color=SAVED, alpha=0.45, lw=0, zorder=0, step="post")
        handles: list[Any] = [Patch(color=SAVED, label="memory saved (pages_sharing + zero pages)")]
        for name, (colour, label) in SERIES.items():
            col = column(samples, name)
            if col is not None:
                xs, ys = reduce_minmax(x, col.to_numpy(float))
                handles += ax.plot(
                    xs, ys, color=colour, label=label, zorder=3, drawstyle="steps-post"
                )
        handles += _check_marks(ax, checks, f.scale)
        ax.set_ylim(bottom=0)
        _count_axis(ax.yaxis)
        ax.set_ylabel("pages")
        to_mib = (lambda p: p * ps / MIB, lambda m: m * MIB / ps)
        mib = ax.secondary_yaxis("right", functions=to_mib)
        mib.set_ylabel("MiB (pages x page size)")
        _count_axis(mib.yaxis)
        return _legend(f, handles + _plateau_handle(w))

    name = "merge" if zoom is None else "merge-zoom"
    return render(name, "Merge curves" + (", zoomed" if zoom else ""), build)


def _check_marks(ax: Axes, checks: Sequence[Check], scale: float) -> list[Any]:
    """The scenario's checks of the charted counters, at the time and value observed."""
    handles: list[Any] = []
    for outcome, marker in ((True, "o"), (False, "X")):
        for name, (colour, _) in SERIES.items():
            pts = [
                (c.t / scale, c.observed)
                for c in checks
                if c.passed is outcome
                and c.t is not None
                and isinstance(c.observed, int)
                and c.name.rsplit(": ", 1)[-1] == name
            ]
            if pts:
                ax.scatter(
                    [p[0] for p in pts],
                    [p[1] for p in pts],
                    marker=marker,
                    s=42,
                    facecolor=colour if outcome else "#c62828",
                    edgecolor="white",
                    zorder=5,
                )
        if any(c.passed is outcome and c.t is not None for c in checks):
            label = "check passed" if outcome else "check FAILED"
            handles.append(
                Line2D(
                    [],
                    [],
                    ls="",
                    marker=marker,
                    color="#616161" if outcome else "#c62828",
                    label=label,
                )
            )
    return handles


def zoom_window(samples: pd.DataFrame, w: Windows) -> tuple[float, float] | None:
    """Where to zoom when the rise to the plateau is too short to see on the whole run."""
    if samples.empty or w.t_on is None or w.plateau_start is None:
        return None
    t0, t1 = float(samples["t"].iloc[0]), float(samples["t"].iloc[-1])
    rise = max(w.plateau_start - w.t_on, 10.0)
    if rise > 0.2 * (t1 - t0):
        return None
    return max(t0, w.t_on - 0.25 * rise), min(t1, w.plateau_start + 0.75 * rise)


def cost_chart(
    samples: pd.DataFrame, events: list[Event], w: Windows, configured: float | None
) -> str | None:
    """ksmd CPU percent (with cumulative CPU seconds) and the scan rate against the configured."""
    cpu = column(samples, "ksmd_cpu")
    scanned = column(samples, "pages_scanned")
    if cpu is None and scanned is None:
        return None

    def build() -> Figure:
        t = samples["t"].to_numpy(float)
        rows = (cpu is not None) + (scanned is not None)
        title = "ksmd's cost"
        if cpu is not None:
            pct = cpu.fillna(0.0).to_numpy(float)
            cum = np.cumsum(pct / 100.0 * np.diff(t, prepend=t[:1]))
            title += f": {cum[-1]:,.1f} CPU seconds in all"
        f = _frame(title, t, events, w, 2.8 * rows + 1.4, rows)
        x = t / f.scale
        panels = iter(f.panels)
        handles: list[Any] = []
        if cpu is not None:
            ax = next(panels)
            xs, ys = reduce_minmax(x, pct)
            handles += ax.plot(xs, ys, color="#c62828", lw=1.2, label="ksmd CPU, % of one CPU")
            ax.set_ylabel("% of one CPU")
            ax.set_ylim(0, max(5.0, float(np.nanmax(pct)) * 1.1))
            right = ax.twinx()
            right.grid(False)
            xs, ys = reduce_minmax(x, cum)
            handles += right.plot(
                xs, ys, color="#424242", lw=1.3, ls="--", label="ksmd CPU seconds, cumulative"
            )
            right.set_ylabel("CPU seconds (dashed)")
            right.set_ylim(bottom=0)
        if scanned is not None:
            ax = next(panels)
            with np.errstate(divide="ignore", invalid="ignore"):  # repeated t: no rate
                dt = np.diff(t, prepend=np.nan)
                rate = np.diff(scanned.to_numpy(float), prepend=np.nan) / dt
            rate[~np.isfinite(rate) | (rate < 0)] = np.nan  # first row, counter resets
            xs, ys = reduce_minmax(x, rate)
            handles += ax.plot(xs, ys, color="#00838f", lw=1.2, label="pages scanned per second")
            if configured:
                ref = ax.axhline(configured, color="#00838f", ls=":", lw=1.5)
                ref.set_label(f"configured rate: {configured:,.0f} pages/s")
                handles.append(ref)
            ax.set_ylabel("pages/s")
            ax.set_ylim(bottom=0)
            ax.set_title("Scan rate: growth of pages_scanned", fontsize=10.5, fontweight="normal")
            _count_axis(ax.yaxis)
        return _legend(f, handles + _plateau_handle(w))

    return render("cost", "ksmd CPU and scan rate", build)


def memory_chart(
    samples: pd.DataFrame, events: list[Event], w: Windows | None = None
) -> str | None:
    present = [n for n in MEMINFO if n in samples.columns]
    if not present:
        return None

    def build() -> Figure:
        t = samples["t"].to_numpy(float)
        f = _frame("Host memory (/proc/meminfo)", t, events, w, 4.4)
        ax = f.panels[0]
        handles: list[Any] = []
        for name in present:
            colour = MEMINFO[name]
            xs, ys = reduce_minmax(t / f.scale, column(samples, name).to_numpy(float) / 1024**2)
            ls = "--" if name == "MemTotal" else "-"
            handles += ax.plot(xs, ys, color=colour, ls=ls, lw=1.3, label=name)
        ax.set_ylim(bottom=0)
        ax.set_ylabel("GiB")
        total = column(samples, "MemTotal")
        if total is not None and total.notna().any() and total.max() > 0:
            gib = float(total.max()) / 1024**2
            pct = ax.secondary_yaxis(
                "right", functions=(lambda g: g / gib * 100, lambda p: p * gib / 100)
            )
            pct.set_ylabel("% of MemTotal")
        return _legend(f, handles)

    return render("memory", "Host memory", build)


def vm_chart(
    samples: pd.DataFrame, events: list[Event], w: Windows, vm: VmAnalysis, ps: int
) -> str | None:
    """Each guest's merged memory stacked, against the global pages_shared + pages_sharing."""
    m = vm.merging
    if m is None or not len(m.t):
        return None

    def build() -> Figure:
        t = samples["t"].to_numpy(float) if len(samples) else m.t
        f = _frame("Per guest: ksm_merging_pages, stacked", t, events, w, 5.2)
        ax = f.panels[0]
        # Pages until the layers are reduced: scaling the whole matrix would copy it.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a guest with no sample at all
            peak = np.nan_to_num(np.nanmax(m.values, axis=0))
        order = np.argsort(-peak, kind="stable")
        top = sorted(order[:TOP_GUESTS])
        layers = [np.nan_to_num(m.values[:, i]) for i in top]
        labels = [m.domains[i] for i in top]
        colours = [GUEST_COLOURS[k % len(GUEST_COLOURS)] for k in range(len(top))]
        if len(order) > TOP_GUESTS:
            layers.append(row_sums(m.values) - np.sum(layers, axis=0))
            labels.append(f"{len(order) - TOP_GUESTS} other guests")
            colours.append("#bdbdbd")
        xs, ys = reduce_mean(m.t, np.column_stack(layers) * ps / MIB)
        handles: list[Any] = list(
            ax.stackplot(xs / f.scale, ys.T, labels=labels, colors=colours, alpha=0.9, lw=0)
        )
        shared, sharing = column(samples, "pages_shared"), column(samples, "pages_sharing")
        if shared is not None and sharing is not None:
            total = (shared + sharing).to_numpy(float) * ps / MIB
            gx, gy = reduce_minmax(t / f.scale, total)
            handles += ax.plot(
                gx,
                gy,
                color="#000000",
                ls="--",
                lw=1.4,
                label="global pages_shared + pages_sharing",
            )
        ax.set_ylim(bottom=0)
        ax.set_ylabel("merged memory (MiB)")
        _count_axis(ax.yaxis)
        return _legend(f, handles + _plateau_handle(w))

    return render("vms", "Merged memory per guest", build)


def _plateau_handle(w: Windows | None) -> list[Any]:
    if w is None or w.plateau_start is None:
        return []
    return [Patch(color=PLATEAU, alpha=0.2, label="plateau (the metrics' window)")]


def _unique(handles: list[Any]) -> list[Any]:
    seen: set[str] = set()
    out = []
    for h in handles:
        if h.get_label() not in seen:
            seen.add(h.get_label())
            out.append(h)
    return out


# -- charts of several records: compare, Pareto, plan ---------------------------------------
def overlay_chart(groups: Sequence[Group]) -> str | None:
    """Memory saved and ksmd CPU of every run against seconds since KSM went on."""

    curves = [(g, r, aligned_curve(r.record, r.analysis)) for g in groups for r in g.runs]
    curves = [c for c in curves if len(c[2])]
    if not curves:
        return None
    span = max(float(c["t"].max()) for _, _, c in curves)
    scale, unit = time_scale(span)
    has_cpu = any(c["ksmd_cpu"].notna().any() for _, _, c in curves)

    def build() -> Figure:
        fig = Figure(figsize=(WIDTH, 6.4 if has_cpu else 4.2), layout="constrained")
        axes = fig.subplots(2 if has_cpu else 1, 1, sharex=True, squeeze=False)[:, 0]
        colours = {g.id: palette(i) for i, g in enumerate(groups)}
        seen: set[str] = set()
        for g, _, c in curves:
            label = None if g.id in seen else f"{g.id}: {g.label}"
            seen.add(g.id)
            x = c["t"].to_numpy(float) / scale
            xs, ys = reduce_minmax(x, c["saved_mib"].to_numpy(float))
            axes[0].plot(xs, ys, color=colours[g.id], lw=1.3, alpha=0.85, label=label)
            if has_cpu:
                xs, ys = reduce_minmax(x, c["ksmd_cpu"].fillna(0).to_numpy(float))
                axes[1].plot(xs, ys, color=colours[g.id], lw=1.0, alpha=0.7)
        for ax in axes:
            ax.axvline(0, color="#2e7d32", lw=1.0, ls="-")
            ax.set_ylim(bottom=0)
        axes[0].set_title("Memory saved, aligned at KSM on (t = 0)")
        axes[0].set_ylabel("MiB saved")
        axes[0].yaxis.set_major_formatter(FuncFormatter(thousands))
        axes[0].legend(loc="lower right")
        if has_cpu:
            axes[1].set_ylabel("ksmd, % of one CPU")
        axes[-1].set_xlabel(f"time since KSM on ({unit})")
        return fig

    return render("overlay", "Memory saved and ksmd CPU, aligned at KSM on", build)


def pareto_chart(data: dict[str, Any]) -> str:

    pts = data["points"]

    def build() -> Figure:
        fig = Figure(figsize=(WIDTH * 0.75, 5.0), layout="constrained")
        ax = fig.subplots()
        for k in sorted({p["set"] for p in pts}):
            mine = [p for p in pts if p["set"] == k]
            colour = palette(k)
            front = sorted((p for p in mine if p["front"]), key=lambda p: p["x"])
            name = mine[0]["set_label"]
            ax.plot(
                [p["x"] for p in front],
                [p["y"] for p in front],
                color=colour,
                lw=1.4,
                ls="--",
                zorder=2,
                label=f"Pareto front ({name})" if data["sets"] > 1 else "Pareto front",
            )
            for p in mine:
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
                )
                ax.annotate(
                    p["group"],  # the table below says what each letter is
                    (p["x"], p["y"]),
                    xytext=(6, 6),
                    textcoords="offset points",
                    fontsize=8,
                )
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.set_xlabel(data["x_label"] + " (lower is better)")
        ax.set_ylabel(data["y_label"] + " (higher is better)")
        ax.yaxis.set_major_formatter(FuncFormatter(thousands))
        ax.set_title("Cost against benefit: filled points are on the Pareto front")
        ax.legend(loc="lower right", fontsize=8)
        return fig

    return render("pareto", "Memory saved against ksmd CPU", build)


def sharing_heatmap(guests: list[str], pairs: list[list[int]], self_only: list[int]) -> str | None:
    """Who shares with whom: KSM frames each pair of guests both map, and on the diagonal
    the frames a guest shares only with itself."""
    n = len(guests)
    if n == 0:
        return None
    m = np.array(pairs, dtype=float).reshape(n, n)
    np.fill_diagonal(m, np.array(self_only, dtype=float))
    names = _short_names(guests)

    def build() -> Figure:
        side = min(9.0, 3.4 + 0.4 * n)
        fig = Figure(figsize=(side + 1.4, side), layout="constrained")
        ax = fig.subplots()
        ax.grid(False)
        im = ax.imshow(m, cmap="Greens", vmin=0, vmax=max(1.0, float(m.max())))
        ticks = np.arange(n)
        ax.set_xticks(ticks, names, rotation=90 if n > 4 else 0, fontsize=8.5)
        ax.set_yticks(ticks, names, fontsize=8.5)
        ax.tick_params(length=0)
        for side_name in ("top", "right", "bottom", "left"):
            ax.spines[side_name].set_visible(False)
        if n <= 16:
            top = float(m.max()) or 1.0
            for i in range(n):
                for j in range(n):
                    v = m[i, j]
                    ax.text(
                        j,
                        i,
                        f"{v:,.0f}",
                        ha="center",
                        va="center",
                        fontsize=8 if n > 8 else 9.5,
                        color="white" if v > 0.6 * top else "#1f2328",
                        fontweight="bold" if i == j else "normal",
                    )
        ax.set_title("KSM frames shared, by pair of guests")
        bar = fig.colorbar(im, ax=ax, shrink=0.8)
        bar.set_label("KSM frames (pages)")
        _count_axis(bar.ax.yaxis)
        return fig

    return render("sharing", "Who shares with whom", build)


def _short_names(names: list[str]) -> list[str]:
    """Guest names without the prefix they all share (kvmksm-<run>-<base>-01 -> 01)."""
    if len(names) < 2:
        return list(names)
    prefix = names[0]
    for name in names[1:]:
        while not name.startswith(prefix):
            prefix = prefix[:-1]
    cut = prefix.rfind("-") + 1 if "-" in prefix else len(prefix)
    short = [name[cut:] or name for name in names]
    return short if len(set(short)) == len(short) else list(names)

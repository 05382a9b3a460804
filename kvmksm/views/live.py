"""What ``kvmksm watch`` shows: on a terminal a live panel of the host-wide figures and a
table of guests (biggest saver first), redrawn each sample; in a pipe or a log one plain
``key=value`` line per sample."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console, Group, JustifyMethod, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from kvmksm.analysis.windows import saved_bytes
from kvmksm.commands.watch.guests import GuestInfo
from kvmksm.commands.watch.session import WatchResult
from kvmksm.units import format_duration, format_size
from kvmksm.views.fmt import fmt_count, fmt_size


def guest_saves(vm: Mapping[str, Any], page_size: int) -> float:
    """What one guest saves, for sorting: the kernel's ksm_process_profit, else merged pages."""
    if vm.get("ksm_process_profit") is not None:
        return float(vm["ksm_process_profit"])
    if vm.get("ksm_merging_pages") is not None:
        return float(vm["ksm_merging_pages"]) * page_size
    return float("-inf")


def _run_state(run: Any) -> str:
    return {0: "off", 1: "on", 2: "unmerging"}.get(run, "—" if run is None else str(run))


def render(
    row: Mapping[str, Any],
    vms: Mapping[str, Mapping[str, Any]],
    guests: Mapping[str, GuestInfo],
    page_size: int,
    footer: str = "",
    max_guests: int = 40,
) -> RenderableType:
    """The live view: host-wide figures, then one line per guest, biggest saver first."""
    host = Table.grid(padding=(0, 2))
    for _ in range(4):
        host.add_column()
    saved = saved_bytes(row, page_size)
    cpu = row.get("ksmd_cpu")
    avail, total = row.get("MemAvailable"), row.get("MemTotal")
    cells = [
        ("KSM", f"{_run_state(row.get('run'))}"),
        ("memory saved", fmt_size(saved)),
        ("pages_shared", fmt_count(row.get("pages_shared"))),
        ("pages_sharing", fmt_count(row.get("pages_sharing"))),
        ("pages_unshared", fmt_count(row.get("pages_unshared"))),
        ("pages_volatile", fmt_count(row.get("pages_volatile"))),
        ("ksm_zero_pages", fmt_count(row.get("ksm_zero_pages"))),
        ("full_scans", fmt_count(row.get("full_scans"))),
        ("general_profit", fmt_size(row.get("general_profit"))),
        ("ksmd CPU", "—" if cpu is None else f"{cpu:.1f} %"),
        (
            "scan",
            f"{fmt_count(row.get('pages_to_scan'))} pages / "
            f"{fmt_count(row.get('sleep_millisecs'))} ms",
        ),
        (
            "host memory",
            "—"
            if avail is None or total is None
            else f"{format_size(avail * 1024)} available of {format_size(total * 1024)}",
        ),
    ]
    for i in range(0, len(cells), 2):
        pair = cells[i : i + 2]
        host.add_row(*[x for k, v in pair for x in (Text(k, style="bold"), v)])

    table = Table(title=f"{len(guests)} running guest(s)", title_justify="left", expand=False)
    columns: tuple[tuple[str, JustifyMethod], ...] = (
        ("domain", "left"),
        ("pid", "right"),
        ("merging pages", "right"),
        ("merged", "right"),
        ("zero pages", "right"),
        ("profit", "right"),
        ("RSS", "right"),
    )
    for col, just in columns:
        table.add_column(col, justify=just)
    order = sorted(guests, key=lambda n: (-guest_saves(vms.get(n, {}), page_size), n))
    for name in order[:max_guests]:
        vm = vms.get(name, {})
        merging = vm.get("ksm_merging_pages")
        rss = vm.get("rss_kb")
        table.add_row(
            name,
            fmt_count(guests[name].pid),
            fmt_count(merging),
            fmt_size(None if merging is None else merging * page_size),
            fmt_count(vm.get("ksm_zero_pages")),
            fmt_size(vm.get("ksm_process_profit")),
            fmt_size(None if rss is None else rss * 1024),
        )
    parts: list[RenderableType] = [host, table]
    if len(order) > max_guests:
        parts.append(Text(f"... and {len(order) - max_guests} more guests", style="dim"))
    if footer:
        parts.append(Text(footer, style="dim"))
    return Group(*parts)


def plain_line(
    row: Mapping[str, Any],
    vms: Mapping[str, Mapping[str, Any]],
    guests: Mapping[str, GuestInfo],
    page_size: int,
) -> str:
    """One line per sample for logs and pipes: key=value, no thousands separators."""
    parts = [f"t={row.get('t', 0):.1f}s"]
    for k in ("run", "pages_shared", "pages_sharing", "pages_unshared", "full_scans"):
        if row.get(k) is not None:
            parts.append(f"{k}={row[k]}")
    saved = saved_bytes(row, page_size)
    if saved is not None:
        parts.append(f"saved={saved / 2**20:.1f}MiB")
    if row.get("ksmd_cpu") is not None:
        parts.append(f"ksmd_cpu={row['ksmd_cpu']:.1f}%")
    parts.append(f"guests={len(guests)}")
    best = max(vms.values(), key=lambda v: guest_saves(v, page_size), default=None)
    if best is not None and (best.get("ksm_process_profit") or 0) > 0:
        parts.append(f"top={best['domain']}:{best['ksm_process_profit'] / 2**20:.1f}MiB")
    return " ".join(parts)


class PlainView:
    """Not a terminal: one line per sample, and one per message."""

    def __init__(self, console: Console, page_size: int) -> None:
        self.console = console
        self.page_size = page_size

    def message(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)
        with contextlib.suppress(OSError, ValueError):
            self.console.file.flush()  # a pipe (| tee, a log) gets each line as it comes

    def update(
        self,
        row: Mapping[str, Any],
        vms: Mapping[str, Mapping[str, Any]],
        guests: Mapping[str, GuestInfo],
        record_dir: Path,
        left: float | None,
    ) -> None:
        self.message(plain_line(row, vms, guests, self.page_size))

    def close(self) -> None:
        return None


class LiveView:
    """A terminal: a rich Live panel redrawn on every sample; messages scroll above it."""

    def __init__(self, console: Console, page_size: int) -> None:
        self.console = console
        self.page_size = page_size
        self.live: Live | None = None

    def message(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def update(
        self,
        row: Mapping[str, Any],
        vms: Mapping[str, Mapping[str, Any]],
        guests: Mapping[str, GuestInfo],
        record_dir: Path,
        left: float | None,
    ) -> None:
        footer = f"t={row.get('t', 0):.0f}s  record {record_dir}  Ctrl-C stops"
        if left is not None:
            footer += f" (or in {format_duration(left)})"
        max_guests = max(5, self.console.size.height - 16)
        view = render(row, vms, guests, self.page_size, footer, max_guests)
        if self.live is None:
            self.live = Live(view, console=self.console, auto_refresh=False)
            self.live.start()
        self.live.update(view, refresh=True)

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None


def summary(console: Console, result: WatchResult, report: Path | None) -> None:
    """What a finished watch prints: how it ended, the guests seen, where the record is."""
    seen = result.guests_seen
    guests = f"{len(seen)} guest(s)" + (f" ({', '.join(seen[:10])})" if seen else "")
    console.print(
        f"watch ended: {result.ended_by}, after {format_duration(result.duration_s)}; "
        f"{guests} seen",
        markup=False,
        soft_wrap=True,
    )
    if result.error:
        console.print(f"error: {result.error}", markup=False, soft_wrap=True)
    console.print(f"record: {result.record_dir}", markup=False, soft_wrap=True)
    if report is not None:
        console.print(f"report: {report}", markup=False, soft_wrap=True)


def view_for(console: Console, page_size: int) -> LiveView | PlainView:
    """A live panel on a terminal; one plain line per sample in a pipe or a log."""
    return LiveView(console, page_size) if console.is_terminal else PlainView(console, page_size)

"""What `kvmksm fleet run` shows: one row per host (status, kernel, the phases' times, what
went wrong), where the fleet folder is, and the pages written from it (each record's report
and the kernel comparison)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from kvmksm.commands.compare import collect, compare
from kvmksm.commands.fleet import FleetResult
from kvmksm.commands.kernels import kernel_comparison
from kvmksm.progress import Progress
from kvmksm.results.collect import iter_records
from kvmksm.scenario.portable import summary
from kvmksm.views.compare_page import compare_page
from kvmksm.views.kernels_page import kernels_page
from kvmksm.views.report import write_report
from kvmksm.views.tables import print_table

STYLE = {"passed": "green", "failed": "bold red", "interrupted": "yellow"}


def fleet_result(result: FleetResult, console: Console, pages: list[Path]) -> None:
    idx = result.index
    table = Table(
        title=f"kvmksm fleet {idx['name']}: {result.status.upper()}", title_justify="left"
    )
    for col in ("host", "status", "kernel", "install", "run", "gather", "restored", "note"):
        table.add_column(col)
    for h in result.hosts:
        t = h["timings"]
        style = STYLE.get(h["status"], "bold red")
        table.add_row(
            h["name"],
            f"[{style}]{h['status']}[/]",
            h.get("kernel_release") or "?",
            _secs(t.get("install_s"), h.get("installed")),
            _secs(t.get("run_s")),
            _secs(t.get("gather_s")),
            _restored(h.get("restored")),
            _note(h),
        )
    print_table(console, table)
    tm = idx.get("timings", {})
    console.print(
        "wall time: "
        + ", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {v:.0f}s" for k, v in tm.items()),
        soft_wrap=True,
        markup=False,
    )
    console.print(f"fleet: {result.dir}", soft_wrap=True, markup=False)
    for page in pages:
        console.print(f"{page.stem}: {page}", soft_wrap=True, markup=False)


def _secs(v: Any, installed: str | None = None) -> str:
    if installed == "already there":
        return "already there"
    return f"{v:.0f}s" if isinstance(v, int | float) else "-"


def _restored(v: bool | None) -> str:
    return {True: "yes", False: "[bold red]NO[/]"}.get(v, "-")  # type: ignore[arg-type]


def _note(h: dict[str, Any]) -> str:
    parts = []
    if h.get("error"):
        parts.append(str(h["error"]))
    if h.get("skipped"):
        parts.append("skipped: " + summary(h["skipped"]))
    return "; ".join(parts)


def write_fleet_pages(fleet_dir: Path, progress: Progress) -> list[Path]:
    """report.html beside every record, and the kernel comparison (kernels.html). A page that
    cannot be drawn loses nothing: the records are what matter, and `kvmksm report` and
    `kvmksm compare` rebuild them."""
    pages: list[Path] = []
    try:
        records = [rec for _, rec in iter_records([fleet_dir])]
    except Exception as e:  # a host's record that cannot be read: say so, keep the rest
        progress.warn(f"records not read: {e}")
        return pages
    for rec in records:
        try:
            write_report(rec.dir)
        except Exception as e:
            progress.warn(f"report not written for {rec.dir} ({e}); rebuild: kvmksm report")
    try:
        cmp = compare(collect([fleet_dir]))
        pages.append(kernels_page(kernel_comparison(cmp), fleet_dir / "kernels.html"))
        pages.append(compare_page(cmp, fleet_dir / "compare.html"))
    except Exception as e:
        progress.warn(f"kernel comparison not written ({e}); rebuild: kvmksm compare {fleet_dir}")
    return pages

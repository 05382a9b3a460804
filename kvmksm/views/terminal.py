"""What commands print on a terminal: rich tables for bench, experiments, compare, plan, doctor
and clean, and the progress of long work (a spinner with its step, lines worth keeping)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kvmksm.views.fmt import NOTHING, fmt_expected, fmt_num, fmt_sig

if TYPE_CHECKING:  # types only: compare and plan pull in scipy, which bench does not need
    from kvmksm.commands.bench import BenchResult
    from kvmksm.commands.compare import Comparison
    from kvmksm.commands.plan import DensityPlan


class TerminalProgress:
    """Progress on a terminal: a spinner for the step in hand, lines for the rest. In a pipe
    only the lines (and warnings) are printed, so a log stays readable."""

    def __init__(self, console: Console) -> None:
        self.console = console

    @contextlib.contextmanager
    def phase(self, text: str) -> Iterator[Callable[[str], None]]:
        if self.console.is_terminal:
            with self.console.status(text) as status:
                yield status.update
        else:
            yield lambda _text: None

    def note(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def warn(self, text: str) -> None:
        self.console.print(f"[yellow]warning:[/] {text}", highlight=False, soft_wrap=True)


# -- bench and experiments ------------------------------------------------------------------
def bench_result(result: BenchResult, name: str, console: Console, report: Any) -> None:
    """The checks of one run, its status, and where its record (and report) are."""
    table = Table(title=f"kvmksm bench {name}: {result.status.upper()}", title_justify="left")
    for col in ("check", "expected", "observed", "result"):
        table.add_column(col)
    for c in result.checks:
        table.add_row(
            c["name"],
            fmt_expected(c["expected"]),
            str(c["observed"]),
            "[green]pass[/]" if c["passed"] else "[bold red]FAIL[/]",
        )
    if result.checks:
        console.print(table)
    if result.error:
        console.print(f"[bold red]{result.status}:[/] {result.error}", soft_wrap=True)
    passed = sum(c["passed"] for c in result.checks)
    console.print(f"checks: {passed} passed, {len(result.checks) - passed} failed")
    console.print(f"record: {result.record_dir}", soft_wrap=True, markup=False)
    if report is not None:
        console.print(f"report: {report}", soft_wrap=True, markup=False)


def experiment_summary(summary: dict[str, Any], console: Console) -> None:
    """One row per point: its axes, runs passed, mean ± sd of the summary figures, Pareto."""
    table = Table(
        title=f"experiment {summary['name']}: {summary['status'].upper()} (mean ± sd over repeats)",
        title_justify="left",
        box=box.SIMPLE_HEAD,
    )
    for axis in summary["axes"] or ["point"]:
        table.add_column(axis, justify="right", no_wrap=True)
    table.add_column("ok", justify="right")
    for _, title in summary["columns"]:
        table.add_column(title, justify="right")
    pareto = any(r["pareto"] is not None for r in summary["rows"])
    if pareto:
        table.add_column("Pareto", justify="center")
    for r in summary["rows"]:
        row = [str(v) for v in r["values"].values()] or [r["label"]]
        row.append(f"{r['passed']}/{r['runs']}")
        for key, _ in summary["columns"]:
            mean, sd = r["figures"][key]
            row.append(
                NOTHING if mean is None else fmt_num(mean) + (f"\n±{fmt_num(sd)}" if sd else "")
            )
        if pareto:
            row.append("★" if r["pareto"] else "")
        table.add_row(*row)
    console.print(table)
    if summary["error"]:
        console.print(f"[bold red]error:[/] {summary['error']}", soft_wrap=True)


# -- compare ---------------------------------------------------------------------------------
WIDE = 3  # more groups than this: one row per group instead of one column per group
HEADLINE = ("plateau_saved_mib", "time_to_90pct_s", "ksmd_cpu_to_plateau_s", "mib_per_cpu_s")
MARK = {"beyond noise": "", "within noise": " =", "same": " =", "too few repeats to tell": " ?"}


def comparison(cmp: Comparison, console: Console) -> None:
    """The groups, what differs, the metrics with verdicts, the Pareto front, the warnings."""
    for g in cmp.groups:
        console.print(f"[bold]{g.id}[/] = {g.label} ({len(g.runs)} run(s))", soft_wrap=True)
    if len(cmp.groups) > WIDE:
        _comparison_wide(cmp, console)
    else:
        _comparison_narrow(cmp, console)
    if cmp.pareto:
        front = [p for p in cmp.pareto["points"] if p["front"]]
        console.print(
            "Pareto front (most saved for the ksmd CPU spent): "
            + "; ".join(f"{p['group']} ({p['label']})" for p in front),
            soft_wrap=True,
        )
    for w in cmp.warnings:
        console.print(f"[yellow]warning:[/] {w}", soft_wrap=True)


def _comparison_narrow(cmp: Comparison, console: Console) -> None:
    if cmp.differences:
        t = Table(title="What differs", title_justify="left")
        t.add_column("field")
        for g in cmp.groups:
            t.add_column(g.id)
        for d in cmp.differences:
            t.add_row(d["field"], *(_short(d["values"][g.id]) for g in cmp.groups))
        console.print(t)
    base = cmp.groups[0].id
    t = Table(
        title=f"Metrics (mean ± sd over repeats; each group against {base})", title_justify="left"
    )
    t.add_column("metric")
    for g in cmp.groups:
        t.add_column(f"{g.id}", justify="right")
    for g in cmp.groups[1:]:
        t.add_column(f"{g.id} - {base}", justify="right")
    for m in cmp.metrics:
        row = [f"{m['label']} ({m['unit']})" if m["unit"] else m["label"]]
        for g in cmp.groups:
            s = m["groups"][g.id]
            row.append(f"{_mean_text(s)} (n={s['n']})")
        for g in cmp.groups[1:]:
            row.append(_diff_text(m["vs_baseline"][g.id]))
        t.add_row(*row)
    console.print(t)


def _comparison_wide(cmp: Comparison, console: Console) -> None:
    """Many groups: one row each, the headline metrics, a mark against the first group."""
    fields = [d["field"] for d in cmp.differences if not d["soft"]]
    if fields:
        console.print("differs: " + ", ".join(fields), soft_wrap=True)
    metrics = [m for m in cmp.metrics if m["key"] in HEADLINE]
    t = Table(
        title=f"Mean ± sd over repeats; against {cmp.groups[0].id}: + better, - worse, "
        "= within noise, ? too few repeats",
        title_justify="left",
    )
    t.add_column("group")
    t.add_column("n", justify="right")
    for m in metrics:
        t.add_column(f"{m['label']} ({m['unit']})", justify="right")
    for g in cmp.groups:
        row = [g.id, str(len(g.runs))]
        for m in metrics:
            text = _mean_text(m["groups"][g.id])
            d = m["vs_baseline"].get(g.id)
            if d is not None:
                text += MARK.get(d["verdict"], "")
                if "better" in d:
                    text += " +" if d["better"] else " -"
            row.append(text)
        t.add_row(*row)
    console.print(t)


def _mean_text(s: dict[str, Any]) -> str:
    if s["mean"] is None:
        return "—"
    text = fmt_num(s["mean"])
    return text + (f" ± {fmt_num(s['sd'])}" if s["sd"] else "")


def _diff_text(d: dict[str, Any]) -> str:
    if d["diff"] is None:
        return "—"
    text = ("+" if d["diff"] > 0 else "") + fmt_num(d["diff"])
    if d["diff_pct"] is not None:
        text += f" ({d['diff_pct']:+.1f}%)"
    verdict = d["verdict"]
    if "better" in d:
        verdict += ", better" if d["better"] else ", worse"
    if d.get("p") is not None:
        verdict += f", p={d['p']:.2g}"
    mark = {"beyond noise": "[bold]", "within noise": "[dim]"}.get(d["verdict"], "")
    return f"{text} {mark}{verdict}{'[/]' if mark else ''}"


def _short(text: str, width: int = 40) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


# -- plan ------------------------------------------------------------------------------------
def plans(plans: list[DensityPlan], console: Console) -> None:
    """Per configuration: the measured points, the fit, the projection and the notes."""
    for p in plans:
        d, f, i = p.data, p.data["fit"], p.data["inputs"]
        noun = d["noun"]
        t = Table(title=f"Measured ({d['config']})", title_justify="left")
        for col in ("N", "runs", "saved MiB", "saved %", "fit MiB", "ksmd CPU %", "ksmd CPU s"):
            t.add_column(col, justify="right")
        for row in d["measured"]:
            saved = fmt_num(row["saved_mib"])
            if row["saved_sd"] is not None:
                saved += f" ± {fmt_num(row['saved_sd'])}"
            t.add_row(
                str(row["n"]),
                str(row["runs"]),
                saved,
                fmt_num(row["saved_pct"]),
                fmt_num(row["fit_mib"]),
                fmt_num(row["cpu_pct"]),
                fmt_num(row["cpu_s"]),
            )
        console.print(t)
        r2 = "R² n/a" if f["r2"] is None else f"R² = {f['r2']:.4f}"
        console.print(
            f"fit: saved(N) = {fmt_sig(f['b_mib'])} + {fmt_sig(f['a_mib'])} x (N-1) MiB for "
            f"{fmt_num(i['guest_memory_mib'])} MiB {noun}; each added one saves "
            f"{fmt_num(f['a_pct'])}% of its memory ({r2}, {f['points']} runs)",
            soft_wrap=True,
        )
        w, k = d["without_ksm"], d["with_ksm"]
        t = Table(title="Projection", title_justify="left", show_header=False)
        t.add_column("what")
        t.add_column("value", justify="right")
        t.add_row("host memory", f"{fmt_num(i['host_memory_mib'] / 1024)} GiB")
        t.add_row(f"headroom ({i['headroom']})", f"{fmt_num(i['headroom_mib'] / 1024)} GiB")
        t.add_row(
            f"memory per {noun[:-1] if noun == 'guests' else 'process'}",
            f"{fmt_num(i['guest_memory_mib'])} MiB + {fmt_num(i['overhead_mib'])} MiB overhead",
        )
        t.add_row(f"max {noun} without KSM", str(w["max"]))
        t.add_row(
            f"max {noun} with KSM", "unbounded by memory" if k["max"] is None else str(k["max"])
        )
        if d["gain"] is not None:
            t.add_row("gain", f"+{d['gain']} ({fmt_num(d['gain_pct'])}%)")
        if k["saved_mib"] is not None:
            t.add_row("saved at that density", f"{fmt_num(k['saved_mib'] / 1024)} GiB")
        if k["ksmd_cpu_pct"] is not None:
            t.add_row("ksmd CPU at that density", f"{fmt_num(k['ksmd_cpu_pct'])}% of one CPU")
        if k["ksmd_cpu_s"] is not None:
            t.add_row("ksmd CPU to reach the savings", f"{fmt_num(k['ksmd_cpu_s'])} CPU s")
        console.print(t)
        console.print(d["extrapolation"]["statement"], soft_wrap=True)
        for n in d["notes"]:
            console.print(f"[yellow]note:[/] {n}", soft_wrap=True)


# -- doctor and clean -----------------------------------------------------------------------
DOCTOR_STYLE = {
    "ok": "[green]ok  [/]",
    "warn": "[yellow]warn[/]",
    "fail": "[bold red]FAIL[/]",
    "note": "[blue]note[/]",
}


def findings(found: list[Any], console: Console) -> None:
    """doctor's findings, one line each, with what to do where something is wrong; notes
    (things to know, not to fix) after the checks."""
    for f in sorted(found, key=lambda f: f.level == "note"):
        line = f"{DOCTOR_STYLE[f.level]} {escape(f.what)}"
        if f.fix and f.level != "ok":
            line += f" [dim]->[/] {escape(f.fix)}"
        console.print(line, soft_wrap=True)


def cleaned(
    done: list[str], problems: list[str], dry_run: bool, out: Console, err: Console
) -> None:
    verb = "would " if dry_run else ""
    for line in done:
        out.print(f"{verb}{line}", markup=False, soft_wrap=True)
    for p in problems:
        err.print(f"problem: {p}", markup=False, soft_wrap=True)
    if not done and not problems:
        out.print("nothing to clean: no leftovers of kvmksm runs on this host")

"""What commands print on a terminal: rich tables for bench, experiments, compare, plan, doctor
and clean, and the progress of long work (a spinner with its step, lines worth keeping)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kvmksm.views.fmt import NOTHING, fmt_expected, fmt_num, fmt_sig
from kvmksm.views.tables import print_table

if TYPE_CHECKING:  # types only: compare and plan pull in pandas and scipy, bench needs neither
    from kvmksm.commands.bench import BenchResult
    from kvmksm.commands.compare import Comparison
    from kvmksm.commands.compare_gate import Gate
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
            fmt_num(c["observed"]),
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


def comparison(cmp: Comparison, console: Console, said: Sequence[str] = ()) -> None:
    """The groups, what differs, the metrics with verdicts, the Pareto front, the warnings
    (but those in `said`, already given on stderr)."""
    for g in cmp.groups:
        console.print(f"[bold]{g.id}[/] = {g.label} ({len(g.runs)} run(s))", soft_wrap=True)
    if len(cmp.groups) > WIDE:
        _comparison_wide(cmp, console)
    else:
        _comparison_narrow(cmp, console)
    if cmp.pareto:
        _pareto(cmp.pareto, console)
    for w in cmp.warnings:
        if w not in said:
            console.print(f"[yellow]warning:[/] {w}", soft_wrap=True)


def gate_result(gate: Gate, console: Console) -> None:
    """What --fail-if-worse found (nothing when it was not asked for)."""
    if gate.threshold_pct is None or gate.cannot_tell:
        return
    pct = fmt_num(gate.threshold_pct)
    if not gate.worse:
        console.print(f"fail-if-worse {pct}%: nothing worse beyond noise by more than {pct}%")
        return
    for w in gate.worse:
        by = "" if w["diff_pct"] is None else f" by {abs(w['diff_pct']):.1f}%"
        p = "" if w["p"] is None else f", p={w['p']:.2g}"
        console.print(
            f"[bold red]WORSE:[/] {w['label']}: {w['group']} is worse than {w['baseline']}{by} "
            f"({w['better']} is better{p}), beyond noise and past {pct}%",
            soft_wrap=True,
        )


def _pareto(pareto: dict[str, Any], console: Console) -> None:
    t = Table(
        title="Cost against benefit (means over repeats; MiB per ksmd CPU s is a ratio of "
        "those means); * on the Pareto front",
        title_justify="left",
    )
    for col in ("group", "setting"):
        t.add_column(col)
    t.add_column("ksmd CPU s", justify="right")
    t.add_column("saved MiB", justify="right")
    t.add_column(pareto["mib_per_cpu_s_label"], justify="right")
    t.add_column("front", justify="center")
    for p in pareto["points"]:
        t.add_row(
            p["group"],
            p["label"],
            fmt_num(p["x"]),
            fmt_num(p["y"]),
            fmt_num(p["mib_per_cpu_s"]),
            "*" if p["front"] else "",
        )
    print_table(console, t)


def _metric_name(m: dict[str, Any]) -> str:
    from kvmksm.commands.compare import AGGREGATION  # here: compare is not on bench's path

    name = f"{m['label']} ({m['unit']})" if m["unit"] else m["label"]
    if m.get("aggregation", AGGREGATION) != AGGREGATION:
        name += ", mean of per-run ratios"
    return name


def _comparison_narrow(cmp: Comparison, console: Console) -> None:
    if cmp.differences:
        t = Table(title="What differs", title_justify="left")
        t.add_column("field")
        for g in cmp.groups:
            t.add_column(g.id)
        for d in cmp.differences:
            t.add_row(d["field"], *(_short(d["values"][g.id]) for g in cmp.groups))
        print_table(console, t)
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
        row = [_metric_name(m)]
        for g in cmp.groups:
            s = m["groups"][g.id]
            row.append(f"{_mean_text(s)} (n={s['n']})")
        for g in cmp.groups[1:]:
            row.append(_diff_text(m["vs_baseline"][g.id]))
        t.add_row(*row)
    print_table(console, t)


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
        t.add_column(_metric_name(m), justify="right")
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
    print_table(console, t)


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
    """Per configuration: the measured points, the fit, the projection with its 95% intervals,
    the check runs and the notes. A refused plan shows what was measured (the reason is the
    command's one-line error)."""
    for p in plans:
        d = p.data
        print_table(console, _measured(d))
        if p.refused:
            continue
        f, i = d["fit"], d["inputs"]
        r2 = f"R² = {f['r2']:.4f}" if f["r2"] is not None else "R² not given"
        console.print(
            f"fit: saved(N) = {fmt_sig(f['b_mib'])} + {fmt_sig(f['a_mib'])} x (N-1) MiB for "
            f"{fmt_num(i['guest_memory_mib'])} MiB {d['noun']}; each added one saves "
            f"{fmt_sig(f['a_pct'])}% of its memory ({r2}, {f['points']} runs)",
            soft_wrap=True,
        )
        iv = d["interval"]
        if iv["level"] is not None:
            console.print(
                f"intervals: {iv['level'] * 100:.0f}% prediction intervals, {iv['method']}",
                soft_wrap=True,
                markup=False,
            )
        print_table(console, _projection(d))
        console.print(d["extrapolation"]["statement"], soft_wrap=True)
        for c in d["checks"]:
            print_table(console, _check(c))
            for n in c["notes"]:
                console.print(f"[yellow]note:[/] {n}", soft_wrap=True)
        for n in d["notes"]:
            console.print(f"[yellow]note:[/] {n}", soft_wrap=True)


def _range(iv: list[float | None] | None, scale: float = 1.0, unit: str = "") -> str:
    """' (95% PI 12 – 15 unit)' for an interval; '' without one."""
    if iv is None:
        return ""
    lo, hi = iv
    lo_t = fmt_num(lo / scale) if lo is not None else "?"
    hi_t = fmt_num(hi / scale) if hi is not None else "unbounded"
    return f" (95% PI {lo_t} – {hi_t}{' ' + unit if unit else ''})"


def _measured(d: dict[str, Any]) -> Table:
    t = Table(title=f"Measured ({d['config']})", title_justify="left")
    cols = ["N", "runs", "saved MiB", "saved %"]
    if not d["refused"]:
        cols += ["fit MiB", "95% PI MiB"]
    for col in (*cols, "ksmd CPU %", "ksmd CPU s"):
        t.add_column(col, justify="right")
    for row in d["measured"]:
        saved = fmt_num(row["saved_mib"])
        if row["saved_sd"] is not None:
            saved += f" ± {fmt_num(row['saved_sd'])}"
        cells = [str(row["n"]), str(row["runs"]), saved, fmt_num(row["saved_pct"])]
        if not d["refused"]:
            iv = row["fit_interval_mib"]
            cells += [
                fmt_num(row["fit_mib"]),
                f"{fmt_num(iv[0])} – {fmt_num(iv[1])}" if iv else NOTHING,
            ]
        t.add_row(*cells, fmt_num(row["cpu_pct"]), fmt_num(row["cpu_s"]))
    return t


def _projection(d: dict[str, Any]) -> Table:
    i, w, k, noun = d["inputs"], d["without_ksm"], d["with_ksm"], d["noun"]
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
    most = "unbounded by memory" if k["max"] is None else fmt_num(k["max"])
    t.add_row(f"max {noun} with KSM", most + _range(k["max_interval"]))
    if d["gain"] is not None:
        t.add_row("gain", f"+{fmt_num(d['gain'])} ({fmt_num(d['gain_pct'])}%)")
    if k["saved_mib"] is not None:
        t.add_row(
            "saved at that density",
            f"{fmt_num(k['saved_mib'] / 1024)} GiB" + _range(k["saved_interval_mib"], 1024, "GiB"),
        )
    if k["ksmd_cpu_pct"] is not None:
        t.add_row(
            "ksmd CPU at that density",
            f"{fmt_num(k['ksmd_cpu_pct'])}% of one CPU" + _range(k["ksmd_cpu_pct_interval"]),
        )
    if k["ksmd_cpu_s"] is not None:
        t.add_row(
            "ksmd CPU to reach the savings",
            f"{fmt_num(k['ksmd_cpu_s'])} CPU s" + _range(k["ksmd_cpu_s_interval"]),
        )
    return t


def _check(c: dict[str, Any]) -> Table:
    t = Table(
        title=f"Check: N = {c['n']} ({fmt_num(c['guest_mib'])} MiB each), {c['record']}",
        title_justify="left",
    )
    for col in ("figure", "predicted", "95% PI", "measured", "error", "error %", "inside"):
        t.add_column(col, justify="left" if col == "figure" else "right")
    for f in c["figures"]:
        iv = f["interval"]
        inside = {True: "yes", False: "[bold red]NO[/]", None: NOTHING}[f["inside"]]
        t.add_row(
            f"{f['what']} ({f['unit']})",
            fmt_num(f["predicted"]),
            f"{fmt_num(iv[0])} – {fmt_num(iv[1])}" if iv else NOTHING,
            fmt_num(f["measured"]),
            NOTHING if f["error"] is None else f"{f['error']:+,.2f}",
            NOTHING if f["error_pct"] is None else f"{f['error_pct']:+.1f}%",
            inside,
        )
    return t


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

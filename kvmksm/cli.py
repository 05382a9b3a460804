"""The command line: thin; each subcommand calls one module."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from kvmksm import __version__
from kvmksm.errors import UserError
from kvmksm.scenario.checks import describe

if TYPE_CHECKING:
    from kvmksm.scenario.model import Scenario

DEFAULT_OUTPUT = Path("reports")


def _connect_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-c",
        "--connect",
        metavar="URI",
        help="libvirt URI (overrides the scenario's; default: LIBVIRT_DEFAULT_URI, then the "
        "scenario's, then qemu:///system)",
    )


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="kvmksm",
        description="Measure Linux KSM (Kernel Samepage Merging) on a real host: run a "
        "scenario of guests or processes, sample every KSM counter, write a run record "
        "and an HTML report.",
    )
    ap.add_argument("--version", action="version", version=f"kvmksm {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    b = sub.add_parser("bench", help="run a scenario and write a run record and report")
    b.add_argument(
        "scenario",
        nargs="?",
        help="scenario YAML file or bundled name (default: the built-in default scenario)",
    )
    b.add_argument(
        "-o",
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        help="folder for run records (default: reports/)",
    )
    b.add_argument("--no-report", action="store_true", help="do not write report.html")
    _connect_arg(b)

    v = sub.add_parser("validate", help="check a scenario file without touching the host")
    v.add_argument("scenario", nargs="+")

    r = sub.add_parser("report", help="(re)build RUN_DIR/report.html from a run record")
    r.add_argument("run_dir", type=Path, nargs="+")

    d = sub.add_parser(
        "doctor", help="check what a run needs and what would spoil its figures (reads only)"
    )
    d.add_argument("scenario", nargs="?", help="also check this scenario's needs (base, memory)")
    _connect_arg(d)

    c = sub.add_parser(
        "clean", help="remove what a killed run left (tagged guests, volumes) and restore knobs"
    )
    c.add_argument("-n", "--dry-run", action="store_true", help="say what would be done")
    _connect_arg(c)

    im = sub.add_parser("image", help="the tiny self-contained base image")
    im_sub = im.add_subparsers(dest="image_command", metavar="ACTION")
    im_sub.required = True
    ib = im_sub.add_parser(
        "build",
        help="build the tiny base image from the host's kernel and busybox and define "
        "it as the shut-off base domain",
    )
    ib.add_argument("--name", default="kvmksm-tiny", help="base domain name (default kvmksm-tiny)")
    ib.add_argument("--force", action="store_true", help="rebuild even if up to date")
    _connect_arg(ib)

    w = sub.add_parser(
        "watch",
        help="record KSM and every running guest on a live host, changing nothing",
    )
    w.add_argument(
        "--duration", type=_duration, help="stop after this long (30s, 15m, 1h; default: Ctrl-C)"
    )
    w.add_argument(
        "-o",
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        help="folder for run records (default: reports/; the record goes in OUTPUT/watch/)",
    )
    w.add_argument(
        "--interval", type=_duration, default=1.0, help="sample period (default 1s, at least 0.1s)"
    )
    w.add_argument("--no-report", action="store_true", help="do not write report.html")
    w.add_argument(
        "-c",
        "--connect",
        metavar="URI",
        help="libvirt URI, opened read-only (default: LIBVIRT_DEFAULT_URI, then qemu:///system)",
    )
    _experiment_parsers(sub)
    return ap


def _duration(text: str) -> float:
    from kvmksm.units import parse_duration

    try:
        value = parse_duration(float(text) if text.replace(".", "", 1).isdigit() else text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    err = Console(stderr=True, highlight=False)
    try:
        return int(COMMANDS[args.command](args))
    except UserError as e:
        err.print(f"kvmksm: {e}", markup=False, soft_wrap=True)
        return e.exit_code
    except KeyboardInterrupt:
        err.print("kvmksm: interrupted")
        return 130


def cmd_bench(args: argparse.Namespace) -> int:
    from kvmksm.commands.bench import bench, load_scenario

    sc, path = load_scenario(args.scenario)
    connect = args.connect or os.environ.get("LIBVIRT_DEFAULT_URI")
    out = Console(highlight=False)
    if sc.repeats > 1 or sc.matrix:  # an experiment: every point x repeats, one run each
        return _bench_experiment(sc, path, connect, args, out)
    result = bench(sc, args.output, scenario_file=path, connect=connect)
    if not args.no_report:
        _write_report(result.record_dir)
    table = Table(title=f"kvmksm bench {sc.name}: {result.status.upper()}", title_justify="left")
    for col in ("check", "expected", "observed", "result"):
        table.add_column(col)
    for c in result.checks:
        table.add_row(
            c["name"],
            describe(c["expected"]),
            str(c["observed"]),
            "[green]pass[/]" if c["passed"] else "[bold red]FAIL[/]",
        )
    if result.checks:
        out.print(table)
    if result.error:
        out.print(f"[bold red]{result.status}:[/] {result.error}", soft_wrap=True)
    passed = sum(c["passed"] for c in result.checks)
    out.print(f"checks: {passed} passed, {len(result.checks) - passed} failed")
    out.print(f"record: {result.record_dir}", soft_wrap=True)
    report = result.record_dir / "report.html"
    if report.exists():
        out.print(f"report: {report}", soft_wrap=True)
    return result.exit_code


def _write_report(run_dir: Path) -> None:
    try:
        from kvmksm.views.report import write_report
    except ImportError:
        return
    try:
        write_report(run_dir)
    except Exception as e:  # the record is what matters; a report can be rebuilt
        Console(stderr=True).print(f"kvmksm: report not written: {e}", markup=False)


def cmd_validate(args: argparse.Namespace) -> int:
    from kvmksm.scenario import load as scenario

    for arg in args.scenario:
        sc = scenario.load(scenario.resolve_path(arg))
        runs = ""
        if sc.repeats > 1 or sc.matrix:
            from kvmksm.commands.experiment import points

            n = len(points(sc))
            runs = f"; {n} point(s) x {sc.repeats} repeat(s) = {n * sc.repeats} runs"
        print(f"{arg}: ok ({sc.workload.type} workload, scenario {sc.name}{runs})")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from kvmksm.views.report import write_report

    for d in args.run_dir:
        if (Path(d) / "experiment.json").exists():
            raise UserError(
                f"{d}: an experiment folder, not a run record: its summary is rebuilt with "
                f"kvmksm compare {d} (and kvmksm plan {d} for a clone-count sweep)"
            )
        print(write_report(d))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from kvmksm.commands.doctor import diagnose
    from kvmksm.host.fs import HostFS
    from kvmksm.scenario import load as scenario

    sc = scenario.load(scenario.resolve_path(args.scenario)) if args.scenario else None
    findings = diagnose(HostFS(), sc, args.connect)
    out = Console(highlight=False)
    style = {"ok": "[green]ok  [/]", "warn": "[yellow]warn[/]", "fail": "[bold red]FAIL[/]"}
    for f in findings:
        line = f"{style[f.level]} {f.what}"
        if f.fix and f.level != "ok":
            line += f" [dim]->[/] {f.fix}"
        out.print(line, soft_wrap=True)
    return 1 if any(f.level == "fail" for f in findings) else 0


def cmd_clean(args: argparse.Namespace) -> int:
    from kvmksm.commands.clean import clean
    from kvmksm.host.fs import HostFS

    done, problems = clean(HostFS(), args.connect, dry_run=args.dry_run)
    verb = "would " if args.dry_run else ""
    for line in done:
        print(f"{verb}{line}")
    for p in problems:
        print(f"problem: {p}", file=sys.stderr)
    if not done and not problems:
        print("nothing to clean: no leftovers of kvmksm runs on this host")
    return 1 if problems else 0


def cmd_image(args: argparse.Namespace) -> int:
    from kvmksm.virt.conn import open_connection, resolve_uri
    from kvmksm.virt.tiny_image import build_image

    conn = open_connection(resolve_uri(args.connect))
    try:
        img = build_image(conn, name=args.name, force=args.force)
    finally:
        conn.close()
    print(f"base domain {args.name}: {img}")
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    from kvmksm.commands.watch import watch

    if args.interval < 0.1:
        raise UserError("--interval: at least 0.1s")
    result = watch(
        args.output,
        duration=args.duration,
        connect=args.connect,
        interval=args.interval,
        report=not args.no_report,
    )
    return result.exit_code


# -- experiments: bench of a matrix, compare, plan ---------------------------------------
def _experiment_parsers(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser(
        "compare",
        help="records or experiments side by side: metrics, differences beyond noise, curves",
    )
    c.add_argument("paths", nargs="+", metavar="PATH", help="run record, experiment, or a folder")
    c.add_argument(
        "-o",
        "--output",
        type=Path,
        help="HTML file (default: compare.html here, or inside the experiment when comparing one)",
    )
    c.add_argument("--json", action="store_true", help="print the comparison as JSON")
    c.add_argument(
        "--by-argument",
        action="store_true",
        help="one group per PATH instead of grouping records by what they ran",
    )
    c.add_argument("--alpha", type=float, default=0.05, help="significance level (default 0.05)")
    p = sub.add_parser("plan", help="how many guests fit, from a sweep of the guest count")
    p.add_argument("paths", nargs="+", metavar="PATH", help="experiment, run records, or a folder")
    p.add_argument(
        "--guest-memory", metavar="SIZE", help="memory per guest (default: the records')"
    )
    p.add_argument(
        "--host-memory", metavar="SIZE", help="host memory (default: the records' host MemTotal)"
    )
    p.add_argument(
        "--headroom",
        default="10%",
        metavar="PCT|SIZE",
        help="memory kept free: a share of host memory or a size (default 10%%)",
    )
    p.add_argument("--overhead", default="0", metavar="SIZE", help="extra memory per guest")
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        help="HTML file (default: plan.html here, or inside the experiment)",
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def _bench_experiment(
    sc: Scenario, path: str, connect: str | None, args: argparse.Namespace, out: Console
) -> int:
    from kvmksm.commands.experiment import run_experiment, summary_table

    result = run_experiment(sc, args.output, path, connect, reports=not args.no_report)
    out.print(summary_table(result.dir))
    if result.index.get("error"):
        out.print(f"[bold red]error:[/] {result.index['error']}", soft_wrap=True)
    out.print(f"experiment: {result.dir}", soft_wrap=True)
    for name in ("compare.html", "plan.html"):
        if (result.dir / name).exists():
            out.print(f"{name.split('.')[0]}: {result.dir / name}", soft_wrap=True)
    return result.exit_code


def cmd_compare(args: argparse.Namespace) -> int:
    import json

    from kvmksm.commands import compare

    if not 0 < args.alpha < 1:
        raise UserError(f"--alpha: expected a significance level between 0 and 1, got {args.alpha}")
    cmp = compare.compare(compare.collect(args.paths), args.by_argument, args.alpha)
    html = compare.write_html(
        cmp, args.output or compare.default_output(args.paths, "compare.html")
    )
    if args.json:
        print(json.dumps(cmp.to_json() | {"html": str(html)}, indent=1, default=str))
    else:
        out = Console(highlight=False)
        compare.terminal(cmp, out)
        out.print(f"report: {html}", soft_wrap=True)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    import json

    from kvmksm.commands import compare, plan

    plans = plan.plan(
        compare.collect(args.paths),
        guest_memory=plan.parse_size_arg(args.guest_memory, "--guest-memory"),
        host_memory=plan.parse_size_arg(args.host_memory, "--host-memory"),
        headroom=args.headroom,
        overhead=plan.parse_size_arg(args.overhead, "--overhead") or 0,
    )
    html = plan.write_html(plans, args.output or compare.default_output(args.paths, "plan.html"))
    if args.json:
        print(json.dumps(plan.to_json(plans) | {"html": str(html)}, indent=1, default=str))
    else:
        out = Console(highlight=False)
        plan.terminal(plans, out)
        out.print(f"report: {html}", soft_wrap=True)
    return 0


COMMANDS = {
    "compare": cmd_compare,
    "plan": cmd_plan,
    "bench": cmd_bench,
    "validate": cmd_validate,
    "report": cmd_report,
    "doctor": cmd_doctor,
    "clean": cmd_clean,
    "image": cmd_image,
    "watch": cmd_watch,
}


if __name__ == "__main__":
    sys.exit(main())

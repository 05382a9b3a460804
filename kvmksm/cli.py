"""The command line: thin; each subcommand calls one module."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from kvmksm import __version__
from kvmksm.checks import describe
from kvmksm.errors import UserError

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
    return ap


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
    from kvmksm.runner import bench, load_scenario

    sc, path = load_scenario(args.scenario)
    connect = args.connect or os.environ.get("LIBVIRT_DEFAULT_URI")
    out = Console(highlight=False)
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
        from kvmksm.report import write_report
    except ImportError:
        return
    try:
        write_report(run_dir)
    except Exception as e:  # the record is what matters; a report can be rebuilt
        Console(stderr=True).print(f"kvmksm: report not written: {e}", markup=False)


def cmd_validate(args: argparse.Namespace) -> int:
    from kvmksm import scenario

    for arg in args.scenario:
        sc = scenario.load(scenario.resolve_path(arg))
        print(f"{arg}: ok ({sc.workload.type} workload, scenario {sc.name})")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from kvmksm.report import write_report

    for d in args.run_dir:
        print(write_report(d))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from kvmksm import scenario
    from kvmksm.doctor import diagnose
    from kvmksm.hostfs import HostFS

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
    from kvmksm.hostfs import HostFS
    from kvmksm.recover import clean

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
    from kvmksm.image import build_image
    from kvmksm.libvirt_conn import open_connection, resolve_uri

    conn = open_connection(resolve_uri(args.connect))
    try:
        img = build_image(conn, name=args.name, force=args.force)
    finally:
        conn.close()
    print(f"base domain {args.name}: {img}")
    return 0


COMMANDS = {
    "bench": cmd_bench,
    "validate": cmd_validate,
    "report": cmd_report,
    "doctor": cmd_doctor,
    "clean": cmd_clean,
    "image": cmd_image,
}


if __name__ == "__main__":
    sys.exit(main())

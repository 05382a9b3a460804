"""The command line: parses arguments, calls the command's logic (kvmksm.commands) and hands
the result to a view (kvmksm.views). Modules are imported inside each command: a command loads
only what it uses (``kvmksm bench ltp-ksm03`` never imports libvirt or matplotlib before it
must), which keeps start-up short."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from kvmksm import __version__
from kvmksm.errors import UserError
from kvmksm.units import parse_duration

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
    b.add_argument(
        "--yes",
        action="store_true",
        help="start even when the scenario's waits could add up to more than a day",
    )
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

    im = sub.add_parser("image", help="kvmksm's own base images (tiny, Debian)")
    im_sub = im.add_subparsers(dest="image_command", metavar="ACTION")
    im_sub.required = True
    ib = im_sub.add_parser(
        "build",
        help="build a base image and define it as a shut-off base domain: tiny (from the "
        "host's kernel and busybox) or debian (Debian 12 from Debian's packages)",
    )
    ib.add_argument(
        "kind",
        nargs="?",
        choices=("tiny", "debian"),
        default="tiny",
        help="which image (default tiny)",
    )
    ib.add_argument(
        "--name", help="base domain name (default kvmksm-tiny, or kvmksm-debian for debian)"
    )
    ib.add_argument(
        "--kernel",
        metavar="PACKAGE",
        help="debian: the guest kernel package (default linux-image-amd64; one only "
        "bookworm-backports has, e.g. linux-image-6.12.95+deb12-amd64, is found there)",
    )
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
    try:
        value = parse_duration(float(text) if text.replace(".", "", 1).isdigit() else text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


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


def _connect(args: argparse.Namespace) -> str | None:
    return args.connect or os.environ.get("LIBVIRT_DEFAULT_URI")


def cmd_bench(args: argparse.Namespace) -> int:
    from kvmksm.commands.bench import bench
    from kvmksm.scenario.load import load_arg
    from kvmksm.views.terminal import TerminalProgress, bench_result

    sc, path = load_arg(args.scenario)
    _check_duration(sc, path, args.yes)
    out = Console(highlight=False)
    progress = TerminalProgress(Console(stderr=True, highlight=False))
    if sc.repeats > 1 or sc.matrix:  # an experiment: every point x repeats, one run each
        return _bench_experiment(sc, path, args, out, progress)
    result = bench(sc, args.output, scenario_file=path, connect=_connect(args), progress=progress)
    report = None if args.no_report else _write_report(result.record_dir, progress)
    bench_result(result, sc.name, out, report)
    return result.exit_code


def _write_report(run_dir: Path, progress: Any) -> Path | None:
    """report.html beside the record; a report that cannot be drawn loses nothing (the
    record is what matters, and `kvmksm report` rebuilds it)."""
    from kvmksm.views.report import write_report

    try:
        return write_report(run_dir)
    except Exception as e:
        progress.warn(f"report not written ({e}); rebuild it with: kvmksm report {run_dir}")
        return None


def _bench_experiment(
    sc: Any, path: str, args: argparse.Namespace, out: Console, progress: Any
) -> int:
    from kvmksm.commands.experiment import point_summaries, run_experiment
    from kvmksm.views.experiment_pages import write_summaries
    from kvmksm.views.terminal import experiment_summary

    report = None if args.no_report else (lambda d: _write_report(d, progress))
    result = run_experiment(sc, args.output, path, _connect(args), progress=progress, report=report)
    for problem in result.problems:
        progress.warn(problem)
    written: list[Path] = []
    if not args.no_report:
        try:
            written = write_summaries(result.dir)
        except Exception as e:  # the records are what matters; kvmksm compare rebuilds these
            progress.warn(f"summary not written: {e}")
    experiment_summary(point_summaries(result.dir), out)
    out.print(f"experiment: {result.dir}", soft_wrap=True, markup=False)
    for page in written:
        out.print(f"{page.stem}: {page}", soft_wrap=True, markup=False)
    return result.exit_code


def _check_duration(sc: Any, path: str, yes: bool) -> None:
    from kvmksm.scenario.estimate import estimate

    est = estimate(sc)
    if est.needs_yes and not yes:
        raise UserError(
            f"{path}: {est.line()}; that could take more than a day: add --yes to start it"
        )


def cmd_validate(args: argparse.Namespace) -> int:
    """Every problem of every file, one line each (stderr); exit 2 when any file is bad."""
    from kvmksm.scenario import load as scenario
    from kvmksm.scenario.estimate import estimate

    bad = 0
    for arg in args.scenario:
        try:
            checked = scenario.check_file(scenario.resolve_path(arg))
        except UserError as e:
            print(e, file=sys.stderr)
            bad += 1
            continue
        if checked.scenario is None:
            print("\n".join(checked.problems), file=sys.stderr)
            bad += 1
            continue
        sc = checked.scenario
        est = estimate(sc)
        asks = "; bench asks for --yes: more than a day" if est.needs_yes else ""
        print(f"{arg}: ok ({sc.workload.type} workload, scenario {sc.name}; {est.line()}{asks})")
    return 2 if bad else 0


def cmd_report(args: argparse.Namespace) -> int:
    from kvmksm.results.experiment import is_experiment
    from kvmksm.views.report import write_report

    for d in args.run_dir:
        if is_experiment(Path(d)):
            raise UserError(
                f"{d}: an experiment folder, not a run record: its summary is rebuilt with "
                f"kvmksm compare {d} (and kvmksm plan {d} for a clone-count sweep)"
            )
        print(write_report(d))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from kvmksm.commands.doctor import diagnose
    from kvmksm.host.fs import HostFS
    from kvmksm.scenario.load import load_arg
    from kvmksm.views.terminal import findings

    sc = load_arg(args.scenario)[0] if args.scenario else None
    found = diagnose(HostFS(), sc, args.connect)
    findings(found, Console(highlight=False))
    return 1 if any(f.level == "fail" for f in found) else 0


def cmd_clean(args: argparse.Namespace) -> int:
    from kvmksm.commands.clean import clean
    from kvmksm.host.fs import HostFS
    from kvmksm.views.terminal import cleaned

    done, problems = clean(HostFS(), args.connect, dry_run=args.dry_run)
    cleaned(done, problems, args.dry_run, Console(highlight=False), Console(stderr=True))
    return 1 if problems else 0


def cmd_image(args: argparse.Namespace) -> int:
    from kvmksm.virt import libvirt_missing

    if args.kernel and args.kind != "debian":
        raise UserError("--kernel: only the debian image takes a kernel package")
    try:
        from kvmksm.virt import debian_image
        from kvmksm.virt.conn import open_connection, resolve_uri
        from kvmksm.virt.tiny_image import build_image
    except ImportError as e:
        raise libvirt_missing(e, "kvmksm image build") from None

    err = Console(stderr=True, highlight=False)
    conn = open_connection(resolve_uri(args.connect))
    try:
        if args.kind == "debian":
            from kvmksm.views.terminal import TerminalProgress

            img = debian_image.build_image(
                conn,
                name=args.name or debian_image.DEFAULT_NAME,
                kernel=args.kernel or debian_image.DEFAULT_KERNEL,
                force=args.force,
                progress=TerminalProgress(err),
            )
        else:
            img = build_image(
                conn,
                name=args.name or "kvmksm-tiny",
                force=args.force,
                progress=lambda text: err.print(f"image: {text}", markup=False, soft_wrap=True),
            )
    finally:
        conn.close()
    print(f"base domain {img}")
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    from kvmksm.commands.watch.session import watch
    from kvmksm.views.live import summary, view_for

    if args.interval < 0.1:
        raise UserError("--interval: at least 0.1s")
    console = Console(highlight=False)
    result = watch(
        args.output,
        duration=args.duration,
        connect=args.connect,
        interval=args.interval,
        view=view_for(console, os.sysconf("SC_PAGE_SIZE")),
    )
    report = None
    if not args.no_report:
        from kvmksm.views.terminal import TerminalProgress

        report = _write_report(result.record_dir, TerminalProgress(console))
    summary(console, result, report)
    return result.exit_code


def cmd_compare(args: argparse.Namespace) -> int:
    from kvmksm.commands.compare import collect, compare, default_output
    from kvmksm.views.compare_page import compare_page
    from kvmksm.views.terminal import comparison

    if not 0 < args.alpha < 1:
        raise UserError(f"--alpha: expected a significance level between 0 and 1, got {args.alpha}")
    cmp = compare(collect(args.paths), args.by_argument, args.alpha)
    html = compare_page(cmp, args.output or default_output(args.paths, "compare.html"))
    if args.json:
        print(json.dumps(cmp.to_json() | {"html": str(html)}, indent=1, default=str))
    else:
        out = Console(highlight=False)
        comparison(cmp, out)
        out.print(f"report: {html}", soft_wrap=True, markup=False)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from kvmksm.commands.compare import collect, default_output
    from kvmksm.commands.plan import parse_size_arg, plan, to_json
    from kvmksm.views.plan_page import plan_page
    from kvmksm.views.terminal import plans as show_plans

    plans = plan(
        collect(args.paths),
        guest_memory=parse_size_arg(args.guest_memory, "--guest-memory"),
        host_memory=parse_size_arg(args.host_memory, "--host-memory"),
        headroom=args.headroom,
        overhead=parse_size_arg(args.overhead, "--overhead") or 0,
    )
    html = plan_page(plans, args.output or default_output(args.paths, "plan.html"))
    if args.json:
        print(json.dumps(to_json(plans) | {"html": str(html)}, indent=1, default=str))
    else:
        out = Console(highlight=False)
        show_plans(plans, out)
        out.print(f"report: {html}", soft_wrap=True, markup=False)
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

"""The command line: parses arguments, calls the command's logic (kvmksm.commands) and hands
the result to a view (kvmksm.views). Modules are imported inside each command: a command loads
only what it uses (``kvmksm bench ltp-ksm03`` never imports libvirt or matplotlib before it
must), which keeps start-up short."""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import os
import re
import sys
import threading
from pathlib import Path
from typing import Any, NoReturn

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
    size = b.add_mutually_exclusive_group()
    size.add_argument(
        "--clones",
        type=_positive_int,
        metavar="N",
        help="run N clones instead of the scenario's (vms scenarios without a matrix; for a "
        "plan's check run: kvmksm plan EXP --check RECORD)",
    )
    size.add_argument(
        "--count",
        type=_positive_int,
        metavar="N",
        help="run N processes instead of the scenario's, each filled with the one pattern "
        "(processes scenarios without a matrix)",
    )
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
    c.add_argument(
        "--run",
        metavar="ID",
        type=_run_id,
        help="only the guests and volumes of this run (the 8 hex digits in kvmksm-ID-...), "
        "leaving other runs' alone",
    )
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
    _fleet_parser(sub)
    return ap


def _run_id(text: str) -> str:
    if not re.fullmatch(r"[0-9a-f]{8}", text):
        raise argparse.ArgumentTypeError("expected the 8 hex digits of a run id, e.g. 0a1b2c3d")
    return text


FLEET_EXIT = """exit status:
  0    every host passed
  1    a host failed, could not be reached or installed, or its run went wrong (each is
       named in the table and in fleet.json); the other hosts still ran
  2    bad input (inventory, scenario): no host was touched
  130  interrupted: every host's run was stopped (SIGTERM: it restores its host), what it
       recorded brought back"""


def _fleet_parser(sub: argparse._SubParsersAction) -> None:
    f = sub.add_parser("fleet", help="one scenario on many hosts, through Ansible")
    f_sub = f.add_subparsers(dest="fleet_command", metavar="ACTION")
    f_sub.required = True
    r = f_sub.add_parser(
        "run",
        help="run a scenario on every host of an Ansible inventory and gather the records",
        epilog=FLEET_EXIT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    r.add_argument("inventory", help="Ansible inventory (INI or YAML file, or a folder)")
    r.add_argument("scenario", help="scenario YAML file or bundled name")
    r.add_argument(
        "-o",
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        help="folder for the fleet folder (default: reports/; it goes in OUTPUT/<name>/)",
    )
    r.add_argument("--limit", metavar="PATTERN", help="only these hosts (Ansible's --limit)")
    r.add_argument(
        "--forks",
        type=_positive_int,
        metavar="N",
        help="hosts worked on at once (default: all of them, up to 50)",
    )
    r.add_argument(
        "--no-report",
        action="store_true",
        help="do not write each record's report.html nor the kernel comparison",
    )


def _duration(text: str) -> float:
    try:
        value = parse_duration(float(text) if text.replace(".", "", 1).isdigit() else text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, got {value}")
    return value


def _percent(text: str) -> float:
    try:
        value = float(text.strip().removesuffix("%"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a percentage (5 or 5%), got {text!r}") from None
    if not 0 <= value < 1e6:
        raise argparse.ArgumentTypeError(f"expected a percentage of 0 or more, got {text!r}")
    return value


COMPARE_EXIT = """exit status:
  0  nothing worse beyond noise by more than --fail-if-worse PCT (or no PCT given)
  1  with --fail-if-worse PCT: some metric of some group is worse than group A beyond
     noise (Welch's t-test at --alpha) by more than PCT percent of A's mean
  2  bad input: nothing was compared
  3  the comparison cannot tell: the records are NOT COMPARABLE (different workloads), or
     a group has fewer than 3 repeats; said on stderr first (3 is given before 1)"""

PLAN_EXIT = """exit status:
  0  planned (with --check: whether or not the check run falls inside the intervals;
     read 'inside' in the table or --json)
  2  bad input, or nothing to project: records of a single guest count (their figures
     are shown), a guest larger than the host, a --check record no plan applies to"""


def _experiment_parsers(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser(
        "compare",
        help="records or experiments side by side: metrics, differences beyond noise, curves",
        epilog=COMPARE_EXIT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
    c.add_argument(
        "--fail-if-worse",
        type=_percent,
        metavar="PCT",
        help="exit 1 when any metric of any group is worse than group A beyond noise by more "
        "than PCT percent (a gate for CI)",
    )
    p = sub.add_parser(
        "plan",
        help="how many guests fit, from a sweep of the guest count",
        epilog=PLAN_EXIT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
    p.add_argument(
        "--check",
        action="append",
        metavar="RECORD",
        default=[],
        help="a run the plan did not see (e.g. kvmksm bench SCENARIO --clones N, N past the "
        "sweep): predicted against measured, and whether it falls inside the 95%% interval "
        "(may be given more than once)",
    )


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


def run() -> NoReturn:
    """The program: main(), then out at once. Tearing down the interpreter once pandas,
    matplotlib and pyarrow are loaded takes a quarter of a second (measured) and does nothing
    for us: every file kvmksm writes is closed by then. With a thread of ours still at work,
    the normal exit, which waits for it."""
    code = main()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    busy = [t for t in threading.enumerate() if not t.daemon and t is not threading.main_thread()]
    if busy:
        sys.exit(code)
    os._exit(code)


def _connect(args: argparse.Namespace) -> str | None:
    return args.connect or os.environ.get("LIBVIRT_DEFAULT_URI")


def cmd_bench(args: argparse.Namespace) -> int:
    from kvmksm.commands.bench import bench
    from kvmksm.results.space import check_room
    from kvmksm.scenario.load import load_arg
    from kvmksm.views.terminal import TerminalProgress, bench_result

    sc, path = load_arg(args.scenario)
    if args.clones is not None or args.count is not None:
        from kvmksm.commands.overrides import override_count

        sc = override_count(sc, path, args.clones, args.count)
    _check_duration(sc, path, args.yes)
    check_room(sc, args.output)  # a record that cannot fit: refused before anything changes
    out = Console(highlight=False)
    progress = TerminalProgress(Console(stderr=True, highlight=False))
    # The analysis and the report need pandas and matplotlib (most of a second to import),
    # the run itself neither: import them meanwhile, while the run waits on the kernel.
    report_too = not args.no_report
    preload = _preload(
        "kvmksm.analysis.metrics",
        *(("kvmksm.views.report",) if report_too else ()),
        warm_report=report_too,
    )
    if sc.repeats > 1 or sc.matrix:  # an experiment: every point x repeats, one run each
        return _bench_experiment(sc, path, args, out, progress, preload)
    result = bench(sc, args.output, scenario_file=path, connect=_connect(args), progress=progress)
    report = _write_report(result.record_dir, progress, preload) if report_too else None
    bench_result(result, sc.name, out, report)
    return result.exit_code


def _preload(*modules: str, warm_report: bool = False) -> threading.Thread:
    """Import modules in a background thread (a failure is left for the real import), and
    with ``warm_report`` pay a first report's one-time costs too. Join the thread before
    drawing: matplotlib is not safe to use from two threads at once."""

    def load() -> None:
        for name in modules:
            with contextlib.suppress(Exception):
                importlib.import_module(name)
        if warm_report:
            with contextlib.suppress(Exception):
                from kvmksm.views.report import warm_up

                warm_up()
        # The modules' objects live as long as the process: kept out of the collector's
        # full passes, which otherwise walk them all (60-70 ms each, one of them in the
        # first report drawn).
        gc.freeze()

    thread = threading.Thread(target=load, name="kvmksm-preload", daemon=True)
    thread.start()
    return thread


def _write_report(
    run_dir: Path, progress: Any, preload: threading.Thread | None = None
) -> Path | None:
    """report.html beside the record; a report that cannot be drawn loses nothing (the
    record is what matters, and `kvmksm report` rebuilds it)."""
    if preload is not None:
        preload.join()  # it may still be drawing its warm-up chart
    from kvmksm.views.report import write_report

    try:
        return write_report(run_dir)
    except Exception as e:
        progress.warn(f"report not written ({e}); rebuild it with: kvmksm report {run_dir}")
        return None


def _bench_experiment(
    sc: Any,
    path: str,
    args: argparse.Namespace,
    out: Console,
    progress: Any,
    preload: threading.Thread,
) -> int:
    from kvmksm.commands.experiment import point_summaries, run_experiment
    from kvmksm.views.terminal import experiment_summary

    report = None if args.no_report else (lambda d: _write_report(d, progress, preload))
    result = run_experiment(sc, args.output, path, _connect(args), progress=progress, report=report)
    for problem in result.problems:
        progress.warn(problem)
    written: list[Path] = []
    if not args.no_report:
        # the pages need matplotlib, which a fleet host (bench --no-report) does not have
        from kvmksm.views.experiment_pages import write_summaries

        preload.join()  # no point drew a report: its warm-up may still be drawing
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

    done, problems = clean(HostFS(), args.connect, dry_run=args.dry_run, run=args.run)
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
    from kvmksm.commands.compare_gate import judge
    from kvmksm.views.compare_page import compare_page
    from kvmksm.views.terminal import comparison, gate_result

    if not 0 < args.alpha < 1:
        raise UserError(f"--alpha: expected a significance level between 0 and 1, got {args.alpha}")
    cmp = compare(collect(args.paths), args.by_argument, args.alpha)
    gate = judge(cmp, args.fail_if_worse)
    err = Console(stderr=True, highlight=False)
    for line in gate.cannot_tell:  # before anything else: the figures below cannot decide
        err.print(f"kvmksm: {line}", markup=False, soft_wrap=True)
    html = compare_page(cmp, args.output or default_output(args.paths, "compare.html"))
    kernels = None
    if any(d["kind"] == "kernel" for d in cmp.differences):  # kernels side by side, too
        from kvmksm.commands.kernels import kernel_comparison  # only when kernels differ
        from kvmksm.views.kernels_page import kernels_page

        kernels = kernels_page(kernel_comparison(cmp), html.with_name("kernels.html"))
    if args.json:
        doc = cmp.to_json() | {"gate": gate.to_json(), "html": str(html)}
        if kernels:
            doc["kernels_html"] = str(kernels)
        print(json.dumps(doc, indent=1, default=str))
    else:
        out = Console(highlight=False)
        comparison(cmp, out, said=gate.cannot_tell)
        gate_result(gate, out)
        out.print(f"report: {html}", soft_wrap=True, markup=False)
        if kernels:
            out.print(f"kernels: {kernels}", soft_wrap=True, markup=False)
    return gate.status


def cmd_plan(args: argparse.Namespace) -> int:
    from kvmksm.commands.compare import collect, default_output
    from kvmksm.commands.plan import parse_size_arg, plan, to_json
    from kvmksm.commands.plan_check import check_plans
    from kvmksm.views.plan_page import plan_page
    from kvmksm.views.terminal import plans as show_plans

    checks = collect(args.check) if args.check else []
    seen = {r.record.dir.resolve() for r in checks}
    plans = plan(
        [r for r in collect(args.paths) if r.record.dir.resolve() not in seen],
        guest_memory=parse_size_arg(args.guest_memory, "--guest-memory"),
        host_memory=parse_size_arg(args.host_memory, "--host-memory"),
        headroom=args.headroom,
        overhead=parse_size_arg(args.overhead, "--overhead") or 0,
    )
    refused = [p.refused for p in plans if p.refused]
    if args.check and not refused:
        check_plans(plans, checks)
    # A plan that refused to project writes no page: its reason is the answer.
    html = (
        None
        if refused
        else plan_page(plans, args.output or default_output(args.paths, "plan.html"))
    )
    if args.json:
        print(
            json.dumps(
                to_json(plans) | {"html": str(html) if html else None}, indent=1, default=str
            )
        )
    else:
        out = Console(highlight=False)
        show_plans(plans, out)
        if html:
            out.print(f"report: {html}", soft_wrap=True, markup=False)
    if refused:
        raise UserError(refused[0])
    return 0


def cmd_fleet(args: argparse.Namespace) -> int:
    from kvmksm.commands.fleet import fleet_run
    from kvmksm.scenario.load import resolve_path
    from kvmksm.views.fleet import fleet_result, write_fleet_pages
    from kvmksm.views.terminal import TerminalProgress

    out = Console(highlight=False)
    progress = TerminalProgress(Console(stderr=True, highlight=False))
    result = fleet_run(
        args.inventory,
        str(resolve_path(args.scenario)),
        args.output,
        limit=args.limit,
        forks=args.forks,
        progress=progress,
    )
    pages = [] if args.no_report else write_fleet_pages(result.dir, progress)
    fleet_result(result, out, pages)
    return result.exit_code


COMMANDS = {
    "fleet": cmd_fleet,
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

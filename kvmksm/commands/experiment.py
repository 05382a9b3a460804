"""Experiments: a scenario's `matrix` (cross product of its axes) times `repeats`, run one
after another as full bench() runs, grouped in one directory with an index.

Layout: OUTPUT/<name>/<UTC time>-<host>-exp/
  experiment.json   the index: axes, points, every run's directory and status
  001_pages_to_scan-1000_r1/ ...   one run record per run (the usual run directory)
  compare.html      every point side by side (kvmksm compare), plan.html for a size sweep

Each run is a complete bench(): knobs saved and restored, workload torn down. The knobs are
read again after every run and the experiment stops if they are not as before it started.
Runs go repeat by repeat (every point once, then every point again), so a slow drift of the
host spreads over all points instead of biasing the last ones.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from rich import box
from rich.console import Console
from rich.table import Table

from kvmksm.errors import Interrupted, UserError
from kvmksm.host.facts import host_facts
from kvmksm.host.fs import HostFS
from kvmksm.host.ksm import Ksm
from kvmksm.results.record import RUN_JSON, Record, load_record, utc_now
from kvmksm.scenario import load as scenario_mod
from kvmksm.scenario.model import SIZE_AXES, Scenario
from kvmksm.signals import signals_raise
from kvmksm.workloads.base import Workload

FORMAT = 1
INDEX = "experiment.json"
STAGING = ".running"  # bench() writes here; the finished record is moved beside the index


@dataclass
class RunPlan:
    index: int  # 0-based, in running order
    point: int  # index into the points
    values: dict[str, Any]  # the matrix point: axis -> value
    repeat: int  # 1-based
    scenario: Scenario  # resolved: point applied, no matrix, repeats 1

    @property
    def label(self) -> str:
        return point_label(self.values)

    @property
    def dirname(self) -> str:
        parts = [f"{k}-{v}" for k, v in self.values.items()]
        return "_".join([f"{self.index + 1:03d}", *parts, f"r{self.repeat}"])


def point_label(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items()) or "no matrix"


def points(sc: Scenario) -> list[dict[str, Any]]:
    """The cross product of the axes, in the order the file lists them."""
    axes = list(sc.matrix.items())
    return [
        dict(zip([k for k, _ in axes], combo, strict=True))
        for combo in itertools.product(*(v for _, v in axes))
    ]


def apply_point(sc: Scenario, values: dict[str, Any]) -> Scenario:
    """The scenario one run of the point runs: the axes set, no matrix, one repeat."""
    data = sc.model_dump()
    data.update(matrix={}, repeats=1)
    size_axis, _ = SIZE_AXES[sc.workload.type]
    for key, value in values.items():
        if key == size_axis:
            data["workload"][key] = value
            if key == "count":  # one pattern per process: the (uniform) pattern, repeated
                for step in data["workload"]["steps"]:
                    if step.get("action") == "fill":
                        step["patterns"] = [step["patterns"][0]] * int(value)
        else:
            data["knobs"][key] = value
    return Scenario.model_validate(data)


def expand(sc: Scenario) -> list[RunPlan]:
    pts = points(sc)
    resolved = [apply_point(sc, p) for p in pts]
    plans = []
    for r in range(1, sc.repeats + 1):
        for i, p in enumerate(pts):
            plans.append(RunPlan(len(plans), i, p, r, resolved[i]))
    return plans


# -- running ----------------------------------------------------------------------------
@dataclass
class ExperimentResult:
    status: str  # passed | failed | error | interrupted
    dir: Path
    index: dict[str, Any]

    @property
    def exit_code(self) -> int:
        from kvmksm.commands.bench import exit_code

        return exit_code(self.status)


def run_experiment(
    sc: Scenario,
    output: Path,
    scenario_file: str | None = None,
    connect: str | None = None,
    fs: HostFS | None = None,
    console: Console | None = None,
    workload_factory: Callable[[Scenario], Workload] | None = None,
    reports: bool = True,
) -> ExperimentResult:
    from kvmksm.commands.bench import bench, make_workload

    fs = fs or HostFS()
    console = console or Console(stderr=True, highlight=False)
    factory = workload_factory or (lambda s: make_workload(s, connect))
    plans = expand(sc)
    _preflight(sc, plans, fs, factory, scenario_file)

    exp_dir = _make_dir(Path(output), sc.name)
    ksm = Ksm(fs)
    knobs0 = ksm.read_knobs()
    index = _new_index(sc, scenario_file, plans, fs, knobs0)
    _save(exp_dir, index)
    console.print(
        f"experiment {sc.name}: {len(index['points'])} point(s) x {sc.repeats} repeat(s) = "
        f"{len(plans)} runs in {exp_dir}",
        soft_wrap=True,
    )
    status = "passed"
    try:
        with signals_raise():
            for plan in plans:
                entry = index["runs"][plan.index]
                console.print(
                    f"[{plan.index + 1}/{len(plans)}] {plan.label}, repeat {plan.repeat}/"
                    f"{sc.repeats} ...",
                    soft_wrap=True,
                )
                entry.update(status="running", started=utc_now())
                _save(exp_dir, index)
                t0 = time.monotonic()
                workload = factory(plan.scenario)
                try:
                    result = bench(
                        plan.scenario,
                        exp_dir / STAGING,
                        scenario_file=scenario_file,
                        connect=connect,
                        fs=fs,
                        console=console,
                        workload=workload,
                    )
                except UserError as e:  # e.g. another kvmksm took the host between runs
                    entry.update(status="error", error=str(e))
                    status = "error"
                    console.print(f"  not run: {e}", markup=False, soft_wrap=True)
                    break
                run_dir = _settle(result.record_dir, exp_dir / plan.dirname)
                meta = _annotate(run_dir, index, plan)
                entry["counters_before"] = {
                    k: (meta.get("counters_before") or {}).get(k)
                    for k in ("pages_shared", "pages_sharing")
                }
                after = ksm.read_knobs()
                restored = after == knobs0
                entry.update(
                    status=result.status,
                    error=result.error,
                    dir=run_dir.name,
                    seconds=round(time.monotonic() - t0, 3),
                    host_restored=restored,
                )
                if reports:
                    _report(run_dir, console)
                _save(exp_dir, index)
                console.print(
                    f"  {result.status} in {entry['seconds']:.1f}s -> {run_dir.name}",
                    soft_wrap=True,
                )
                if result.status == "interrupted":
                    status = "interrupted"
                    break
                if not restored:
                    diff = {k: (v, after.get(k)) for k, v in knobs0.items() if after.get(k) != v}
                    index["error"] = f"knobs not restored after run {plan.index + 1}: {diff}"
                    status = "error"
                    break
                if result.status != "passed" and status == "passed":
                    status = "failed"
    except (KeyboardInterrupt, Interrupted):
        status = "interrupted"
    except Exception as e:
        status, index["error"] = "error", f"{type(e).__name__}: {e}"
        raise
    finally:
        for entry in index["runs"]:
            if entry["status"] in ("pending", "running"):
                entry["status"] = "not run" if entry["status"] == "pending" else "interrupted"
        with contextlib.suppress(OSError):
            (exp_dir / STAGING).rmdir()  # only when empty: a killed run's record stays
        index.update(status=status, finished=utc_now(), knobs_after=ksm.read_knobs())
        _save(exp_dir, index)
    if reports:
        write_summaries(exp_dir, console)
    return ExperimentResult(status, exp_dir, index)


def _preflight(
    sc: Scenario,
    plans: list[RunPlan],
    fs: HostFS,
    factory: Callable[[Scenario], Workload],
    scenario_file: str | None,
) -> None:
    """Every point checked against this host before the first run changes anything."""
    ksm = Ksm(fs)
    ksm.require()
    for key in sc.matrix:
        if key != SIZE_AXES[sc.workload.type][0]:
            where = f"{scenario_file or sc.name}:{_line(scenario_file, ('matrix', key))}"
            ksm.check_knobs([key], where=f"{where}: matrix.{key}: ")
    seen: set[int] = set()
    for plan in plans:
        if plan.point in seen:
            continue
        seen.add(plan.point)
        ksm.check_knobs(plan.scenario.knobs, where=f"{scenario_file or sc.name}: knobs: ")
        factory(plan.scenario).preflight(fs, ksm)


def _line(scenario_file: str | None, loc: tuple[Any, ...]) -> int | str:
    try:
        root = yaml.compose(Path(scenario_file or "").read_text(), Loader=yaml.SafeLoader)
        return scenario_mod.locate(root, loc)[0]
    except (OSError, yaml.YAMLError, AttributeError, TypeError):
        return "?"


def _make_dir(output: Path, name: str) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    base = output / name / f"{stamp}-{socket.gethostname()}-exp"
    d, n = base, 1
    while d.exists():
        n += 1
        d = base.with_name(f"{base.name}-{n}")
    try:
        d.mkdir(parents=True)
    except OSError as e:
        raise UserError(f"{d}: cannot create the experiment folder: {e.strerror}") from None
    return d


def _new_index(
    sc: Scenario,
    scenario_file: str | None,
    plans: list[RunPlan],
    fs: HostFS,
    knobs0: dict[str, Any],
) -> dict[str, Any]:
    from kvmksm import __version__

    pts = points(sc)
    return {
        "format": FORMAT,
        "kind": "experiment",
        "tool": {"name": "kvmksm", "version": __version__},
        "name": sc.name,
        "status": "running",
        "error": None,
        "scenario_file": scenario_file,
        "scenario": sc.model_dump(mode="json"),
        "started": utc_now(),
        "finished": None,
        "host": host_facts(fs),
        "axes": dict(sc.matrix),
        "repeats": sc.repeats,
        "order": "repeat by repeat: every point once, then every point again",
        "knobs_before": knobs0,
        "knobs_after": None,
        "counters_before": {
            k: v
            for k, v in Ksm(fs).read_counters().items()
            if k in ("pages_shared", "pages_sharing")
        },
        "points": [
            {
                "index": i,
                "values": p,
                "label": point_label(p),
                "runs": [pl.index for pl in plans if pl.point == i],
            }
            for i, p in enumerate(pts)
        ],
        "runs": [
            {
                "index": pl.index,
                "point": pl.point,
                "values": pl.values,
                "repeat": pl.repeat,
                "label": pl.label,
                "dir": None,
                "status": "pending",
                "error": None,
                "started": None,
                "seconds": None,
                "host_restored": None,
                "counters_before": None,
            }
            for pl in plans
        ],
    }


def _save(exp_dir: Path, index: dict[str, Any]) -> None:
    tmp = exp_dir / (INDEX + ".tmp")
    tmp.write_text(json.dumps(index, indent=1, default=str) + "\n")
    os.replace(tmp, exp_dir / INDEX)


def _settle(record_dir: Path, target: Path) -> Path:
    """Move a finished record from the staging folder to its place beside the index."""
    os.replace(record_dir, target)
    with contextlib.suppress(OSError):
        record_dir.parent.rmdir()  # STAGING/<name>/ once empty
    return target


def _annotate(run_dir: Path, index: dict[str, Any], plan: RunPlan) -> dict[str, Any]:
    """Say in run.json which experiment, point and repeat the record belongs to."""
    path = run_dir / RUN_JSON
    meta = json.loads(path.read_text())
    meta["experiment"] = {
        "name": index["name"],
        "started": index["started"],
        "run": plan.index,
        "point": plan.point,
        "values": plan.values,
        "repeat": plan.repeat,
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=1, default=str) + "\n")
    os.replace(tmp, path)
    return meta


def _report(run_dir: Path, console: Console) -> None:
    try:
        from kvmksm.views.report import write_report

        write_report(run_dir)
    except Exception as e:  # the record is what matters; a report can be rebuilt
        console.print(f"  report not written: {e}", markup=False, soft_wrap=True)


def write_summaries(exp_dir: Path, console: Console | None = None) -> list[Path]:
    """compare.html of all points, and plan.html when the size of the workload was swept."""
    from kvmksm.commands import compare, plan

    written = []
    try:
        runs = compare.collect([exp_dir])
        if runs:
            cmp = compare.compare(runs)
            written.append(compare.write_html(cmp, exp_dir / "compare.html"))
            index = load_index(exp_dir)
            size_axis, _ = SIZE_AXES.get(index["scenario"]["workload"]["type"], ("", 0))
            if len(index["axes"].get(size_axis, [])) >= 2:
                written.append(plan.write_html(plan.plan(runs), exp_dir / "plan.html"))
    except Exception as e:  # the records are what matters; `kvmksm compare` rebuilds these
        if console:
            console.print(f"summary not written: {e}", markup=False, soft_wrap=True)
    return written


# -- reading ----------------------------------------------------------------------------
def load_index(exp_dir: str | Path) -> dict[str, Any]:
    path = Path(exp_dir) / INDEX
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{exp_dir}: not a kvmksm experiment (no {INDEX})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None
    if not isinstance(index, dict) or index.get("kind") != "experiment":
        raise UserError(f"{path}: not a kvmksm experiment index")
    if int(index.get("format", 0)) > FORMAT:
        raise UserError(f"{path}: experiment format {index['format']} is newer than this kvmksm")
    return index


def load_runs(exp_dir: str | Path) -> list[tuple[dict[str, Any], Record]]:
    """(index entry, record) of every run that left a record."""
    index = load_index(exp_dir)
    out = []
    for entry in index["runs"]:
        if entry.get("dir") and (Path(exp_dir) / entry["dir"] / RUN_JSON).exists():
            out.append((entry, load_record(Path(exp_dir) / entry["dir"])))
    return out


def summary_table(exp_dir: Path) -> Table:
    """One row per point: runs, savings, cost, speed (mean ± sd over the repeats)."""
    from kvmksm.analysis.pareto import pareto_front
    from kvmksm.commands import compare
    from kvmksm.views.report import fmt_num

    index = load_index(exp_dir)
    by_point: dict[int, list[Any]] = {p["index"]: [] for p in index["points"]}
    for entry, record in load_runs(exp_dir):
        if entry["status"] in ("passed", "failed"):
            by_point[entry["point"]].append(compare.make_run(record, str(exp_dir)))
    table = Table(
        title=f"experiment {index['name']}: {index['status'].upper()} (mean ± sd over repeats)",
        title_justify="left",
        box=box.SIMPLE_HEAD,
    )
    for axis in index["axes"] or {"point": None}:
        table.add_column(axis, justify="right", no_wrap=True)
    cols = [
        ("plateau_saved_mib", "saved MiB"),
        ("ksmd_cpu_to_plateau_s", "ksmd CPU s"),
        ("mib_per_cpu_s", "MiB/CPU s"),
        ("time_to_90pct_s", "t90% s"),
    ]
    table.add_column("ok", justify="right")
    for _, title in cols:
        table.add_column(title, justify="right")
    means = {
        i: [compare.mean_sd([r.outcome.value(k) for r in runs])[0] for k, _ in cols]
        for i, runs in by_point.items()
    }
    knob_axes = [a for a in index["axes"] if a not in ("count", "clones")]
    front = set()
    if knob_axes and len(by_point) > 1:
        # The front among points of the same size: knobs are what a user can pick.
        sizes: dict[Any, list[int]] = {}
        for p in index["points"]:
            size = tuple(v for k, v in p["values"].items() if k not in knob_axes)
            sizes.setdefault(size, []).append(p["index"])
        for members in sizes.values():
            pts = [(i, means[i][1], means[i][0]) for i in members]
            pts = [t for t in pts if t[1] is not None and t[2] is not None]
            flags = pareto_front([(x, y) for _, x, y in pts])
            front |= {i for (i, _, _), f in zip(pts, flags, strict=True) if f}
        table.add_column("Pareto", justify="center")
    for p in index["points"]:
        runs = by_point[p["index"]]
        total = len(p["runs"])
        ok = sum(1 for e in index["runs"] if e["point"] == p["index"] and e["status"] == "passed")
        row = [str(v) for v in p["values"].values()] or [p["label"]]
        row.append(f"{ok}/{total}")
        for k, _ in cols:
            mean, sd = compare.mean_sd([r.outcome.value(k) for r in runs])
            row.append("—" if mean is None else fmt_num(mean) + (f"\n±{fmt_num(sd)}" if sd else ""))
        if knob_axes and len(by_point) > 1:
            row.append("★" if p["index"] in front else "")
        table.add_row(*row)
    return table

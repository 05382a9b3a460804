"""Experiments: a scenario's `matrix` (cross product of its axes) times `repeats`, run one
after another as full bench runs, in one folder with an index (kvmksm.results.experiment).

Each run is a complete bench: knobs saved and restored, workload torn down. The knobs are read
again after every run and the experiment stops if they are not as before it started. Runs go
repeat by repeat (every point once, then every point again), so a slow drift of the host
spreads over all points instead of biasing the last ones.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kvmksm import __version__
from kvmksm.analysis.grouping import USABLE, make_run
from kvmksm.analysis.pareto import pareto_front
from kvmksm.analysis.stats import mean_sd
from kvmksm.commands.bench import bench, exit_code, fit_to_host, make_workload
from kvmksm.errors import Interrupted, UserError
from kvmksm.host.facts import host_facts
from kvmksm.host.fs import HostFS
from kvmksm.host.ksm import Ksm
from kvmksm.progress import Progress, Silent
from kvmksm.results import experiment as folder
from kvmksm.results.record import utc_now
from kvmksm.scenario.load import locate
from kvmksm.scenario.model import SIZE_AXES, Scenario
from kvmksm.signals import signals_raise
from kvmksm.workloads.base import Workload

# The figures an experiment's summary shows per point, and their short titles.
SUMMARY = (
    ("plateau_saved_mib", "saved MiB"),
    ("ksmd_cpu_to_plateau_s", "ksmd CPU s"),
    ("mib_per_cpu_s", "MiB/CPU s (mean of run ratios)"),
    ("time_to_90pct_s", "t90% s"),
)


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
    problems: list[str] = field(default_factory=list)  # reports not written

    @property
    def exit_code(self) -> int:
        return exit_code(self.status)


def run_experiment(
    sc: Scenario,
    output: Path,
    scenario_file: str | None = None,
    connect: str | None = None,
    fs: HostFS | None = None,
    progress: Progress | None = None,
    workload_factory: Callable[[Scenario], Workload] | None = None,
    report: Callable[[Path], Any] | None = None,
) -> ExperimentResult:
    """Run every point x repeat; `report(run_dir)` (a view) is called after each run."""
    fs = fs or HostFS()
    progress = progress or Silent()
    base_factory = workload_factory or (lambda s: make_workload(s, connect))

    def factory(s: Scenario) -> Workload:
        # Optional knobs and expectations this kernel lacks are dropped, as bench does.
        return base_factory(fit_to_host(s, Ksm(fs))[0])

    plans = expand(sc)
    _preflight(sc, plans, fs, factory, scenario_file)

    exp_dir = folder.make_dir(Path(output), sc.name)
    ksm = Ksm(fs)
    knobs0 = ksm.read_knobs()
    index = _new_index(sc, scenario_file, plans, fs, knobs0)
    folder.save_index(exp_dir, index)
    progress.note(
        f"experiment {sc.name}: {len(index['points'])} point(s) x {sc.repeats} repeat(s) = "
        f"{len(plans)} runs in {exp_dir}"
    )
    status = "passed"
    problems: list[str] = []
    try:
        with signals_raise():
            for plan_ in plans:
                entry = index["runs"][plan_.index]
                progress.note(
                    f"[{plan_.index + 1}/{len(plans)}] {plan_.label}, repeat {plan_.repeat}/"
                    f"{sc.repeats} ..."
                )
                entry.update(status="running", started=utc_now())
                folder.save_index(exp_dir, index)
                t0 = time.monotonic()
                try:
                    result = bench(
                        plan_.scenario,
                        folder.staging(exp_dir),
                        scenario_file=scenario_file,
                        connect=connect,
                        fs=fs,
                        progress=progress,
                        workload=factory(plan_.scenario),
                    )
                except UserError as e:  # e.g. another kvmksm took the host between runs
                    entry.update(status="error", error=str(e))
                    status = "error"
                    progress.warn(f"  not run: {e}")
                    break
                meta = folder.settle(
                    result.record_dir,
                    exp_dir / plan_.dirname,
                    {
                        "name": index["name"],
                        "started": index["started"],
                        "run": plan_.index,
                        "point": plan_.point,
                        "values": plan_.values,
                        "repeat": plan_.repeat,
                    },
                )
                entry["counters_before"] = {
                    k: meta["counters_before"].get(k) for k in ("pages_shared", "pages_sharing")
                }
                after = ksm.read_knobs()
                restored = after == knobs0
                entry.update(
                    status=result.status,
                    error=result.error,
                    dir=plan_.dirname,
                    seconds=round(time.monotonic() - t0, 3),
                    host_restored=restored,
                )
                if report is not None:
                    problems += _try(report, exp_dir / plan_.dirname, "report")
                folder.save_index(exp_dir, index)
                progress.note(f"  {result.status} in {entry['seconds']:.1f}s -> {plan_.dirname}")
                if result.status == "interrupted":
                    status = "interrupted"
                    break
                if not restored:
                    diff = {k: (v, after.get(k)) for k, v in knobs0.items() if after.get(k) != v}
                    index["error"] = f"knobs not restored after run {plan_.index + 1}: {diff}"
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
        folder.close_staging(exp_dir)
        index.update(status=status, finished=utc_now(), knobs_after=ksm.read_knobs())
        folder.save_index(exp_dir, index)
    return ExperimentResult(status, exp_dir, index, problems)


def _try(fn: Callable[[Path], Any], path: Path, what: str) -> list[str]:
    try:
        fn(path)
    except Exception as e:  # the record is what matters; a report can be rebuilt
        return [f"{what} not written for {path.name}: {e}"]
    return []


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
    for p in plans:
        if p.point in seen:
            continue
        seen.add(p.point)
        fitted = fit_to_host(p.scenario, ksm)[0]
        ksm.check_knobs(fitted.knobs, where=f"{scenario_file or sc.name}: knobs: ")
        factory(p.scenario).preflight(fs, ksm)


def _line(scenario_file: str | None, loc: tuple[Any, ...]) -> int | str:
    try:
        root = yaml.compose(Path(scenario_file or "").read_text(), Loader=yaml.SafeLoader)
        return locate(root, loc)[0]
    except (OSError, yaml.YAMLError, AttributeError, TypeError):
        return "?"


def _new_index(
    sc: Scenario,
    scenario_file: str | None,
    plans: list[RunPlan],
    fs: HostFS,
    knobs0: dict[str, Any],
) -> dict[str, Any]:
    pts = points(sc)
    return {
        "format": folder.FORMAT,
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


# -- a summary of the points, for the terminal --------------------------------------------
def point_summaries(exp_dir: Path) -> dict[str, Any]:
    """Per point: its axis values, runs passed of all, mean and sd of the SUMMARY figures, and
    whether it is on the Pareto front of its size (knobs being what a user can pick)."""
    index = folder.load_index(exp_dir)
    by_point: dict[int, list[Any]] = {p.index: [] for p in index.points}
    for entry, record in folder.load_runs(exp_dir):
        if entry.status in USABLE:
            by_point[entry.point].append(make_run(record, str(exp_dir)))
    stats = {
        i: {k: mean_sd([r.value(k) for r in runs]) for k, _ in SUMMARY}
        for i, runs in by_point.items()
    }
    knob_axes = [a for a in index.axes if a not in ("count", "clones")]
    front: set[int] = set()
    if knob_axes and len(by_point) > 1:
        sizes: dict[Any, list[int]] = {}
        for p in index.points:
            size = tuple(v for k, v in p.values.items() if k not in knob_axes)
            sizes.setdefault(size, []).append(p.index)
        cost, benefit = "ksmd_cpu_to_plateau_s", "plateau_saved_mib"
        for members in sizes.values():
            pts = [(i, stats[i][cost][0], stats[i][benefit][0]) for i in members]
            pts = [t for t in pts if t[1] is not None and t[2] is not None]
            flags = pareto_front([(x, y) for _, x, y in pts])  # type: ignore[misc]
            front |= {i for (i, _, _), f in zip(pts, flags, strict=True) if f}
    rows = []
    for p in index.points:
        ok = sum(1 for e in index.runs if e.point == p.index and e.status == "passed")
        rows.append(
            {
                "values": p.values,
                "label": p.label,
                "passed": ok,
                "runs": len(p.runs),
                "figures": stats[p.index],
                "pareto": p.index in front if knob_axes and len(by_point) > 1 else None,
            }
        )
    return {
        "name": index.name,
        "status": index.status,
        "error": index.error,
        "axes": list(index.axes),
        "columns": SUMMARY,
        "rows": rows,
    }

"""kvmksm compare: run records side by side.

Records are pooled from the arguments (run folders, experiment folders, or folders holding
either) and grouped by what they ran (kvmksm.analysis.grouping). Each group is set against the
first: mean and spread over its repeats, the difference, and whether that difference is beyond
the noise by Welch's t-test. Below three repeats on either side the test has too little to go
on, and the comparison says so instead of guessing. Views print and draw the result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvmksm.analysis.grouping import (
    USABLE,
    Group,
    Run,
    differences,
    group_runs,
    label_groups,
    make_run,
)
from kvmksm.analysis.metrics import COMPARED
from kvmksm.analysis.pareto import cost_benefit
from kvmksm.analysis.stats import ALPHA, MIN_REPEATS, difference, mean_sd
from kvmksm.errors import UserError
from kvmksm.results.collect import iter_records
from kvmksm.results.events import Kind
from kvmksm.results.experiment import is_experiment
from kvmksm.results.fleet import is_fleet

JSON_FORMAT = 1  # version of the document `kvmksm compare --json` prints
# How each figure of a group is aggregated over its repeats. A per-run ratio is averaged as a
# ratio (each run's own), unlike the Pareto front's ratio of the group's means.
AGGREGATION = "mean ± sd over the repeats of each group"
AGGREGATION_OF = {
    "mib_per_cpu_s": "mean ± sd over the repeats of each run's own ratio (its saved MiB / "
    "its ksmd CPU s): a mean of ratios",
}


def collect(paths: Sequence[str | Path]) -> list[Run]:
    """Every record under the arguments, analysed, with the argument it came from."""
    return [make_run(record, source) for source, record in iter_records(paths)]


@dataclass
class Comparison:
    groups: list[Group]
    differences: list[dict[str, Any]]
    warnings: list[str]
    metrics: list[dict[str, Any]]
    pareto: dict[str, Any] | None
    excluded: list[dict[str, str]]
    alpha: float
    sources: list[str] = field(default_factory=list)

    @property
    def base(self) -> Group:
        return self.groups[0]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": JSON_FORMAT,
            "alpha": self.alpha,
            "min_repeats": MIN_REPEATS,
            "test": "Welch's t-test (two-sided) on the repeats of each group against group A",
            "groups": [
                {
                    "id": g.id,
                    "label": g.label,
                    "n": len(g.runs),
                    "records": [str(r.record.dir) for r in g.runs],
                    "config": g.config,
                }
                for g in self.groups
            ],
            "differences": self.differences,
            "warnings": self.warnings,
            "metrics": self.metrics,
            "pareto": self.pareto,
            "excluded": self.excluded,
        }


def compare(runs: list[Run], by_argument: bool = False, alpha: float = ALPHA) -> Comparison:
    if not runs:
        raise UserError("nothing to compare: no run records")
    warnings: list[str] = []
    excluded = [
        {"record": str(r.record.dir), "status": r.status} for r in runs if r.status not in USABLE
    ]
    usable = [r for r in runs if r.status in USABLE]
    if excluded:
        warnings.append(
            f"{len(excluded)} record(s) left out because they did not finish "
            f"({', '.join(sorted({e['status'] for e in excluded}))})"
        )
    if not usable:
        raise UserError("nothing to compare: no record finished (all error or interrupted)")
    groups = group_runs(usable, by_argument)
    diffs = differences(groups)
    label_groups(groups, diffs, by_argument)
    warnings += _warnings(groups, diffs)
    metrics = _metrics(groups, alpha)
    pareto = None
    if len(groups) > 1 and any(d["kind"] == "knobs" for d in diffs):
        pareto = cost_benefit(groups)
    sources = list(dict.fromkeys(r.source for r in runs))
    return Comparison(groups, diffs, warnings, metrics, pareto, excluded, alpha, sources)


def _warnings(groups: list[Group], diffs: list[dict[str, Any]]) -> list[str]:
    out = []
    fields = {d["field"]: d for d in diffs}
    if "scenario.workload.type" in fields:
        out.append(
            "NOT COMPARABLE: the records ran different workloads (processes and vms): their "
            "figures measure different things"
        )
    scen = [
        d["field"].removeprefix("scenario.")
        for d in diffs
        if d["kind"] == "scenario" and not d["soft"] and d["field"] != "scenario.workload.type"
    ]
    if scen:
        out.append(
            "different scenarios: the groups differ in "
            + ", ".join(scen[:6])
            + (" …" if len(scen) > 6 else "")
            + "; a difference in the figures may come from the workload, not only from the "
            "kernel or the knobs"
        )
    if "host.hostname" in fields:
        out.append(
            "different hosts: CPU, memory and firmware differ along with whatever else "
            "differs; compare kernels on one host where you can"
        )
    machine = [f for f in ("host.cpu_model", "host.virtualization", "host.cpus") if f in fields]
    if machine:
        out.append(
            "timings not comparable between every group: they ran on different machines ("
            + ", ".join(f.removeprefix("host.") for f in machine)
            + " differ); memory saved and exact counts are, time to steady and ksmd CPU are "
            "only within one kind of machine"
        )
    few = [g.id for g in groups if len(g.runs) < MIN_REPEATS]
    if few and len(groups) > 1:
        out.append(
            f"too few repeats to tell a difference from noise for group(s) {', '.join(few)}: "
            f"run each configuration at least {MIN_REPEATS} times (repeats: {MIN_REPEATS})"
        )
    others = sorted(
        {r.name for g in groups for r in g.runs if r.record.event_time(Kind.OTHER_KSM_USERS)}
    )
    if others:
        out.append(
            f"{len(others)} record(s) saw other processes using KSM during the run: the "
            "host-wide counters include their pages"
        )
    return out


def _metrics(groups: list[Group], alpha: float) -> list[dict[str, Any]]:
    base = groups[0]
    out = []
    for key, better in COMPARED.items():
        per = {}
        meta = None
        for g in groups:
            vals = g.values(key)
            mean, sd = mean_sd(vals)
            per[g.id] = {
                "n": len(vals),
                "mean": mean,
                "sd": sd,
                "cv_pct": sd / abs(mean) * 100 if sd is not None and mean else None,
                "min": min(vals) if vals else None,
                "max": max(vals) if vals else None,
                "values": vals,
            }
            meta = meta or next(
                (r.analysis.metrics[key] for r in g.runs if key in r.analysis.metrics), None
            )
        if meta is None or all(p["n"] == 0 for p in per.values()):
            continue
        vs = {}
        for g in groups[1:]:
            d = difference(base.values(key), g.values(key), alpha)
            if d["verdict"] == "beyond noise" and d["diff"]:
                d["better"] = (d["diff"] > 0) == (better == "higher")
            vs[g.id] = d
        out.append(
            {
                "key": key,
                "label": meta["label"],
                "unit": meta["unit"],
                "definition": meta["definition"],
                "aggregation": AGGREGATION_OF.get(key, AGGREGATION),
                "better": better,
                "groups": per,
                "vs_baseline": vs,
            }
        )
    return out


def default_output(paths: Sequence[str | Path], name: str) -> Path:
    """Inside the experiment when comparing one; else in the current folder."""
    if len(paths) == 1 and (is_experiment(Path(paths[0])) or is_fleet(Path(paths[0]))):
        return Path(paths[0]) / name
    return Path(name)


def title(cmp: Comparison) -> str:
    names = sorted({r.record.meta.scenario.name for g in cmp.groups for r in g.runs})
    return f"{', '.join(names)}: {len(cmp.groups)} configuration(s) compared"

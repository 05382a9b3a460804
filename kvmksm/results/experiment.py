"""The experiment folder: an index (experiment.json) and one run record per run beside it.

Layout (format 1): OUTPUT/<name>/<UTC time>-<host>-exp/
  experiment.json   axes, repeats, points, every run's folder and status, knobs, host facts
  001_pages_to_scan-1000_r1/ ...   one run record per run (its run.json says which
                    experiment, point and repeat it belongs to)
  compare.html, plan.html   summaries, rebuilt at any time by kvmksm compare / plan

Runs are written into a staging folder first and moved beside the index once finished, so a
folder beside the index is always a finished record.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from pydantic import Field

from kvmksm.results.files import read_json, write_json
from kvmksm.results.meta import Host, Meta, ScenarioMeta, parse_index
from kvmksm.results.record import RUN_JSON, Record, annotate, load_record, new_dir

FORMAT = 1
INDEX = "experiment.json"
STAGING = ".running"  # bench writes a run here; the finished record is moved beside the index


class RunEntry(Meta):
    index: int
    point: int
    values: dict[str, Any] = Field(default_factory=dict)
    repeat: int = 1
    label: str = ""
    dir: str | None = None
    status: str = "pending"
    error: str | None = None
    started: str | None = None
    seconds: float | None = None
    host_restored: bool | None = None
    counters_before: dict[str, Any] | None = None


class Point(Meta):
    index: int
    values: dict[str, Any] = Field(default_factory=dict)
    label: str = ""
    runs: list[int] = Field(default_factory=list)


class ExperimentMeta(Meta):
    format: int
    kind: str = "experiment"
    name: str = ""
    status: str = "unknown"
    error: str | None = None
    scenario_file: str | None = None
    scenario: ScenarioMeta = Field(default_factory=ScenarioMeta)
    started: str | None = None
    finished: str | None = None
    host: Host = Field(default_factory=Host)
    axes: dict[str, list[Any]] = Field(default_factory=dict)
    repeats: int = 1
    knobs_before: dict[str, Any] = Field(default_factory=dict)
    knobs_after: dict[str, Any] | None = None
    counters_before: dict[str, Any] = Field(default_factory=dict)
    points: list[Point] = Field(default_factory=list)
    runs: list[RunEntry] = Field(default_factory=list)


def is_experiment(path: Path) -> bool:
    return (path / INDEX).is_file()


def make_dir(output: Path, name: str) -> Path:
    return new_dir(Path(output) / name, "-exp")


def save_index(exp_dir: Path, index: dict[str, Any]) -> None:
    write_json(exp_dir / INDEX, index | {"format": FORMAT, "kind": "experiment"})


def load_index(exp_dir: str | Path) -> ExperimentMeta:
    path = Path(exp_dir) / INDEX
    return parse_index(read_json(path, "experiment"), path, "experiment", ExperimentMeta, FORMAT)


def load_runs(exp_dir: str | Path) -> list[tuple[RunEntry, Record]]:
    """(index entry, record) of every run that left a record."""
    index = load_index(exp_dir)
    out = []
    for entry in index.runs:
        if entry.dir and (Path(exp_dir) / entry.dir / RUN_JSON).exists():
            out.append((entry, load_record(Path(exp_dir) / entry.dir)))
    return out


def staging(exp_dir: Path) -> Path:
    return exp_dir / STAGING


def settle(record_dir: Path, target: Path, membership: dict[str, Any]) -> dict[str, Any]:
    """Move a finished record from the staging folder to its place beside the index and say
    in its run.json which experiment, point and repeat it belongs to; returns that run.json."""
    os.replace(record_dir, target)
    with contextlib.suppress(OSError):
        record_dir.parent.rmdir()  # STAGING/<name>/ once empty
    return annotate(target, experiment=membership).raw()


def close_staging(exp_dir: Path) -> None:
    with contextlib.suppress(OSError):
        staging(exp_dir).rmdir()  # only when empty: a killed run's record stays

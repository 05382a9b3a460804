"""The fleet folder: one scenario run on many hosts (kvmksm fleet run), with an index
(fleet.json) and, beside it, what each host's bench wrote (a run record, or an experiment
folder when the scenario has repeats or a matrix).

Layout (format 1): OUTPUT/<name>/<UTC time>-<controller>-fleet/
  fleet.json      the hosts (inventory name, groups, address), each host's status, error,
                  kernel, Python, virtualisation, install/run/gather times, the KSM knobs the
                  playbook read before and after, whether they were restored, what was
                  skipped; the controller; the phases' times; the overall status
  <host>/         one per host that left a record: its run record or experiment folder
  compare.html    the kernels side by side (kvmksm compare on this folder rebuilds it)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from kvmksm.results.files import read_json, write_json
from kvmksm.results.meta import Meta, ScenarioMeta, parse_index
from kvmksm.results.record import new_dir

FORMAT = 1
INDEX = "fleet.json"
# A host's status: what its bench ended as (passed, failed, error, interrupted), or why it
# has none: unreachable (no connection), install failed, not run (stopped before its turn).
HOST_STATUSES = (
    "passed",
    "failed",
    "error",
    "interrupted",
    "unreachable",
    "install failed",
    "not run",
)


class HostEntry(Meta):
    name: str  # as in the inventory
    groups: list[str] = Field(default_factory=list)
    address: str | None = None  # ansible_host (and port), when the inventory gives one
    status: str = "not run"
    error: str | None = None
    exit_status: int | None = None  # of kvmksm bench on the host
    dir: str | None = None  # the host's record or experiment folder, relative to the index
    record_kind: str | None = None  # run | experiment
    kernel_release: str | None = None
    python: str | None = None
    virtualization: str | None = None
    cpu_model: str | None = None
    installed: str | None = None  # "installed" | "already there" | None (never got there)
    timings: dict[str, float] = Field(default_factory=dict)  # install_s, run_s, gather_s
    knobs_before: dict[str, Any] = Field(default_factory=dict)  # read by the playbook
    knobs_after: dict[str, Any] = Field(default_factory=dict)
    restored: bool | None = None
    skipped: list[dict[str, Any]] = Field(default_factory=list)


class FleetMeta(Meta):
    format: int
    kind: str = "fleet"
    name: str = ""
    status: str = "unknown"
    error: str | None = None
    scenario_file: str | None = None
    scenario: ScenarioMeta = Field(default_factory=ScenarioMeta)
    inventory: str | None = None
    started: str | None = None
    finished: str | None = None
    controller: dict[str, Any] = Field(default_factory=dict)
    timings: dict[str, float] = Field(default_factory=dict)
    hosts: list[HostEntry] = Field(default_factory=list)

    def host(self, name: str) -> HostEntry | None:
        return next((h for h in self.hosts if h.name == name), None)


def is_fleet(path: Path) -> bool:
    return (path / INDEX).is_file()


def make_dir(output: Path, name: str) -> Path:
    return new_dir(Path(output) / name, "-fleet")


def save_index(fleet_dir: Path, index: dict[str, Any]) -> None:
    write_json(fleet_dir / INDEX, index | {"format": FORMAT, "kind": "fleet"})


def load_index(fleet_dir: str | Path) -> FleetMeta:
    path = Path(fleet_dir) / INDEX
    return parse_index(read_json(path, "fleet"), path, "fleet", FleetMeta, FORMAT)


def host_dirs(fleet_dir: str | Path) -> list[tuple[HostEntry, Path]]:
    """(entry, folder) of every host that left a record or experiment folder."""
    index = load_index(fleet_dir)
    out = []
    for h in index.hosts:
        if h.dir and (Path(fleet_dir) / h.dir).is_dir():
            out.append((h, Path(fleet_dir) / h.dir))
    return out

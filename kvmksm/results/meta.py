"""run.json read back: typed, read-only metadata.

Readers get attributes with defaults (``meta.host.page_size``, ``meta.workload.clones``)
instead of chains of ``dict.get(...) or {}``. Fields a newer kvmksm adds are kept (extra is
allowed) so nothing is lost when an older reader looks at a newer record of the same format.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kvmksm.errors import UserError

DEFAULT_PAGE = 4096


class Meta(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True, defer_build=True)

    def extra(self, key: str, default: Any = None) -> Any:
        """A field this model does not name (e.g. an event's ``processes``)."""
        return (self.model_extra or {}).get(key, default)


class Event(Meta):
    t: float
    time: str = ""
    kind: str
    detail: str = ""
    # Extras some kinds carry, named so readers need no dict lookups.
    step: int | None = None
    seconds: float | None = None
    pages_sharing: int | None = None
    domain: str | None = None
    pid: int | None = None


class Check(Meta):
    name: str
    expected: Any = None
    observed: Any = None
    passed: bool = False
    t: float | None = None
    step: int | None = None


class Host(Meta):
    kernel_release: str | None = None
    kernel_version: str | None = None
    hostname: str | None = None
    arch: str | None = None
    cpu_model: str | None = None
    cpus: int | None = None
    page_size: int = DEFAULT_PAGE
    mem_total_kb: int | None = None
    thp_enabled: str | None = None
    virtualization: str | None = None  # none, qemu-tcg, vm (...): see host.facts


class Guest(Meta):
    name: str
    uuid: str | None = None
    memory_kb: float | None = None
    pid: int | None = None
    boot_seconds: float | None = None


class Base(Meta):
    domain: str | None = None
    image: str | None = None
    memory: int | None = None


class Workload(Meta):
    type: str = "?"
    # processes
    count: int | None = None
    size: int | None = None
    steps: list[dict[str, Any]] = Field(default_factory=list)
    # vms
    clones: int | None = None
    memory: int | None = None
    base: Base | None = None
    domain_type: str | None = None
    guest_fill: dict[str, Any] | None = None


class ScenarioMeta(Meta):
    name: str = "run"
    description: str = ""
    sample_interval: float = 1.0
    knobs: dict[str, Any] = Field(default_factory=dict)
    workload: Workload = Field(default_factory=Workload)
    repeats: int = 1
    matrix: dict[str, list[Any]] = Field(default_factory=dict)


class ExperimentRef(Meta):
    """Which experiment, point and repeat a run belongs to."""

    name: str = ""
    started: str | None = None
    run: int = 0
    point: int = 0
    values: dict[str, Any] = Field(default_factory=dict)
    repeat: int = 1


class RunMeta(Meta):
    format: int
    kind: str = "bench"
    tool: dict[str, Any] = Field(default_factory=dict)
    status: str = "unknown"
    error: str | None = None
    scenario_file: str | None = None
    scenario: ScenarioMeta = Field(default_factory=ScenarioMeta)
    started: str | None = None
    finished: str | None = None
    duration_s: float | None = None
    host: Host = Field(default_factory=Host)
    knobs_before: dict[str, Any] = Field(default_factory=dict)
    knobs_during: dict[str, Any] = Field(default_factory=dict)
    knobs_after: dict[str, Any] = Field(default_factory=dict)
    counters_before: dict[str, Any] = Field(default_factory=dict)
    events: list[Event] = Field(default_factory=list)
    checks: list[Check] = Field(default_factory=list)
    metrics: dict[str, Any] = Field(default_factory=dict)
    files: dict[str, str] = Field(default_factory=dict)
    sampler: dict[str, Any] = Field(default_factory=dict)  # interval, ksmd_cpu_source
    guests: list[Guest] = Field(default_factory=list)
    reconciliation: dict[str, Any] | None = None
    sharing: dict[str, Any] | None = None  # who shares with whom, after the plateau
    potential: dict[str, Any] | None = None  # the most that could merge, after the plateau
    # inside the guests, through their agents (workloads.guest_work)
    guest_run: list[dict[str, Any]] | None = None  # each command in each guest
    churn: dict[str, Any] | None = None  # the churn program per guest, its rate achieved
    guest_probe: dict[str, Any] | None = None  # write latency with KSM off and on
    experiment: ExperimentRef | None = None
    # Optional knobs and expectations this kernel lacks, not set and not judged.
    skipped: list[dict[str, Any]] = Field(default_factory=list)

    @property
    def workload(self) -> Workload:
        return self.scenario.workload

    @property
    def version(self) -> str:
        return str(self.tool.get("version") or "?")

    def raw(self) -> dict[str, Any]:
        """The document as plain JSON data (for --json output and comparisons)."""
        return self.model_dump(mode="json", exclude_none=False)


def parse_meta(data: Any, where: str) -> RunMeta:
    """Validate a (migrated) run.json document; one line naming the first bad field."""
    try:
        return RunMeta.model_validate(data)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        loc = ".".join(str(p) for p in err["loc"]) or "(top)"
        raise UserError(f"{where}: {loc}: {err['msg'].lower()}: not a usable run record") from None


M = TypeVar("M", bound=BaseModel)


def parse_index(data: Any, path: Any, kind: str, model: type[M], newest: int) -> M:
    """Validate a folder's index document (experiment.json, fleet.json): of this ``kind``, no
    newer than ``newest``, fields as ``model`` says; one line naming what is wrong."""
    if not isinstance(data, dict) or data.get("kind") != kind:
        raise UserError(f"{path}: not a kvmksm {kind} index")
    version = data.get("format")
    if not isinstance(version, int) or version > newest:
        raise UserError(f"{path}: {kind} format {version} is newer than this kvmksm")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise UserError(f"{path}: {loc}: {err['msg'].lower()}") from None

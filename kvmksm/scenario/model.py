"""The scenario schema: what a scenario file may say (pydantic models) and the cross-field
rules a single field cannot state. Loading YAML and locating errors is scenario.load."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from kvmksm.host.ksm import KNOWN_COUNTERS, KNOWN_KNOBS
from kvmksm.units import Duration, Size


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- expectations -------------------------------------------------------------------
class Range(Strict):
    min: int | None = None
    max: int | None = None


Expectation = int | Range
Expect = dict[str, Expectation]


def _check_expect_keys(v: dict[str, Any]) -> dict[str, Any]:
    for key in v:
        if key not in KNOWN_COUNTERS and key not in KNOWN_KNOBS:
            raise ValueError(
                f"unknown counter {key!r} (expected a KSM counter such as pages_shared, "
                "pages_sharing, pages_unshared, pages_volatile, or a knob such as run)"
            )
    return v


def _check_knob_keys(v: dict[str, Any]) -> dict[str, Any]:
    for key in v:
        if key == "run":
            raise ValueError(
                "'run' is set by the workload (ksmd goes on when the scenario says), "
                "not a knob to pin"
            )
        if key not in KNOWN_KNOBS:
            raise ValueError(
                f"unknown KSM knob {key!r} (expected one of: "
                f"{', '.join(k for k in KNOWN_KNOBS if k != 'run')})"
            )
    return v


# -- the processes workload ---------------------------------------------------------
class PatternSpec(Strict):
    """What one process writes into its whole mapping."""

    byte: int | None = None
    last_byte: int | None = None  # LTP's "all d except one byte of the last page is e"
    random: bool = False

    @field_validator("byte", "last_byte", mode="before")
    @classmethod
    def _char(cls, v: object) -> object:
        return _byte_value(v)

    def describe(self) -> str:
        """Short: 'c', 'd+e' (d with a last byte e), '0x00', 'random'."""
        if self.random:
            return "random"
        text = _show_byte(self.byte)
        if self.last_byte is not None:
            text += f"+{_show_byte(self.last_byte)}"
        return text


def _show_byte(b: int | None) -> str:
    if b is None:
        return "?"
    return chr(b) if 0x21 <= b < 0x7F else f"0x{b:02x}"


def _byte_value(v: object) -> object:
    if isinstance(v, str) and len(v) == 1:
        return ord(v)
    if isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255:
        return v
    if v is None:
        return v
    raise ValueError(f"expected one character or a byte value 0-255, got {v!r}")


def _pattern(v: object) -> object:
    if v == "random":
        return {"random": True}
    if isinstance(v, str | int) and not isinstance(v, bool):
        return {"byte": _byte_value(v)}
    return v


Pattern = Annotated[PatternSpec, Field(), BeforeValidator(_pattern)]


class FillStep(Strict):
    action: Literal["fill"]
    patterns: list[Pattern] = Field(min_length=1)
    expect: Annotated[Expect, AfterValidator(_check_expect_keys)] = {}


class UnmergeStep(Strict):
    action: Literal["unmerge"]
    expect: Annotated[Expect, AfterValidator(_check_expect_keys)] = {}


class StopStep(Strict):
    action: Literal["stop"]
    expect: Annotated[Expect, AfterValidator(_check_expect_keys)] = {}


Step = Annotated[FillStep | UnmergeStep | StopStep, Field(discriminator="action")]


class CgroupSpec(Strict):
    memory_limit: Size


class ProcessesWorkload(Strict):
    type: Literal["processes"]
    count: int = Field(ge=1, le=1024)
    size: Size = Field(gt=0)
    cgroup: CgroupSpec | None = None
    full_scans: int = Field(default=3, ge=1)  # per round, as LTP
    scan_timeout: Duration = 300.0
    verify: bool = True
    steps: list[Step] = Field(min_length=1)


# -- the vms workload -----------------------------------------------------------------
class BaseDomain(Strict):
    domain: str = Field(min_length=1)


class BaseImage(Strict):
    image: Path
    memory: Size = Field(gt=0)
    vcpus: int = Field(default=1, ge=1)
    kernel: Path | None = None  # direct kernel boot when set
    initrd: Path | None = None
    cmdline: str | None = None


class BootWait(Strict):
    method: Literal["console", "agent", "delay"] = "console"
    marker: str = "KVMKSM-READY"  # printed on the serial console when the guest is up
    timeout: Duration = 300.0
    delay: Duration = 30.0  # for method: delay


class GuestFill(Strict):
    """Memory each guest fills at boot (the tiny image reads it from its kernel command line)."""

    size: Size = Field(gt=0)
    byte: int = 0x61

    @field_validator("byte", mode="before")
    @classmethod
    def _char(cls, v: object) -> object:
        return _byte_value(v)


class Steady(Strict):
    """The merge curve is steady once `min_full_scans` full scans have completed since KSM
    went on and `pages_sharing` then moved by less than `threshold` (a fraction of its value)
    over the next `scan_fraction` of a full scan (and, when `window` > 0, over the last
    `window` too)."""

    min_full_scans: int = Field(default=3, ge=1)
    threshold: float = Field(default=0.01, ge=0)
    scan_fraction: float = Field(default=0.25, gt=0, le=1)
    window: Duration = 0.0
    timeout: Duration = 600.0


class VmsWorkload(Strict):
    type: Literal["vms"]
    connect: str | None = None  # libvirt URI; -c/--connect and LIBVIRT_DEFAULT_URI override
    domain_type: Literal["kvm", "qemu"] = "kvm"
    base: BaseDomain | BaseImage
    clones: int = Field(ge=1, le=1000)
    disk: Literal["overlay", "copy"] = "overlay"
    pool: str = "default"
    memory: Size | None = None  # override the base's memory per clone
    guest_fill: GuestFill | None = None
    boot: BootWait = BootWait()
    settle: Duration = 5.0
    steady: Steady = Steady()
    plateau: Duration = 10.0  # KSM stays on this long after steady: the plateau measured
    unmerge: bool = True
    expect: Annotated[Expect, AfterValidator(_check_expect_keys)] = {}
    # Sharing matrix and potential after the plateau; unset: on when the guests are small.
    sharing: bool | None = None


Workload = Annotated[ProcessesWorkload | VmsWorkload, Field(discriminator="type")]


class Scenario(Strict):
    name: str = Field(default="", pattern=r"^[A-Za-z0-9_.-]*$")
    description: str = ""
    sample_interval: Duration = Field(default=1.0, ge=0.1, le=3600)
    knobs: Annotated[dict[str, int | str], AfterValidator(_check_knob_keys)] = {}
    workload: Workload
    # An experiment: every point of the matrix (cross product of the axes), `repeats` times.
    repeats: int = Field(default=1, ge=1, le=1000)
    matrix: dict[str, Annotated[list[int | str], Field(min_length=1)]] = {}


# -- rules across fields -------------------------------------------------------------
def semantic_problem(s: Scenario) -> tuple[tuple[Any, ...], str] | None:
    """Cross-field rules pydantic cannot say per field."""
    w = s.workload
    if isinstance(w, ProcessesWorkload):
        for i, step in enumerate(w.steps):
            sized_by_axis = "count" in s.matrix  # patterns are repeated to each count
            if isinstance(step, FillStep) and len(step.patterns) != w.count and not sized_by_axis:
                return (
                    ("workload", "steps", i, "patterns"),
                    f"expected {w.count} patterns (one per process, workload.count), "
                    f"got {len(step.patterns)}",
                )
            if isinstance(step, FillStep):
                for j, p in enumerate(step.patterns):
                    if not p.random and p.byte is None:
                        return (
                            ("workload", "steps", i, "patterns", j),
                            "expected a byte, 'random', or {byte, last_byte}",
                        )
        if w.cgroup and w.cgroup.memory_limit < w.count * w.size:
            return (
                ("workload", "cgroup", "memory_limit"),
                f"expected at least count x size = {w.count * w.size} bytes, or the "
                "processes would be killed by the OOM killer",
            )
    if isinstance(w, VmsWorkload) and w.guest_fill and w.memory and w.guest_fill.size >= w.memory:
        return (("workload", "guest_fill", "size"), "expected less than the guest's memory")
    for i, (k, v) in enumerate(s.knobs.items()):
        if k == "advisor_mode":
            if v not in ("none", "scan-time"):
                return (("knobs", k), "expected 'none' or 'scan-time'")
        elif not isinstance(v, int):
            return (("knobs", k), f"expected an integer, got {v!r}")
        del i
    return _check_matrix(s)


# The axis that sets how many guests or processes run, per workload type.
SIZE_AXES = {"processes": ("count", 1024), "vms": ("clones", 1000)}


def _check_matrix(s: Scenario) -> tuple[tuple[Any, ...], str] | None:
    """Matrix axes: the workload's size axis or a KSM knob, each a list of distinct values."""
    size_axis, size_max = SIZE_AXES[s.workload.type]
    for key, values in s.matrix.items():
        loc: tuple[Any, ...] = ("matrix", key)
        if key in ("count", "clones") and key != size_axis:
            return loc, f"a {s.workload.type} workload's size axis is '{size_axis}', not '{key}'"
        if key == "run":
            return loc, "'run' is switched by the workload, not an axis to sweep"
        if key != size_axis and key not in KNOWN_KNOBS:
            knobs = ", ".join(k for k in KNOWN_KNOBS if k != "run")
            return loc, f"unknown axis (expected '{size_axis}' or a KSM knob: {knobs})"
        if key in s.knobs:
            return loc, f"also set in knobs.{key}: set it in one place"
        for i, v in enumerate(values):
            if key == size_axis and not (isinstance(v, int) and 1 <= v <= size_max):
                return (*loc, i), f"expected a whole number from 1 to {size_max}, got {v!r}"
            if key == "advisor_mode" and v not in ("none", "scan-time"):
                return (*loc, i), f"expected 'none' or 'scan-time', got {v!r}"
            if key not in (size_axis, "advisor_mode") and not isinstance(v, int):
                return (*loc, i), f"expected an integer, got {v!r}"
            if v in values[:i]:
                return (*loc, i), f"duplicate value {v!r}"
    w = s.workload
    if isinstance(w, ProcessesWorkload) and "count" in s.matrix:
        for i, step in enumerate(w.steps):
            if isinstance(step, FillStep) and any(p != step.patterns[0] for p in step.patterns):
                return (
                    ("workload", "steps", i, "patterns"),
                    "with a count axis every process needs the same pattern (it is repeated "
                    "to each count)",
                )
        top = max(int(v) for v in s.matrix["count"])
        if w.cgroup and w.cgroup.memory_limit < top * w.size:
            return (
                ("workload", "cgroup", "memory_limit"),
                f"expected at least the largest count x size = {top * w.size} bytes",
            )
    return None

"""The scenario schema: what a scenario file may say (pydantic models) and the cross-field
rules a single field cannot state. Loading YAML and locating errors is scenario.load."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from kvmksm.host.ksm import KNOWN_COUNTERS, KNOWN_KNOBS
from kvmksm.units import Duration, Size, parse_size


class Strict(BaseModel):
    # NaN and infinity are refused even when written as text ("nan" read as a float).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


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


def _check_optional(v: list[str]) -> list[str]:
    for key in v:
        if key == "run":
            raise ValueError("'run' is on every kernel with KSM: it cannot be optional")
        if key not in KNOWN_KNOBS and key not in KNOWN_COUNTERS:
            raise ValueError(
                f"unknown KSM knob or counter {key!r} (expected names such as smart_scan, "
                "advisor_mode, ksm_zero_pages, general_profit, pages_scanned)"
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
    # Fill (and verify) only the first `touched` bytes of each mapping: the rest is never
    # faulted in, a large sparse MADV_MERGEABLE area that ksmd must still walk every pass.
    touched: Size | None = Field(default=None, gt=0)
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


class GuestCommand(Strict):
    """A command run in every guest through its agent (``/bin/sh -c run``)."""

    run: str = Field(min_length=1)
    timeout: Duration = Field(default=300.0, gt=0)


def _command(v: object) -> object:
    return {"run": v} if isinstance(v, str) else v


GuestRun = Annotated[GuestCommand, BeforeValidator(_command)]


def _rate(v: object) -> object:
    """'8MiB/s' (or a size: bytes per second)."""
    if isinstance(v, str) and v.strip().endswith("/s"):
        v = v.strip()[:-2]
    try:
        return parse_size(v)
    except ValueError:
        raise ValueError(f"expected a rate such as 8MiB/s (or bytes a second), got {v!r}") from None


Rate = Annotated[int, BeforeValidator(_rate)]


class Churn(Strict):
    """Memory every guest keeps rewriting while KSM runs: ``size`` bytes, ``rate`` bytes a
    second (``rate: 0`` fills them once and holds them: the same memory without churn)."""

    size: Size = Field(gt=0)
    rate: Rate = Field(ge=0)


class GuestProbe(Strict):
    """What the guests feel: timed writes, one to each page of a ``size`` buffer, while KSM is
    off (before it goes on) and while it is on (after the plateau)."""

    latency: bool = True
    size: Size = Field(default=16 << 20, ge=1 << 20)


class Steady(Strict):
    """The merge curve is steady once `min_full_scans` full scans have completed since KSM
    went on and `pages_sharing` moved by no more than `threshold` (a fraction of its value)
    over the last `scan_fraction` of a full scan's worth of scanning, after the first pass
    (and, when `window` > 0, over the last `window` too). Less than a whole scan can declare
    a curve steady that is still rising (kvmksm.analysis.steady says why)."""

    min_full_scans: int = Field(default=3, ge=1)
    threshold: float = Field(default=0.01, ge=0)
    scan_fraction: float = Field(default=1.0, gt=0, le=1)
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
    # Inside the guests, through the guest agent (the base needs its channel):
    guest_run: list[GuestRun] = []  # once all are up, before KSM goes on
    churn: Churn | None = None  # from then on, until the guests are torn down
    probe: GuestProbe | None = None  # guest-side cost of KSM
    settle: Duration = 5.0
    steady: Steady = Steady()
    plateau: Duration = 10.0  # KSM stays on this long after steady: the plateau measured
    unmerge: bool = True
    expect: Annotated[Expect, AfterValidator(_check_expect_keys)] = {}
    # Sharing matrix and potential after the plateau; unset: on when the guests are small.
    sharing: bool | None = None


Workload = Annotated[ProcessesWorkload | VmsWorkload, Field(discriminator="type")]


NAME_MAX = 100
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def _check_name(v: str) -> str:
    """The name becomes a folder (OUTPUT/<name>/...): one plain path component."""
    if v == "" or (len(v) <= NAME_MAX and _NAME_RE.fullmatch(v)):
        return v
    shown = v if len(v) <= 40 else v[:37] + "..."
    raise ValueError(
        f"expected a plain folder name of at most {NAME_MAX} characters: letters, digits, "
        f"'.', '_' or '-', not starting with '.' or '-', got {shown!r}"
    )


def name_from_file(stem: str) -> str:
    """A scenario's default name, from its file name, made a plain folder name."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", stem)[:NAME_MAX].lstrip(".-")
    return name or "scenario"


class Scenario(Strict):
    name: Annotated[str, AfterValidator(_check_name)] = ""
    description: str = ""
    sample_interval: Duration = Field(default=1.0, ge=0.1, le=3600)
    knobs: Annotated[dict[str, int | str], AfterValidator(_check_knob_keys)] = {}
    workload: Workload
    # An experiment: every point of the matrix (cross product of the axes), `repeats` times.
    repeats: int = Field(default=1, ge=1, le=1000)
    matrix: dict[str, Annotated[list[int | str], Field(min_length=1)]] = {}
    # Knobs and counters only some kernels have: where this kernel lacks one, its knob is not
    # set and its expectations are not judged, and the record says so (scenario.portable).
    optional: Annotated[list[str], AfterValidator(_check_optional)] = []


# -- rules across fields -------------------------------------------------------------
# Knob values and matrix axes are checked on the data as read (scenario.knob_checks), so
# that every one of them is reported even when another field is wrong.
def semantic_problems(s: Scenario) -> list[tuple[tuple[Any, ...], str]]:
    """Cross-field rules pydantic cannot say per field, every one that applies."""
    out: list[tuple[tuple[Any, ...], str]] = []
    w = s.workload
    if isinstance(w, ProcessesWorkload):
        sized_by_axis = "count" in s.matrix  # patterns are repeated to each count
        for i, step in enumerate(w.steps):
            if not isinstance(step, FillStep):
                continue
            if len(step.patterns) != w.count and not sized_by_axis:
                out.append(
                    (
                        ("workload", "steps", i, "patterns"),
                        f"expected {w.count} patterns (one per process, workload.count), "
                        f"got {len(step.patterns)}",
                    )
                )
            for j, p in enumerate(step.patterns):
                if not p.random and p.byte is None:
                    out.append(
                        (
                            ("workload", "steps", i, "patterns", j),
                            "expected a byte, 'random', or {byte, last_byte}",
                        )
                    )
            if sized_by_axis and any(p != step.patterns[0] for p in step.patterns):
                out.append(
                    (
                        ("workload", "steps", i, "patterns"),
                        "with a count axis every process needs the same pattern (it is "
                        "repeated to each count)",
                    )
                )
        if w.touched is not None and w.touched > w.size:
            out.append((("workload", "touched"), f"expected at most size ({w.size} bytes)"))
        counts = [v for v in s.matrix.get("count", []) if isinstance(v, int)]
        if w.cgroup and counts and w.cgroup.memory_limit < max(counts) * w.size:
            out.append(
                (
                    ("workload", "cgroup", "memory_limit"),
                    f"expected at least the largest count x size = {max(counts) * w.size} bytes",
                )
            )
        elif w.cgroup and not counts and w.cgroup.memory_limit < w.count * w.size:
            out.append(
                (
                    ("workload", "cgroup", "memory_limit"),
                    f"expected at least count x size = {w.count * w.size} bytes, or the "
                    "processes would be killed by the OOM killer",
                )
            )
    for key in s.optional:
        if key in s.matrix:
            out.append(
                (
                    ("matrix", key),
                    f"{key} is optional (only some kernels have it): it cannot be an axis",
                )
            )
    if isinstance(w, VmsWorkload) and w.guest_fill and w.memory and w.guest_fill.size >= w.memory:
        out.append((("workload", "guest_fill", "size"), "expected less than the guest's memory"))
    return out


def semantic_problem(s: Scenario) -> tuple[tuple[Any, ...], str] | None:
    """The first of semantic_problems (or None)."""
    found = semantic_problems(s)
    return found[0] if found else None


# The axis that sets how many guests or processes run, per workload type.
SIZE_AXES = {"processes": ("count", 1024), "vms": ("clones", 1000)}

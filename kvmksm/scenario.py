"""Scenario files: the YAML schema and its validation.

Everything is checked before anything touches the host. An error is one line:
``FILE:LINE: field.path: what was expected`` and exit status 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from kvmksm.errors import UserError
from kvmksm.ksm import KNOWN_COUNTERS, KNOWN_KNOBS
from kvmksm.units import Duration, Size

SCENARIO_DIR = Path(__file__).resolve().parent.parent / "scenarios"
DEFAULT_SCENARIO = "tiny3.yaml"


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


# -- loading with line numbers ----------------------------------------------------------
def resolve_path(arg: str | None) -> Path:
    """A scenario argument: a path, or a bare name found in the bundled scenarios/."""
    if arg is None:
        return SCENARIO_DIR / DEFAULT_SCENARIO
    if arg == "-":
        return Path("-")
    p = Path(arg)
    if p.exists():
        return p
    for cand in (SCENARIO_DIR / arg, SCENARIO_DIR / f"{arg}.yaml"):
        if cand.exists():
            return cand
    raise UserError(f"{arg}: no such scenario file")


def load(path: str | Path) -> Scenario:
    path = Path(path)
    if str(path) == "-":
        import sys

        return loads(sys.stdin.read(), "<stdin>", default_name="stdin")
    try:
        text = path.read_text()
    except OSError as e:
        raise UserError(f"{path}: cannot read scenario: {e.strerror}") from None
    return loads(text, str(path), default_name=path.stem)


def loads(text: str, filename: str = "<scenario>", default_name: str = "scenario") -> Scenario:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 1
        raise UserError(f"{filename}:{line}: invalid YAML: {e.problem}") from None
    if root is None:
        raise UserError(f"{filename}:1: the scenario is empty (expected a mapping with 'workload')")
    dup = _find_duplicate(root)
    if dup:
        node, key = dup
        raise UserError(f"{filename}:{node.start_mark.line + 1}: {key}: duplicate key")
    data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise UserError(f"{filename}:1: expected a mapping of fields at the top of the scenario")
    try:
        scenario = Scenario.model_validate(data)
    except ValidationError as e:
        raise UserError(_format_error(e, root, filename)) from None
    problem = _semantic_check(scenario)
    if problem:
        loc, msg = problem
        line, path = _locate(root, loc)
        raise UserError(f"{filename}:{line}: {path}: {msg}")
    if not scenario.name:
        scenario.name = default_name
    return scenario


def _semantic_check(s: Scenario) -> tuple[tuple[Any, ...], str] | None:
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


def _find_duplicate(node: yaml.Node) -> tuple[yaml.Node, str] | None:
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for k, v in node.value:
            if k.value in seen:
                return k, k.value
            seen.add(k.value)
            found = _find_duplicate(v)
            if found:
                return found
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            found = _find_duplicate(item)
            if found:
                return found
    return None


def _locate(root: yaml.Node, loc: tuple[Any, ...]) -> tuple[int, str]:
    """The line of the deepest YAML node on `loc`, and the dotted path that exists."""
    node = root
    path: list[str] = []
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            found = next(((k, v) for k, v in node.value if k.value == str(part)), None)
            if found is None:
                continue  # a union tag pydantic adds (e.g. 'processes'), or a missing field
            node = found[1]
            path.append(str(part))
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if part >= len(node.value):
                break
            node = node.value[part]
            path.append(f"[{part}]")
        # anything else is a union member name pydantic adds to loc: skip it
    dotted = ".".join(path).replace(".[", "[")
    return node.start_mark.line + 1, dotted or "(top)"


def _key_line(root: yaml.Node, loc: tuple[Any, ...]) -> int | None:
    """Line of the key itself (for unknown fields)."""
    parent_loc, key = loc[:-1], str(loc[-1])
    node = root
    for part in parent_loc:
        if isinstance(node, yaml.MappingNode):
            found = next((v for k, v in node.value if k.value == str(part)), None)
            if found is not None:
                node = found
        elif (
            isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value)
        ):
            node = node.value[part]
    if isinstance(node, yaml.MappingNode):
        for k, _ in node.value:
            if k.value == key:
                return k.start_mark.line + 1
    return None


def _format_error(err: ValidationError, root: yaml.Node, filename: str) -> str:
    errors = err.errors(include_url=False)
    # Prefer the most specific error; unions report one error per member.
    e = _pick(errors)
    loc = tuple(e["loc"])
    line, path = _locate(root, loc)
    kind = e["type"]
    msg = str(e["msg"]).removeprefix("Value error, ")
    if kind == "extra_forbidden":
        field = str(loc[-1])
        line = _key_line(root, loc) or line
        parent = _locate(root, loc[:-1])[1]
        parent = parent if parent != "(top)" else ""
        allowed = _allowed_fields(loc[:-1])
        where = f"{parent}.{field}" if parent else field
        hint = f" (expected one of: {', '.join(allowed)})" if allowed else ""
        return f"{filename}:{line}: {where}: unknown field{hint}"
    if kind == "missing":
        field = str(loc[-1])
        where = f"{path}.{field}" if path != "(top)" else field
        return f"{filename}:{line}: {where}: missing required field"
    if kind == "union_tag_invalid" or kind == "union_tag_not_found":
        ctx = e.get("ctx", {})
        tag = ctx.get("discriminator", "type").strip("'")
        expected = ctx.get("expected_tags", "")
        where = f"{path}.{tag}" if path != "(top)" else tag
        got = (
            f", got {e['input'].get(tag)!r}"
            if isinstance(e.get("input"), dict) and tag in e["input"]
            else ""
        )
        if kind == "union_tag_not_found":
            return f"{filename}:{line}: {where}: missing required field (expected {expected})"
        return f"{filename}:{line}: {where}: expected one of {expected}{got}"
    ctx = e.get("ctx") or {}
    if kind in _PLAIN:
        msg = _PLAIN[kind].format(**ctx)
    got = ""
    if "input" in e and not isinstance(e["input"], dict | list) and "got" not in msg:
        got = f", got {e['input']!r}"
    return f"{filename}:{line}: {path}: {_lower_first(msg)}{got}"


# Pydantic's wording, said as what was expected.
_PLAIN = {
    "int_parsing": "expected an integer",
    "int_type": "expected an integer",
    "int_from_float": "expected an integer",
    "float_parsing": "expected a number",
    "float_type": "expected a number",
    "bool_parsing": "expected true or false",
    "bool_type": "expected true or false",
    "string_type": "expected a string",
    "dict_type": "expected a mapping",
    "model_type": "expected a mapping",
    "list_type": "expected a list",
    "greater_than_equal": "expected a value >= {ge}",
    "greater_than": "expected a value > {gt}",
    "less_than_equal": "expected a value <= {le}",
    "less_than": "expected a value < {lt}",
    "too_short": "expected at least {min_length} item(s)",
    "string_pattern_mismatch": "expected letters, digits, '.', '_' or '-' only",
    "literal_error": "expected {expected}",
}


def _lower_first(s: str) -> str:
    return s[:1].lower() + s[1:]


def _pick(errors: list[Any]) -> Any:
    # An error inside a union member beats "input should be a valid dict" on another member.
    return max(errors, key=lambda e: (len(e["loc"]), e["type"] != "model_type"))


def _allowed_fields(loc: tuple[Any, ...]) -> list[str]:
    model: Any = Scenario
    for part in loc:
        if isinstance(part, int):
            continue
        if isinstance(part, str) and model is not None:
            fields = getattr(model, "model_fields", {})
            if part in fields:
                model = _inner_model(fields[part].annotation, None)
            else:
                model = _inner_model(None, part)
    return list(getattr(model, "model_fields", {}) or [])


_TAGGED = {
    "processes": ProcessesWorkload,
    "vms": VmsWorkload,
    "fill": FillStep,
    "unmerge": UnmergeStep,
    "stop": StopStep,
    "BaseDomain": BaseDomain,
    "BaseImage": BaseImage,
}


def _inner_model(annotation: Any, tag: str | None) -> Any:
    if tag is not None:
        return _TAGGED.get(tag)
    import typing

    stack = [annotation]
    while stack:
        a = stack.pop()
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
        stack.extend(typing.get_args(a))
    return None

"""Loading scenario files: YAML to a validated Scenario, every error one line
``FILE:LINE: field.path: what was expected`` (exit status 2). Bundled scenarios live in
kvmksm/scenarios/ (package data), so a bare name works wherever kvmksm is installed."""

from __future__ import annotations

import sys
import typing
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from kvmksm.errors import UserError
from kvmksm.scenario import safe_yaml
from kvmksm.scenario.estimate import MAX_RUNS, estimate
from kvmksm.scenario.knob_checks import knob_and_matrix_problems
from kvmksm.scenario.model import (
    BaseDomain,
    BaseImage,
    FillStep,
    ProcessesWorkload,
    Scenario,
    StopStep,
    UnmergeStep,
    VmsWorkload,
    name_from_file,
    semantic_problems,
)
from kvmksm.scenario.safe_yaml import Problem, short

SCENARIO_DIR = Path(__file__).resolve().parent.parent / "scenarios"
DEFAULT_SCENARIO = "tiny3.yaml"


def resolve_path(arg: str | None) -> Path:
    """A scenario argument: a path, or a bundled scenario by name (``tiny3``, ``tiny3.yaml``,
    or ``scenarios/tiny3.yaml`` as the README writes it, from any folder)."""
    if arg is None:
        return SCENARIO_DIR / DEFAULT_SCENARIO
    if arg == "-":
        return Path("-")
    p = Path(arg)
    if p.exists():
        return p
    name = p.name if p.parent == Path("scenarios") else arg
    for cand in (SCENARIO_DIR / name, SCENARIO_DIR / f"{name}.yaml"):
        if cand.is_file():
            return cand
    bundled = ", ".join(sorted(q.stem for q in SCENARIO_DIR.glob("*.yaml")))
    raise UserError(f"{arg}: no such scenario file (bundled scenarios: {bundled})")


def load_arg(arg: str | None) -> tuple[Scenario, str]:
    """The scenario a command-line argument names (a file, or a bundled name; None for the
    default), and the path it was read from."""
    path = resolve_path(arg)
    return load(path), str(path)


class ScenarioError(UserError):
    """A scenario with problems: the first as the message (one line), all in `problems`."""

    def __init__(self, problems: list[str], filename: str) -> None:
        self.problems = problems
        more = ""
        if len(problems) > 1:
            more = f" (and {len(problems) - 1} more: kvmksm validate {filename} lists them all)"
        super().__init__(problems[0] + more)


@dataclass
class Checked:
    """A scenario file checked: the Scenario when it is valid, every problem otherwise."""

    scenario: Scenario | None
    problems: list[str]


def load(path: str | Path) -> Scenario:
    checked = check_file(path)
    if checked.scenario is None:
        raise ScenarioError(checked.problems, str(path))
    return checked.scenario


def loads(text: str, filename: str = "<scenario>", default_name: str = "scenario") -> Scenario:
    checked = check_text(text, filename, default_name)
    if checked.scenario is None:
        raise ScenarioError(checked.problems, filename)
    return checked.scenario


def check_file(path: str | Path) -> Checked:
    """Read and check a scenario file (or '-' for stdin); raises UserError only when the file
    cannot be read at all."""
    path = Path(path)
    if str(path) == "-":
        raw = sys.stdin.buffer.read(safe_yaml.MAX_BYTES + 1)
        return check_bytes(raw, "<stdin>", "stdin")
    try:
        with path.open("rb") as f:  # at most what a scenario may hold: /dev/zero ends too
            raw = f.read(safe_yaml.MAX_BYTES + 1)
    except OSError as e:
        raise UserError(f"{path}: cannot read scenario: {e.strerror or e}") from None
    return check_bytes(raw, str(path), path.stem)


def check_bytes(raw: bytes, filename: str, default_name: str = "scenario") -> Checked:
    text, problems = safe_yaml.decode(raw)
    if text is None:
        return Checked(None, [p.render(filename) for p in problems])
    return check_text(text, filename, default_name)


def check_text(text: str, filename: str = "<scenario>", default_name: str = "scenario") -> Checked:
    """Every problem of a scenario, each one line ``FILE:LINE: field.path: what was expected``,
    in the order of the file; or the Scenario when there is none."""
    doc = safe_yaml.read(text)
    found = list(doc.problems)
    if doc.root is None and not found:
        found.append(Problem(1, "", "the scenario is empty (expected a mapping with 'workload')"))
    if found and doc.data is None:
        return Checked(None, _render(found, filename))
    root, data = doc.root, doc.data
    assert root is not None
    if not isinstance(data, dict):
        found.append(Problem(1, "", "expected a mapping of fields at the top of the scenario"))
        return Checked(None, _render(found, filename))
    raw = [_at(root, loc, msg) for loc, msg in knob_and_matrix_problems(data)]
    scenario: Scenario | None = None
    schema: list[Problem] = []
    try:
        scenario = Scenario.model_validate(data)
    except ValidationError as e:
        schema = _schema_problems(e, data, root)
    except (RecursionError, OverflowError) as e:  # bounded by safe_yaml; kept as one line
        schema = [Problem(1, "", f"cannot check the scenario: {type(e).__name__}")]
    if scenario is not None:
        schema = [_at(root, loc, msg) for loc, msg in semantic_problems(scenario)]
        runs = estimate(scenario).runs
        if runs > MAX_RUNS:
            schema.append(
                _at(
                    root,
                    ("matrix",),
                    f"expected at most {MAX_RUNS} runs (points x repeats), got {runs}: "
                    "split the experiment",
                )
            )
    # One problem per field: what the reader found first, then the per-knob checks, then the
    # schema (whose error on `knobs` as a whole is said better per knob).
    said = {p.path for p in found}
    said_raw = {p.path for p in raw}
    found += [p for p in raw if p.path not in said]
    found += [
        p
        for p in schema
        if p.path not in said
        and not any(r == p.path or r.startswith((p.path + ".", p.path + "[")) for r in said_raw)
    ]
    if found:
        return Checked(None, _render(found, filename))
    assert scenario is not None
    if not scenario.name:
        scenario.name = name_from_file(default_name)
    return Checked(scenario, [])


def _render(problems: list[Problem], filename: str) -> list[str]:
    lines = (p.render(filename) for p in sorted(problems, key=lambda p: p.line))
    return list(dict.fromkeys(lines))  # in order, each once (stable: a line keeps its order)


def _at(root: yaml.Node, loc: tuple[Any, ...], msg: str) -> Problem:
    line, path = locate(root, loc)
    if loc and loc[0] in ("knobs", "matrix") and len(loc) == 2:
        line = _key_line(root, loc) or line  # a knob or axis: the line that names it
    return Problem(line, path if path != "(top)" else "", msg)


def locate(root: yaml.Node, loc: tuple[Any, ...]) -> tuple[int, str]:
    """The line of the deepest YAML node on `loc`, and the dotted path that exists."""
    node = root
    path: list[str] = []
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            found = _entries(node).get(str(part))
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
            entry = _entries(node).get(str(part))
            if entry is not None:
                node = entry[1]
        elif (
            isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value)
        ):
            node = node.value[part]
    if isinstance(node, yaml.MappingNode):
        entry = _entries(node).get(key)
        if entry is not None:
            return int(entry[0].start_mark.line) + 1
    return None


_ENTRIES: weakref.WeakKeyDictionary[yaml.Node, dict[str, tuple[yaml.Node, yaml.Node]]] = (
    weakref.WeakKeyDictionary()
)


def _entries(node: yaml.MappingNode) -> dict[str, tuple[yaml.Node, yaml.Node]]:
    """A mapping node's (key, value) nodes by key text, the first of duplicates; built once
    per node, so locating thousands of problems stays linear."""
    found = _ENTRIES.get(node)
    if found is None:
        found = {}
        for k, v in node.value:
            found.setdefault(str(k.value), (k, v))
        _ENTRIES[node] = found
    return found


def _schema_problems(err: ValidationError, data: Any, root: yaml.Node) -> list[Problem]:
    errors = _one_member(list(err.errors(include_url=False)), data, 0)
    return [_format_one(e, root) for e in errors]


def _one_member(errors: list[Any], data: Any, start: int) -> list[Any]:
    """Pydantic reports a value that fits no member of a union once per member; keep the
    member the value looks most like (errors deepest in it, then fewest, then first)."""
    plain: list[Any] = []
    sites: dict[tuple[Any, ...], dict[Any, list[Any]]] = {}
    for e in errors:
        i = _member_at(tuple(e["loc"]), data, start, e["type"] == "missing")
        if i is None:
            plain.append(e)
        else:
            loc = tuple(e["loc"])
            sites.setdefault(loc[:i], {}).setdefault(loc[i], []).append(e)
    out = plain
    for site, members in sites.items():
        order = list(members)
        best = max(
            order,
            key=lambda m: (
                max(len(e["loc"]) for e in members[m]),
                -len(members[m]),
                -order.index(m),
            ),
        )
        out += _one_member(members[best], data, len(site) + 1)
    return out


def _member_at(loc: tuple[Any, ...], data: Any, start: int, missing: bool) -> int | None:
    """The index in `loc` (from `start`) of the first part that names a union member rather
    than a key or index of the data (the last part of a missing field's loc names the
    field); None when there is none."""
    cur = data
    for i, part in enumerate(loc):
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and isinstance(part, int) and 0 <= part < len(cur):
            cur = cur[part]
        elif missing and i == len(loc) - 1:
            return None
        elif i >= start:
            return i
    return None


def _format_one(e: Any, root: yaml.Node) -> Problem:
    loc = tuple(e["loc"])
    line, path = locate(root, loc)
    kind = e["type"]
    msg = str(e["msg"]).removeprefix("Value error, ")
    if kind == "extra_forbidden":
        field = str(loc[-1])
        line = _key_line(root, loc) or line
        parent = locate(root, loc[:-1])[1]
        parent = parent if parent != "(top)" else ""
        allowed = _allowed_fields(loc[:-1])
        where = f"{parent}.{field}" if parent else field
        hint = f" (expected one of: {', '.join(allowed)})" if allowed else ""
        return Problem(line, where, f"unknown field{hint}")
    if kind == "missing":
        field = str(loc[-1])
        where = f"{path}.{field}" if path != "(top)" else field
        return Problem(line, where, "missing required field")
    if kind == "union_tag_invalid" or kind == "union_tag_not_found":
        ctx = e.get("ctx", {})
        tag = ctx.get("discriminator", "type").strip("'")
        expected = ctx.get("expected_tags", "")
        where = f"{path}.{tag}" if path != "(top)" else tag
        got = (
            f", got {short(e['input'].get(tag))}"
            if isinstance(e.get("input"), dict) and tag in e["input"]
            else ""
        )
        if kind == "union_tag_not_found":
            return Problem(line, where, f"missing required field (expected {expected})")
        return Problem(line, where, f"expected one of {expected}{got}")
    ctx = e.get("ctx") or {}
    if kind in _PLAIN:
        msg = _PLAIN[kind].format(**ctx)
    got = ""
    if "input" in e and not isinstance(e["input"], dict | list) and "got" not in msg:
        got = f", got {short(e['input'])}"
    return Problem(line, path if path != "(top)" else "", f"{_lower_first(msg)}{got}")


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
    "finite_number": "expected a finite number",
    "literal_error": "expected {expected}",
}


def _lower_first(s: str) -> str:
    return s[:1].lower() + s[1:]


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
    stack = [annotation]
    while stack:
        a = stack.pop()
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
        stack.extend(typing.get_args(a))
    return None

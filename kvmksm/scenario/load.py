"""Loading scenario files: YAML to a validated Scenario, every error one line
``FILE:LINE: field.path: what was expected`` (exit status 2). Bundled scenarios live in
kvmksm/scenarios/ (package data), so a bare name works wherever kvmksm is installed."""

from __future__ import annotations

import sys
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from kvmksm.errors import UserError
from kvmksm.scenario.model import (
    BaseDomain,
    BaseImage,
    FillStep,
    ProcessesWorkload,
    Scenario,
    StopStep,
    UnmergeStep,
    VmsWorkload,
    semantic_problem,
)

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


def load(path: str | Path) -> Scenario:
    path = Path(path)
    if str(path) == "-":
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
    problem = semantic_problem(scenario)
    if problem:
        loc, msg = problem
        line, path = locate(root, loc)
        raise UserError(f"{filename}:{line}: {path}: {msg}")
    if not scenario.name:
        scenario.name = default_name
    return scenario


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


def locate(root: yaml.Node, loc: tuple[Any, ...]) -> tuple[int, str]:
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
    stack = [annotation]
    while stack:
        a = stack.pop()
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
        stack.extend(typing.get_args(a))
    return None

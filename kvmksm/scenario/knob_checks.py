"""Checks of a scenario's `knobs` and `matrix` on the data as read from YAML, before (and
whatever) the schema says about the rest: each knob and each axis value against what the
kernel accepts, one problem per field, so that `validate` lists all of them at once."""

from __future__ import annotations

from typing import Any

from kvmksm.host.knob_limits import knob_problem
from kvmksm.host.ksm import KNOWN_KNOBS
from kvmksm.scenario.model import SIZE_AXES

Loc = tuple[Any, ...]


def knob_and_matrix_problems(data: Any) -> list[tuple[Loc, str]]:
    if not isinstance(data, dict):
        return []
    out: list[tuple[Loc, str]] = []
    knobs = data.get("knobs")
    if isinstance(knobs, dict):
        for key, value in knobs.items():
            out += [(("knobs", key), msg) for msg in _knob(key, value)]
    matrix = data.get("matrix")
    if isinstance(matrix, dict):
        workload = data.get("workload")
        wtype = workload.get("type") if isinstance(workload, dict) else None
        out += _matrix(matrix, wtype, knobs if isinstance(knobs, dict) else {})
    out += _advisor(knobs if isinstance(knobs, dict) else {}, matrix)
    return out


def _knob(key: Any, value: Any) -> list[str]:
    if key == "run":
        return [
            "'run' is set by the workload (ksmd goes on when the scenario says), not a knob to pin"
        ]
    if key not in KNOWN_KNOBS:
        knobs = ", ".join(k for k in KNOWN_KNOBS if k != "run")
        return [f"unknown KSM knob (expected one of: {knobs})"]
    problem = knob_problem(key, value)
    return [problem] if problem else []


def _matrix(matrix: dict[Any, Any], wtype: Any, knobs: dict[Any, Any]) -> list[tuple[Loc, str]]:
    """Axes: the workload's size axis or a KSM knob, each a list of distinct values."""
    out: list[tuple[Loc, str]] = []
    size_axis, size_max = SIZE_AXES.get(wtype, (None, 0))
    for key, values in matrix.items():
        loc: Loc = ("matrix", key)
        if key in ("count", "clones") and size_axis and key != size_axis:
            out.append((loc, f"a {wtype} workload's size axis is '{size_axis}', not '{key}'"))
            continue
        if key == "run":
            out.append((loc, "'run' is switched by the workload, not an axis to sweep"))
            continue
        if key not in ("count", "clones") and key not in KNOWN_KNOBS:
            knob_list = ", ".join(k for k in KNOWN_KNOBS if k != "run")
            axis = f"'{size_axis}'" if size_axis else "'count' or 'clones'"
            out.append((loc, f"unknown axis (expected {axis} or a KSM knob: {knob_list})"))
            continue
        if key in knobs:
            out.append((loc, f"also set in knobs.{key}: set it in one place"))
            continue
        if not isinstance(values, list):
            continue  # the schema says "expected a list"
        seen: set[Any] = set()
        for i, v in enumerate(values):
            if key in ("count", "clones"):
                top = size_max or 1024
                if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= top:
                    out.append(((*loc, i), f"expected a whole number from 1 to {top}, got {v!r}"))
                    continue
            else:
                problem = knob_problem(key, v)
                if problem:
                    out.append(((*loc, i), problem))
                    continue
            marker = (type(v).__name__, v) if _hashable(v) else None
            if marker is not None and marker in seen:
                out.append(((*loc, i), f"duplicate value {v!r}"))
            elif marker is not None:
                seen.add(marker)
    return out


def _advisor(knobs: dict[Any, Any], matrix: Any) -> list[tuple[Loc, str]]:
    """The kernel refuses pages_to_scan (EINVAL) while the scan-time advisor is on: the
    advisor sets it itself."""
    matrix = matrix if isinstance(matrix, dict) else {}
    modes = [knobs.get("advisor_mode")]
    if isinstance(matrix.get("advisor_mode"), list):
        modes += matrix["advisor_mode"]
    if "scan-time" not in modes:
        return []
    where: Loc | None = None
    if "pages_to_scan" in knobs:
        where = ("knobs", "pages_to_scan")
    elif "pages_to_scan" in matrix:
        where = ("matrix", "pages_to_scan")
    if where is None:
        return []
    return [
        (
            where,
            "the kernel refuses pages_to_scan while advisor_mode is 'scan-time' (the advisor "
            "sets it): set advisor_min_pages_to_scan / advisor_max_pages_to_scan instead",
        )
    ]


def _hashable(v: Any) -> bool:
    try:
        hash(v)
    except TypeError:
        return False
    return True

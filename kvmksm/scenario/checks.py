"""Expectations from a scenario, judged against what the kernel reports."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kvmksm.scenario.model import Range


def expected_json(exp: int | Range) -> int | dict[str, int]:
    if isinstance(exp, Range):
        return {k: v for k, v in (("min", exp.min), ("max", exp.max)) if v is not None}
    return exp


def passes(exp: int | Range, observed: Any) -> bool:
    if observed is None:
        return False
    if isinstance(exp, Range):
        return (exp.min is None or observed >= exp.min) and (exp.max is None or observed <= exp.max)
    return bool(observed == exp)


def describe(expected: Any) -> str:
    if isinstance(expected, dict):
        lo, hi = expected.get("min"), expected.get("max")
        if lo is not None and hi is not None:
            return f"{lo}..{hi}"
        return f">= {lo}" if lo is not None else f"<= {hi}"
    return str(expected)


def judge(
    label: str, expect: Mapping[str, int | Range], observed: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """One check per expectation: {name, expected, observed, passed}."""
    out = []
    for key, exp in expect.items():
        value = observed.get(key)
        out.append(
            {
                "name": f"{label}: {key}",
                "expected": expected_json(exp),
                "observed": value,
                "passed": passes(exp, value),
            }
        )
    return out

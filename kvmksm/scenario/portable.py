"""Scenarios that travel across kernels: a scenario's ``optional`` knobs and counters are
dropped where this kernel lacks them (the knob is not set, the expectation is not judged), and
each drop is listed, so the record says what was skipped and compare can show it. Anything
not optional that the kernel lacks is still refused, in one line, as before.
"""

from __future__ import annotations

from typing import Any

from kvmksm.host.ksm import KNOWN_COUNTERS, KNOWN_KNOBS
from kvmksm.scenario.model import ProcessesWorkload, Scenario, VmsWorkload


def fit(sc: Scenario, have: set[str], release: str = "") -> tuple[Scenario, list[dict[str, Any]]]:
    """The scenario as this kernel can run it (the KSM files it has are `have`), and what
    was skipped: [{name, kind: knob|expect, where, reason}]. Without optional names the
    scenario comes back unchanged."""
    missing = [k for k in sc.optional if k not in have]
    if not missing:
        return sc, []
    data = sc.model_dump()
    skipped: list[dict[str, Any]] = []

    def reason(name: str) -> str:
        added = KNOWN_KNOBS.get(name) or KNOWN_COUNTERS.get(name)
        on = f" ({release})" if release else ""
        return f"this kernel{on} has no {name}" + (
            f": it appeared in Linux {added}" if added else ""
        )

    for name in missing:
        if name in data["knobs"]:
            value = data["knobs"].pop(name)
            skipped.append(
                {"name": name, "kind": "knob", "where": "knobs", "value": value,
                 "reason": reason(name)}
            )  # fmt: skip
    w = data["workload"]
    expects: list[tuple[str, dict[str, Any]]] = []
    if isinstance(sc.workload, ProcessesWorkload):
        expects = [(f"workload.steps[{i}].expect", s["expect"]) for i, s in enumerate(w["steps"])]
    elif isinstance(sc.workload, VmsWorkload):
        expects = [("workload.expect", w["expect"])]
    for where, expect in expects:
        for name in missing:
            if name in expect:
                value = expect.pop(name)
                skipped.append(
                    {"name": name, "kind": "expect", "where": where, "value": value,
                     "reason": reason(name)}
                )  # fmt: skip
    return Scenario.model_validate(data), skipped


def summary(skipped: list[dict[str, Any]]) -> str:
    """'smart_scan (knob), ksm_zero_pages (3 expectations)': one line for tables."""
    counts: dict[tuple[str, str], int] = {}
    for s in skipped:
        key = (s["name"], s["kind"])
        counts[key] = counts.get(key, 0) + 1
    parts = []
    for (name, kind), n in counts.items():
        what = "knob" if kind == "knob" else ("expectation" if n == 1 else f"{n} expectations")
        parts.append(f"{name} ({what})")
    return ", ".join(parts)

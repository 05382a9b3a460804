"""kvmksm plan --check: a plan set against a run it did not see, at a larger count.

For each check record (typically `kvmksm bench SCENARIO --clones N` with N past the sweep), the
plan's fits give what it should have saved and what ksmd should have cost at its count and
guest size; the record gives what it did. The error is the prediction less the measurement,
also as a share of the measurement, and the measurement is inside or outside the plan's 95%
prediction interval.
"""

from __future__ import annotations

from typing import Any

from kvmksm.analysis.grouping import SIZE_FIELDS, SOFT, USABLE, Run, key_of, short_name
from kvmksm.analysis.windows import MIB
from kvmksm.commands.plan import DensityPlan, cost_at
from kvmksm.errors import UserError

# (the plan's name for the figure, the record's metric, what it is, its unit)
FIGURES = (
    ("saved_mib", "plateau_saved_mib", "memory saved", "MiB"),
    ("cpu_pct", "ksmd_cpu_plateau_pct", "ksmd CPU on the plateau", "% of one CPU"),
    ("cpu_s", "ksmd_cpu_to_plateau_s", "ksmd CPU to reach the savings", "CPU s"),
)
ERROR = "predicted − measured"
ERROR_PCT = "(predicted − measured) / measured × 100"


def check_plans(plans: list[DensityPlan], checks: list[Run]) -> None:
    """Set each check record against the plan of its configuration (data["checks"])."""
    if not checks:
        raise UserError("--check: no run record there")
    for run in checks:
        if run.status not in USABLE:
            raise UserError(f"--check {run.record.dir}: the run did not finish ({run.status})")
        p = plan_for(plans, run)
        p.data["checks"].append(check_one(p, run))


def plan_for(plans: list[DensityPlan], run: Run) -> DensityPlan:
    """The plan of the record's configuration; with a single plan, that one (the check then
    names what differs)."""
    where = f"--check {run.record.dir}"
    open_plans = [p for p in plans if p.refused is None]
    if not open_plans:
        raise UserError(f"{where}: no plan to check (nothing was projected)")
    key = key_of(run.config, SIZE_FIELDS)
    same = [p for p in open_plans if p.key == key]
    if same:
        return same[0]
    if run.analysis.workload != open_plans[0].workload:
        raise UserError(
            f"{where}: a {run.analysis.workload} run, but the plan is of {open_plans[0].workload}"
        )
    if len(open_plans) == 1:
        return open_plans[0]
    raise UserError(
        f"{where}: its configuration matches none of the plans "
        f"({'; '.join(p.label for p in open_plans)}): run it with the knobs of one of them"
    )


def check_one(p: DensityPlan, run: Run) -> dict[str, Any]:
    a = run.analysis
    if a.guests is None or not a.guest_bytes:
        raise UserError(f"--check {run.record.dir}: the record has no guest count or memory")
    n, m = a.guests, a.guest_bytes
    counts = p.data["fit"]["counts"]
    rows = []
    for key, metric, what, unit in FIGURES:
        measured = run.value(metric)
        if key == "saved_mib":
            mean, lo, hi = p.saved_band([n], m)
            predicted = float(mean[0])
            interval = None if lo[0] != lo[0] else [float(lo[0]), float(hi[0])]  # NaN: none
        else:
            predicted, interval = cost_at(
                p.cpu_lines.get(key), n, 100.0 if key == "cpu_pct" else float("inf")
            )
        rows.append(figure(key, what, unit, predicted, interval, measured))
    planned = dict(p.key)
    differs = [
        short_name(k)
        for k in sorted(set(run.config) | set(planned))
        if k not in SIZE_FIELDS + SOFT and run.config.get(k) != planned.get(k)
    ]
    notes = []
    if n <= max(counts):
        notes.append(
            f"N = {n} is within the measured counts ({min(counts)} to {max(counts)}): this "
            "checks the fit, not how far it reaches"
        )
    if differs:
        notes.append(
            "the check record differs from the sweep in "
            + ", ".join(differs[:6])
            + ": the plan may not apply to it"
        )
    return {
        "record": str(run.record.dir),
        "n": n,
        "guest_mib": m / MIB,
        "beyond_measured": n > max(counts),
        "count_factor": n / max(counts),
        "error": ERROR,
        "error_pct": ERROR_PCT,
        "figures": rows,
        "notes": notes,
    }


def figure(
    key: str,
    what: str,
    unit: str,
    predicted: float | None,
    interval: list[float] | None,
    measured: float | None,
) -> dict[str, Any]:
    err = predicted - measured if predicted is not None and measured is not None else None
    inside = None
    if interval is not None and measured is not None:
        # Exact counters fit a line exactly: the interval is the line, and floating point
        # must not put a measurement on it outside.
        tol = 1e-9 * max(1.0, abs(measured))
        inside = interval[0] - tol <= measured <= interval[1] + tol
    return {
        "key": key,
        "what": what,
        "unit": unit,
        "predicted": predicted,
        "interval": interval,
        "measured": measured,
        "error": err,
        "error_pct": err / measured * 100 if err is not None and measured else None,
        "inside": inside,
    }

"""`kvmksm bench --clones N` / `--count N`: one scenario run at another guest count.

Made for the check run of a plan (a count past the sweep, then `kvmksm plan EXP --check RUN`).
The count is set as a point of a matrix would set it (kvmksm.commands.experiment.apply_point:
for processes, the one fill pattern repeated to every process); a scenario with a matrix is
refused, since the matrix already says which counts to run.
"""

from __future__ import annotations

from kvmksm.commands.experiment import apply_point
from kvmksm.errors import UserError
from kvmksm.scenario.model import SIZE_AXES, FillStep, ProcessesWorkload, Scenario, semantic_problem

FLAGS = {"vms": "--clones", "processes": "--count"}


def override_count(sc: Scenario, path: str, clones: int | None, count: int | None) -> Scenario:
    """The scenario with its guest count (vms) or process count (processes) replaced."""
    if clones is None and count is None:
        return sc
    if clones is not None and count is not None:
        raise UserError("--clones and --count: give one (--clones for vms, --count for processes)")
    flag, value = ("--clones", clones) if clones is not None else ("--count", count)
    assert value is not None
    kind = sc.workload.type
    if FLAGS[kind] != flag:
        raise UserError(
            f"{path}: {flag} is for a {'vms' if flag == '--clones' else 'processes'} workload; "
            f"this scenario runs {kind}: use {FLAGS[kind]}"
        )
    if sc.matrix:
        raise UserError(
            f"{path}: {flag}: the scenario has a matrix ({', '.join(sc.matrix)}), which says "
            "which counts to run; drop the matrix (or use a scenario without one) for a run at "
            "one count"
        )
    axis, most = SIZE_AXES[kind]
    if not 1 <= value <= most:
        raise UserError(f"{flag}: expected 1 to {most}, got {value}")
    if isinstance(sc.workload, ProcessesWorkload):
        for i, step in enumerate(sc.workload.steps):
            if isinstance(step, FillStep) and any(p != step.patterns[0] for p in step.patterns):
                raise UserError(
                    f"{path}: --count: workload.steps[{i}] gives each process its own pattern; "
                    "--count repeats one pattern to every process, so they must all be the same"
                )
    out = apply_point(sc, {axis: value}).model_copy(update={"repeats": sc.repeats})
    problem = semantic_problem(out)
    if problem is not None:
        loc, msg = problem
        raise UserError(f"{path}: {flag} {value}: {'.'.join(map(str, loc))}: {msg}")
    return out

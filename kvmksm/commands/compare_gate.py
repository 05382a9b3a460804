"""kvmksm compare as a gate (for CI, or before shipping a kernel or a knob setting).

The exit status says what the comparison found:

  0  no metric of any group is worse than group A beyond the noise by more than
     --fail-if-worse PCT (or no PCT was given), and the comparison can tell
  1  with --fail-if-worse PCT: some metric of some group is worse than group A, beyond the
     noise (Welch's t-test), by more than PCT percent of A's mean
  2  bad input (no records, a wrong argument): nothing was compared
  3  the comparison cannot tell: the records are NOT COMPARABLE (different workloads), or a
     group has too few repeats for the test; said on stderr before anything else

3 comes before 1: a gate that cannot tell a regression from noise must not pass silently,
and must not be read as a regression either.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvmksm.analysis.stats import MIN_REPEATS
from kvmksm.commands.compare import Comparison

OK, WORSE, CANNOT_TELL = 0, 1, 3
EXIT_STATUSES = {
    OK: "nothing worse beyond noise by more than --fail-if-worse PCT (or no PCT given)",
    WORSE: "with --fail-if-worse PCT: a metric worse than group A beyond noise by more than PCT",
    2: "bad input: nothing compared",
    CANNOT_TELL: "cannot tell: records NOT COMPARABLE, or too few repeats for the test",
}


@dataclass
class Gate:
    threshold_pct: float | None
    cannot_tell: list[str] = field(default_factory=list)  # why the comparison cannot tell
    worse: list[dict[str, Any]] = field(default_factory=list)  # beyond noise and past PCT

    @property
    def status(self) -> int:
        if self.cannot_tell:
            return CANNOT_TELL
        return WORSE if self.worse else OK

    def to_json(self) -> dict[str, Any]:
        return {
            "fail_if_worse_pct": self.threshold_pct,
            "exit_status": self.status,
            "exit_statuses": {str(k): v for k, v in EXIT_STATUSES.items()},
            "cannot_tell": self.cannot_tell,
            "worse": self.worse,
        }


def judge(cmp: Comparison, fail_if_worse: float | None = None) -> Gate:
    """What the comparison lets a gate say (see the module's exit statuses)."""
    gate = Gate(fail_if_worse)
    if len(cmp.groups) < 2:
        return gate
    gate.cannot_tell = [
        w for w in cmp.warnings if w.startswith("NOT COMPARABLE") or w.startswith("too few repeats")
    ]
    few = [g.id for g in cmp.groups if len(g.runs) < MIN_REPEATS]
    if few and not any(w.startswith("too few repeats") for w in gate.cannot_tell):
        gate.cannot_tell.append(f"too few repeats to tell for group(s) {', '.join(few)}")
    if fail_if_worse is None:
        return gate
    for m in cmp.metrics:
        for gid, d in m["vs_baseline"].items():
            if d["verdict"] != "beyond noise" or d.get("better") is not False:
                continue
            pct = d["diff_pct"]
            # A mean of 0 in group A: any change beyond noise is past every threshold.
            if pct is None or abs(pct) > fail_if_worse:
                gate.worse.append(
                    {
                        "metric": m["key"],
                        "label": m["label"],
                        "unit": m["unit"],
                        "group": gid,
                        "baseline": cmp.base.id,
                        "diff": d["diff"],
                        "diff_pct": pct,
                        "p": d.get("p"),
                        "better": m["better"],
                    }
                )
    return gate

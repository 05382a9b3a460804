"""How many runs a scenario makes and how long they may take, from the waits the scenario
itself sets: `validate` says it, and `bench` asks for --yes before one that could go on for
more than a day.

Each run waits for what the scenario says, and no longer than its timeouts allow:
- vms: the guests' boot (`boot.delay`, or up to `boot.timeout`), `settle`, KSM on until the
  merge curve is steady (up to `steady.timeout`), then the `plateau`;
- processes: each fill step waits for `full_scans` full scans (up to `scan_timeout`).
The shortest is what the scenario waits whatever happens (delay, settle, plateau); the
longest is every timeout reached. Defining, starting and removing guests, filling memory and
writing the record come on top (seconds on a usual host). The matrix and repeats multiply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvmksm.scenario.model import FillStep, ProcessesWorkload, Scenario
from kvmksm.units import format_duration

# Past this longest total, bench wants --yes: such an experiment may run for days.
LONG_SECONDS = 24 * 3600.0
# More runs than this are refused even with --yes (split the experiment): each run is a
# folder, and expanding the matrix itself would take minutes.
MAX_RUNS = 10_000


@dataclass(frozen=True)
class Estimate:
    points: int
    repeats: int
    shortest: float  # seconds, one run
    longest: float  # seconds, one run
    parts: str  # what one run waits, e.g. "boot up to 5m + settle 5s + ..."

    @property
    def runs(self) -> int:
        return self.points * self.repeats

    @property
    def total_longest(self) -> float:
        return self.runs * self.longest

    @property
    def needs_yes(self) -> bool:
        return self.total_longest > LONG_SECONDS

    def line(self) -> str:
        """'6 point(s) x 2 repeat(s) = 12 runs, 3m to 3h3m by the scenario's waits (each
        run: boot up to 5m + settle 5s + steady up to 10m + plateau 10s)'."""
        runs = f"{self.runs} run{'s' if self.runs != 1 else ''}"
        if self.points > 1 or self.repeats > 1:
            runs = f"{self.points} point(s) x {self.repeats} repeat(s) = {runs}"
        low, high = self.runs * self.shortest, self.total_longest
        span = f"up to {_span(high)}" if low < 1 else f"{_span(low)} to {_span(high)}"
        return f"{runs}, {span} by the scenario's waits (each run: {self.parts})"


def estimate(sc: Scenario) -> Estimate:
    points = math.prod(len(v) for v in sc.matrix.values()) if sc.matrix else 1
    w = sc.workload
    if isinstance(w, ProcessesWorkload):
        fills = sum(isinstance(s, FillStep) for s in w.steps)
        longest = fills * w.scan_timeout
        parts = f"{fills} fill(s) x {w.full_scans} full scans, each up to {_span(w.scan_timeout)}"
        return Estimate(points, sc.repeats, 0.0, longest, parts)
    if w.boot.method == "delay":
        boot_low = boot_high = w.boot.delay
        boot = f"boot {_span(w.boot.delay)}"
    else:
        boot_low, boot_high = 0.0, w.boot.timeout
        boot = f"boot up to {_span(w.boot.timeout)}"
    shortest = boot_low + w.settle + w.plateau
    longest = boot_high + w.settle + w.steady.timeout + w.plateau
    parts = (
        f"{boot} + settle {_span(w.settle)} + steady up to {_span(w.steady.timeout)} "
        f"+ plateau {_span(w.plateau)}"
    )
    if w.guest_run:  # commands run one after another, each up to its timeout
        run = sum(c.timeout for c in w.guest_run)
        longest += run
        parts += f" + guest_run up to {_span(run)}"
    return Estimate(points, sc.repeats, shortest, longest, parts)


def _span(seconds: float) -> str:
    """An estimate's duration: its two largest units."""
    return format_duration(seconds, approx=True)

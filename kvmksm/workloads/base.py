"""What the runner gives a workload, and what a workload gives the runner."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from kvmksm.errors import UserError
from kvmksm.host.fs import KSM_DIR, HostFS
from kvmksm.host.ksm import Ksm
from kvmksm.host.state import ActiveRun
from kvmksm.progress import Progress, Silent
from kvmksm.results.record import RunRecord
from kvmksm.sampling.sampler import Probe
from kvmksm.scenario import checks
from kvmksm.scenario.model import Range, Scenario
from kvmksm.units import format_size


@dataclass
class RunContext:
    fs: HostFS
    ksm: Ksm
    record: RunRecord
    active: ActiveRun
    scenario: Scenario
    progress: Progress = field(default_factory=Silent)
    failed_checks: int = 0
    # Set from any thread when the run cannot go on (a guest lost, the record unwritable):
    # the workload's waits raise it in the main thread, so the run ends and tears down.
    _halt: threading.Event = field(default_factory=threading.Event, repr=False)
    _halt_reason: BaseException | None = field(default=None, repr=False)

    def halt(self, reason: BaseException) -> None:
        """Stop the run with this exception at its next wait (the first reason wins)."""
        if self._halt_reason is None:
            self._halt_reason = reason
        self._halt.set()

    @property
    def halted(self) -> BaseException | None:
        return self._halt_reason

    def check_halt(self) -> None:
        """Raise the halt reason, if any."""
        if self._halt_reason is not None:
            raise self._halt_reason

    def sleep(self, seconds: float) -> None:
        """Wait, unless the run is halted meanwhile (then raise why, at once)."""
        self._halt.wait(max(0.0, seconds))
        self.check_halt()

    def check(self, label: str, expect: Mapping[str, int | Range]) -> bool:
        """Read every KSM file now and judge the expectations; recorded in run.json."""
        if not expect:
            return True
        observed = self.ksm.read_all()
        ok = True
        for c in checks.judge(label, expect, observed):
            self.record.check(c["name"], c["expected"], c["observed"], c["passed"])
            if not c["passed"]:
                ok = False
                self.failed_checks += 1
        self.record.save()  # the step's checks in one rewrite of run.json
        return ok

    def phase(self, text: str) -> contextlib.AbstractContextManager[Callable[[str], None]]:
        """A step that takes a while, shown by the caller's progress view."""
        return self.progress.phase(text)


def require_fits(fs: HostFS, n: int, each: int, what: str) -> None:
    """n x each bytes must fit in 90% of MemAvailable, or the host would swap or OOM."""
    need = n * each
    avail = fs.meminfo().get("MemAvailable", 0) * 1024
    if need > 0.9 * avail:
        raise UserError(
            f"workload: {n} {what} x {format_size(each)} = {format_size(need)} does not fit "
            f"in 90% of available memory ({format_size(avail)})"
        )


def require_counters(fs: HostFS, ksm: Ksm, keys: Iterable[str], where: str) -> None:
    """Every expected counter must exist on this kernel."""
    have = set(ksm.files())
    for key in keys:
        if key not in have:
            raise UserError(f"{where}.{key}: this kernel has no such KSM file ({fs.path(KSM_DIR)})")


class Workload:
    """Base class: preflight checks the host without changing it; run drives the timeline;
    teardown undoes everything run created and never raises."""

    def preflight(self, fs: HostFS, ksm: Ksm) -> None:
        """Check that the host can run this (raise UserError); read only, change nothing."""
        return None

    def probes(self) -> list[Probe]:
        return []

    def start_early(self, ctx: RunContext) -> None:
        """Begin what takes a while and needs no knob set (processes: start the children),
        so that it overlaps the rest of the run's setup; run() waits for it."""
        return None

    def run(self, ctx: RunContext) -> None:
        raise NotImplementedError

    def teardown(self, ctx: RunContext) -> list[str]:
        return []

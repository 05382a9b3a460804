"""One bench run: validate, lock, save knobs, run the workload under the sampler, and undo
everything on every exit path (normal end, failed check, exception, Ctrl-C, SIGTERM)."""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmksm.errors import Interrupted, UserError, WorkloadFailed
from kvmksm.host.facts import host_facts
from kvmksm.host.fs import HostFS
from kvmksm.host.ksm import Ksm, ksm_processes
from kvmksm.host.state import ActiveRun, HostLock
from kvmksm.progress import Progress, Silent
from kvmksm.results.events import SAMPLED, Kind
from kvmksm.results.files import OutputError
from kvmksm.results.record import RunRecord, load_record
from kvmksm.sampling.sampler import Sampler
from kvmksm.scenario.model import ProcessesWorkload, Scenario
from kvmksm.scenario.portable import fit, summary
from kvmksm.signals import signals_ignored, signals_raise
from kvmksm.virt import libvirt_missing
from kvmksm.workloads.base import RunContext, Workload
from kvmksm.workloads.processes import ProcessesRun


@dataclass
class BenchResult:
    status: str  # passed | failed | error | interrupted
    record_dir: Path
    checks: list[dict[str, Any]]
    error: str | None

    @property
    def exit_code(self) -> int:
        return exit_code(self.status)


def exit_code(status: str) -> int:
    """0 when every check passed, 130 when interrupted, 1 otherwise (2 is for bad input)."""
    return {"passed": 0, "interrupted": 130}.get(status, 1)


def fit_to_host(sc: Scenario, ksm: Ksm) -> tuple[Scenario, list[dict[str, Any]]]:
    """The scenario as this kernel can run it: optional knobs and expectations it lacks
    dropped, and the list of what was (scenario.portable)."""
    return fit(sc, set(ksm.files()), ksm.fs.kernel_release())


def make_workload(sc: Scenario, connect: str | None = None) -> Workload:
    if isinstance(sc.workload, ProcessesWorkload):
        return ProcessesRun(sc.workload)
    try:  # libvirt-python is an optional extra, imported only for VM scenarios
        from kvmksm.workloads.vms import VmsRun
    except ImportError as e:
        raise libvirt_missing(e, "a vms scenario") from None

    return VmsRun(sc.workload, connect=connect)


def bench(
    sc: Scenario,
    output: Path,
    scenario_file: str | None = None,
    connect: str | None = None,
    fs: HostFS | None = None,
    progress: Progress | None = None,
    workload: Workload | None = None,
) -> BenchResult:
    fs = fs or HostFS()
    progress = progress or Silent()
    ksm = Ksm(fs)
    # Everything below until the lock only reads the host.
    ksm.require_writable()
    # Optional knobs and expectations this kernel lacks are dropped here (and recorded).
    sc, skipped = fit_to_host(sc, ksm)
    ksm.check_knobs(sc.knobs, where=f"{scenario_file or sc.name}: knobs: ")
    workload = workload or make_workload(sc, connect)
    workload.preflight(fs, ksm)  # raises UserError; reads the host, changes nothing
    lock = HostLock()
    lock.acquire(f"scenario {sc.name}")
    try:
        _refuse_after_killed_run()
        return _run_locked(sc, output, scenario_file, fs, ksm, progress, workload, skipped)
    finally:
        lock.release()


def _refuse_after_killed_run() -> None:
    """A run that was killed left its knobs set and maybe guests running: measuring on top
    of that would be wrong, and saving its knobs as 'before' would keep them for good."""
    left = ActiveRun.load()
    if left:
        raise UserError(
            f"a kvmksm run (pid {left.get('pid')}, record {left.get('run_dir')}) did not put "
            "the host back (killed, or its teardown failed): run `kvmksm clean` first"
        )


def _run_locked(
    sc: Scenario,
    output: Path,
    scenario_file: str | None,
    fs: HostFS,
    ksm: Ksm,
    progress: Progress,
    workload: Workload,
    skipped: list[dict[str, Any]] | None = None,
) -> BenchResult:
    record = RunRecord.create(output, sc.model_dump(mode="json"), scenario_file)
    active = ActiveRun()
    ctx = RunContext(fs=fs, ksm=ksm, record=record, active=active, scenario=sc, progress=progress)
    # A results folder that fills up stops the run: its figures could not be kept.
    record.on_write_error = lambda message: ctx.halt(OutputError(message))
    saved = ksm.read_knobs()
    active.start(record.dir, saved)
    record.update(host=host_facts(fs), knobs_before=saved, counters_before=ksm.read_counters())
    status, error = "error", None
    sampler: Sampler | None = None
    with signals_raise():
        try:
            record.event(Kind.RUN_START, f"scenario {sc.name}")
            workload.start_early(ctx)  # e.g. processes start while the knobs are set
            if skipped:
                record.update(skipped=skipped)
                record.event(Kind.SKIPPED, summary(skipped), skipped=skipped)
            _note_other_users(ctx)
            if ksm.read("run") != 0:
                ksm.write("run", 0)  # the workload decides when ksmd runs
            record.event(Kind.KSM_OFF, "run=0")
            ksm.set_knobs(sc.knobs)
            record.update(knobs_during=ksm.read_knobs())
            record.event(Kind.KNOBS_SET, ", ".join(f"{k}={v}" for k, v in sc.knobs.items()))
            sampler = Sampler(fs, record, sc.sample_interval, workload.probes())
            record.update(sampler=sampler.describe())
            sampler.start()
            record.on_event = lambda kind: sampler.poke() if kind in SAMPLED else None
            workload.run(ctx)
            status = "passed" if ctx.failed_checks == 0 else "failed"
        except (KeyboardInterrupt, Interrupted) as e:
            status = "interrupted"
            error = "interrupted by SIGINT" if isinstance(e, KeyboardInterrupt) else str(e)
            record.event(Kind.INTERRUPTED, error)
        except WorkloadFailed as e:
            status, error = "failed", str(e)
            record.event(Kind.ERROR, error)
        except OutputError as e:  # the record cannot be written: said below, in one line
            status, error = "error", str(e)
        except Exception as e:
            status, error = "error", f"{type(e).__name__}: {e}"
            record.event(Kind.ERROR, error, traceback=traceback.format_exc())
        finally:
            # Teardown must finish even if the user presses Ctrl-C again.
            with signals_ignored():
                problems = _teardown(ctx, workload, sampler, saved)
                if problems:
                    record.event(Kind.TEARDOWN_PROBLEMS, "; ".join(problems))
                    if status == "passed":
                        status, error = "error", "teardown: " + "; ".join(problems)
                if record.write_error and status != "interrupted":
                    # The figures may be incomplete: never a silent "passed".
                    status, error = (
                        "error",
                        f"the record could not be written: {record.write_error}",
                    )
                record.event(Kind.RUN_END, status)
                record.finish(status, error)
                if problems:
                    # Something of the run is still on the host: `kvmksm clean` finds it here.
                    active.data["teardown_problems"] = problems
                    active.save()
                else:
                    active.finish()
                _store_metrics(record)
    return BenchResult(status, record.dir, record.data["checks"], error)


def _store_metrics(record: RunRecord) -> None:
    """Derived metrics go into run.json too; they are a pure function of the record, so a
    failure here loses nothing (the report recomputes them)."""
    try:
        # imported here: analysis needs pandas, which the run itself does not
        from kvmksm.analysis.metrics import compute_metrics

        record.update(metrics=compute_metrics(load_record(record.dir)))
    except Exception as e:
        record.event(Kind.METRICS_ERROR, f"{type(e).__name__}: {e}")


def _note_other_users(ctx: RunContext) -> None:
    """Other processes' mergeable memory mixes into the host-wide counters: say so."""
    others = ksm_processes(ctx.fs)
    if not others:
        return
    names = ", ".join(f"{o['comm']} (pid {o['pid']})" for o in others[:5])
    more = f" and {len(others) - 5} more" if len(others) > 5 else ""
    msg = (
        f"other processes have memory registered with KSM: {names}{more}; the host-wide "
        "counters include their pages, so exact expectations may not hold"
    )
    ctx.record.event(Kind.OTHER_KSM_USERS, msg, processes=others)
    ctx.progress.warn(msg)


def _teardown(
    ctx: RunContext, workload: Workload, sampler: Sampler | None, saved: dict[str, Any]
) -> list[str]:
    problems: list[str] = []
    ctx.record.on_event = None  # the sampler stops here: no more extra samples
    if sampler is not None:
        sampler.stop()
        if sampler.errors:
            ctx.record.event(Kind.SAMPLER_ERRORS, "; ".join(sampler.errors[:5]))
    ctx.record.event(Kind.TEARDOWN, "undoing what the run created")
    try:
        problems += workload.teardown(ctx)
    except Exception as e:  # teardown must go on to restore the knobs
        problems.append(f"workload teardown: {e}")
    try:
        drain(ctx)
    except Exception as e:  # the knobs must still be restored
        ctx.record.event(Kind.DRAIN_FAILED, str(e))
    problems += ctx.ksm.restore(saved)
    after = ctx.ksm.read_knobs()
    ctx.record.update(knobs_after=after)
    diff = {k: (v, after.get(k)) for k, v in saved.items() if after.get(k) != v}
    if diff:
        problems.append(f"knobs not restored: {diff}")
    else:
        ctx.record.event(Kind.KNOBS_RESTORED, f"{len(saved)} knobs as before")
    return problems


DRAIN_TIMEOUT = 10.0  # seconds teardown waits for ksmd to drop an exited workload's pages


def drain(ctx: RunContext, timeout: float = DRAIN_TIMEOUT, poll: float = 0.02) -> None:
    """With ksmd still on, wait until pages_shared + pages_sharing are back to what they were
    before the run, or ksmd finished two more full scans (what is left then belongs to other
    KSM users). The merged pages of processes or guests that just exited stay in the counters
    until ksmd's scan reaches them: with ksmd switched off by the knob restore they would
    linger into the next run and inflate its first samples."""
    ksm = ctx.ksm
    if ksm.read("run") != 1:
        return
    before = ctx.record.data.get("counters_before") or {}
    base = int(before.get("pages_shared", 0)) + int(before.get("pages_sharing", 0))
    t0, scans0 = time.monotonic(), int(ksm.read("full_scans"))
    while True:
        c = ksm.read_counters()
        merged = c.get("pages_shared", 0) + c.get("pages_sharing", 0)
        waited = round(time.monotonic() - t0, 3)
        if merged <= base or c.get("full_scans", 0) >= scans0 + 2:
            why = "as before the run" if merged <= base else "after 2 full scans"
            ctx.record.event(Kind.DRAINED, f"{merged} merged pages, {why}", seconds=waited)
            return
        if waited > timeout:
            ctx.record.event(
                Kind.DRAIN_TIMEOUT, f"{merged} merged pages left after {timeout:g}s", seconds=waited
            )
            return
        time.sleep(poll)

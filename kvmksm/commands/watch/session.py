"""``kvmksm watch``: record KSM and every running guest on a live host, changing nothing.

What the seed's author did by hand (``while true; do cat .../pages_shared; sleep 1; done``),
made safe for production hosts: the host row (every KSM counter and knob, ksmd's CPU, host
memory) and, for every running guest, its QEMU process's ksm_stat and RSS, each second, into
the same run record as ``bench`` writes, so report, compare and plan read it.

Read-only by construction: nothing here writes a KSM knob (Ksm.write is never called, files
are opened O_RDONLY), the libvirt connection is read-only, no domain is created, started or
stopped, and the bench lock is not taken (a bench may run meanwhile; the record says so, since
its figures then include a benchmark). The view (kvmksm.views.live) shows what happens.
"""

from __future__ import annotations

import contextlib
import os
import queue
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from kvmksm.commands.watch.guests import GuestInfo, GuestLister, open_lister
from kvmksm.commands.watch.tracker import GuestTracker
from kvmksm.errors import Interrupted
from kvmksm.host.facts import host_facts
from kvmksm.host.fs import KSM_DIR, HostFS
from kvmksm.host.ksm import Ksm, ksm_processes
from kvmksm.results.events import Kind
from kvmksm.results.record import RunRecord
from kvmksm.sampling.guest_rows import VmProbe
from kvmksm.sampling.sampler import Sampler
from kvmksm.signals import signals_ignored, signals_raise
from kvmksm.units import format_duration

DEFAULT_RELIST = 3.0  # seconds between guest listings
RUN_EVENTS = {0: Kind.KSM_OFF, 1: Kind.KSM_ON, 2: Kind.UNMERGE}  # observed changes of `run`


class WatchView(Protocol):
    """What a watch tells its view: messages as they come, and every new sample."""

    def message(self, text: str) -> None: ...

    def update(
        self,
        row: Mapping[str, Any],
        vms: Mapping[str, Mapping[str, Any]],
        guests: Mapping[str, GuestInfo],
        record_dir: Path,
        left: float | None,
    ) -> None: ...

    def close(self) -> None: ...


class QuietView:
    """A view that shows nothing (tests, and callers that only want the record)."""

    def message(self, text: str) -> None:
        return None

    def update(
        self,
        row: Mapping[str, Any],
        vms: Mapping[str, Mapping[str, Any]],
        guests: Mapping[str, GuestInfo],
        record_dir: Path,
        left: float | None,
    ) -> None:
        return None

    def close(self) -> None:
        return None


@dataclass
class WatchResult:
    status: str  # passed (closed cleanly: Ctrl-C, SIGTERM or --duration) | error
    record_dir: Path
    ended_by: str
    error: str | None
    guests_seen: list[str]
    duration_s: float
    notes: list[str]

    @property
    def exit_code(self) -> int:
        return 0 if self.status == "passed" else 1


def watch(
    output: Path,
    duration: float | None = None,
    connect: str | None = None,
    interval: float = 1.0,
    relist: float = DEFAULT_RELIST,
    fs: HostFS | None = None,
    lister: GuestLister | None = None,
    view: WatchView | None = None,
) -> WatchResult:
    """Watch until Ctrl-C, SIGTERM/SIGHUP or ``duration`` seconds and close the record; the
    view is told every message and every sample. Raises UserError before anything starts when
    it cannot watch at all."""
    fs = fs or HostFS()
    view = view or QuietView()
    ksm = Ksm(fs)
    notes: list[str] = []
    if not ksm.available():
        notes.append(
            f"KSM is not available ({fs.path(KSM_DIR)} is missing): recording host memory "
            "and the guests' RSS only"
        )
    if lister is None:
        lister, note = open_lister(connect, fs)
        if note:
            notes.append(note)
    if os.geteuid() != 0:
        notes.append("not root: other users' /proc/<pid>/ksm_stat cannot be read")

    scenario = {
        "name": "watch",
        "description": "kvmksm watch: a live host, recorded without changing anything",
        "sample_interval": interval,
        "knobs": {},
        "workload": {
            "type": "watch",
            "connect": connect,
            "guests": lister.source,
            "duration": duration,
        },
    }
    record = RunRecord.create(output, scenario, None, kind="watch")
    knobs = ksm.read_knobs() if ksm.available() else {}
    facts = host_facts(fs)
    with contextlib.suppress(Exception):
        facts.update(lister.facts())
    record.update(
        host=facts,
        knobs_before=knobs,
        knobs_during=knobs,  # watch sets nothing: the knobs in force are the ones found
        counters_before=ksm.read_counters() if ksm.available() else {},
        watch={"guests": lister.source, "interval": interval, "relist": relist, "notes": notes},
    )
    messages: queue.SimpleQueue[str] = queue.SimpleQueue()
    tracker = GuestTracker(lister, record, relist, messages.put)
    probe = VmProbe(fs, tracker.pids)
    sampler: Sampler | None = None
    status, error, ended_by = "error", None, "error"

    view.message(f"kvmksm watch: recording to {record.dir}")
    view.message(
        f"  host: KSM counters and knobs (read only), ksmd CPU, memory; guests: {lister.source}"
    )
    for n in notes:
        view.message(f"  note: {n}")
        record.event(Kind.WATCH_NOTE, n)
    with signals_raise():
        try:
            record.event(Kind.RUN_START, f"watching; guests from {lister.source}")
            tracker.check_bench()
            tracker.refresh()
            _note_other_users(fs, record, tracker, messages.put)
            sampler = Sampler(fs, record, interval, [probe])
            record.update(sampler=sampler.describe())
            knob_names = [k for k in knobs if k in sampler.source.columns]
            sampler.start()
            tracker.start()
            ended_by = _loop(view, sampler, probe, tracker, record, knob_names, duration, messages)
            status = "passed"
        except (KeyboardInterrupt, Interrupted) as e:
            status = "passed"  # stopping is how a watch ends
            ended_by = "Ctrl-C" if isinstance(e, KeyboardInterrupt) else str(e).split()[-1]
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
            record.event(Kind.ERROR, error, traceback=traceback.format_exc())
        finally:
            with signals_ignored():
                view.close()
                _close(record, sampler, tracker, lister, ksm, knobs, status, ended_by)
                record.finish(status, error)
    _drain(messages, view)
    duration_s = float(record.data.get("duration_s") or 0.0)
    seen = sorted(tracker.seen)
    return WatchResult(status, record.dir, ended_by, error, seen, duration_s, notes)


def _loop(
    view: WatchView,
    sampler: Sampler,
    probe: VmProbe,
    tracker: GuestTracker,
    record: RunRecord,
    knob_names: list[str],
    duration: float | None,
    messages: queue.SimpleQueue[str],
) -> str:
    """Show each new sample until the duration is up; returns why it ended."""
    end = None if duration is None else time.monotonic() + duration
    last: dict[str, Any] | None = None
    prev_knobs: dict[str, Any] | None = None
    while True:
        now = time.monotonic()
        if end is not None and now >= end:
            return f"--duration {format_duration(duration or 0)} reached"
        time.sleep(0.05 if end is None else max(0.0, min(0.05, end - now)))
        _drain(messages, view)
        row = sampler.last
        if row is last or not row:
            continue
        last = row
        prev_knobs = _observe_knobs(record, row, knob_names, prev_knobs, view)
        left = None if end is None else max(0.0, end - time.monotonic())
        view.update(row, probe.last, tracker.current, record.dir, left)


def _observe_knobs(
    record: RunRecord,
    row: Mapping[str, Any],
    names: list[str],
    prev: dict[str, Any] | None,
    view: WatchView,
) -> dict[str, Any]:
    """Knob changes someone else made while we watched, as events (`run` as ksm_on/off)."""
    cur = {k: row.get(k) for k in names}
    if prev is not None:
        for k in names:
            if cur[k] == prev[k]:
                continue
            change = f"{k} {prev[k]} -> {cur[k]} (changed on the host; kvmksm watch only reads)"
            kind = RUN_EVENTS.get(cur[k], Kind.KNOB_CHANGED) if k == "run" else Kind.KNOB_CHANGED
            record.event(kind, change, knob=k, before=prev[k], after=cur[k])
            view.message(change)
    return cur


def _note_other_users(
    fs: HostFS, record: RunRecord, tracker: GuestTracker, say: Callable[[str], None]
) -> None:
    """Processes other than the guests with KSM memory also count in the host-wide figures."""
    guests = set(tracker.pids().values()) | {os.getpid()}
    others = ksm_processes(fs, exclude=guests)
    if not others:
        return
    names = ", ".join(f"{o['comm']} (pid {o['pid']})" for o in others[:5])
    more = f" and {len(others) - 5} more" if len(others) > 5 else ""
    msg = f"processes that are not guests have memory registered with KSM: {names}{more}"
    record.event(Kind.OTHER_KSM_USERS, msg, processes=others)
    say(msg)


def _close(
    record: RunRecord,
    sampler: Sampler | None,
    tracker: GuestTracker,
    lister: GuestLister,
    ksm: Ksm,
    knobs: dict[str, Any],
    status: str,
    ended_by: str,
) -> None:
    """Stop the threads and close the record; never raises (runs on every exit path)."""
    problems = []
    if sampler is not None:
        try:
            sampler.stop()
        except Exception as e:
            problems.append(f"sampler: {e}")
        if sampler.errors:
            record.event(
                Kind.SAMPLER_ERRORS, "; ".join(sampler.errors[:5]), count=sampler.error_count
            )
    tracker.stop()
    lister.close()
    for name in tracker.current:
        if name in tracker.seen and tracker.seen[name].get("last_seen_t") is None:
            tracker.seen[name]["last_seen_t"] = record.now()
    after: dict[str, Any] = {}
    try:
        after = ksm.read_knobs() if ksm.available() else {}
    except OSError as e:
        problems.append(f"reading the knobs at the end: {e}")
    changed = {k: [v, after.get(k)] for k, v in knobs.items() if after.get(k) != v}
    if changed:
        record.event(
            Kind.KNOBS_CHANGED, f"changed on the host during the watch (not by kvmksm): {changed}"
        )
    if problems:
        record.event(Kind.CLOSE_PROBLEMS, "; ".join(problems))
    record.update(knobs_after=after, guests=[dict(v) for v in tracker.seen.values()])
    record.event(Kind.WATCH_END, ended_by)
    record.event(Kind.RUN_END, status)


def _drain(messages: queue.SimpleQueue[str], view: WatchView) -> None:
    while True:
        try:
            view.message(messages.get_nowait())
        except queue.Empty:
            return

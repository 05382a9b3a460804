"""The run record: one directory per run, written as the run goes, read back by analysis.

Layout (format 2):
  run.json        metadata, scenario as run, host facts, knobs, events, checks, metrics
  samples.csv     one row per tick: t, time, every KSM counter (sysfs names), ksmd_cpu,
                  host memory (kB, /proc/meminfo names), cow_ksm (/proc/vmstat)
  vm_samples.csv  VM runs and watch: one row per guest per tick: t, domain, pid, ksm_stat
                  fields, rss_kb; for the first hour of a run (kvmksm.results.guest_samples)
  vm_samples/     the same rows after that, one Parquet part per hour (part-0001.parquet ...)
  report.html     written from the above

Format 1 had vm_samples.csv alone, whatever the run's length; it reads as format 2 does.
samples.csv stays CSV however long the run: one row a second is 15 MiB a day, read whole in
about a second, and each row is on disk as soon as it is taken (`tail -f` works on it).

This module is the only one that knows these names and the format number: RunRecord writes a
record, load_record reads one (migrating older formats first), write_record lays out a whole
record at once (tests, generators), annotate adds fields to a finished one.
"""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvmksm import __version__
from kvmksm.errors import UserError
from kvmksm.results.events import Kind
from kvmksm.results.files import CsvAppender, OutputError, output_error, read_json, write_json
from kvmksm.results.guest_samples import (
    PARTS_DIR,
    VM_SAMPLES,
    GuestSamples,
    GuestSamplesWriter,
    _read_csv,
    write_parts,
)
from kvmksm.results.meta import Check, Event, RunMeta, parse_meta

if TYPE_CHECKING:  # pandas is imported where records are read: a run only writes
    import pandas as pd

FORMAT = 2
RUN_JSON = "run.json"
SAMPLES = "samples.csv"
REPORT = "report.html"
# Room kept aside in a run folder while the run is written, freed when a write fails (a full
# disk), so run.json can still say how the run ended and why.
RESERVE = ".reserve"
RESERVE_BYTES = 1 << 20
CONSOLES = "consoles"  # guests' serial console logs, copied before teardown deletes them


# Upgrades of older run.json documents: MIGRATIONS[n] turns format n into format n + 1.
# Every format ever written stays readable; tests/fixtures/records holds one of each.
def _from_1(data: dict[str, Any]) -> dict[str, Any]:
    """Format 1 kept every per-guest row in vm_samples.csv; format 2 adds the hourly parts
    (vm_samples/) of long runs. The reader looks for both, so a format-1 record reads as it
    is: its files list gains the folder name only when it has per-guest rows at all."""
    files = dict(data.get("files") or {})
    files.setdefault("samples", SAMPLES)
    data["files"] = files
    return data


MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {1: _from_1}


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def migrate(data: dict[str, Any], where: str) -> dict[str, Any]:
    """A run.json document brought up to FORMAT through MIGRATIONS, one version at a time."""
    version = data.get("format")
    if not isinstance(version, int) or isinstance(version, bool):
        raise UserError(f"{where}: no integer 'format': not a kvmksm run record")
    if version > FORMAT:
        raise UserError(
            f"{where}: record format {version} is newer than this kvmksm understands "
            f"({FORMAT}); upgrade kvmksm"
        )
    while version < FORMAT:
        step = MIGRATIONS.get(version)
        if step is None:
            raise UserError(f"{where}: record format {version} can no longer be read")
        data = step(dict(data))
        version += 1
        data["format"] = version
    return data


# -- writing as a run goes ------------------------------------------------------------
class RunRecord:
    """A run directory being written. run.json is rewritten atomically on every change.

    A write that fails (a full disk) never raises into the run or its teardown: the data
    stays in memory, `write_error` says what went wrong, the CSV files stop (what they hold
    stays whole), the room reserved at creation is freed so that run.json can still be
    rewritten to its end, an event says so, and `on_write_error` (the runner's) is told, so
    the run stops and ends as failed with that reason."""

    def __init__(self, directory: Path, data: dict[str, Any]) -> None:
        self.dir = directory
        self.data = data
        self.t0 = time.monotonic()
        self.write_error: str | None = None
        # Called after an event is logged, with its kind (a run pokes its sampler here).
        self.on_event: Callable[[str], None] | None = None
        self.on_write_error: Callable[[str], None] | None = None
        self._appenders: list[CsvAppender | GuestSamplesWriter] = []
        self._lock = threading.RLock()  # a failed save records an event, under the same lock

    @classmethod
    def create(
        cls, output: Path, scenario: dict[str, Any], scenario_file: str | None, kind: str = "bench"
    ) -> RunRecord:
        name = scenario.get("name") or "run"
        directory = new_dir(Path(output) / name, "")
        data: dict[str, Any] = {
            "format": FORMAT,
            "kind": kind,
            "tool": {"name": "kvmksm", "version": __version__},
            "status": "running",
            "scenario_file": scenario_file,
            "scenario": scenario,
            "started": utc_now(),
            "finished": None,
            "duration_s": None,
            "host": {},
            "knobs_before": {},
            "knobs_during": {},
            "knobs_after": {},
            "counters_before": {},
            "events": [],
            "checks": [],
            "metrics": {},
            "error": None,
            "files": {"samples": SAMPLES},
        }
        rec = cls(directory, data)
        rec.save()
        if rec.write_error:
            raise OutputError(rec.write_error)
        rec._reserve()
        return rec

    def _reserve(self) -> None:
        path = self.dir / RESERVE
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.posix_fallocate(fd, 0, RESERVE_BYTES)
            finally:
                os.close(fd)
        except OSError as e:
            # Nothing ran: leave no record of it (it would say 'running' for ever).
            shutil.rmtree(self.dir, ignore_errors=True)
            raise output_error(path, e) from None

    def _release_reserve(self) -> None:
        try:
            (self.dir / RESERVE).unlink(missing_ok=True)
        except OSError:
            pass

    def _failed(self, message: str) -> None:
        """The first write that failed: stop the CSVs, free the reserve, say so, tell the run."""
        with self._lock:
            if self.write_error is not None:
                return
            self.write_error = message
            for a in self._appenders:
                a.stop()
            self._release_reserve()
            self.event(Kind.RECORD_UNWRITABLE, message)
        if self.on_write_error is not None:
            self.on_write_error(message)

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 4)

    def event(self, kind: Kind, detail: str = "", **extra: Any) -> dict[str, Any]:
        ev = {"t": self.now(), "time": utc_now(), "kind": str(kind), "detail": detail, **extra}
        with self._lock:
            self.data["events"].append(ev)
            self._save_locked()
        if self.on_event is not None:
            self.on_event(ev["kind"])
        return ev

    def check(self, name: str, expected: Any, observed: Any, passed: bool, **extra: Any) -> None:
        """Kept in memory until save() or the next event or update: a step's checks come in
        a burst, and one rewrite of run.json for all of them saves a few ms each."""
        entry = {"name": name, "expected": expected, "observed": observed, "passed": passed}
        with self._lock:
            self.data["checks"].append(entry | {"t": self.now(), **extra})

    def update(self, **fields: Any) -> None:
        with self._lock:
            self.data.update(fields)
            self._save_locked()

    def save(self) -> None:
        with self._lock:
            self._save_locked()

    def _save_locked(self) -> None:
        try:
            write_json(self.dir / RUN_JSON, self.data)
        except OutputError as e:
            self._failed(str(e))

    def csv(self, name: str, columns: list[str]) -> CsvAppender | GuestSamplesWriter:
        """The appender of one samples file; per-guest rows get the writer that moves to
        hourly Parquet parts when the run grows long."""
        with self._lock:
            self.data["files"][name.removesuffix(".csv")] = name
            if name == VM_SAMPLES:
                self.data["files"]["vm_parts"] = f"{PARTS_DIR}/"
        appender: CsvAppender | GuestSamplesWriter
        try:
            if name == VM_SAMPLES:
                appender = GuestSamplesWriter(self.dir, columns, on_error=self._failed)
            else:
                appender = CsvAppender(self.dir / name, columns, on_error=self._failed)
        except OutputError as e:
            self._failed(str(e))
            raise
        self._appenders.append(appender)
        return appender

    def finish(self, status: str, error: str | None = None) -> None:
        self.update(status=status, error=error, finished=utc_now(), duration_s=self.now())
        self._release_reserve()


def new_dir(parent: Path, suffix: str) -> Path:
    """parent/<UTC time>-<host><suffix>, made fresh (-2, -3 ... when the second is taken)."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    base = f"{stamp}-{socket.gethostname()}"
    directory, n = parent / f"{base}{suffix}", 1
    while directory.exists():
        n += 1
        directory = parent / f"{base}{suffix}-{n}"
    try:
        directory.mkdir(parents=True)
    except OSError as e:
        raise UserError(f"{directory}: cannot create the results folder: {e.strerror}") from None
    return directory


# -- reading --------------------------------------------------------------------------
@dataclass
class Record:
    """A run record read back: what analysis, reports, compare and plan take.

    The per-guest rows are not read with the record: ``guests`` reads them in chunks
    (kvmksm.analysis.per_guest aggregates while reading), ``vm_samples`` reads them whole
    on first use (small records, tests)."""

    dir: Path
    meta: RunMeta
    samples: pd.DataFrame
    guests: GuestSamples | None = None
    _vm: pd.DataFrame | None = field(default=None, repr=False)

    @property
    def vm_samples(self) -> pd.DataFrame | None:
        if self._vm is None and self.guests is not None:
            self._vm = read_vm_samples(self.dir)
        return self._vm

    @property
    def events(self) -> list[Event]:
        return self.meta.events

    @property
    def checks(self) -> list[Check]:
        return self.meta.checks

    @property
    def name(self) -> str:
        """parent/dir: enough to tell records apart in a table."""
        return f"{self.dir.parent.name}/{self.dir.name}"

    def event_time(self, kind: Kind) -> float | None:
        """t of the first event of this kind, or None."""
        return next((e.t for e in self.events if e.kind == kind), None)


def is_record(path: Path) -> bool:
    return (path / RUN_JSON).is_file()


def load_meta(directory: str | Path) -> RunMeta:
    d = Path(directory)
    where = str(d / RUN_JSON)
    if d.is_file():
        hint = " (give the folder that holds it)" if d.name == RUN_JSON else ""
        raise UserError(f"{d}: a file, not a run record folder{hint}")
    data = read_json(d / RUN_JSON, "run record")
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a JSON object: not a kvmksm run record")
    return parse_meta(migrate(data, where), where)


def load_record(directory: str | Path) -> Record:
    d = Path(directory)
    meta = load_meta(d)
    samples = _read_csv(d / SAMPLES)
    guests = GuestSamples(d)
    return Record(d, meta, samples, guests if guests.exists() else None)


def read_vm_samples(directory: str | Path) -> pd.DataFrame | None:
    """Every per-guest row of a record as one frame (t in seconds, domain as a category),
    from vm_samples.csv, the hourly parts, or both; None when it has none. Holds it all in
    memory: for a long run, read in chunks through Record.guests instead."""
    return GuestSamples(Path(directory)).read()


# -- whole records and changes to finished ones -----------------------------------------
def write_record(
    directory: Path,
    meta: dict[str, Any],
    samples: pd.DataFrame,
    vm_samples: pd.DataFrame | Iterable[pd.DataFrame] | None = None,
) -> Path:
    """Lay out a complete record at once (tests and generators); meta is validated first, so
    a record that load_record could not read is never written. Per-guest rows (a frame, or
    frames in time order for a record too long to hold) are laid out as a run writes them:
    CSV for the first hour, hourly Parquet parts after."""
    directory = Path(directory)
    meta = dict(meta, format=meta.get("format", FORMAT))
    files = {"samples": SAMPLES}
    if vm_samples is not None:
        files |= {"vm_samples": VM_SAMPLES, "vm_parts": f"{PARTS_DIR}/"}
    meta["files"] = files | dict(meta.get("files") or {})
    parse_meta(migrate(dict(meta), str(directory / RUN_JSON)), str(directory / RUN_JSON))
    directory.mkdir(parents=True, exist_ok=True)
    samples.to_csv(directory / SAMPLES, index=False)
    import pandas as pd

    if isinstance(vm_samples, pd.DataFrame):
        write_parts(directory, [vm_samples], list(vm_samples.columns))
    elif vm_samples is not None:  # frames one after another (a long generated record)
        frames = iter(vm_samples)
        first = next(frames, None)
        if first is not None:
            write_parts(directory, itertools.chain([first], frames), list(first.columns))
    write_json(directory / RUN_JSON, meta)
    return directory


def close_killed(directory: Path, error: str, detail: str) -> bool:
    """End the record of a run that was killed (left 'running'): status error with ``error``,
    and a ``cleaned`` event saying what was put back. False when there was nothing to end
    (no record, or one that had ended)."""
    path = Path(directory) / RUN_JSON
    try:
        data = read_json(path, "run record")
    except UserError:
        return False
    if not isinstance(data, dict) or data.get("status") != "running":
        return False
    t = max([e.get("t", 0) for e in data.get("events") or []] or [0])
    data["events"] = [
        *(data.get("events") or []),
        {"t": t, "time": utc_now(), "kind": str(Kind.CLEANED), "detail": detail},
    ]
    data.update(status="error", error=error, finished=utc_now())
    write_json(path, data)
    (Path(directory) / RESERVE).unlink(missing_ok=True)
    return True


def annotate(directory: Path, **fields: Any) -> RunMeta:
    """Add or replace top-level fields of a finished record's run.json; returns it read back."""
    path = Path(directory) / RUN_JSON
    data = read_json(path, "run record")
    data.update(fields)
    write_json(path, data)
    return load_meta(directory)

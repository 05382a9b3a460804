"""The run record: one directory per run, written as the run goes, read back by analysis.

Layout (format 1):
  run.json        metadata, scenario as run, host facts, knobs, events, checks, metrics
  samples.csv     one row per tick: t, time, every KSM counter (sysfs names), ksmd_cpu,
                  host memory (kB, /proc/meminfo names), cow_ksm (/proc/vmstat)
  vm_samples.csv  VM runs: one row per guest per tick: t, domain, pid, ksm_stat fields, rss_kb
  report.html     written from the above
"""

from __future__ import annotations

import csv
import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from kvmksm.errors import UserError

FORMAT = 1
RUN_JSON = "run.json"
SAMPLES = "samples.csv"
VM_SAMPLES = "vm_samples.csv"
REPORT = "report.html"


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class CsvAppender:
    """Appends rows and flushes each one, so a crash loses at most the row being written."""

    def __init__(self, path: Path, columns: list[str]) -> None:
        self.path = path
        self.columns = columns
        self._f = open(path, "w", newline="")  # noqa: SIM115 - closed in close()
        self._w = csv.DictWriter(self._f, fieldnames=columns, extrasaction="ignore")
        self._w.writeheader()
        self._f.flush()
        self.rows = 0

    def write(self, row: dict[str, Any]) -> None:
        self._w.writerow(row)
        self._f.flush()
        self.rows += 1

    def write_many(self, rows: list[dict[str, Any]]) -> None:
        self._w.writerows(rows)
        self._f.flush()
        self.rows += len(rows)

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()


class RunRecord:
    """A run directory being written. run.json is rewritten atomically on every change."""

    def __init__(self, directory: Path, data: dict[str, Any]) -> None:
        self.dir = directory
        self.data = data
        self.t0 = time.monotonic()
        self._lock = threading.Lock()

    @classmethod
    def create(
        cls, output: Path, scenario: dict[str, Any], scenario_file: str | None, kind: str = "bench"
    ) -> RunRecord:
        name = scenario.get("name") or "run"
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        base = Path(output) / name
        directory = base / f"{stamp}-{socket.gethostname()}"
        n = 1
        while directory.exists():
            n += 1
            directory = base / f"{stamp}-{socket.gethostname()}-{n}"
        try:
            directory.mkdir(parents=True)
        except OSError as e:
            raise UserError(f"{directory}: cannot create the run record: {e.strerror}") from None
        data: dict[str, Any] = {
            "format": FORMAT,
            "kind": kind,
            "tool": {"name": "kvmksm", "version": _version()},
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
        return rec

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 4)

    def event(self, kind: str, detail: str = "", **extra: Any) -> dict[str, Any]:
        ev = {"t": self.now(), "time": utc_now(), "kind": kind, "detail": detail, **extra}
        with self._lock:
            self.data["events"].append(ev)
            self._save_locked()
        return ev

    def check(self, name: str, expected: Any, observed: Any, passed: bool, **extra: Any) -> None:
        with self._lock:
            self.data["checks"].append(
                {
                    "name": name,
                    "expected": expected,
                    "observed": observed,
                    "passed": passed,
                    "t": self.now(),
                    **extra,
                }
            )
            self._save_locked()

    def update(self, **fields: Any) -> None:
        with self._lock:
            self.data.update(fields)
            self._save_locked()

    def save(self) -> None:
        with self._lock:
            self._save_locked()

    def _save_locked(self) -> None:
        tmp = self.dir / (RUN_JSON + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        os.replace(tmp, self.dir / RUN_JSON)

    def csv(self, name: str, columns: list[str]) -> CsvAppender:
        with self._lock:
            key = name.removesuffix(".csv")
            self.data["files"][key] = name
        return CsvAppender(self.dir / name, columns)

    def finish(self, status: str, error: str | None = None) -> None:
        self.update(status=status, error=error, finished=utc_now(), duration_s=self.now())


# -- reading --------------------------------------------------------------------------
@dataclass
class Record:
    """A run record read back: what analysis, reports, compare and plan take."""

    dir: Path
    meta: dict[str, Any]
    samples: pd.DataFrame
    vm_samples: pd.DataFrame | None

    @property
    def events(self) -> list[dict[str, Any]]:
        return list(self.meta.get("events", []))

    @property
    def checks(self) -> list[dict[str, Any]]:
        return list(self.meta.get("checks", []))

    def event_time(self, kind: str) -> float | None:
        """t of the first event of this kind, or None."""
        return next((e["t"] for e in self.events if e["kind"] == kind), None)


def load_record(directory: str | Path) -> Record:
    d = Path(directory)
    try:
        meta = json.loads((d / RUN_JSON).read_text())
    except FileNotFoundError:
        raise UserError(f"{d}: not a kvmksm run record (no {RUN_JSON})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{d / RUN_JSON}:{e.lineno}: not valid JSON: {e.msg}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("format"), int):
        raise UserError(f"{d / RUN_JSON}: no integer 'format': not a kvmksm run record")
    if meta["format"] > FORMAT:
        raise UserError(
            f"{d / RUN_JSON}: record format {meta['format']} is newer than this kvmksm "
            f"understands ({FORMAT}); upgrade kvmksm"
        )
    samples = _read_csv(d / SAMPLES)
    # Guest names repeat on every row: categories cut a day-long record's load time.
    vm = _read_csv(d / VM_SAMPLES, {"domain": "category"}) if (d / VM_SAMPLES).exists() else None
    return Record(d, meta, samples, vm)


def _read_csv(path: Path, dtype: dict[str, str] | None = None) -> pd.DataFrame:
    try:
        return pd.read_csv(path, dtype=dtype)
    except FileNotFoundError:
        return pd.DataFrame({"t": pd.Series(dtype=float)})
    except pd.errors.EmptyDataError:
        return pd.DataFrame({"t": pd.Series(dtype=float)})


def _version() -> str:
    from kvmksm import __version__

    return __version__

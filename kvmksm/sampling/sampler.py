"""The sampler: one row of every KSM counter, ksmd's CPU and host memory per tick.

Ticks follow a deadline schedule (start + k * interval), so the series does not drift;
a tick that is missed (the machine stalled) is skipped, not squeezed in late. Files are
opened once and re-read with pread(), which regenerates sysfs/procfs content at offset 0.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, Protocol

from kvmksm.host.fs import KSM_DIR, HostFS, parse_keyvalue, parse_meminfo
from kvmksm.host.ksm import Ksm, parse_value
from kvmksm.host.process import CpuClock
from kvmksm.results.record import RunRecord, utc_now

MEMINFO_FIELDS = (
    "MemTotal",
    "MemFree",
    "MemAvailable",
    "Cached",
    "AnonPages",
    "AnonHugePages",
    "Shmem",
)
VMSTAT_FIELDS = ("cow_ksm", "ksm_swpin_copy")
# What a sampler keeps about itself is bounded, so a watch left running for weeks holds the
# same memory on its last day as on its first: the latest lateness figures, the first errors.
LATENESS_KEPT = 86_400  # a day at 1 Hz
ERRORS_KEPT = 100


class Probe(Protocol):
    """An extra per-tick source with a CSV of its own (e.g. per-VM ksm_stat): each tick,
    rows as sequences in ``columns`` order. A probe with a ``close()`` has it called when
    the sampler stops; one with a ``problems`` list has what it appends there recorded as
    the sampler's errors (something went wrong, yet the tick has its rows)."""

    filename: str
    columns: list[str]

    def rows(self, t: float) -> Sequence[Sequence[Any]]: ...


class HostSource:
    """Reads the host-wide row: KSM files, ksmd CPU, meminfo, vmstat."""

    def __init__(self, fs: HostFS) -> None:
        self.fs = fs
        self._ksm_fds: dict[str, int] = {}
        for name in Ksm(fs).files():
            fd = fs.open_fd(f"{KSM_DIR}/{name}")
            # Only numeric files become columns (advisor_mode is a choice, not a number).
            if isinstance(parse_value(_pread(fd)), int):
                self._ksm_fds[name] = fd
            else:
                os.close(fd)
        self._meminfo = _open_or_none(fs, "proc/meminfo")
        self._vmstat = _open_or_none(fs, "proc/vmstat")
        self.vmstat_fields = [
            f
            for f in VMSTAT_FIELDS
            if self._vmstat is not None and f in parse_keyvalue(_pread(self._vmstat, 16384))
        ]
        self.ksmd_pid = fs.pid_of("ksmd")
        # schedstat's nanoseconds where the kernel has them: stat's 10 ms ticks make a 0.1 s
        # sample read 0 % or 10 %. `ksmd_cpu_source` says which one the column came from.
        self._ksmd_clock = CpuClock(fs, self.ksmd_pid)
        self._last_cpu: tuple[float, float] | None = None
        self.columns = [
            "t",
            "time",
            *self._ksm_fds,
            "ksmd_cpu",
            *MEMINFO_FIELDS,
            *self.vmstat_fields,
        ]

    @property
    def ksm_columns(self) -> list[str]:
        return list(self._ksm_fds)

    @property
    def ksmd_cpu_source(self) -> str | None:
        """Where ksmd_cpu comes from: "schedstat" (ns), "stat" (utime+stime clock ticks) or
        None (no ksmd found)."""
        return self._ksmd_clock.source

    def read(self, t: float) -> dict[str, Any]:
        row: dict[str, Any] = {"t": round(t, 3), "time": utc_now()}
        for name, fd in self._ksm_fds.items():
            row[name] = int(_pread(fd))
        row["ksmd_cpu"] = self._ksmd_cpu(t)
        if self._meminfo is not None:
            mem = parse_meminfo(_pread(self._meminfo, 8192))
            for f in MEMINFO_FIELDS:
                row[f] = mem.get(f)
        if self.vmstat_fields and self._vmstat is not None:
            vm = parse_keyvalue(_pread(self._vmstat, 16384))
            for f in self.vmstat_fields:
                row[f] = vm.get(f)
        return row

    def _ksmd_cpu(self, t: float) -> float | None:
        """Percent of one CPU ksmd used since the previous read."""
        seconds = self._ksmd_clock.seconds()
        if seconds is None:
            return None
        last, self._last_cpu = self._last_cpu, (t, seconds)
        if last is None or t <= last[0]:
            return None
        return round(100.0 * (seconds - last[1]) / (t - last[0]), 2)

    def ksmd_cpu_seconds(self) -> float | None:
        return self._ksmd_clock.seconds()

    def close(self) -> None:
        for fd in [*self._ksm_fds.values(), self._meminfo, self._vmstat]:
            if fd is not None:
                os.close(fd)
        self._ksm_fds.clear()
        self._meminfo = self._vmstat = None
        self._ksmd_clock.close()


class Sampler:
    """Runs HostSource (and probes) every `interval` seconds in a thread, appending to the
    record's CSV files as it goes."""

    def __init__(
        self, fs: HostFS, record: RunRecord, interval: float = 1.0, probes: Sequence[Probe] = ()
    ) -> None:
        self.fs = fs
        self.record = record
        self.interval = interval
        self.source = HostSource(fs)
        self.out = record.csv("samples.csv", self.source.columns)
        self.probes = list(probes)
        self.probe_out = [record.csv(p.filename, p.columns) for p in self.probes]
        # seconds each recent tick ran after its deadline (the latest LATENESS_KEPT)
        self.lateness: deque[float] = deque(maxlen=LATENESS_KEPT)
        self.late_max = 0.0  # over every tick
        self.ticks = 0
        self.missed = 0
        self.realtime = False
        self.errors: list[str] = []  # the first ERRORS_KEPT; error_count counts them all
        self.error_count = 0
        self.last: dict[str, Any] = {}
        self._stop = threading.Event()
        self._wake = threading.Event()  # set by poke() and stop()
        self._poked = False
        self.extra = 0  # samples taken off the schedule, at events
        self._thread: threading.Thread | None = None

    @property
    def ksmd_cpu_source(self) -> str | None:
        """Where the ksmd_cpu column comes from (for run.json): "schedstat", "stat" or None."""
        return self.source.ksmd_cpu_source

    def describe(self) -> dict[str, Any]:
        """What the record keeps about how it was sampled."""
        return {"interval": self.interval, "ksmd_cpu_source": self.ksmd_cpu_source}

    def tick(self) -> dict[str, Any]:
        t = self.record.now()
        row = self.source.read(t)
        self.out.write(row)
        for probe, out in zip(self.probes, self.probe_out, strict=True):
            try:
                out.write_sequences(probe.rows(t))
            except Exception as e:  # a guest vanishing must not stop host sampling
                self._error(f"{probe.filename}: {e}")
            problems: list[str] = getattr(probe, "problems", [])
            while problems:
                self._error(f"{probe.filename}: {problems.pop(0)}")
        self.last = row
        return row

    def poke(self) -> None:
        """Take one extra sample now, off the schedule: a run calls it at the events that
        matter (a fill's scans done, KSM on, steady, unmerge), so a short run's record holds
        the counters as they were at each of them, whatever the sample interval."""
        self._poked = True
        self._wake.set()

    def _wait(self, delay: float) -> bool:
        """Sleep until the deadline, taking the extra samples poke() asks for meanwhile;
        True when stopped."""
        end = time.monotonic() + delay
        while not self._stop.is_set():
            left = end - time.monotonic()
            if left <= 0:
                return False
            self._wake.wait(left)
            self._wake.clear()
            if self._poked and not self._stop.is_set():
                self._poked = False
                self.extra += 1
                self._safe_tick()
        return True

    def _safe_tick(self) -> None:
        try:
            self.tick()
        except Exception as e:
            self._error(str(e))

    def _error(self, text: str) -> None:
        self.error_count += 1
        if len(self.errors) < ERRORS_KEPT:
            self.errors.append(text)

    def _loop(self) -> None:
        self.realtime = _realtime_thread()
        start = time.monotonic()
        k = 0
        while not self._stop.is_set():
            deadline = start + k * self.interval
            delay = deadline - time.monotonic()
            if delay > 0 and self._wait(delay):
                break
            late = time.monotonic() - deadline
            self.lateness.append(late)
            self.late_max = max(self.late_max, late)
            self.ticks += 1
            self._safe_tick()
            # Next deadline still ahead of us; count the ones a stall skipped.
            nxt = int((time.monotonic() - start) / self.interval) + 1
            self.missed += max(0, nxt - k - 1)
            k = nxt

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="kvmksm-sampler", daemon=True)
        self._thread.start()

    def stop(self, final_tick: bool = True) -> None:
        if self._thread is not None:
            self._stop.set()
            self._wake.set()
            self._thread.join()
            self._thread = None
            if final_tick:
                try:
                    self.tick()  # the state at the very end, e.g. after unmerge
                except Exception as e:
                    self._error(str(e))
        self.out.close()
        for out in self.probe_out:
            out.close()
        for probe in self.probes:
            close = getattr(probe, "close", None)  # probes that keep files open
            if close is not None:
                close()
        self.source.close()


def _realtime_thread() -> bool:
    """Give this thread the lowest real-time priority (as cyclictest does), so a busy host
    (TCG guests on every core) delays a tick by microseconds, not a time slice. A tick is
    ~0.2 ms a second, so it cannot starve anything. Without the privilege: normal policy."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
        return True
    except (OSError, AttributeError):
        return False


def _pread(fd: int, n: int = 4096) -> str:
    return os.pread(fd, n, 0).decode()


def _open_or_none(fs: HostFS, rel: str) -> int | None:
    try:
        return fs.open_fd(rel)
    except OSError:
        return None

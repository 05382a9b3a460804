"""Room for a record before a run starts: a run whose results folder fills up halfway has
changed the host for nothing, so `bench` refuses one that clearly cannot fit.

What a record needs is dominated by its samples: one row of every column each tick for the
host, and one per guest each tick, for as long as the run can last (scenario.estimate's
longest: every timeout reached). run.json, the guests' console logs and the room the
record keeps aside for its last words (record.RESERVE_BYTES) come on top.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from kvmksm.errors import UserError
from kvmksm.host.fs import HostFS
from kvmksm.host.ksm import Ksm
from kvmksm.results.record import RESERVE_BYTES
from kvmksm.scenario.estimate import estimate
from kvmksm.scenario.model import Scenario, VmsWorkload
from kvmksm.units import format_duration, format_size

# Bytes a value takes in a CSV row, comma included (counters of 6-9 digits, most of them).
VALUE_BYTES = 9
# The two time columns of a host row (t, and the UTC time as 2025-01-01T12:00:00.000Z).
TIME_BYTES = 34
# Host row columns besides the KSM files: ksmd_cpu, 7 of /proc/meminfo, 2 of /proc/vmstat.
OTHER_COLUMNS = 10
# A guest row: t, domain (kvmksm-<8 hex>-<base>-NN), pid, 4 ksm_stat fields, RSS.
GUEST_ROW_BYTES = 8 + 32 + 8 + 5 * VALUE_BYTES
FIXED_BYTES = 256 << 10  # run.json, its temporary copy while it is replaced
CONSOLE_BYTES = 64 << 10  # a guest's console log, copied into the record at the end
SETUP_SECONDS = 60.0  # defining, starting, removing guests, filling: beyond the waits


@dataclass(frozen=True)
class Need:
    bytes: int
    runs: int
    guests: int
    columns: int
    seconds: float  # the longest one run can last

    def line(self) -> str:
        who = f"{self.guests} guest(s) + the host" if self.guests else "the host"
        runs = f" x {self.runs} runs" if self.runs > 1 else ""
        return (
            f"up to {format_size(self.bytes)} ({who} x {self.columns} columns x up to "
            f"{format_duration(self.seconds, approx=True)} at one row a sample{runs})"
        )


def record_need(sc: Scenario, ksm_columns: int) -> Need:
    est = estimate(sc)
    seconds = est.longest + SETUP_SECONDS
    ticks = int(seconds / sc.sample_interval) + 2
    guests = 0
    if isinstance(sc.workload, VmsWorkload):
        guests = max([sc.workload.clones, *[int(c) for c in sc.matrix.get("clones", [])]])
    columns = 2 + ksm_columns + OTHER_COLUMNS
    per_tick = TIME_BYTES + (ksm_columns + OTHER_COLUMNS) * VALUE_BYTES + guests * GUEST_ROW_BYTES
    one = ticks * per_tick + FIXED_BYTES + RESERVE_BYTES + guests * CONSOLE_BYTES
    return Need(one * est.runs, est.runs, guests, columns, seconds)


def free_bytes(folder: Path) -> tuple[Path, int]:
    """Free bytes (for an unprivileged writer too) where ``folder`` is or would be made:
    the nearest folder of its path that exists."""
    at = Path(os.path.abspath(folder))
    while not at.exists() and at != at.parent:
        at = at.parent
    st = os.statvfs(at)
    return at, st.f_bavail * st.f_frsize


def check_room(sc: Scenario, output: Path, fs: HostFS | None = None) -> Need:
    """Refuse (UserError, exit 2; nothing changed) when the output folder's free space is
    below what the record(s) of this scenario can need."""
    ksm = Ksm(fs or HostFS())
    columns = len(ksm.files()) if ksm.available() else 20
    need = record_need(sc, columns)
    at, free = free_bytes(output)
    if free < need.bytes:
        raise UserError(
            f"{output}: {format_size(free)} free on {at}, but the record may need "
            f"{need.line()}: free some space or choose another folder with -o"
        )
    return need

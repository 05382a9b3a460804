"""Synthetic run records with known curves, for tests and benchmarks of analysis and reports.

`write_record` lays out any record; `vm_record` and `ltp_record` build the two usual shapes
with numbers chosen so that every derived metric has an exact expected value.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kvmksm.results.record import FORMAT
from kvmksm.results.record import write_record as write_run

PAGE = 4096
MIB = 1024 * 1024
RMAP_ITEM_BYTES = 64  # sizeof(struct ksm_rmap_item) on x86-64
START = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


def ramp(t: np.ndarray, start: float, duration: float, top: float) -> np.ndarray:
    """0 before start, a straight line to `top` over `duration`, then `top`."""
    return top * np.clip((t - start) / duration, 0.0, 1.0)


def logistic(t: np.ndarray, midpoint: float, rate: float, top: float) -> np.ndarray:
    return top / (1.0 + np.exp(-rate * (t - midpoint)))


def iso(t: float | np.ndarray) -> Any:
    if np.isscalar(t):
        stamp = START + timedelta(seconds=float(t))
        return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    stamps = pd.Timestamp(START) + pd.to_timedelta(np.asarray(t), unit="s")
    return stamps.strftime("%Y-%m-%dT%H:%M:%S.%f").str[:-3] + "Z"


def event(t: float, kind: str, detail: str = "", **extra: Any) -> dict[str, Any]:
    return {"t": t, "time": iso(t), "kind": kind, "detail": detail, **extra}


def host_facts(**over: Any) -> dict[str, Any]:
    facts = {
        "kernel_release": "6.18.0-test",
        "hostname": "testhost",
        "cpu_model": "Synthetic CPU @ 2.0GHz",
        "cpus": 2,
        "mem_total_kb": 24 * 1024 * 1024,
        "page_size": PAGE,
        "thp_enabled": "madvise",
    }
    facts.update(over)
    return facts


def write_record(
    directory: Path,
    *,
    samples: pd.DataFrame,
    events: Sequence[dict[str, Any]],
    scenario: dict[str, Any],
    checks: Sequence[dict[str, Any]] = (),
    vm_samples: pd.DataFrame | Iterable[pd.DataFrame] | None = None,
    host: dict[str, Any] | None = None,
    knobs_before: dict[str, Any] | None = None,
    knobs_during: dict[str, Any] | None = None,
    guests: list[dict[str, Any]] | None = None,
    status: str = "passed",
    kind: str = "bench",
    error: str | None = None,
) -> Path:
    """A record laid out through kvmksm.results (run.json validated as every reader sees it)."""
    duration = float(samples["t"].iloc[-1]) if len(samples) else 0.0
    before = knobs_before or {"run": 0, "pages_to_scan": 100, "sleep_millisecs": 20}
    meta: dict[str, Any] = {
        "format": FORMAT,
        "kind": kind,
        "tool": {"name": "kvmksm", "version": "0.1.0"},
        "status": status,
        "scenario_file": f"scenarios/{scenario.get('name', 'test')}.yaml",
        "scenario": scenario,
        "started": iso(0.0),
        "finished": iso(duration),
        "duration_s": duration,
        "host": host or host_facts(),
        "knobs_before": before,
        "knobs_during": knobs_during or dict(scenario.get("knobs", {}), run=1),
        "knobs_after": before,
        "counters_before": {"pages_shared": 0, "pages_sharing": 0},
        "events": list(events),
        "checks": list(checks),
        "metrics": {},
        "error": error,
    }
    if guests is not None:
        meta["guests"] = guests
    return write_run(Path(directory), meta, samples, vm_samples)


@dataclass
class VmRun:
    """A VM run whose every figure is known: N identical guests, each KSM page mapped once by
    every guest, so pages_sharing = (N-1) x pages_shared and each guest's ksm_merging_pages
    equals pages_shared. Times are seconds since the run started."""

    guests: int = 3
    guest_mib: int = 256
    duration: float = 700.0
    interval: float = 1.0
    t_on: float = 100.0
    rise: float = 200.0  # ramp length; for shape="logistic" the time constant is rise / 10
    shape: str = "ramp"
    shared_top: int = 32000  # pages_shared at the plateau
    steady: float | None = 300.0
    unmerge: float | None = 600.0
    unmerge_seconds: float = 2.5
    cpu_rise: float = 50.0  # ksmd %CPU while the curve rises
    cpu_plateau: float = 5.0
    scan_rate: float = 40000.0  # pages_scanned per second while run=1
    pages_to_scan: int = 1000
    sleep_ms: int = 20
    zero_top: int = 0  # ksm_zero_pages at the plateau
    other_pages: int = 0  # merged pages (shared+sharing) of a non-guest KSM user
    with_vm: bool = True
    drop: Iterable[str] = field(default_factory=tuple)  # columns an older kernel lacks
    status: str = "passed"
    noise: float = 0.0  # relative jitter on ksmd_cpu and pages_volatile, as real samples have
    seed: int = 1

    @property
    def guest_pages(self) -> int:
        return self.guest_mib * MIB // PAGE

    def times(self) -> np.ndarray:
        return np.arange(0.0, self.duration + self.interval / 2, self.interval)

    def shared(self, t: np.ndarray) -> np.ndarray:
        if self.shape == "logistic":
            f = logistic(t, self.t_on + self.rise / 2, 10.0 / self.rise, 1.0)
            f = np.where(t >= self.t_on, f, 0.0)
        else:
            f = ramp(t, self.t_on, self.rise, 1.0)
        shared = np.round(f * self.shared_top)
        if self.unmerge is not None:
            shared = np.where(t >= self.unmerge, 0.0, shared)
        return shared.astype(np.int64)


def vm_samples_frame(
    run: VmRun, t: np.ndarray, shared: np.ndarray, zero: np.ndarray
) -> pd.DataFrame:
    """The per-guest rows of the ticks t. Without noise every guest maps every KSM page once
    (ksm_merging_pages = pages_shared); with it each guest's figures move a little around
    that, tick by tick, as real guests' do (a few pages merged or broken, RSS by a few pages),
    so that record sizes and medians are measured on values that change."""
    n, g = len(t), run.guests
    names = np.array([f"clone{i + 1:02d}" for i in range(g)])
    merging = np.repeat(shared, g)
    zero_each = np.repeat(zero // g, g)
    rmap = np.repeat(np.where(shared > 0, run.guest_pages, 0), g)
    rss = np.full(n * g, run.guest_mib * 1024 * 3 // 4 + 20480)
    if run.noise and n:
        rng = np.random.default_rng([run.seed, int(t[0] * 1000)])
        step = max(1, int(run.noise * 200))
        moved = rng.random(n * g) < 0.3
        merging = merging + np.where(
            moved & (merging > step), rng.integers(-step, step + 1, n * g), 0
        )
        rss = rss + np.where(rng.random(n * g) < 0.5, 4 * rng.integers(-25, 26, n * g), 0)
    return pd.DataFrame(
        {
            "t": np.repeat(t, g),
            "domain": np.tile(names, n),
            "pid": np.tile(np.arange(4001, 4001 + g), n),
            "ksm_rmap_items": rmap,
            "ksm_zero_pages": zero_each,
            "ksm_merging_pages": merging,
            "ksm_process_profit": (merging + zero_each) * PAGE - rmap * RMAP_ITEM_BYTES,
            "rss_kb": rss,
        }
    )


def vm_samples_frames(
    run: VmRun, t: np.ndarray, shared: np.ndarray, zero: np.ndarray
) -> Iterator[pd.DataFrame]:
    """vm_samples_frame an hour at a time: a week of 200 guests is 121 million rows."""
    hour = (t // 3600).astype(np.int64)
    starts = np.flatnonzero(np.r_[True, hour[1:] != hour[:-1]]) if len(t) else []
    for a, b in zip(starts, [*starts[1:], len(t)], strict=True):
        yield vm_samples_frame(run, t[a:b], shared[a:b], zero[a:b])


def vm_record(directory: Path, run: VmRun | None = None, **over: Any) -> Path:
    run = run or VmRun(**over)
    t = run.times()
    shared = run.shared(t)
    sharing = shared * (run.guests - 1)
    zero_frac = np.divide(shared, run.shared_top, out=np.zeros(len(t)), where=run.shared_top > 0)
    zero = np.round(zero_frac * run.zero_top).astype(np.int64)
    other = np.where(shared > 0, run.other_pages, 0)  # a host process: 1 shared, rest sharing
    # a row's ksmd_cpu covers the second before it, so ksmd is busy in (t_on, unmerge]
    on = (t > run.t_on) & ((t <= run.unmerge) if run.unmerge is not None else True)
    end = run.unmerge if run.unmerge is not None else run.duration
    scanned = np.round(np.clip(t - run.t_on, 0, end - run.t_on) * run.scan_rate).astype(np.int64)
    run_col = np.where(t >= run.t_on, 1, 0)
    if run.unmerge is not None:
        run_col = np.where(t >= run.unmerge, 2, run_col)
    rmap = np.where(shared > 0, run.guests * run.guest_pages, 0)
    rising = on & (t <= run.t_on + run.rise)
    cpu = np.where(rising, run.cpu_rise, np.where(on, run.cpu_plateau, 0.0))
    volatile = np.where(rising, 500, 0)
    if run.noise:
        rng = np.random.default_rng(run.seed)
        cpu = np.round(np.clip(cpu * (1 + run.noise * rng.standard_normal(len(t))), 0, 100), 2)
        volatile = np.where(on, rng.integers(0, 1 + int(2000 * run.noise), len(t)), 0)
    guests_kb = run.guests * run.guest_mib * 1024
    mem_total = max(24 * 1024 * 1024, guests_kb * 5 // 4)  # a host the guests fit on
    anon = np.where(t >= 20, run.guests * run.guest_mib * 1024, 0)
    saved_kb = (sharing + zero) * PAGE // 1024
    samples = pd.DataFrame(
        {
            "t": t,
            "time": iso(t),
            "pages_shared": shared + np.where(other > 0, 1, 0),
            "pages_sharing": sharing + np.maximum(other - 1, 0),
            "pages_unshared": np.where(on, run.guest_pages // 8, 0),
            "pages_volatile": volatile,
            "full_scans": scanned // max(1, run.guests * run.guest_pages),
            "pages_scanned": scanned,
            "pages_skipped": scanned // 10,
            "ksm_zero_pages": zero,
            "general_profit": (sharing + zero) * PAGE - rmap * RMAP_ITEM_BYTES,
            "stable_node_chains": 0,
            "stable_node_dups": 0,
            "run": run_col,
            "pages_to_scan": run.pages_to_scan,
            "sleep_millisecs": run.sleep_ms,
            "max_page_sharing": 256,
            "smart_scan": 1,
            "use_zero_pages": int(run.zero_top > 0),
            "merge_across_nodes": 1,
            "ksmd_cpu": cpu,
            "MemTotal": mem_total,
            "MemFree": mem_total - anon + saved_kb - 2 * 1024 * 1024,
            "MemAvailable": mem_total - anon + saved_kb - 1024 * 1024,
            "Cached": 1024 * 1024,
            "AnonPages": anon - saved_kb,
            "AnonHugePages": 0,
            "Shmem": 65536,
            "cow_ksm": 0,
        }
    )
    samples = samples.drop(columns=[c for c in run.drop if c in samples.columns])
    names = [f"clone{i + 1:02d}" for i in range(run.guests)]
    events = [event(0.0, "run_start"), event(0.5, "knobs_set"), event(1.0, "ksm_off")]
    for i, name in enumerate(names):
        events.append(event(2.0 + 0.1 * i, "guest_started", name, domain=name))
    for i, name in enumerate(names):
        events.append(event(40.0 + 0.5 * i, "guest_up", name, domain=name))
    events += [event(60.0, "all_up"), event(90.0, "settle_done"), event(run.t_on, "ksm_on")]
    if run.steady is not None:
        events.append(event(run.steady, "steady", "pages_sharing within 1% over 10s"))
    if run.unmerge is not None:
        events.append(event(run.unmerge, "unmerge", seconds=run.unmerge_seconds))
        events.append(event(run.unmerge + run.unmerge_seconds, "unmerge_done"))
    events += [event(run.duration - 1, "teardown"), event(run.duration, "run_end")]
    plateau_sharing = run.shared_top * (run.guests - 1)
    checks = [
        {
            "name": "pages_sharing at steady",
            "expected": {"min": plateau_sharing // 2, "max": None},
            "observed": plateau_sharing,
            "passed": True,
            "t": run.steady,
        },
        {
            "name": "pages_sharing after unmerge",
            "expected": 0,
            "observed": 0,
            "passed": True,
            "t": run.unmerge,
        },
    ]
    knobs = {"pages_to_scan": run.pages_to_scan, "sleep_millisecs": run.sleep_ms}
    scenario = {
        "name": "tiny-vms",
        "description": "synthetic VM run",
        "sample_interval": run.interval,
        "knobs": knobs,
        "workload": {
            "type": "vms",
            "domain_type": "qemu",
            "base": {"image": "images/tiny.qcow2", "memory": run.guest_mib * MIB, "vcpus": 1},
            "clones": run.guests,
            "disk": "overlay",
            "memory": None,
            "guest_fill": {"size": run.guest_mib * MIB // 2, "byte": 0x61},
            "steady": {"window": 10.0, "threshold": 0.01, "min_full_scans": 2},
            "unmerge": run.unmerge is not None,
        },
    }
    guests = [
        {"name": n, "uuid": f"00000000-0000-0000-0000-{i:012d}", "memory_kb": run.guest_mib * 1024}
        | {"pid": 4001 + i}
        for i, n in enumerate(names)
    ]
    host = host_facts(libvirt_version="9.0.0", qemu_version="7.2.0", mem_total_kb=mem_total)
    vm = vm_samples_frames(run, t, shared, zero) if run.with_vm else None
    return write_record(
        directory,
        samples=samples,
        events=events,
        scenario=scenario,
        checks=checks,
        vm_samples=vm,
        host=host,
        knobs_during=dict(knobs, run=1),
        guests=guests,
        status=run.status,
    )


def ltp_record(directory: Path) -> Path:
    """The seed's LTP ksm03 shape: 3 processes x 128 MiB, four rounds, unmerge, stop; no VMs."""
    rounds = [(2, 98302, 0), (3, 98301, 0), (1, 98303, 0), (1, 98302, 1)]
    t = np.arange(0.0, 15.0)
    shared = np.zeros(len(t), dtype=np.int64)
    sharing = np.zeros(len(t), dtype=np.int64)
    unshared = np.zeros(len(t), dtype=np.int64)
    events = [event(0.0, "run_start"), event(0.2, "knobs_set"), event(0.3, "workload_start")]
    checks = []
    for i, (sh, sg, un) in enumerate(rounds):
        t_fill, t_check = 1.5 + 2 * i, 2.5 + 2 * i
        events.append(event(t_fill, "round_filled", f"round {i + 1}", step=i))
        if i == 0:
            events.append(event(t_fill + 0.1, "ksm_on"))
        events += [event(t_check - 0.2, "scans_done", step=i), event(t_check, "round_checked")]
        mask = t >= t_fill + 0.5
        shared[mask], sharing[mask], unshared[mask] = sh, sg, un
        for name, value in (("pages_shared", sh), ("pages_sharing", sg), ("pages_unshared", un)):
            checks.append(
                {"name": f"round {i + 1}: {name}", "expected": value, "observed": value}
                | {"passed": True, "t": t_check, "step": i}
            )
    events += [event(9.6, "unmerge", seconds=0.05), event(9.65, "unmerge_done")]
    events += [event(10.5, "stop"), event(14.0, "teardown"), event(14.0, "run_end")]
    after = t >= 10.0
    shared[after] = sharing[after] = unshared[after] = 0
    run_col = np.where(t >= 1.6, 1, 0)
    run_col[t >= 9.6] = 2
    run_col[t >= 10.5] = 0
    samples = pd.DataFrame(
        {
            "t": t,
            "time": iso(t),
            "pages_shared": shared,
            "pages_sharing": sharing,
            "pages_unshared": unshared,
            "pages_volatile": 0,
            "full_scans": np.cumsum(run_col == 1) * 3,
            "run": run_col,
            "pages_to_scan": 98304,
            "sleep_millisecs": 0,
            "ksmd_cpu": np.where(run_col == 1, 95.0, 0.0),
            "MemTotal": 24 * 1024 * 1024,
            "MemFree": 20 * 1024 * 1024,
            "MemAvailable": 21 * 1024 * 1024,
            "AnonPages": 400 * 1024,
        }
    )
    knobs = {"max_page_sharing": 98304, "smart_scan": 0, "pages_to_scan": 98304}
    knobs["sleep_millisecs"] = 0
    scenario = {
        "name": "ltp-ksm03",
        "sample_interval": 1.0,
        "knobs": knobs,
        "workload": {"type": "processes", "count": 3, "size": 128 * MIB, "steps": []},
    }
    return write_record(
        directory,
        samples=samples,
        events=events,
        scenario=scenario,
        checks=checks,
        host=host_facts(kernel_release="6.1.0-test"),
    )

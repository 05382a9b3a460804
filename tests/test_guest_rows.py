"""Per-guest rows (sampling.guest_rows.VmProbe) and the /proc readers under them
(host.process): files kept open and re-read, guests that come, go or exit mid-tick, kernels
without ksm_stat, and ksmd's CPU from schedstat or stat. Fake trees for the logic, real
processes for what only the kernel can show (pread regenerating, ESRCH after exit, merging)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from kvmksm.host.fs import HostFS
from kvmksm.host.ksm import Ksm
from kvmksm.host.process import CpuClock, ProcessFiles, ProcessGone, read_process
from kvmksm.results.record import RunRecord
from kvmksm.sampling.guest_rows import VM_COLUMNS, VmProbe
from kvmksm.sampling.sampler import HostSource, Sampler

from .fakehost import KSMD_PID
from .fakeqemu import add_qemu, exit_qemu, set_merging


def as_dicts(rows: list[tuple]) -> list[dict]:
    return [dict(zip(VM_COLUMNS, r, strict=True)) for r in rows]


def live_row(t: float, domain: str, pid: int, merging: int, rss_kb: int = 100_000) -> dict:
    return {
        "t": t,
        "domain": domain,
        "pid": pid,
        "ksm_rmap_items": merging + 10,
        "ksm_zero_pages": 0,
        "ksm_merging_pages": merging,
        "ksm_process_profit": merging * 4096 - 640,
        "rss_kb": rss_kb,
    }


class CountingFS(HostFS):
    """Counts the files opened, to prove they are opened once, not every tick."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.opened: list[str] = []

    def open_fd(self, rel: str) -> int:
        fd = super().open_fd(rel)
        self.opened.append(rel)
        return fd


# -- fake trees: the logic --------------------------------------------------------------------
def test_files_open_once_and_reread_every_tick(fake_root: Path) -> None:
    fs = CountingFS(fake_root)
    add_qemu(fake_root, 6001, "a", merging=7)
    add_qemu(fake_root, 6002, "b", merging=9)
    mapping = {"b": 6002, "a": 6001}
    probe = VmProbe(fs, lambda: dict(mapping))  # a new but equal dict each tick, as bench's
    assert as_dicts(probe.rows(1.0)) == [live_row(1.0, "a", 6001, 7), live_row(1.0, "b", 6002, 9)]
    opened = len(fs.opened)
    assert opened == 4  # statm and ksm_stat of each
    set_merging(fake_root, 6001, 500)  # rewritten in place: what a held fd sees on pread
    rows = as_dicts(probe.rows(2.0))
    assert rows[0] == live_row(2.0, "a", 6001, 500)
    assert len(fs.opened) == opened  # nothing reopened while the mapping stayed the same
    assert probe.last["a"]["ksm_merging_pages"] == 500

    # A guest leaves, another arrives: only the newcomer's files are opened.
    add_qemu(fake_root, 6003, "c", merging=1)
    del mapping["b"]
    mapping["c"] = 6003
    assert [r["domain"] for r in as_dicts(probe.rows(3.0))] == ["a", "c"]
    assert fs.opened[opened:] == ["proc/6003/statm", "proc/6003/ksm_stat"]
    before = len(os.listdir("/proc/self/fd"))
    probe.close()
    assert len(os.listdir("/proc/self/fd")) == before - 4  # a's and c's files closed


def test_processes_that_exit_are_dropped_quietly(fake_root: Path) -> None:
    fs = CountingFS(fake_root)
    add_qemu(fake_root, 6001, "live", merging=7)
    add_qemu(fake_root, 6002, "exiting", merging=9)
    add_qemu(fake_root, 6004, "old-kernel", ksm_stat=False)
    (fake_root / "proc/6004/ksm_merging_pages").write_text("42\n")
    mapping = {"live": 6001, "exiting": 6002, "gone": 6003, "old-kernel": 6004}
    probe = VmProbe(fs, lambda: mapping)
    rows = as_dicts(probe.rows(1.0))
    assert [r["domain"] for r in rows] == ["exiting", "live", "old-kernel"]
    assert probe.gone == 1  # 6003 was never there
    # Before Linux 6.1 there is no ksm_stat; 5.19's ksm_merging_pages still says something.
    assert rows[2]["ksm_merging_pages"] == 42 and rows[2]["ksm_process_profit"] is None
    assert rows[2]["rss_kb"] == 100_000

    exit_qemu(fake_root, 6002)  # a zombie through the open files, then reaped
    rows = as_dicts(probe.rows(2.0))
    assert [r["domain"] for r in rows] == ["live", "old-kernel"]
    assert probe.gone == 3  # 6002 and 6003, still listed, skipped
    opened = len(fs.opened)
    probe.rows(3.0)
    assert len(fs.opened) == opened  # a dead guest still listed is not reopened each tick
    assert set(probe.last) == {"live", "old-kernel"}
    assert read_process(fs, 6001)["rss_kb"] == 100_000


def test_a_read_failing_with_esrch_drops_only_that_guest(
    fake_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel's answer on a held /proc file once the process is reaped is ESRCH."""
    fs = HostFS(fake_root)
    add_qemu(fake_root, 6001, "a", merging=7)
    add_qemu(fake_root, 6002, "b", merging=9)
    probe = VmProbe(fs, lambda: {"a": 6001, "b": 6002})
    assert len(probe.rows(1.0)) == 2
    real_pread = os.pread

    def pread(fd: int, n: int, offset: int) -> bytes:
        if "/proc/6002/" in os.readlink(f"/proc/self/fd/{fd}"):
            raise ProcessLookupError(errno.ESRCH, "No such process")
        return real_pread(fd, n, offset)

    monkeypatch.setattr(os, "pread", pread)
    assert [r[1] for r in probe.rows(2.0)] == ["a"]
    assert probe.gone == 1


def test_a_guest_whose_files_misbehave_is_read_the_slow_way(fake_root: Path) -> None:
    fs = HostFS(fake_root)
    add_qemu(fake_root, 6001, "a", merging=7)
    add_qemu(fake_root, 6002, "b", merging=9)
    probe = VmProbe(fs, lambda: {"a": 6001, "b": 6002})
    probe.rows(1.0)
    (fake_root / "proc/6001/ksm_stat").write_text("ksm_rmap_items 5\n")  # not the layout seen
    rows = as_dicts(probe.rows(2.0))
    assert [r["domain"] for r in rows] == ["a", "b"]  # b is not lost because of a
    assert rows[0]["ksm_rmap_items"] == 5 and rows[0]["ksm_merging_pages"] is None


def test_too_many_open_files_falls_back_to_reading_by_path(
    fake_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs = HostFS(fake_root)
    add_qemu(fake_root, 6001, "a", merging=7)

    def no_fds(self: HostFS, rel: str) -> int:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(HostFS, "open_fd", no_fds)
    probe = VmProbe(fs, lambda: {"a": 6001})
    assert as_dicts(probe.rows(1.0)) == [live_row(1.0, "a", 6001, 7)]
    set_merging(fake_root, 6001, 8)
    assert probe.rows(2.0)[0][VM_COLUMNS.index("ksm_merging_pages")] == 8


def test_sampler_writes_the_guest_csv_in_its_columns(fake_root: Path, tmp_path: Path) -> None:
    fs = HostFS(fake_root)
    add_qemu(fake_root, 6001, "a,b", merging=7)  # a comma: the CSV must quote it
    rec = RunRecord.create(tmp_path, {"name": "t"}, None)
    sampler = Sampler(fs, rec, probes=[VmProbe(fs, lambda: {"a,b": 6001})])
    sampler.tick()
    set_merging(fake_root, 6001, 8)
    sampler.tick()
    sampler.stop(final_tick=False)
    vm = pd.read_csv(rec.dir / "vm_samples.csv")
    assert list(vm.columns) == VM_COLUMNS
    assert vm["domain"].tolist() == ["a,b", "a,b"]
    assert vm["ksm_merging_pages"].tolist() == [7, 8]
    assert sampler.probe_out[0].rows == 2


def test_ksmd_cpu_from_schedstat_where_there_is_one(fake_root: Path) -> None:
    sched = fake_root / f"proc/{KSMD_PID}/schedstat"
    sched.write_text("1000000000 5 7\n")  # 1 s on CPU
    src = HostSource(HostFS(fake_root))
    assert src.ksmd_cpu_source == "schedstat"
    assert src.read(10.0)["ksmd_cpu"] is None  # no interval yet
    sched.write_text("1250000000 5 9\n")  # +0.25 s of CPU in 0.5 s: below one 10 ms tick's
    assert src.read(10.5)["ksmd_cpu"] == 50.0  # resolution it would be 0 or 2 %
    assert src.ksmd_cpu_seconds() == 1.25
    src.close()


def test_ksmd_cpu_falls_back_to_stat_ticks_and_says_so(fake_root: Path) -> None:
    from .fakehost import set_ksmd_ticks

    src = HostSource(HostFS(fake_root))  # the fake ksmd has stat, no schedstat
    assert src.ksmd_cpu_source == "stat"
    src.read(1.0)
    set_ksmd_ticks(fake_root, 30)  # 0.3 s at 100 ticks a second
    assert src.read(2.0)["ksmd_cpu"] == 30.0
    src.close()
    (fake_root / f"proc/{KSMD_PID}/comm").write_text("not-ksmd\n")
    none = Sampler(HostFS(fake_root), RunRecord.create(fake_root / "rec", {"name": "t"}, None))
    assert none.ksmd_cpu_source is None and none.tick()["ksmd_cpu"] is None
    none.stop(final_tick=False)


# -- real processes: what only the kernel shows ------------------------------------------------
@pytest.fixture
def fillers() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        p.kill()
        p.wait()


def start_filler(procs: list[subprocess.Popen[str]], size: int, index: int) -> int:
    p = subprocess.Popen(
        [sys.executable, "-m", "kvmksm.workloads.filler", str(size), str(index)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    procs.append(p)
    assert p.stdout is not None and p.stdin is not None
    kind, pid = json.loads(p.stdout.readline())
    assert kind == "ready"
    return int(pid)


def fill(p: subprocess.Popen[str], byte: int) -> None:
    assert p.stdin is not None and p.stdout is not None
    p.stdin.write(json.dumps(["fill", [1, {"byte": byte}]]) + "\n")
    p.stdin.flush()
    assert json.loads(p.stdout.readline())[0] == "filled"


def test_real_files_regenerate_on_pread_and_exit_means_gone(
    fillers: list[subprocess.Popen[str]],
) -> None:
    pid = start_filler(fillers, 8 << 20, 0)
    files = ProcessFiles(HostFS(), pid)
    rss_before = files.read()[-1]
    fill(fillers[0], 97)  # 8 MiB touched: statm through the same open file must see it
    rss_after = files.read()[-1]
    assert rss_after - rss_before >= 7 * 1024
    # The open files follow the process, not the pid number: after exit and reaping, ESRCH.
    fillers[0].kill()
    fillers[0].wait()
    with pytest.raises(ProcessGone):
        files.read()
    files.close()
    with pytest.raises(ProcessGone):
        ProcessFiles(HostFS(), pid)
    with pytest.raises(ProcessGone):
        read_process(HostFS(), pid)


def test_real_cpu_clock_counts_nanoseconds() -> None:
    clock = CpuClock(HostFS(), os.getpid())
    assert clock.source == ("schedstat" if Path("/proc/self/schedstat").exists() else "stat")
    before = clock.seconds()
    end = time.thread_time() + 0.05
    while time.thread_time() < end:  # 50 ms of CPU
        pass
    spent = clock.seconds() - before  # type: ignore[operator]
    assert 0.04 < spent < 1.0
    clock.close()


@pytest.mark.realksm
@pytest.mark.parametrize("helpers", [0, 1])
def test_real_probe_sees_merging_through_held_files(
    real_ksm: Ksm, fillers: list[subprocess.Popen[str]], helpers: int
) -> None:
    """Three processes with the same 4 MiB: their ksm_stat, read through files opened before
    KSM went on (in this process, or in a helper process that holds a share), shows the
    merge; one killed mid-way is dropped without an error."""
    saved = real_ksm.read_knobs()
    pids: dict[str, int] = {}
    probe = VmProbe(HostFS(), lambda: dict(pids), helpers=helpers)
    try:
        real_ksm.write("run", 2)  # whatever the host had: nothing merged, ksmd stopped
        pids.update({f"p{i}": start_filler(fillers, 4 << 20, i) for i in range(3)})
        for p in fillers:
            fill(p, 0x5A)
        first = {r["domain"]: r for r in as_dicts(probe.rows(0.0))}
        assert all(r["ksm_merging_pages"] == 0 and r["rss_kb"] >= 4096 for r in first.values())
        real_ksm.set_knobs({"pages_to_scan": 5000, "sleep_millisecs": 10, "max_page_sharing": 256})
        real_ksm.write("run", 1)
        real_ksm.wait_full_scans(3, timeout=60)
        rows = {r["domain"]: r for r in as_dicts(probe.rows(1.0))}
        for r in rows.values():
            # 1024 identical pages each; the filler's own heap may add a few.
            assert r["ksm_merging_pages"] >= 1000, r
            assert r["ksm_rmap_items"] >= r["ksm_merging_pages"]
        fillers[1].kill()
        fillers[1].wait()
        rows2 = as_dicts(probe.rows(2.0))
        assert [r["domain"] for r in rows2] == ["p0", "p2"]
        assert probe.gone == 1
        assert len(probe.helper_pids) == helpers and probe.problems == []
    finally:
        real_ksm.write("run", 2)  # unmerge before the knobs go back
        assert not real_ksm.restore(saved)
        probe.close()

"""Faults during a run, fast: libvirt's test driver for guests that stop and connections that
die, a fake /sys for KSM, and small tmpfs mounts for results folders that fill up (root).
The same faults on real guests and real KSM: tests/test_faults_real.py."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pandas as pd
import pytest

from kvmksm.commands.bench import bench
from kvmksm.commands.clean import clean
from kvmksm.errors import UserError
from kvmksm.host.fs import HostFS
from kvmksm.host.ksm import Ksm
from kvmksm.host.state import ActiveRun
from kvmksm.results.events import Kind
from kvmksm.results.files import CsvAppender, OutputError
from kvmksm.results.record import RESERVE, RunRecord, load_record
from kvmksm.results.space import check_room, record_need
from kvmksm.scenario import load as scenario
from kvmksm.scenario.model import VmsWorkload
from kvmksm.virt import clones as clones_mod
from kvmksm.virt.cleanup import remove_clone
from kvmksm.virt.clones import Clones
from kvmksm.virt.conn import open_connection
from kvmksm.virt.lifecycle import LifecycleEvents, ensure_event_loop, stop_reason
from kvmksm.workloads import guest_watch
from kvmksm.workloads.base import RunContext, Workload
from kvmksm.workloads.guest_watch import GuestLost, GuestWatch, LibvirtGone

from .fakehost import knob_values
from .test_runner import SCENARIO
from .tmpfs import tmpfs

NODE = Path(__file__).parent / "fixtures" / "testnode.xml"


# -- what libvirt says ------------------------------------------------------------------------
def test_stop_reasons_in_words() -> None:
    failed = stop_reason(libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_STOPPED_FAILED)
    assert failed == "crashed (its QEMU process ended unexpectedly); libvirt: stopped, failed"
    inside = stop_reason(
        libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN
    )
    assert inside is not None and inside.startswith("shut down from inside")
    panic = stop_reason(libvirt.VIR_DOMAIN_EVENT_CRASHED, libvirt.VIR_DOMAIN_EVENT_CRASHED_PANICKED)
    assert panic is not None and "kernel panic" in panic
    assert stop_reason(libvirt.VIR_DOMAIN_EVENT_STARTED, 0) is None
    assert stop_reason(libvirt.VIR_DOMAIN_EVENT_SUSPENDED, 0) is None


def _until(cond: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "not within the time"
        time.sleep(0.01)


def test_lifecycle_events_of_the_named_guests_only(test_conn: libvirt.virConnect) -> None:
    conn = test_conn  # (the event loop registered before it opened, as the vms workload does)
    stops: list[tuple[str, str]] = []
    events = LifecycleEvents(conn, lambda: {"test"}, lambda n, r: stops.append((n, r)), print)
    try:
        conn.lookupByName("test").destroy()
        _until(lambda: stops)
        assert stops == [("test", "destroyed (virsh destroy or another libvirt client); "
                                  "libvirt: stopped, destroyed")]  # fmt: skip
        events.stop()
        conn.lookupByName("test").create()
        conn.lookupByName("test").destroy()  # after stop(): not told
        time.sleep(0.2)
        assert len(stops) == 1
    finally:
        events.stop()


# -- GuestWatch: a guest lost, libvirtd gone --------------------------------------------------
@pytest.fixture
def ctx(fake_fs: HostFS, tmp_path: Path) -> RunContext:
    sc = scenario.loads(SCENARIO, "fake.yaml")
    record = RunRecord.create(tmp_path / "out", sc.model_dump(mode="json"), None)
    return RunContext(fs=fake_fs, ksm=Ksm(fake_fs), record=record, active=ActiveRun(), scenario=sc)


@pytest.fixture
def test_conn() -> Iterator[libvirt.virConnect]:
    """test:///default, whose state is shared by the whole process: its domain 'test'
    running at the start of each test."""
    ensure_event_loop()
    conn = libvirt.open("test:///default")
    dom = conn.lookupByName("test")
    if not dom.isActive():
        dom.create()
    yield conn
    with contextlib.suppress(libvirt.libvirtError):
        conn.close()


def _events(ctx: RunContext, kind: str) -> list[dict[str, Any]]:
    return [e for e in ctx.record.data["events"] if e["kind"] == kind]


def test_a_guest_destroyed_halts_the_run_with_its_reason(
    ctx: RunContext, test_conn: libvirt.virConnect
) -> None:
    watch = GuestWatch(ctx, "test:///default", test_conn, lambda c: None)
    watch.follow(["test"])
    watch.attend()  # nothing yet
    test_conn.lookupByName("test").destroy()
    _until(lambda: ctx.halted is not None)
    with pytest.raises(GuestLost) as info:
        guest_watch.wait(ctx, watch, 30)  # a long wait ends at once
    assert str(info.value).startswith("guest test was lost at t=")
    assert str(info.value).endswith(
        "s: destroyed (virsh destroy or another libvirt client); libvirt: stopped, destroyed"
    )
    (lost,) = _events(ctx, "guest_lost")
    assert lost["domain"] == "test" and lost["by"] == "libvirt event"
    watch.close()


def test_a_guest_process_gone_is_dated_when_found(
    ctx: RunContext, test_conn: libvirt.virConnect, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(guest_watch, "CONFIRM", 0.3)
    watch = GuestWatch(ctx, "test:///default", test_conn, lambda c: None)
    watch.follow(["test"])  # running, as far as libvirt can tell
    watch.process_gone("someone-else", 1)  # not a guest of this run
    found = ctx.record.now()
    watch.process_gone("test", 4242)
    t0 = time.monotonic()
    with pytest.raises(GuestLost, match=r"its QEMU process \(pid 4242\) exited"):
        watch.attend()  # waits for libvirt's word (CONFIRM), then stops the run
    assert time.monotonic() - t0 < 2
    (lost,) = _events(ctx, "guest_lost")
    assert lost["by"] == "sampler" and found <= lost["t"] < found + 0.1
    watch.close()


def test_found_by_the_sampler_dated_then_even_when_libvirt_tells_first(
    ctx: RunContext, test_conn: libvirt.virConnect, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(guest_watch, "_why_not_running", lambda conn, name: None)  # slow libvirt
    watch = GuestWatch(ctx, "test:///default", test_conn, lambda c: None)
    watch.follow(["test"])
    found = ctx.record.now()
    watch.process_gone("test", 4242)
    time.sleep(0.3)
    test_conn.lookupByName("test").destroy()  # libvirt's event comes later
    with pytest.raises(GuestLost, match="destroyed") as info:
        watch.attend()
    (lost,) = _events(ctx, "guest_lost")
    assert lost["by"] == "sampler, reason from libvirt event"
    assert found <= lost["t"] < found + 0.1 and info.value.t == lost["t"]
    watch.close()


def test_a_guest_process_gone_takes_libvirts_reason(
    ctx: RunContext, test_conn: libvirt.virConnect
) -> None:
    watch = GuestWatch(ctx, "test:///default", test_conn, lambda c: None)
    watch.follow(["test"])
    watch._events.stop()  # libvirt's event unheard: the state is asked instead
    test_conn.lookupByName("test").destroy()
    watch.process_gone("test", 4242)
    with pytest.raises(GuestLost, match="destroyed.*libvirt: shut off"):
        watch.attend()
    watch.close()


def test_destroying_our_own_guests_after_close_is_no_loss(
    ctx: RunContext, test_conn: libvirt.virConnect
) -> None:
    watch = GuestWatch(ctx, "test:///default", test_conn, lambda c: None)
    watch.follow(["test"])
    watch.close()
    test_conn.lookupByName("test").destroy()
    watch.process_gone("test", 1)
    time.sleep(0.2)
    assert ctx.halted is None and not _events(ctx, "guest_lost")


def test_libvirt_lost_then_back_goes_on(
    ctx: RunContext, test_conn: libvirt.virConnect, monkeypatch: pytest.MonkeyPatch
) -> None:
    used: list[libvirt.virConnect] = []
    watch = GuestWatch(ctx, "test:///default", test_conn, used.append, poll=0.01)
    watch.follow(["test"])
    test_conn.close()  # as if libvirtd went away (its events would say so)
    watch._conn_closed("libvirtd closed the connection")
    assert watch.connection_lost()
    watch.attend()  # reconnects (a fresh test driver: 'test' is running there)
    assert len(used) == 1 and used[0] is watch.conn and watch.disconnected is None
    assert _events(ctx, "libvirt_lost")[0]["reason"] == "libvirtd closed the connection"
    assert _events(ctx, "libvirt_reconnected")
    assert ctx.halted is None
    watch.close()


def test_libvirt_that_does_not_come_back_fails_the_run(
    ctx: RunContext, test_conn: libvirt.virConnect, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(guest_watch, "reconnect", lambda *a, **k: None)
    watch = GuestWatch(ctx, "qemu:///nowhere", test_conn, lambda c: None, timeout=60)
    watch._conn_closed("libvirtd closed the connection")
    with pytest.raises(LibvirtGone, match=r"went away at t=.*did not come back within 60s"):
        watch.attend()
    watch.close()


def test_teardown_reconnects_and_says_what_it_could_not_remove(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("KVMKSM_DATA_DIR", str(tmp_path / "data"))
    conn = open_connection(f"test://{NODE}")
    spec = VmsWorkload.model_validate({"type": "vms", "base": {"domain": "fedora01"}, "clones": 2})
    cl = Clones(conn, spec, reconnect_timeout=0)
    cl.create()
    names = [g.name for g in cl.guests]
    conn.close()  # libvirtd gone
    # A dead connection is no proof that a clone is gone: removing one says so.
    assert remove_clone(conn, names[0])[0].startswith(f"cannot look up {names[0]}")
    monkeypatch.setattr(clones_mod, "reconnect", lambda *a, **k: None)
    (problem,) = cl.teardown()
    assert problem.startswith(f"libvirtd at test://{NODE} did not answer within 0s")
    assert all(n in problem for n in names) and "kvmksm clean" in problem
    back = open_connection(f"test://{NODE}")
    monkeypatch.setattr(clones_mod, "reconnect", lambda *a, **k: back)
    assert cl.teardown() == [] and cl.conn is back  # the new connection is used from now on
    back.close()


# -- a results folder that fills up -----------------------------------------------------------
def fill(path: Path) -> None:
    """Zeros until the file system is full (a page at a time at the end)."""
    with open(path, "ab", buffering=0) as f:
        for size in (1 << 16, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * size)


def test_csv_rows_stay_whole_when_the_disk_fills(tmp_path: Path) -> None:
    told: list[str] = []
    with tmpfs(tmp_path / "fs", "64k") as fs:
        out = CsvAppender(fs / "samples.csv", ["t", "name", "value"], on_error=told.append)
        with pytest.raises(OutputError) as info:
            for i in range(100_000):
                out.write({"t": i, "name": "x" * (i % 37), "value": i * 7})
        assert str(info.value) == f"{fs / 'samples.csv'}: cannot write: No space left on device"
        assert told == [str(info.value)]
        out.write({"t": -1, "name": "dropped", "value": 0})  # no second error
        assert out.dropped == 1
        out.close()
        frame = pd.read_csv(fs / "samples.csv")
        assert len(frame) == out.rows > 100
        assert list(frame["t"]) == list(range(out.rows))  # every row whole, none half
        assert frame["value"].iloc[-1] == 7 * (out.rows - 1)


def test_record_keeps_room_to_say_how_it_ended(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "fs", "2m") as fs:
        told: list[str] = []
        rec = RunRecord.create(fs / "out", {"name": "full"}, None)
        rec.on_write_error = told.append
        assert (rec.dir / RESERVE).stat().st_size == 1 << 20
        samples = rec.csv("samples.csv", ["t", "pages_sharing"])
        fill(fs / "filler")
        with contextlib.suppress(OutputError):
            for i in range(10_000):
                samples.write({"t": i, "pages_sharing": 12345})
        assert rec.write_error and "No space left on device" in rec.write_error
        assert told == [rec.write_error]
        assert not (rec.dir / RESERVE).exists()
        rec.event(Kind.TEARDOWN, "the reserve holds the rest")
        rec.finish("error", f"the record could not be written: {rec.write_error}")
        meta = json.loads((rec.dir / "run.json").read_text())
        assert meta["status"] == "error" and "No space left" in meta["error"]
        assert [e["kind"] for e in meta["events"]] == ["record_unwritable", "teardown"]
        assert load_record(rec.dir).samples["t"].is_monotonic_increasing


class FillsTheDisk(Workload):
    """KSM on, then someone fills the results folder: the run stops at its next wait."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.torn_down = False

    def run(self, ctx: RunContext) -> None:
        ctx.ksm.write("run", 1)
        ctx.sleep(0.3)
        fill(self.folder / "filler")
        for _ in range(100):  # waits of a run: the first after the failure raises
            ctx.sleep(0.1)
        raise AssertionError("the run was not stopped")

    def teardown(self, ctx: RunContext) -> list[str]:
        self.torn_down = True
        return []


def test_bench_stops_when_the_results_folder_fills_up(
    fake_root: Path, fake_fs: HostFS, tmp_path: Path
) -> None:
    before = knob_values(fake_root)
    sc = scenario.loads(SCENARIO, "fake.yaml")
    with tmpfs(tmp_path / "fs", "4m") as fs:
        wl = FillsTheDisk(fs)
        t0 = time.monotonic()
        result = bench(sc, fs / "out", fs=fake_fs, workload=wl)
        assert time.monotonic() - t0 < 5
        assert result.status == "error" and result.exit_code == 1
        assert result.error == (
            f"the record could not be written: {result.record_dir}/samples.csv: cannot write: "
            "No space left on device"
        ) or "run.json: cannot write: No space left on device" in (result.error or "")
        assert wl.torn_down and knob_values(fake_root) == before
        meta = json.loads((result.record_dir / "run.json").read_text())
        assert meta["status"] == "error" and meta["error"] == result.error
        kinds = [e["kind"] for e in meta["events"]]
        assert "record_unwritable" in kinds and kinds[-1] == "run_end"
        assert "knobs_restored" in kinds
        assert ActiveRun.load() is None
        # `kvmksm report` on the full disk: one line, exit 1, naming the file.
        fill(fs / "filler2")  # (the reserve the record freed would hold a small report)
        r = subprocess.run(
            [sys.executable, "-m", "kvmksm", "report", str(result.record_dir)],
            capture_output=True,
            text=True,
        )
        assert r.returncode == 1
        assert r.stderr.strip() == (
            f"kvmksm: {result.record_dir}/report.html: cannot write: No space left on device"
        )
        (fs / "filler").unlink()
        (fs / "filler2").unlink()
        assert load_record(result.record_dir).samples["t"].is_monotonic_increasing


def test_room_is_checked_before_the_run(tmp_path: Path, fake_root: Path) -> None:
    sc = scenario.loads(SCENARIO, "fake.yaml")
    need = record_need(sc, 20)
    assert need.bytes > (1 << 20) and need.guests == 0
    tiny3, _ = scenario.load_arg("tiny3")
    three = record_need(tiny3, 20)
    # 3 guests x a row each tick, for boot + settle + steady timeouts: megabytes, not less
    assert three.guests == 3 and 1 << 20 < three.bytes < 64 << 20
    with tmpfs(tmp_path / "fs", "512k") as fs:
        with pytest.raises(UserError) as info:
            check_room(sc, fs / "out" / "deeper", HostFS(fake_root))
        text = str(info.value)
        assert text.startswith(f"{fs / 'out' / 'deeper'}: ") and "free on" in text
        assert "\n" not in text and info.value.exit_code == 2
        assert list(fs.iterdir()) == []  # nothing made
        cli = subprocess.run(
            [sys.executable, "-m", "kvmksm", "bench", "ltp-ksm03", "-o", str(fs / "out")],
            capture_output=True,
            text=True,
            env={"KVMKSM_ROOT": str(fake_root), "PATH": "/usr/bin:/bin", **_py_env()},
        )
        assert cli.returncode == 2 and cli.stderr.count("\n") == 1, cli.stderr
        assert "the record may need up to" in cli.stderr
        assert list(fs.iterdir()) == []
    check_room(sc, tmp_path, HostFS(fake_root))  # plenty of room: no error


def _py_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(("PYTHON", "KVMKSM_STATE"))}


# -- killed runs ------------------------------------------------------------------------------
def test_clean_closes_the_record_of_a_killed_run(fake_root: Path, tmp_path: Path) -> None:
    fs = HostFS(fake_root)
    rec = RunRecord.create(tmp_path / "out", {"name": "killed"}, None)
    state = ActiveRun()
    state.start(rec.dir, Ksm(fs).read_knobs())
    done, problems = clean(fs, "test:///default")
    assert problems == []
    assert f"mark the record {rec.dir} as killed" in done
    meta = json.loads((rec.dir / "run.json").read_text())
    assert meta["status"] == "error" and "was killed" in meta["error"]
    assert meta["events"][-1]["kind"] == "cleaned"
    assert not (rec.dir / RESERVE).exists()
    assert ActiveRun.load() is None


def test_bench_refuses_while_a_killed_run_is_not_cleaned(
    fake_root: Path, fake_fs: HostFS, tmp_path: Path
) -> None:
    before = knob_values(fake_root)
    ActiveRun().start(tmp_path / "old-run", {"pages_to_scan": 100})
    sc = scenario.loads(SCENARIO, "fake.yaml")
    with pytest.raises(UserError, match="run `kvmksm clean` first"):
        bench(sc, tmp_path / "out", fs=fake_fs, workload=FillsTheDisk(tmp_path))
    assert not (tmp_path / "out").exists() and knob_values(fake_root) == before


def test_halt_from_another_thread_wakes_a_wait(ctx: RunContext) -> None:
    threading.Timer(0.1, ctx.halt, args=(RuntimeError("stop"),)).start()
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="stop"):
        ctx.sleep(30)
    assert time.monotonic() - t0 < 2


class FillsOnRun(Workload):
    """KSM on for a moment; on run ``at`` of an experiment, the results folder fills up."""

    def __init__(self, folder: Path, runs: list[int], at: int) -> None:
        self.folder, self.runs, self.at = folder, runs, at

    def run(self, ctx: RunContext) -> None:
        self.runs.append(len(self.runs) + 1)
        ctx.ksm.write("run", 1)
        ctx.sleep(0.3)
        if len(self.runs) == self.at:
            fill(self.folder / "filler")
        ctx.sleep(0.5)


def test_experiment_ends_in_one_line_when_the_folder_fills_up(
    fake_root: Path, tmp_path: Path
) -> None:
    from kvmksm.commands.experiment import run_experiment
    from kvmksm.results.experiment import load_index

    from .test_experiment import _sweep

    before = knob_values(fake_root)
    sc = scenario.loads(_sweep(), "s.yaml")
    runs: list[int] = []
    with tmpfs(tmp_path / "fs", "4m") as fs:
        result = run_experiment(
            sc,
            fs / "out",
            "s.yaml",
            fs=HostFS(fake_root),
            workload_factory=lambda s: FillsOnRun(fs, runs, at=2),
        )
        # The host put back after every run; the run that hit the full disk stopped there.
        assert knob_values(fake_root) == before and ActiveRun.load() is None
        assert result.status == "error" and result.exit_code == 1
        index = load_index(result.dir)
        # Run 2 ended with the reason; run 3 could not even start its record; 4 was not run.
        assert [r.status for r in index.runs] == ["passed", "error", "error", "not run"]
        assert index.runs[1].error.startswith("the record could not be written: ")  # type: ignore[union-attr]
        assert index.runs[1].error.endswith("run.json: cannot write: No space left on device")  # type: ignore[union-attr]
        assert index.runs[2].error.endswith(": cannot write: No space left on device")  # type: ignore[union-attr]
        assert runs == [1, 2]
        leftover = list((result.dir / ".running").rglob("run.json"))
        assert leftover == []  # no record of a run that never started
        (fs / "filler").unlink()
        assert load_record(result.dir / index.runs[0].dir).samples["t"].size >= 2

"""`kvmksm watch` on a fake /sys + /proc tree: read-only, guests coming and going, hosts
without libvirt or KSM, a bench running meanwhile, and the ways a watch ends."""

from __future__ import annotations

import builtins
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from rich.console import Console

from kvmksm.commands.watch import session
from kvmksm.commands.watch.guests import GuestInfo, LibvirtGuests
from kvmksm.commands.watch.session import WatchResult
from kvmksm.host.fs import KSM_DIR, HostFS
from kvmksm.host.ksm import parse_value
from kvmksm.host.qemu import guest_name as qemu_guest_name
from kvmksm.host.state import HostLock, bench_holder
from kvmksm.sampling.guest_rows import VM_COLUMNS
from kvmksm.views.live import PlainView, plain_line, render
from kvmksm.views.report import write_report
from kvmksm.virt import conn as libvirt_conn

from .fakehost import KNOBS, knob_values, set_counter
from .fakeqemu import add_qemu, exit_qemu, pidfile, qemu_argv, set_merging

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


class WriteGuard:
    """Records (and refuses) every attempt to write under a directory, by any route kvmksm
    could take: HostFS.write, os.open with write flags, open() in a write mode, replacing,
    removing or truncating. Being root, chmod alone would not stop a write, so this does."""

    def __init__(
        self, directory: Path, monkeypatch: pytest.MonkeyPatch, compare_files: bool = True
    ) -> None:
        self.dir = directory.resolve()
        self.violations: list[str] = []
        # Live sysfs counters change by themselves: there only the write routes are checked.
        self.before = self.snapshot() if compare_files else None
        real_os_open, real_open = os.open, builtins.open

        def refuse(what: str, path: object) -> None:
            self.violations.append(f"{what} {path}")
            raise PermissionError(f"test: {what} {path} under the KSM directory")

        def guarded_os_open(path: Any, flags: int, *a: Any, **k: Any) -> int:
            if flags & _WRITE_FLAGS and self.under(path):
                refuse("os.open for writing", path)
            return real_os_open(path, flags, *a, **k)

        def guarded_open(file: Any, mode: str = "r", *a: Any, **k: Any) -> Any:
            if not isinstance(file, int) and set(mode) & set("wax+") and self.under(file):
                refuse(f"open({mode!r})", file)
            return real_open(file, mode, *a, **k)

        def hostfs_write(fs: HostFS, rel: str, value: str) -> None:
            refuse("HostFS.write", fs.path(rel))

        monkeypatch.setattr(os, "open", guarded_os_open)
        monkeypatch.setattr(builtins, "open", guarded_open)
        monkeypatch.setattr(io, "open", guarded_open)
        monkeypatch.setattr(HostFS, "write", hostfs_write)
        for name in ("replace", "rename", "remove", "unlink", "truncate"):
            real = getattr(os, name)

            def guarded(*args: Any, _real: Any = real, _name: str = name, **k: Any) -> Any:
                if any(self.under(a) for a in args[:2] if not isinstance(a, int)):
                    refuse(f"os.{_name}", args[0])
                return _real(*args, **k)

            monkeypatch.setattr(os, name, guarded)

    def under(self, path: Any) -> bool:
        try:
            p = Path(os.fsdecode(path))
        except TypeError:
            return False
        if not p.is_absolute():
            p = Path.cwd() / p
        return p.resolve().is_relative_to(self.dir)

    def snapshot(self) -> dict[str, tuple[str, int, int]]:
        out = {}
        for p in sorted(self.dir.iterdir()):
            st = p.stat()
            out[p.name] = (p.read_text(), st.st_mode, st.st_mtime_ns)
        return out

    def check(self) -> None:
        assert self.violations == []
        if self.before is not None:
            assert self.snapshot() == self.before, "a file under the KSM directory changed"


@pytest.fixture
def make_ksm_read_only(fake_root: Path) -> Iterator[Callable[[], WriteGuard]]:
    """Arms (once the test has set its counters) a read-only fake KSM directory: the
    directory 0555 and every write route refused and recorded; the test fails if anything
    tried one or any file changed. Knob files keep their 0644: kvmksm tells knobs from
    counters by that bit, as sysfs sets it, and root ignores it anyway (hence the guard)."""
    ksm = fake_root / KSM_DIR
    mp = pytest.MonkeyPatch()
    guards: list[WriteGuard] = []

    def arm() -> WriteGuard:
        ksm.chmod(0o555)
        guards.append(WriteGuard(ksm, mp))
        return guards[-1]

    try:
        yield arm
    finally:
        mp.undo()
        ksm.chmod(0o755)
    for g in guards:
        g.check()


# -- fake guests ---------------------------------------------------------------------------------
class FakeLister:
    """What libvirt would say: the test changes ``guests`` while watch runs."""

    source = "fake libvirt"

    def __init__(self, guests: dict[str, GuestInfo]) -> None:
        self.guests = guests
        self.closed = False

    def list(self) -> dict[str, GuestInfo]:
        return {n: GuestInfo(g.name, g.pid, g.uuid, g.memory_kb) for n, g in self.guests.items()}

    def facts(self) -> dict[str, Any]:
        return {"libvirt": "fake"}

    def close(self) -> None:
        self.closed = True


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200, force_terminal=False)


def watch(output: Path, console: Console | None = None, **kw: Any) -> WatchResult:
    """The watch session with the view the CLI gives it in a pipe, then its report."""
    res = session.watch(output, view=PlainView(console or quiet(), 4096), **kw)
    write_report(res.record_dir)
    return res


def meta_of(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "run.json").read_text())


def kinds(meta: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [e for e in meta["events"] if e["kind"] == kind]


def assert_no_gaps(samples: pd.DataFrame, vm: pd.DataFrame, domain: str) -> None:
    """A guest has a row at every host tick from its first row to its last."""
    ts = vm.loc[vm["domain"] == domain, "t"].tolist()
    host_ts = samples["t"][(samples["t"] >= min(ts)) & (samples["t"] <= max(ts))].tolist()
    assert ts == host_ts, f"{domain}: rows at {ts}, host ticks at {host_ts}"


# -- the tests -------------------------------------------------------------------------------------
def test_guests_come_and_go_and_nothing_is_written(
    fake_root: Path, make_ksm_read_only: Callable[[], WriteGuard], tmp_path: Path
) -> None:
    set_counter(fake_root, "pages_shared", 100)
    set_counter(fake_root, "pages_sharing", 5000)
    guard = make_ksm_read_only()
    add_qemu(fake_root, 5001, "vm-a", merging=3000)
    lister = FakeLister({"vm-a": GuestInfo("vm-a", 5001, "uuid-a", 262144)})
    timeline: dict[str, float] = {}

    def host_changes() -> None:
        start = time.monotonic()
        time.sleep(0.6)
        add_qemu(fake_root, 5002, "vm-b", merging=1000)
        lister.guests["vm-b"] = GuestInfo("vm-b", 5002, "uuid-b", 524288)
        timeline["b_started"] = time.monotonic() - start
        time.sleep(0.6)
        set_merging(fake_root, 5002, 8000)  # vm-b now saves more than vm-a
        time.sleep(0.3)
        # vm-a's QEMU exits before the next listing: the probe must skip it quietly.
        exit_qemu(fake_root, 5001)
        timeline["a_exited"] = time.monotonic() - start
        time.sleep(0.5)
        del lister.guests["vm-a"]

    fs = HostFS(fake_root)
    changer = threading.Thread(target=host_changes)
    changer.start()
    try:
        res = watch(
            tmp_path / "out",
            duration=3.0,
            interval=0.1,
            relist=0.2,
            fs=fs,
            console=quiet(),
            lister=lister,
        )
    finally:
        changer.join()

    assert res.status == "passed" and res.exit_code == 0, res.error
    assert res.ended_by == "--duration 3s reached"
    assert lister.closed
    meta = meta_of(res.record_dir)
    assert meta["kind"] == "watch" and meta["status"] == "passed"
    assert meta["scenario"]["name"] == "watch"
    assert meta["scenario"]["workload"] == {
        "type": "watch",
        "connect": None,
        "guests": "fake libvirt",
        "duration": 3.0,
    }
    # The knobs as they were, only read: before == during == after == the files.
    assert meta["knobs_before"] == {k: parse_value(v) for k, v in KNOBS.items()}
    assert meta["knobs_before"]["advisor_mode"] == "none"
    assert meta["knobs_during"] == meta["knobs_after"] == meta["knobs_before"]
    assert meta["host"]["libvirt"] == "fake"
    assert not kinds(meta, "sampler_errors")

    appeared = kinds(meta, "guest_appeared")
    assert [e["domain"] for e in appeared] == ["vm-a", "vm-b"]
    assert "running when the watch started" in appeared[0]["detail"]
    assert [e["domain"] for e in kinds(meta, "guest_gone")] == ["vm-a"]
    guests = {g["name"]: g for g in meta["guests"]}
    assert guests["vm-a"]["memory_kb"] == 262144 and guests["vm-b"]["memory_kb"] == 524288
    assert guests["vm-a"]["last_seen_t"] < guests["vm-b"]["last_seen_t"]

    samples = pd.read_csv(res.record_dir / "samples.csv")
    vm = pd.read_csv(res.record_dir / "vm_samples.csv")
    assert list(vm.columns) == VM_COLUMNS
    assert len(samples) >= 20
    assert samples["pages_sharing"].eq(5000).all()
    a, b = vm[vm["domain"] == "vm-a"], vm[vm["domain"] == "vm-b"]
    assert a["pid"].eq(5001).all() and b["pid"].eq(5002).all()
    assert a["t"].min() == samples["t"].min()  # there from the first tick
    assert b["t"].min() > a["t"].min() + 0.4  # appeared when it started...
    assert b["t"].min() <= timeline["b_started"] + 0.6  # ...within a listing or two
    assert a["t"].max() <= timeline["a_exited"] + 0.2  # no rows once its process was gone
    assert b["t"].max() == samples["t"].max()  # and vm-b to the last tick
    for d in ("vm-a", "vm-b"):
        assert_no_gaps(samples, vm, d)
    assert a["ksm_merging_pages"].eq(3000).all() and a["rss_kb"].eq(100_000).all()
    assert set(b["ksm_merging_pages"]) == {1000, 8000}
    assert (res.record_dir / "report.html").exists()
    guard.check()  # and again at teardown


def test_knob_changes_made_by_others_become_events(fake_root: Path, tmp_path: Path) -> None:
    def operator() -> None:
        time.sleep(0.5)
        (fake_root / KSM_DIR / "pages_to_scan").write_text("1000\n")
        (fake_root / KSM_DIR / "run").write_text("1\n")

    t = threading.Thread(target=operator)
    t.start()
    try:
        res = watch(
            tmp_path,
            duration=1.5,
            interval=0.1,
            fs=HostFS(fake_root),
            console=quiet(),
            lister=FakeLister({}),
        )
    finally:
        t.join()
    meta = meta_of(res.record_dir)
    assert meta["knobs_before"]["run"] == 0 and meta["knobs_after"]["run"] == 1
    assert meta["knobs_before"]["pages_to_scan"] == 100
    on = kinds(meta, "ksm_on")
    assert len(on) == 1 and on[0]["before"] == 0 and on[0]["after"] == 1
    assert "kvmksm watch only reads" in on[0]["detail"]
    changed = kinds(meta, "knob_changed")
    assert [(e["knob"], e["before"], e["after"]) for e in changed] == [("pages_to_scan", 100, 1000)]
    assert "not by kvmksm" in kinds(meta, "knobs_changed")[0]["detail"]
    # The report's merge window starts when KSM was seen going on.
    from kvmksm.analysis.metrics import windows
    from kvmksm.results.record import load_record

    assert windows(load_record(res.record_dir)).t_on == on[0]["t"]


def test_host_without_libvirt_or_ksm_says_so_and_records_what_it_can(
    fake_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.rmtree(fake_root / KSM_DIR)
    add_qemu(fake_root, 7001, "plain-qemu", rss_kb=300_000, ksm_stat=False)
    kvm = fake_root / "proc/7002"
    kvm.mkdir()
    (kvm / "cmdline").write_bytes(qemu_argv("100", exe="/usr/bin/kvm"))  # Proxmox's QEMU
    (kvm / "statm").write_text("1000 512 10 1 0 100 0\n")  # 2048 kB resident
    (fake_root / "proc/7003").mkdir()
    (fake_root / "proc/7003/cmdline").write_bytes(b"/bin/sh\0-c\0sleep 100\0")
    monkeypatch.setitem(sys.modules, "libvirt", None)  # `import libvirt` fails
    out = io.StringIO()
    res = watch(
        tmp_path,
        duration=0.6,
        interval=0.1,
        fs=HostFS(fake_root),
        console=Console(file=out, width=300),
    )
    text = out.getvalue()
    assert "KSM is not available" in text and "recording host memory" in text
    assert "libvirt-python is not installed" in text and "QEMU processes in /proc" in text
    assert res.status == "passed"
    meta = meta_of(res.record_dir)
    assert meta["knobs_before"] == {} and meta["counters_before"] == {}
    assert len(kinds(meta, "watch_note")) == 2
    samples = pd.read_csv(res.record_dir / "samples.csv")
    assert "pages_sharing" not in samples.columns
    assert samples["MemTotal"].eq(24684084).all()
    vm = pd.read_csv(res.record_dir / "vm_samples.csv")
    assert set(vm["domain"]) == {"plain-qemu", "100"}
    assert vm.loc[vm["domain"] == "plain-qemu", "rss_kb"].eq(300_000).all()
    assert vm["ksm_merging_pages"].isna().all()


def test_libvirt_unreachable(
    fake_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kvmksm.errors import UserError

    bad = "qemu:///system?socket=/nonexistent/libvirt-sock"
    monkeypatch.delenv("LIBVIRT_DEFAULT_URI", raising=False)
    fs = HostFS(fake_root)
    # A URI the user named must work: refused before a record is made.
    with pytest.raises(UserError, match="cannot connect to libvirt at qemu:///system"):
        watch(tmp_path / "a", duration=0.2, connect=bad, fs=fs, console=quiet())
    assert not (tmp_path / "a").exists()
    # The default one may be missing: a note, then host-wide data and QEMU found in /proc.
    monkeypatch.setattr(libvirt_conn, "DEFAULT_URI", bad)
    add_qemu(fake_root, 7001, "g1", merging=5)
    out = io.StringIO()
    res = watch(
        tmp_path / "b", duration=0.4, interval=0.1, fs=fs, console=Console(file=out, width=300)
    )
    assert "cannot connect to libvirt at qemu:///system" in out.getvalue()
    assert "QEMU processes in /proc instead" in out.getvalue()
    vm = pd.read_csv(res.record_dir / "vm_samples.csv")
    assert set(vm["domain"]) == {"g1"} and vm["ksm_merging_pages"].eq(5).all()


def test_libvirt_domains_read_only(fake_root: Path, tmp_path: Path) -> None:
    """libvirt's test driver (the in-process test:///default) as the guest source; the pids
    come from fake libvirt pid files checked against fake QEMU command lines."""
    import libvirt

    rw = libvirt.open("test:///default")  # the test's own connection, to start guests
    names = ["kvmksm-watch-t1", "kvmksm-watch-t2"]
    for i, name in enumerate(names):
        pid = 8001 + i
        add_qemu(fake_root, pid, name, merging=100 * (i + 1))
        pidfile(fake_root, name, pid)
    doms = [
        rw.defineXML(
            f"<domain type='test'><name>{n}</name><memory unit='KiB'>131072</memory>"
            "<os><type>hvm</type></os></domain>"
        )
        for n in names
    ]
    fs = HostFS(fake_root)
    try:
        # The connection watch uses cannot change anything.
        lister = LibvirtGuests("test:///default", fs)
        with pytest.raises(libvirt.libvirtError, match="read only"):
            lister.conn.lookupByName("test").destroy()
        lister.close()

        doms[0].create()

        def start_second() -> None:
            time.sleep(0.5)
            doms[1].create()

        t = threading.Thread(target=start_second)
        t.start()
        out = io.StringIO()
        try:
            res = watch(
                tmp_path,
                duration=1.5,
                interval=0.1,
                relist=0.2,
                connect="test:///default",
                fs=fs,
                console=Console(file=out, width=300),
            )
        finally:
            t.join()
    finally:
        for d in doms:
            if d.isActive():
                d.destroy()
            d.undefine()
        rw.close()
    assert "libvirt driver TEST: only QEMU guests have per-VM figures" in out.getvalue()
    meta = meta_of(res.record_dir)
    assert meta["host"]["libvirt_uri"] == "test:///default"
    guests = {g["name"]: g for g in meta["guests"]}
    assert guests["kvmksm-watch-t1"]["memory_kb"] == 131072
    assert guests["test"]["pid"] is None  # the driver's own guest has no QEMU process
    detail = {e["domain"]: e["detail"] for e in kinds(meta, "guest_appeared")}
    assert "no QEMU process found" in detail["test"]
    assert "running when the watch started" not in detail["kvmksm-watch-t2"]
    vm = pd.read_csv(res.record_dir / "vm_samples.csv")
    assert set(vm["domain"]) == set(names)
    first = vm.groupby("domain")["t"].min()
    assert first["kvmksm-watch-t2"] > first["kvmksm-watch-t1"] + 0.3
    assert vm.loc[vm["domain"] == names[1], "ksm_merging_pages"].eq(200).all()


def test_a_running_bench_is_noted_without_taking_its_lock(fake_root: Path, tmp_path: Path) -> None:
    lock = HostLock()
    assert bench_holder() is None  # no lock file yet
    lock.acquire("scenario tiny3")
    try:
        assert "scenario tiny3" in (bench_holder() or "")
        res = watch(
            tmp_path,
            duration=0.3,
            interval=0.1,
            fs=HostFS(fake_root),
            console=quiet(),
            lister=FakeLister({}),
        )
        # The bench still holds its lock: watch never took it.
        with pytest.raises(BlockingIOError):
            import fcntl

            fd = os.open(lock.path, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            finally:
                os.close(fd)
    finally:
        lock.release()
    ev = kinds(meta_of(res.record_dir), "bench_running")
    assert len(ev) == 1 and "scenario tiny3" in ev[0]["holder"]
    assert "figures include its workload" in ev[0]["detail"]
    # Released (or left behind by a killed bench with its text still there): not running.
    assert bench_holder() is None
    lock.path.write_text(f"pid {os.getpid()}, scenario killed\n")
    assert bench_holder() is None


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_ctrl_c_or_sigterm_close_the_record_and_write_the_report(
    fake_root: Path, tmp_path: Path, sig: str
) -> None:
    env = dict(os.environ, KVMKSM_ROOT=str(fake_root))
    cmd = [sys.executable, "-m", "kvmksm", "watch", "-o", str(tmp_path), "--interval", "0.2"]
    proc = subprocess.Popen(
        [*cmd, "-c", "test:///default"], env=env, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    lines = []
    deadline = time.monotonic() + 30
    while sum(ln.startswith("t=") for ln in lines) < 3 and time.monotonic() < deadline:
        lines.append(proc.stdout.readline())  # plain lines, one per sample, as they come
    proc.send_signal(getattr(signal, sig))
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, rest
    (run_dir,) = (tmp_path / "watch").iterdir()
    meta = meta_of(run_dir)
    assert meta["status"] == "passed"
    ended = kinds(meta, "watch_end")[0]["detail"]
    assert ended == ("Ctrl-C" if sig == "SIGINT" else "SIGTERM")
    assert kinds(meta, "run_end")[0]["detail"] == "passed"
    assert (run_dir / "report.html").exists()
    assert f"record: {run_dir}" in rest and f"report: {run_dir}/report.html" in rest
    assert knob_values(fake_root)["run"] == "0"


def test_live_view_sorts_guests_by_what_they_save() -> None:
    row = {
        "t": 12.0,
        "run": 1,
        "pages_shared": 1000,
        "pages_sharing": 50_000,
        "ksm_zero_pages": 1200,
        "general_profit": 200 * 2**20,
        "ksmd_cpu": 7.25,
        "pages_to_scan": 1000,
        "sleep_millisecs": 20,
        "MemAvailable": 20 * 2**20,
        "MemTotal": 24 * 2**20,
    }

    def vm(name: str, pid: int, merging: int, profit: int | None) -> dict[str, Any]:
        return {
            "domain": name,
            "pid": pid,
            "ksm_merging_pages": merging,
            "ksm_zero_pages": 0,
            "ksm_process_profit": profit,
            "rss_kb": 262144,
        }

    vms = {
        "small": vm("small", 11, 100, 100 * 4096),
        "big": vm("big", 12, 40_000, 40_000 * 4096),
        "mid": vm("mid", 13, 9_000, 9_000 * 4096),
    }
    guests = {n: GuestInfo(n, v["pid"]) for n, v in vms.items()}
    guests["booting"] = GuestInfo("booting", None)
    console = Console(record=True, width=160, force_terminal=True)
    console.print(render(row, vms, guests, 4096, footer="t=12s"))
    text = console.export_text()
    order = [text.index(f" {n} ") for n in ("big", "mid", "small", "booting")]
    assert order == sorted(order)
    assert "4 running guest(s)" in text
    assert "200.0 MiB" in text  # memory saved: (50,000 + 1,200) x 4 KiB
    assert "7.2 %" in text or "7.3 %" in text
    assert "156.2 MiB" in text  # big: 40,000 merging pages
    line = plain_line(row, vms, guests, 4096)
    assert line.startswith("t=12.0s run=1 pages_shared=1000 pages_sharing=50000")
    assert "saved=200.0MiB" in line and "guests=4" in line and "top=big:156.2MiB" in line


def test_qemu_guest_name() -> None:
    assert qemu_guest_name(qemu_argv("web,,1")) == "web,1"
    assert qemu_guest_name(b"/usr/bin/kvm\0-id\0100\0-name\0vm100,debug-threads=on\0") == "vm100"
    assert qemu_guest_name(b"/usr/bin/qemu-system-aarch64\0-m\0512\0") == ""
    assert qemu_guest_name(b"/bin/bash\0-name\0x\0") is None
    assert qemu_guest_name(b"") is None

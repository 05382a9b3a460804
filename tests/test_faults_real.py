"""Faults during a real `kvmksm bench` of tiny guests (qemu:///system, TCG, real KSM): each
one ends with the exit status and event it should, a record `kvmksm report` reads, no kvmksm
domain, volume or cgroup left, and every KSM knob as before.

- SIGKILL at each phase (defining, booting, KSM on, plateau, teardown), then `kvmksm clean`;
- SIGTERM (and a second bench meanwhile, refused);
- a guest's QEMU killed (kill -9) after KSM went on: `guest_lost`, exit 1, at once;
- libvirtd killed and started again mid-run: the run reconnects and passes;
- the results folder fills up mid-run (a small tmpfs), and one clearly too small before it.

One guest each, small fills and short waits: a tiny guest boots in ~15-20 s under TCG, so
every case that needs a booted guest pays that once. The real_ksm fixture holds the real-KSM
lock throughout (other VM tests run only under it), so restarting libvirtd here can disturb
no one's guests.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import libvirt
import pandas as pd
import pytest
import yaml

from kvmksm.host.ksm import Ksm
from kvmksm.host.state import ActiveRun
from kvmksm.virt.cleanup import find_leftovers
from kvmksm.virt.tiny_image import TinyImage

from .tmpfs import tmpfs

# The lock for the whole module: its cases run back to back (each still uses real_ksm).
pytestmark = [
    pytest.mark.libvirt,
    pytest.mark.realksm,
    pytest.mark.usefixtures("real_ksm_module"),
]

URI = "qemu:///system"
SCENARIO: dict[str, Any] = {
    "name": "faults",
    "sample_interval": "0.5s",
    "knobs": {"pages_to_scan": 1000, "sleep_millisecs": 20},
    "workload": {
        "type": "vms",
        "connect": URI,
        "domain_type": "qemu",
        "base": {"domain": "kvmksm-tiny"},
        "clones": 1,
        "memory": "256MiB",
        "guest_fill": {"size": "16MiB", "byte": "f"},
        "boot": {"timeout": "3m"},
        "settle": "1s",
        "steady": {"min_full_scans": 2, "timeout": "2m"},
        "plateau": "2s",
        "sharing": False,
        "unmerge": False,
    },
}
# A crawling ksmd: KSM surely stays in its merge phase while the test acts on it.
SLOW = {"pages_to_scan": 10, "sleep_millisecs": 200}


# -- running and watching a bench -------------------------------------------------------------
def scenario(tmp_path: Path, **changes: Any) -> Path:
    data = json.loads(json.dumps(SCENARIO))
    for key, value in changes.items():
        target = data["workload"] if key in data["workload"] else data
        target[key] = value
    path = tmp_path / "faults.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def kvmksm(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvmksm", *args], capture_output=True, text=True, timeout=timeout
    )


class Bench:
    """`kvmksm bench` in a child process, and its record as it is written."""

    def __init__(self, sc: Path, out: Path) -> None:
        self.out = out
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvmksm", "bench", str(sc), "-o", str(out), "--no-report"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.run_json: Path | None = None
        self._run: str | None = None

    def meta(self) -> dict[str, Any]:
        if self.run_json is None:
            found = list(self.out.glob("*/*/run.json"))
            if not found:
                return {}
            self.run_json = found[0]
        try:
            return json.loads(self.run_json.read_text())
        except (OSError, json.JSONDecodeError):  # replaced as we read: read again
            return {}

    def run_id(self) -> str:
        """The run's id (kvmksm-<id>-...), from its record or, before a guest was defined
        in full, from its state file."""
        if self._run is None:
            events = self.meta().get("events", [])
            names = [e["detail"] for e in events if e["kind"] == "guest_defined"]
            state = ActiveRun.load() or {}
            runs = [c["run"] for c in state.get("created", []) if c.get("kind") == "domain"]
            self._run = names[0].split("-")[1] if names else runs[0] if runs else None
        assert self._run is not None, "the run defined no guest"
        return self._run

    def wait_for(self, kind: str, timeout: float = 240) -> dict[str, Any]:
        """The run's record once it has an event of this kind (polled every 10 ms)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            meta = self.meta()
            if any(e["kind"] == kind for e in meta.get("events", [])):
                return meta
            if self.proc.poll() is not None:
                out, err = self.proc.communicate()
                raise AssertionError(f"bench ended before {kind}: {out}{err}")
            time.sleep(0.01)
        raise AssertionError(f"no {kind} event within {timeout}s")

    def finish(self, timeout: float = 300) -> tuple[int, str]:
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out + err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate(timeout=30)


@pytest.fixture
def bench_of(tmp_path: Path) -> Iterator[Any]:
    """Starts benches; any still running when the test ends is killed (and cleaned below)."""
    benches: list[Bench] = []

    def start(sc: Path, out: Path | None = None) -> Bench:
        b = Bench(sc, out or tmp_path / "out")
        benches.append(b)
        return b

    yield start
    for b in benches:
        b.kill()


# -- the host before and after ----------------------------------------------------------------
def cgroups() -> set[str]:
    found: set[str] = set()
    for root in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/memory")):
        if root.is_dir():
            found |= {str(p) for p in root.glob("kvmksm-*")}
    return found


class Host:
    """What the host had before the test: knobs and cgroups. Guests are checked by the run's
    id: on a shared host other runs' clones may come and go (and `kvmksm clean --run` leaves
    them alone)."""

    def __init__(self, ksm: Ksm) -> None:
        self.ksm = ksm
        self.knobs = ksm.read_knobs()
        self.cgroups = cgroups()

    def assert_restored(self, run: str) -> None:
        conn = libvirt.open(URI)  # a new one: libvirtd may have been restarted meanwhile
        try:
            assert find_leftovers(conn, run).describe() == []
        finally:
            conn.close()
        assert cgroups() == self.cgroups
        assert self.ksm.read_knobs() == self.knobs
        assert ActiveRun.load() is None


def kinds(meta: dict[str, Any]) -> list[str]:
    return [e["kind"] for e in meta["events"]]


def assert_report(run_json: Path) -> None:
    """`kvmksm report` reads the record and writes its page."""
    r = kvmksm("report", str(run_json.parent))
    assert r.returncode == 0, r.stdout + r.stderr
    assert (run_json.parent / "report.html").stat().st_size > 0


def note(fault: str, rc: int, meta: dict[str, Any], said: str) -> None:
    """One row of bench/RESULTS.md's fault table (bench/bench_faults.py sets the file): what
    the fault gave, written once the test has checked the host was put back."""
    path = os.environ.get("KVMKSM_FAULT_TABLE")
    if not path:
        return
    events = [k for k in kinds(meta) if k in FAULT_EVENTS]
    row = {"fault": fault, "exit": rc, "status": meta.get("status"), "events": events}
    row["said"] = said.strip().splitlines()[-1] if said.strip() else ""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


# The events that tell a fault's story (the table leaves out the ones every run has).
FAULT_EVENTS = (
    "guest_lost", "libvirt_lost", "libvirt_reconnected", "record_unwritable", "interrupted",
    "cleaned", "steady",
)  # fmt: skip


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# -- SIGKILL at each phase, then kvmksm clean --------------------------------------------------
def _kill_while_defining(b: Bench) -> None:
    """SIGKILL as soon as the run's state lists a domain it defined (before it starts it)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        state = ActiveRun.load() or {}
        if any(c.get("kind") == "domain" for c in state.get("created", [])):
            b.proc.kill()
            return
        if b.proc.poll() is not None:
            raise AssertionError("bench ended before defining a guest: " + str(b.finish()))
        time.sleep(0.002)
    raise AssertionError("no domain defined within 120s")


PHASES = {  # phase: (event to kill at, scenario changes, events that must not be there yet)
    "defining": (None, {}, ["guest_started"]),
    "booting": ("guest_started", {}, ["all_up"]),
    "ksm on": ("ksm_on", {"knobs": SLOW}, ["steady"]),
    "plateau": ("steady", {"plateau": "60s"}, ["plateau_done"]),
    "teardown": ("teardown", {"knobs": SLOW}, ["knobs_restored"]),
}


@pytest.mark.parametrize("phase", list(PHASES))
def test_sigkill_at_each_phase_then_clean(
    phase: str,
    conn: libvirt.virConnect,
    tiny: TinyImage,
    real_ksm: Ksm,
    tmp_path: Path,
    bench_of: Any,
) -> None:
    host = Host(real_ksm)
    event, changes, not_yet = PHASES[phase]
    b = bench_of(scenario(tmp_path, **changes))
    if event is None:
        _kill_while_defining(b)
    else:
        if phase == "teardown":
            b.wait_for("ksm_on")  # then SIGTERM: teardown starts at once (and drains ksmd)
            b.proc.send_signal(signal.SIGTERM)
        b.wait_for(event)
        b.proc.kill()
    rc, _ = b.finish(timeout=60)
    assert rc == -signal.SIGKILL
    meta = b.meta()
    assert meta["status"] == "running"  # nothing could say otherwise
    for kind in not_yet:  # killed in the phase meant
        assert kind not in kinds(meta), (phase, kinds(meta))
    assert ActiveRun.load() is not None  # what clean needs to put the host back
    run = b.run_id()

    clean = kvmksm("clean", "--run", run)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    meta = b.meta()
    assert meta["status"] == "error" and "was killed" in meta["error"]
    assert kinds(meta)[-1] == "cleaned"
    assert_report(b.run_json)  # type: ignore[arg-type]
    host.assert_restored(run)
    note(f"SIGKILL while {phase}, then `kvmksm clean --run ID`", rc, meta, meta["error"])


# -- SIGTERM, and a second bench meanwhile -----------------------------------------------------
def test_sigterm_and_a_second_bench_meanwhile(
    conn: libvirt.virConnect, tiny: TinyImage, real_ksm: Ksm, tmp_path: Path, bench_of: Any
) -> None:
    host = Host(real_ksm)
    sc = scenario(tmp_path, knobs=SLOW)
    first = bench_of(sc)
    first.wait_for("guest_started")
    second = kvmksm("bench", str(sc), "-o", str(tmp_path / "second"))
    assert second.returncode == 2, second.stdout + second.stderr
    assert f"another kvmksm run is using KSM on this host (pid {first.proc.pid}" in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "second").exists()

    first.wait_for("ksm_on")
    first.proc.send_signal(signal.SIGTERM)
    rc, out = first.finish()
    assert rc == 130, out
    meta = first.meta()
    assert meta["status"] == "interrupted" and meta["error"] == "interrupted by SIGTERM"
    for kind in ("interrupted", "guest_removed", "knobs_restored", "run_end"):
        assert kind in kinds(meta), kind
    assert_report(first.run_json)  # type: ignore[arg-type]
    host.assert_restored(first.run_id())
    note("a second bench while one runs", second.returncode, {"events": []}, second.stderr)
    note("SIGTERM while KSM is on", rc, meta, meta["error"])


# -- a guest's QEMU killed after KSM went on ---------------------------------------------------
def test_guest_killed_after_ksm_on_is_lost_at_once(
    conn: libvirt.virConnect, tiny: TinyImage, real_ksm: Ksm, tmp_path: Path, bench_of: Any
) -> None:
    host = Host(real_ksm)
    b = bench_of(scenario(tmp_path, knobs=SLOW))
    meta = b.wait_for("ksm_on")
    (guest,) = meta["guests"]
    killed = datetime.now(UTC)
    os.kill(guest["pid"], signal.SIGKILL)
    rc, out = b.finish(timeout=120)
    assert rc == 1, out
    line = next(ln for ln in out.splitlines() if "was lost" in ln)
    assert f"guest {guest['name']} was lost at t=" in line
    assert "crashed" in line or "exited" in line, line

    meta = b.meta()
    assert meta["status"] == "failed"
    assert meta["error"].startswith(f"guest {guest['name']} was lost")
    (lost,) = [e for e in meta["events"] if e["kind"] == "guest_lost"]
    assert lost["domain"] == guest["name"]
    assert lost["by"] in (
        "libvirt event",  # libvirt told before the sampler's next tick
        "sampler, reason from libvirt event",  # the sampler found it, libvirt said why
        "sampler, reason from libvirt",  # ... and libvirt's state said why
        "sampler",  # libvirt said nothing within 3 s
    ), lost
    # Noticed within one sample (0.5 s) of the kill (dated then, recorded once libvirt said
    # why, at most 3 s later); the run did not wait for steady.
    ksm_on = next(e for e in meta["events"] if e["kind"] == "ksm_on")
    noticed = utc(ksm_on["time"]) + timedelta(seconds=lost["t"] - ksm_on["t"])
    assert (noticed - killed).total_seconds() <= 0.5 + 0.2, (lost, killed)
    assert (utc(lost["time"]) - noticed).total_seconds() <= 3.2, lost
    assert "steady" not in kinds(meta)
    assert kinds(meta).index("guest_lost") < kinds(meta).index("teardown")
    # The samples up to the loss are kept.
    run_dir = b.run_json.parent  # type: ignore[union-attr]
    samples = pd.read_csv(run_dir / "samples.csv")
    assert samples["t"].max() >= lost["t"] > ksm_on["t"]
    vm = pd.read_csv(run_dir / "vm_samples.csv")
    assert (vm["domain"] == guest["name"]).any()
    assert_report(b.run_json)  # type: ignore[arg-type]
    host.assert_restored(b.run_id())
    note("a guest's QEMU killed (kill -9) after KSM went on", rc, meta, line)


# -- libvirtd killed and started again mid-run -------------------------------------------------
def _libvirtd_pid() -> int | None:
    try:
        pid = int(Path("/run/libvirtd.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if Path(f"/proc/{pid}").exists() else None


def _libvirtd_answers() -> bool:
    r = subprocess.run(["virsh", "-c", URI, "version"], capture_output=True, timeout=30)
    return r.returncode == 0


def _start_libvirtd(timeout: float = 60) -> None:
    if not _libvirtd_answers():
        subprocess.run(["libvirtd", "-d"], check=True, timeout=30)
    deadline = time.monotonic() + timeout
    while not _libvirtd_answers():
        assert time.monotonic() < deadline, f"libvirtd does not answer {timeout}s after starting"
        time.sleep(0.2)


@contextlib.contextmanager
def libvirtd_running_afterwards() -> Iterator[None]:
    """However the test ends, libvirtd is running again (others share it)."""
    try:
        yield
    finally:
        _start_libvirtd()


def test_libvirtd_restarted_mid_run_reconnects_and_passes(
    conn: libvirt.virConnect, tiny: TinyImage, real_ksm: Ksm, tmp_path: Path, bench_of: Any
) -> None:
    host = Host(real_ksm)
    b = bench_of(scenario(tmp_path, knobs={"pages_to_scan": 500, "sleep_millisecs": 20}))
    with libvirtd_running_afterwards():
        b.wait_for("ksm_on")
        pid = _libvirtd_pid()
        assert pid is not None, "no libvirtd running (/run/libvirtd.pid)"
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(5)
        _start_libvirtd()
        rc, out = b.finish()
    assert rc == 0, out
    meta = b.meta()
    assert meta["status"] == "passed", meta["error"]
    k = kinds(meta)
    for kind in ("libvirt_lost", "libvirt_reconnected", "steady", "guest_removed"):
        assert kind in k, kind
    assert k.index("ksm_on") < k.index("libvirt_lost") < k.index("libvirt_reconnected")
    assert "guest_lost" not in k
    assert_report(b.run_json)  # type: ignore[arg-type]
    host.assert_restored(b.run_id())
    lost = next(e for e in meta["events"] if e["kind"] == "libvirt_reconnected")
    note("libvirtd killed just after KSM went on, started 5 s later", rc, meta, lost["detail"])


# -- the results folder full -------------------------------------------------------------------
def _fill(path: Path) -> None:
    """Write zeros until the file system is full."""
    chunk = b"\0" * (64 << 10)
    with open(path, "wb", buffering=0) as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(chunk)
    with open(path, "ab", buffering=0) as f, contextlib.suppress(OSError):
        for _ in range(64):  # the last bytes, a page at a time
            f.write(b"\0" * 4096)


def test_results_folder_full_before_and_during_a_run(
    conn: libvirt.virConnect, tiny: TinyImage, real_ksm: Ksm, tmp_path: Path, bench_of: Any
) -> None:
    host = Host(real_ksm)
    sc = scenario(tmp_path, knobs=SLOW)
    # Clearly too small: refused before anything is touched.
    with tmpfs(tmp_path / "tiny_fs", "256k") as small:
        r = kvmksm("bench", str(sc), "-o", str(small / "out"))
        assert r.returncode == 2, r.stdout + r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "free" in r.stderr, r.stderr
        assert str(small / "out") in r.stderr
        assert list(small.iterdir()) == []
        assert real_ksm.read_knobs() == host.knobs and ActiveRun.load() is None
        note("results folder on a 256 KiB tmpfs", r.returncode, {"events": []}, r.stderr)

    # Big enough to start; filled up by someone else once KSM is on.
    with tmpfs(tmp_path / "fs", "8m") as fs:
        b = bench_of(sc, fs / "out")
        b.wait_for("ksm_on")
        _fill(fs / "filler")
        rc, out = b.finish(timeout=120)
        assert rc == 1, out
        assert "No space left on device" in out and str(fs) in out, out
        meta = b.meta()
        assert meta["status"] == "error"
        assert meta["error"].startswith("the record could not be written: " + str(fs))
        k = kinds(meta)
        for kind in ("record_unwritable", "teardown", "guest_removed", "knobs_restored", "run_end"):
            assert kind in k, kind
        assert "steady" not in k  # the run stopped: its figures could not be kept
        run_dir = b.run_json.parent  # type: ignore[union-attr]
        samples = pd.read_csv(run_dir / "samples.csv")  # whole rows only
        assert len(samples) >= 2
        assert samples.iloc[-1][["pages_sharing", "full_scans", "MemFree"]].notna().all()
        assert not (run_dir / ".reserve").exists()
        (fs / "filler").unlink()
        assert_report(b.run_json)  # type: ignore[arg-type]
        run = b.run_id()  # from the record, while the tmpfs holding it is still mounted
    host.assert_restored(run)
    note("results folder (8 MiB tmpfs) filled up after KSM went on", rc, meta, meta["error"])

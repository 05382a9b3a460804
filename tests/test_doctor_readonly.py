"""`kvmksm doctor` only looks: no lock, no file, libvirt read-only; what it says about
<nosharepages/> and about side channels; and libvirt's own view of KSM in the host facts."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import libvirt
import pytest

from kvmksm.commands.doctor import diagnose
from kvmksm.host.fs import HostFS
from kvmksm.host.ksm import Ksm
from kvmksm.host.state import ActiveRun, HostLock, state_dir
from kvmksm.scenario import load as scenario
from kvmksm.security import SIDE_CHANNEL_NOTE
from kvmksm.virt.conn import node_memory, open_read_only, versions

# libvirt's test driver reads a whole host from one file: two shut-off base domains, one that
# forbids KSM from merging its memory.
NODE_XML = """\
<node>
  <domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>
    <name>base-nosharing</name>
    <memory>262144</memory>
    <memoryBacking><nosharepages/></memoryBacking>
    <os><type>hvm</type></os>
    <test:runstate>5</test:runstate>
  </domain>
  <domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>
    <name>base-plain</name>
    <memory>262144</memory>
    <memoryBacking><hugepages/></memoryBacking>
    <os><type>hvm</type></os>
    <test:runstate>5</test:runstate>
  </domain>
</node>
"""
SCENARIO = """\
workload:
  type: vms
  domain_type: qemu
  base: {{domain: {base}}}
  clones: 2
"""
NOSHARE = (
    "base domain 'base-nosharing' has <memoryBacking><nosharepages/>: KSM never merges the "
    "memory of its clones"
)


@pytest.fixture
def node_uri(tmp_path: Path) -> str:
    f = tmp_path / "libvirt" / "node.xml"
    f.parent.mkdir()
    f.write_text(NODE_XML)
    return f"test://{f}"


def _snapshot(top: Path) -> dict[str, Any]:
    """Every file and folder under `top`: kind, size, mtime and content (atime left out:
    reading may change it)."""
    out: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
            out[str(p)] = (st.st_mode, st.st_size, st.st_mtime_ns, digest)
    return out


def test_doctor_changes_nothing(tmp_path: Path, fake_root: Path, node_uri: str) -> None:
    state = tmp_path / "state"
    state.mkdir()
    # A bench killed with SIGKILL: its line is still in the lock file, its state file left.
    (state / "bench.lock").write_text("pid 999999999, scenario tiny3\n")
    ActiveRun(state).start(tmp_path / "reports/tiny3/run", {"pages_to_scan": 100})
    work = tmp_path / "cwd"
    work.mkdir()
    sc = work / "s.yaml"
    sc.write_text(SCENARIO.format(base="base-nosharing"))
    before = _snapshot(tmp_path)
    time.sleep(0.01)  # a write after the snapshot would show in mtime_ns
    env = {
        **os.environ,
        "KVMKSM_ROOT": str(fake_root),
        "KVMKSM_STATE_DIR": str(state),
        "KVMKSM_DATA_DIR": str(tmp_path / "data"),
        "HOME": str(tmp_path / "home"),
        "XDG_CACHE_HOME": str(tmp_path / "home/.cache"),
        "XDG_CONFIG_HOME": str(tmp_path / "home/.config"),
    }
    p = subprocess.run(
        [sys.executable, "-m", "kvmksm", "doctor", str(sc), "-c", node_uri],
        capture_output=True,
        text=True,
        env=env,
        cwd=work,
        timeout=120,
    )
    assert _snapshot(tmp_path) == before
    assert p.returncode == 1, p.stdout + p.stderr  # the killed run's state is a FAIL
    out = p.stdout
    assert "FAIL a killed run left state behind" in out
    assert "another kvmksm run" not in out  # the dead pid in the lock file holds nothing
    assert f"warn {NOSHARE}" in out
    assert out.count("note ") == 1 and "side channel" in out


def test_doctor_opens_libvirt_read_only(
    monkeypatch: pytest.MonkeyPatch, fake_fs: HostFS, node_uri: str
) -> None:
    opened: list[libvirt.virConnect] = []
    real_open_ro = libvirt.openReadOnly

    def read_write(uri: str | None = None) -> None:
        raise AssertionError(f"doctor opened {uri} read-write")

    def read_only(uri: str | None = None) -> libvirt.virConnect:
        conn = real_open_ro(uri)
        opened.append(conn)
        monkeypatch.setattr(conn, "close", lambda: 0)  # kept open to be inspected below
        return conn

    monkeypatch.setattr(libvirt, "open", read_write)
    monkeypatch.setattr(libvirt, "openAuth", read_write)
    monkeypatch.setattr(libvirt, "openReadOnly", read_only)
    sc = scenario.loads(SCENARIO.format(base="base-plain"), "s.yaml")
    found = diagnose(fake_fs, sc, node_uri)
    assert any(f.what == "base domain 'base-plain' is shut off" for f in found)
    (conn,) = opened
    assert conn.getURI() == node_uri
    with pytest.raises(libvirt.libvirtError) as e:  # libvirt itself refuses any change
        conn.defineXML("<domain type='test'><name>x</name><memory>1024</memory></domain>")
    assert e.value.get_error_code() == libvirt.VIR_ERR_OPERATION_DENIED
    conn.close()


def test_nosharepages_base_is_warned_once(fake_fs: HostFS, node_uri: str) -> None:
    sc = scenario.loads(SCENARIO.format(base="base-nosharing"), "s.yaml")
    found = diagnose(fake_fs, sc, node_uri)
    (warn,) = [f for f in found if f.level != "ok" and "nosharepages" in f.what]
    assert (warn.level, warn.what) == ("warn", NOSHARE)
    assert warn.fix == "remove <nosharepages/> from its XML (virsh edit base-nosharing)"
    plain = scenario.loads(SCENARIO.format(base="base-plain"), "s.yaml")
    assert not [f for f in diagnose(fake_fs, plain, node_uri) if "<nosharepages/>" in f.what]


def test_side_channel_note_said_once_from_the_one_text(fake_fs: HostFS) -> None:
    for found in (diagnose(fake_fs, None, "test:///default"), diagnose(fake_fs, None, None)):
        notes = [f for f in found if f.level == "note"]
        assert [n.what for n in notes] == [SIDE_CHANNEL_NOTE]
    for source in ("CAIN 2015", "Dedup Est Machina 2016", "Flip Feng Shui", "KB 2080735"):
        assert source in SIDE_CHANNEL_NOTE
    assert "admin-guide/mm/ksm" in SIDE_CHANNEL_NOTE


def test_running_bench_seen_without_touching_its_lock(fake_fs: HostFS) -> None:
    # A bench in another process holds the lock; doctor must see it, not wait, not write.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from kvmksm.host.state import HostLock; "
            "HostLock().acquire('scenario tiny3'); print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        lock = HostLock().path
        before = (lock.stat().st_mtime_ns, lock.read_text())
        t0 = time.monotonic()
        found = diagnose(fake_fs, None, None)
        assert time.monotonic() - t0 < 30
        (f,) = [f for f in found if "another kvmksm run" in f.what]
        assert f.level == "warn"
        assert f.what == (
            f"another kvmksm run is using KSM on this host (pid {holder.pid}, scenario tiny3)"
        )
        assert (lock.stat().st_mtime_ns, lock.read_text()) == before
    finally:
        holder.kill()
        holder.wait()
    # Killed: the kernel dropped the lock; its line stays, and names a dead process.
    found = diagnose(fake_fs, None, None)
    assert any(f.what == f"no kvmksm run in progress ({state_dir() / 'bench.lock'})" for f in found)


# -- libvirt's own view of KSM (virsh node-memory-tune) in the host facts --------------------
def test_node_memory_with_the_test_driver() -> None:
    conn = open_read_only("test:///default")
    try:
        facts = versions(conn)
    finally:
        conn.close()
    assert facts["libvirt_node_memory"] == {
        "error": "this function is not supported by the connection driver: "
        "virNodeGetMemoryParameters"
    }


@pytest.mark.libvirt
@pytest.mark.realksm
def test_node_memory_from_the_real_libvirtd(real_ksm: Ksm) -> None:
    conn = open_read_only("qemu:///system")
    try:
        facts = versions(conn)
        params = node_memory(conn)
    finally:
        conn.close()
    assert facts["libvirt_node_memory"].keys() == params.keys()
    assert {
        "shm_pages_to_scan",
        "shm_sleep_millisecs",
        "shm_pages_shared",
        "shm_pages_sharing",
        "shm_pages_unshared",
        "shm_pages_volatile",
        "shm_full_scans",
    } <= params.keys()
    # The knobs cannot move while the real-KSM lock is held: libvirt reads the same sysfs.
    for knob in ("pages_to_scan", "sleep_millisecs", "merge_across_nodes"):
        if f"shm_{knob}" in params:
            assert params[f"shm_{knob}"] == real_ksm.read(knob), knob

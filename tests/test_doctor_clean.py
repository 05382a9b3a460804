"""doctor and clean on a fake host tree."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kvmksm.commands.clean import clean
from kvmksm.commands.doctor import diagnose
from kvmksm.host.cgroup import MemoryCgroup
from kvmksm.host.fs import HostFS
from kvmksm.host.ksm import Ksm
from kvmksm.host.state import ActiveRun, HostLock

from .fakehost import knob_values


def _fake_process(root: Path, pid: int, comm: str, ksm_stat: str | None = None) -> None:
    d = root / "proc" / str(pid)
    d.mkdir(parents=True)
    (d / "comm").write_text(comm + "\n")
    if ksm_stat is not None:
        (d / "ksm_stat").write_text(ksm_stat)


def levels(findings: list) -> dict[str, str]:
    return {f.what: f.level for f in findings}


def test_doctor_clean_host(fake_fs: HostFS) -> None:
    found = diagnose(fake_fs, None, "test:///default")
    assert all(f.level in ("ok", "note") for f in found), [(f.level, f.what) for f in found]
    whats = " | ".join(f.what for f in found)
    assert "KSM sysfs present and writable" in whats
    assert "THP mode is 'madvise'" in whats
    assert "libvirtd reachable at test:///default" in whats


def test_doctor_flags_what_spoils_figures(fake_root: Path, fake_fs: HostFS) -> None:
    _fake_process(fake_root, 900, "ksmtuned")
    _fake_process(fake_root, 901, "qemu-system-x86", "ksm_rmap_items 10\nksm_merging_pages 5\n")
    (fake_root / "sys/kernel/mm/transparent_hugepage/enabled").write_text(
        "[always] madvise never\n"
    )
    ActiveRun().start(Path("/tmp/some-run"), {"pages_to_scan": 100})
    found = diagnose(fake_fs, None, None)
    by_level = {f.level: [] for f in found}
    for f in found:
        by_level[f.level].append(f.what + " -> " + f.fix)
    text = "\n".join(by_level.get("warn", []) + by_level.get("fail", []))
    assert "a KSM manager is running: ksmtuned (pid 900)" in text
    assert "stop it during runs" in text
    assert "THP is 'always'" in text
    assert "1 other process(es) use KSM: qemu-system-x86 (901)" in text
    assert "a killed run left state behind (record /tmp/some-run" in "\n".join(by_level["fail"])
    assert "kvmksm clean" in text


def test_doctor_reports_running_bench(fake_fs: HostFS) -> None:
    lock = HostLock()
    lock.acquire("scenario tiny3")
    try:
        found = diagnose(fake_fs, None, None)
    finally:
        lock.release()
    assert any(f.level == "warn" and "another kvmksm run is using KSM" in f.what for f in found)


def test_clean_restores_knobs_of_a_killed_run(fake_root: Path, fake_fs: HostFS) -> None:
    before = knob_values(fake_root)
    ksm = Ksm(fake_fs)
    # A run saved the knobs, changed them, made a cgroup... and was killed with SIGKILL.
    cg_root = fake_root / "sys/fs/cgroup/memory"
    cg_root.mkdir(parents=True)
    (cg_root / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    cg = MemoryCgroup(fake_fs, "kvmksm-killed", 1 << 30)
    os.mkdir(cg.path)  # a real cgroupfs makes the control files itself
    active = ActiveRun()
    active.start(Path("/tmp/killed-run"), ksm.read_knobs())
    active.created("cgroup", path=cg.path)
    ksm.set_knobs({"pages_to_scan": 5000, "sleep_millisecs": 0, "run": 1})
    assert knob_values(fake_root) != before

    done, problems = clean(fake_fs, "test:///default", dry_run=True)
    assert any(d.startswith("restore KSM knobs") and "pages_to_scan=100" in d for d in done)
    assert f"remove cgroup {cg.path}" in done
    assert knob_values(fake_root) != before  # dry run changed nothing

    done, problems = clean(fake_fs, "test:///default")
    assert problems == []
    assert knob_values(fake_root) == before
    assert not Path(cg.path).exists()
    assert ActiveRun.load() is None
    done, problems = clean(fake_fs, "test:///default")
    assert done == [] and problems == []


def test_cgroup_v2_chosen_when_v1_memory_absent(
    fake_root: Path, fake_fs: HostFS, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_mkdir = os.mkdir

    def cgroupfs_mkdir(path: str, *args: int) -> None:  # cgroupfs makes its files on mkdir
        real_mkdir(path, *args)
        if Path(path).name == "kvmksm-x":
            for f in ("memory.max", "cgroup.procs"):
                Path(path, f).write_text("")

    monkeypatch.setattr("kvmksm.host.cgroup.os.mkdir", cgroupfs_mkdir)
    base = fake_root / "sys/fs/cgroup"
    base.mkdir(parents=True, exist_ok=True)
    (base / "cgroup.controllers").write_text("cpu io memory pids\n")
    (base / "cgroup.subtree_control").write_text("memory pids\n")
    cg = MemoryCgroup(fake_fs, "kvmksm-x", 512 << 20)
    assert cg.version == 2
    cg.create()
    assert (base / "kvmksm-x/memory.max").read_text() == str(512 << 20)
    cg.add(1234)
    assert (base / "kvmksm-x/cgroup.procs").read_text() == "1234"

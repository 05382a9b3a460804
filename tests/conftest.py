from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmksm.hostfs import HostFS
from kvmksm.ksm import Ksm

from .fakehost import make_tree

REAL_KSM_LOCK = "/tmp/kvmksm-realksm.lock"


@pytest.fixture(autouse=True)
def _state_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test gets its own lock/state folder so tests never meet a real run's lock."""
    monkeypatch.setenv("KVMKSM_STATE_DIR", str(tmp_path_factory.mktemp("state")))


@pytest.fixture
def fake_root(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "root")


@pytest.fixture
def fake_fs(fake_root: Path) -> HostFS:
    return HostFS(fake_root)


@pytest.fixture
def real_ksm() -> Iterator[Ksm]:
    """The host's real KSM, one test at a time (an flock shared with benchmarks and other
    sessions), with every knob checked and restored afterwards."""
    ksm = Ksm(HostFS("/"))
    if not ksm.available():
        pytest.fail("this host has no /sys/kernel/mm/ksm; the real-KSM tests need it")
    fd = os.open(REAL_KSM_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    before = ksm.read_knobs()
    try:
        yield ksm
        after = ksm.read_knobs()
        assert after == before, f"knobs changed by the test: {before} -> {after}"
    finally:
        ksm.restore(before)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from kvmksm.errors import UserError
from kvmksm.host.fs import HostFS
from kvmksm.host.ksm import Ksm
from kvmksm.host.paths import DEFAULT_DATA_DIR
from kvmksm.virt import debian_image
from kvmksm.virt.base_image import BuiltImage
from kvmksm.virt.conn import open_connection
from kvmksm.virt.tiny_image import TinyImage, build_image

from .fakehost import make_tree

REAL_KSM_LOCK = "/tmp/kvmksm-realksm.lock"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--regen-golden",
        action="store_true",
        help="rewrite the golden files (tests/fixtures/clone/*.golden.xml) from the code",
    )


@pytest.fixture
def regen_golden(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--regen-golden"))


LIBVIRT_URI = "qemu:///system"


@pytest.fixture(autouse=True)
def _state_dir(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each test gets its own lock/state folder so tests never meet a real run's lock, and
    tests without real libvirt their own data folder, so a `clean` sweep in a test can never
    touch the console logs of guests running for real."""
    monkeypatch.setenv("KVMKSM_STATE_DIR", str(tmp_path_factory.mktemp("state")))
    if request.node.get_closest_marker("libvirt") is None:
        monkeypatch.setenv("KVMKSM_DATA_DIR", str(tmp_path_factory.mktemp("data")))


@pytest.fixture(scope="session")
def conn() -> Iterator[libvirt.virConnect]:
    """A connection to the real libvirtd (qemu:///system); fails, never skips, without one."""
    try:
        c = open_connection(LIBVIRT_URI)
    except UserError as e:
        pytest.fail(f"{e} (run scripts/setup.sh, or deselect with -m 'not libvirt')")
    yield c
    c.close()


@pytest.fixture(scope="session")
def tiny(conn: libvirt.virConnect) -> TinyImage:
    """The tiny base, built once and kept (build_image does nothing when it is up to date).
    Always the host's own image directory: the base domain is shared with real runs."""
    return build_image(conn, directory=DEFAULT_DATA_DIR / "images", progress=lambda s: None)


@pytest.fixture(scope="session")
def debian(conn: libvirt.virConnect) -> BuiltImage:
    """The Debian base kvmksm-debian, built once per machine (about a minute and a half:
    Debian packages through the host's apt sources) and then found up to date. The host's own
    image directory, like the tiny base: the base domain is shared with real runs."""
    return debian_image.build_image(conn, directory=DEFAULT_DATA_DIR / "images")


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

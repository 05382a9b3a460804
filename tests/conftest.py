from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import warnings
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
from kvmksm.virt.cleanup import find_leftovers, remove_leftovers
from kvmksm.virt.conn import alive, open_connection
from kvmksm.virt.tiny_image import DEFAULT_NAME, TinyImage, build_image

from .fakehost import make_tree

# A suite started in the background of a shell without job control inherits SIGINT ignored,
# and so would every kvmksm it starts (Python keeps an ignored SIGINT ignored): the Ctrl-C
# tests need it delivered. A handler, unlike SIG_IGN, is reset to the default in children.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

REAL_KSM_LOCK = "/tmp/kvmksm-realksm.lock"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--regen-golden",
        action="store_true",
        help="rewrite the golden files (tests/fixtures/clone/*.golden.xml) from the code",
    )
    parser.addoption(
        "--tiny-base",
        default=DEFAULT_NAME,
        help="name of the tiny base domain the libvirt tests build and clone (default "
        f"{DEFAULT_NAME}); another name lets one try a changed image beside the shared one",
    )
    parser.addoption(
        "--tiny-data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        help=f"data folder whose images/ holds the tiny base (default {DEFAULT_DATA_DIR})",
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


class _Libvirt:
    """The session's connection to the real libvirtd, opened again when it died (the fault
    tests restart libvirtd)."""

    def __init__(self) -> None:
        self.conn: libvirt.virConnect | None = None
        self.swept = False

    def get(self) -> libvirt.virConnect:
        if not alive(self.conn):
            try:
                self.conn = open_connection(LIBVIRT_URI)
            except UserError as e:
                pytest.fail(f"{e} (run scripts/setup.sh, or deselect with -m 'not libvirt')")
        assert self.conn is not None
        if not self.swept:
            self.swept = True
            self._sweep(self.conn)
        return self.conn

    @staticmethod
    def _sweep(conn: libvirt.virConnect) -> None:
        """What a killed kvmksm run left on this host (a machine image taken mid-run, a
        session stopped) is removed first, as `kvmksm clean` would, under the real-KSM lock so
        no other test session's guests are in the middle of a run. The tests then assert that
        they themselves leave nothing behind."""
        with _REAL_KSM.held():
            left = find_leftovers(conn)
            if left.empty():
                return
            problems = remove_leftovers(conn, left)
        warnings.warn(
            "removed what earlier kvmksm runs left on this host: "
            + ", ".join(left.describe())
            + (f" (not removed: {'; '.join(problems)})" if problems else ""),
            stacklevel=1,
        )

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except libvirt.libvirtError:
                pass


@pytest.fixture(scope="session")
def _libvirt() -> Iterator[_Libvirt]:
    holder = _Libvirt()
    yield holder
    holder.close()


@pytest.fixture
def conn(_libvirt: _Libvirt) -> libvirt.virConnect:
    """A connection to the real libvirtd (qemu:///system); fails, never skips, without one."""
    return _libvirt.get()


@pytest.fixture(scope="session")
def tiny(_libvirt: _Libvirt, request: pytest.FixtureRequest) -> TinyImage:
    """The tiny base, built once and kept (build_image does nothing when it is up to date).
    The host's own image directory unless --tiny-data-dir says otherwise: the base domain is
    shared with real runs. Tests clone ``tiny.domain``, never a name of their own."""
    return build_image(
        _libvirt.get(),
        name=request.config.getoption("--tiny-base"),
        directory=request.config.getoption("--tiny-data-dir") / "images",
        progress=lambda s: None,
    )


@pytest.fixture(scope="session")
def debian(_libvirt: _Libvirt) -> BuiltImage:
    """The Debian base kvmksm-debian, built once per machine (about a minute and a half:
    Debian packages through the host's apt sources) and then found up to date. The host's own
    image directory, like the tiny base: the base domain is shared with real runs."""
    return debian_image.build_image(_libvirt.get(), directory=DEFAULT_DATA_DIR / "images")


@pytest.fixture
def fake_root(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "root")


@pytest.fixture
def fake_fs(fake_root: Path) -> HostFS:
    return HostFS(fake_root)


class _RealKsmLock:
    """The real-KSM flock, taken once by this process however many fixtures ask for it (an
    flock on a second descriptor of the same file would wait for ourselves)."""

    def __init__(self) -> None:
        self.depth = 0
        self.fd: int | None = None

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        if self.depth == 0:
            fd = os.open(REAL_KSM_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            self.fd = fd
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            if self.depth == 0 and self.fd is not None:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
                os.close(self.fd)
                self.fd = None


_REAL_KSM = _RealKsmLock()


@pytest.fixture
def real_ksm() -> Iterator[Ksm]:
    """The host's real KSM, one test at a time (an flock shared with benchmarks and other
    sessions), with every knob checked and restored afterwards."""
    ksm = Ksm(HostFS("/"))
    if not ksm.available():
        pytest.fail("this host has no /sys/kernel/mm/ksm; the real-KSM tests need it")
    with _REAL_KSM.held():
        before = ksm.read_knobs()
        try:
            yield ksm
            after = ksm.read_knobs()
            assert after == before, f"knobs changed by the test: {before} -> {after}"
        finally:
            ksm.restore(before)


@pytest.fixture(scope="module")
def real_ksm_module() -> Iterator[None]:
    """The real-KSM lock held across a whole module, so its tests run back to back rather
    than queueing again behind other users of the lock between each two."""
    with _REAL_KSM.held():
        yield

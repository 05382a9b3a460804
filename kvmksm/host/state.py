"""Host-wide state of a kvmksm run: the lock that keeps runs apart and the saved state
that lets `kvmksm clean` undo a run that was killed.

KSM is global, so two runs on one host spoil each other: `bench` takes an exclusive,
non-blocking flock. The active-run file holds the knobs as they were before the run
and every object the run created, updated as it goes.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any

from kvmksm.errors import LockedError, UserError
from kvmksm.host.fs import HostFS

LOCK_NAME = "bench.lock"
ACTIVE_NAME = "active.json"


def state_dir() -> Path:
    return Path(os.environ.get("KVMKSM_STATE_DIR", "/run/kvmksm"))


class HostLock:
    """Exclusive per-host lock; released by the kernel if the process dies."""

    def __init__(self, directory: Path | None = None) -> None:
        self.dir = directory or state_dir()
        self.path = self.dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self, what: str = "") -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(
                f"cannot open the host lock {self.path}: {e.strerror} (run as root, or set "
                "KVMKSM_STATE_DIR)"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise LockedError(
                f"another kvmksm run is using KSM on this host ({holder}); KSM is host-wide, "
                "so runs cannot overlap: wait for it to finish or stop it"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}{', ' + what if what else ''}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> HostLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class ActiveRun:
    """The state file of the run in progress (for `kvmksm clean` after a kill)."""

    def __init__(self, directory: Path | None = None) -> None:
        self.path = (directory or state_dir()) / ACTIVE_NAME
        self.data: dict[str, Any] = {}

    def start(self, run_dir: Path, knobs_before: dict[str, Any]) -> None:
        self.data = {
            "pid": os.getpid(),
            "run_dir": str(run_dir),
            "knobs_before": knobs_before,
            "created": [],
        }
        self._save()

    def created(self, kind: str, **ident: Any) -> None:
        """Note an object (domain, volume, pool, cgroup, file) the run created."""
        self.data.setdefault("created", []).append({"kind": kind, **ident})
        self._save()

    def removed(self, kind: str, **ident: Any) -> None:
        entry = {"kind": kind, **ident}
        self.data["created"] = [c for c in self.data.get("created", []) if c != entry]
        self._save()

    def finish(self) -> None:
        self.path.unlink(missing_ok=True)
        self.data = {}

    def save(self) -> None:
        """Write the state as it is now (after changing ``data``)."""
        self._save()

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)

    @staticmethod
    def load(directory: Path | None = None) -> dict[str, Any] | None:
        path = (directory or state_dir()) / ACTIVE_NAME
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None


def bench_holder(directory: Path | None = None) -> str | None:
    """What the bench lock's holder wrote, when a ``kvmksm bench`` holds it; else None.

    The kernel's lock table (/proc/locks) tells whether the flock is held without taking it:
    even a shared lock for a moment would make a bench starting just then refuse to run.
    The lock is on the real host whatever KVMKSM_ROOT says, so this reads the real /proc.
    """
    path = (directory or state_dir()) / LOCK_NAME
    try:
        st = os.stat(path)
        text = path.read_text(errors="replace").strip()
    except OSError:
        return None
    try:
        locks: str | None = HostFS("/").read("proc/locks")
    except OSError:
        locks = None
    if locks is not None:
        ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        if not any("FLOCK" in ln.split() and ident in ln.split() for ln in locks.splitlines()):
            return None
    elif not text:  # no lock table: a released lock leaves the file empty
        return None
    active = ActiveRun.load(directory)
    if active and active.get("run_dir"):
        text += f", record {active['run_dir']}"
    return text or "holder unknown"

"""`kvmksm clean`: undo what a killed run left behind, using the state it saved as it went
(knobs before the run, objects created) plus a sweep of tagged libvirt objects."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kvmksm.errors import UserError
from kvmksm.host.fs import HostFS
from kvmksm.host.ksm import Ksm
from kvmksm.host.state import ActiveRun, HostLock
from kvmksm.results.record import close_killed


def clean(
    fs: HostFS, uri: str | None, dry_run: bool = False, run: str | None = None
) -> tuple[list[str], list[str]]:
    """Returns (what was done or would be done, problems). With ``run`` (8 hex digits), only
    that run's tagged guests and volumes are removed."""
    lock = HostLock()
    try:
        lock.acquire("kvmksm clean")
    except UserError as e:
        raise UserError(f"not cleaning: {e}") from None
    try:
        done: list[str] = []
        problems: list[str] = []
        active = ActiveRun.load()
        if active:
            d, p = _undo_active(fs, active, dry_run)
            done += d
            problems += p
        d, p = _sweep_libvirt(uri, dry_run, run)
        done += d
        problems += p
        if active and not dry_run:
            _close_record(active, done, problems)
            if not problems:
                ActiveRun().finish()
        return done, problems
    finally:
        lock.release()


def _close_record(active: dict[str, Any], done: list[str], problems: list[str]) -> None:
    """The killed run's record says it was killed, and what clean put back."""
    run_dir = active.get("run_dir")
    if not run_dir:
        return
    what = "; ".join(done) or "nothing was left"
    if problems:
        what += "; not removed: " + "; ".join(problems)
    try:
        closed = close_killed(
            Path(run_dir),
            f"kvmksm (pid {active.get('pid')}) was killed before the run ended; "
            "`kvmksm clean` put the host back",
            what,
        )
    except UserError as e:  # the record's folder is gone or unwritable: the host matters more
        problems.append(f"record {run_dir} not closed: {e}")
        return
    if closed:
        done.append(f"mark the record {run_dir} as killed")


def _undo_active(fs: HostFS, active: dict[str, Any], dry_run: bool) -> tuple[list[str], list[str]]:
    done, problems = [], []
    ksm = Ksm(fs)
    saved = active.get("knobs_before") or {}
    if saved and ksm.available():
        now = ksm.read_knobs()
        diff = {k: v for k, v in saved.items() if now.get(k) != v}
        if diff:
            done.append("restore KSM knobs " + ", ".join(f"{k}={v}" for k, v in diff.items()))
            if not dry_run:
                problems += ksm.restore(saved)
    for obj in active.get("created", []):
        if obj.get("kind") == "cgroup":
            path = Path(obj["path"])
            if path.exists():
                done.append(f"remove cgroup {path}")
                if not dry_run:
                    _kill_cgroup(path)
                    try:
                        os.rmdir(path)
                    except OSError as e:
                        problems.append(f"cgroup {path}: {e.strerror}")
    return done, problems


def _kill_cgroup(path: Path) -> None:
    """Processes a killed run left in its cgroup are ours (the fill children)."""
    try:
        pids = [int(p) for p in (path / "cgroup.procs").read_text().split()]
    except OSError:
        return
    for pid in pids:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass


def _sweep_libvirt(
    uri: str | None, dry_run: bool, run: str | None = None
) -> tuple[list[str], list[str]]:
    try:  # libvirt-python is an optional extra: without it there is no libvirt to sweep
        from kvmksm.virt.cleanup import find_leftovers, remove_leftovers
        from kvmksm.virt.conn import open_connection, resolve_uri
    except ImportError:
        return [], []
    target = resolve_uri(uri)
    try:
        conn = open_connection(target)
    except UserError as e:
        return [], [f"libvirt not checked: {e}"]
    try:
        left = find_leftovers(conn, run)
        done = [f"remove {d}" for d in left.describe()]
        problems = [] if dry_run else remove_leftovers(conn, left)
        return done, problems
    finally:
        conn.close()

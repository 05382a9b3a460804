"""Waiting until guests are up: a marker on the serial console, the guest agent, or a delay.

A guest that stops, prints the failure marker or runs out of time fails the run with the
reason and the tail of its console log.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import libvirt
import libvirt_qemu

from kvmksm.errors import WorkloadFailed
from kvmksm.scenario.model import BootWait

FAIL_MARKER = "KVMKSM-FAILED"  # the tiny image prints it when it cannot do what it was told
POLL = 0.2
LOG_GRACE = 10.0  # seconds a started guest's console log may take to appear


class BootError(WorkloadFailed):
    def __init__(self, domain: str, reason: str, tail: str = "") -> None:
        self.domain, self.reason, self.tail = domain, reason, tail
        text = f"guest {domain} {reason}"
        if tail:
            text += "; last console lines:\n" + tail
        super().__init__(text)


def console_tail(path: str | None, lines: int = 15) -> str:
    """The last lines of a console log, for a failure message ('' if unreadable)."""
    if not path:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 8192))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    out = [ln.rstrip("\r") for ln in text.splitlines() if ln.strip()]
    return "\n".join(f"  | {ln}" for ln in out[-lines:])


@dataclass
class Pending:
    dom: libvirt.virDomain
    console: str | None
    started: float  # time.monotonic() when it was started
    offset: int = 0
    carry: str = ""  # end of the last read, so a marker split across reads is still seen


class ConsoleWatch:
    """Reads a console log as it grows and tells whether a marker has appeared."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def poll(self, p: Pending) -> str | None:
        """'up', 'failed: <line>' or None (not yet)."""
        if not p.console:
            return None
        try:
            with open(p.console, "rb") as f:
                f.seek(p.offset)
                data = f.read()
        except OSError:
            return None
        if not data:
            return None
        p.offset += len(data)
        text = p.carry + data.decode(errors="replace")
        keep = max(len(self.marker), len(FAIL_MARKER)) + 200
        p.carry = text[-keep:]
        if FAIL_MARKER in text:
            line = text[text.index(FAIL_MARKER) :].splitlines()[0]
            return f"failed: {line}"
        if self.marker in text:
            return "up"
        return None


def _agent_ping(dom: libvirt.virDomain) -> bool:
    try:
        reply = libvirt_qemu.qemuAgentCommand(dom, json.dumps({"execute": "guest-ping"}), 1, 0)
    except libvirt.libvirtError:
        return False
    return "return" in json.loads(reply or "{}")


def wait_up(
    guests: list[Pending],
    boot: BootWait,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    on_up: Callable[[str, float], None] | None = None,
) -> dict[str, float]:
    """Wait for every guest; returns {name: seconds from start to up}. Raises BootError for
    the first guest that stops, reports failure or exceeds ``boot.timeout``."""
    watch = ConsoleWatch(boot.marker)
    pending = list(guests)
    up: dict[str, float] = {}
    while pending:
        now = clock()
        for p in list(pending):
            name, elapsed = p.dom.name(), now - p.started
            state = None
            if boot.method == "console":
                state = watch.poll(p)
            elif boot.method == "agent":
                state = "up" if _agent_ping(p.dom) else None
                elapsed = clock() - p.started  # as the ping answered (it may wait up to 1 s)
            elif elapsed >= boot.delay:
                state = "up"
            if state == "up":
                up[name] = round(elapsed, 2)
                pending.remove(p)
                if on_up:
                    on_up(name, up[name])
                continue
            if state and state.startswith("failed"):
                raise BootError(name, f"reported a failure ({state[8:]})", console_tail(p.console))
            if not _active(p.dom):
                raise BootError(name, "stopped before it came up", console_tail(p.console))
            if boot.method == "console" and elapsed > LOG_GRACE and not _exists(p.console):
                raise BootError(name, f"has no console log at {p.console} (deleted?)")
            if elapsed > boot.timeout:
                what = {
                    "console": f"did not print {boot.marker!r} on its serial console",
                    "agent": "did not answer the guest agent",
                    "delay": "did not stay up",
                }[boot.method]
                raise BootError(name, f"{what} within {boot.timeout:g}s", console_tail(p.console))
        if pending:
            sleep(POLL if boot.method != "agent" else 1.0)
    return up


def _exists(path: str | None) -> bool:
    return bool(path) and Path(path or "").exists()


def _active(dom: libvirt.virDomain) -> bool:
    try:
        return bool(dom.isActive())
    except libvirt.libvirtError:
        return False


def marker_seen(path: str | Path, marker: str) -> bool:
    try:
        return marker.encode() in Path(path).read_bytes()
    except OSError:
        return False

"""Waiting until guests are up: a marker on the serial console, the guest agent, or a delay.

A guest that stops, prints the failure marker or runs out of time fails the run with the
reason and the tail of its console log. A guest whose kernel panics is reported as that, in one
line, with the cause the kernel printed (``panic_cause``): the panic line sits 20-40 lines
before the end of the log (the task, the call trace and the kernel offset follow it), out of
the tail's reach.
"""

from __future__ import annotations

import json
import re
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
PANIC_LINE = "Kernel panic - not syncing:"
# After the panic line: time for the rest of the report to reach the log, or (panic=-1 and
# on_reboot=destroy) for the guest to stop; a kernel without panic=-1 hangs there for ever.
PANIC_GRACE = 3.0
LOG_FLUSH = 0.5  # seconds virtlogd may take to write out what a guest printed before it stopped
CONSOLE_READ_LIMIT = 4 << 20  # bytes of a console log searched for a panic (its end)


class BootError(WorkloadFailed):
    def __init__(self, domain: str, reason: str, tail: str = "", panic: str | None = None) -> None:
        self.domain, self.reason, self.tail, self.panic = domain, reason, tail, panic
        text = f"guest {domain}: {reason}" if panic else f"guest {domain} {reason}"
        if tail:
            text += "; last console lines:\n" + tail
        super().__init__(text)

    @classmethod
    def kernel_panic(cls, domain: str, cause: str, tail: str = "") -> BootError:
        """ "guest X: kernel panic during boot: <cause>", then the tail."""
        return cls(domain, f"kernel panic during boot: {cause}", tail, panic=cause)


def read_console(path: str | None, limit: int = CONSOLE_READ_LIMIT) -> str:
    """A console log's text (its last ``limit`` bytes), '' if there is none."""
    if not path:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - limit))
            return f.read().decode(errors="replace").replace("\r", "")
    except OSError:
        return ""


def panic_cause(console: str) -> str | None:
    """The cause of a kernel panic in a console log, or None if the kernel did not panic.

    The text after "Kernel panic - not syncing:" (the first one), with what the log shows of
    why in brackets: the task that panicked (the "CPU: ... PID: ... Comm:" line after it), a
    failed initramfs unpacking, the OOM killer. For example "System is deadlocked on memory
    (in init (pid 1); out of memory, no killable process)".
    """
    m = re.search(re.escape(PANIC_LINE) + r" ?(.*)", console)
    if not m:
        return None
    cause = m.group(1).strip().removesuffix("]---").strip() or "(no reason given)"
    hints = []
    task = re.search(r"CPU: \d+ (?:UID: \d+ )?PID: (\d+) Comm: (\S+)", console[m.end() :])
    if task:
        hints.append(f"in {task.group(2)} (pid {task.group(1)})")
    unpack = re.search(r"Initramfs unpacking failed: ?(.*)", console)
    if unpack:
        hints.append(f"initramfs unpacking failed: {unpack.group(1).strip()}")
    if "Out of memory and no killable processes" in console:
        hints.append("out of memory, no killable process")
    else:
        killed = re.findall(r"Out of memory: Killed process \d+ \((\S+)\)", console)
        if killed:
            hints.append(f"out of memory, killed {', '.join(sorted(set(killed)))}")
    # An OOM while unpacking panics before "Initramfs unpacking failed" could be printed.
    if not unpack and (
        "unpack_to_rootfs" in console[m.start() :]
        or ("Trying to unpack rootfs image" in console and "Freeing initrd memory" not in console)
    ):
        hints.append("while unpacking the initramfs")
    return cause + (f" ({'; '.join(hints)})" if hints else "")


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
    panicked: float | None = None  # clock time the panic line was seen


class ConsoleWatch:
    """Reads a console log as it grows and tells whether a marker has appeared."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def poll(self, p: Pending) -> str | None:
        """'up', 'failed: <line>', 'panic' or None (not yet)."""
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
        keep = max(len(self.marker), len(FAIL_MARKER), len(PANIC_LINE)) + 200
        p.carry = text[-keep:]
        if FAIL_MARKER in text:
            line = text[text.index(FAIL_MARKER) :].splitlines()[0]
            return f"failed: {line}"
        if PANIC_LINE in text:
            return "panic"
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
            if state == "panic" and p.panicked is None:
                p.panicked = now
            if not _active(p.dom):
                sleep(LOG_FLUSH)
                raise _stopped(name, p.console)
            if p.panicked is not None and now - p.panicked >= PANIC_GRACE:
                raise _stopped(name, p.console)  # still running: no panic=-1 on its cmdline
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


def _stopped(name: str, console: str | None) -> BootError:
    """Why a guest stopped (or hangs) before it came up, from its whole console log."""
    text = read_console(console)
    tail = console_tail(console)
    cause = panic_cause(text)
    if cause:
        return BootError.kernel_panic(name, cause, tail)
    if FAIL_MARKER in text:  # printed just before the initramfs powered the guest off
        line = text[text.index(FAIL_MARKER) :].splitlines()[0]
        return BootError(name, f"reported a failure ({line})", tail)
    if console and not text.strip():
        return BootError(
            name,
            "stopped before it came up, without a line on its console (an x86 guest resets "
            "so when its memory is below what its kernel needs to start)",
        )
    return BootError(name, "stopped before it came up", tail)


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

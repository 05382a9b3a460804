"""Talking to a guest through its QEMU guest agent: ping, run a command, write and read files.

Everything goes through libvirt (``qemuAgentCommand``), so it works for remote URIs too and
needs no network into the guest. Each call has a timeout; every failure is an ``AgentError``
of one line naming the guest and what was asked.

What the agent's replies look like (QEMU 7.2's qemu-ga, checked on Debian 12 guests):
``guest-exec`` returns ``{"pid": N}`` at once; ``guest-exec-status`` returns only
``{"exited": false}`` while the command runs, then ``exitcode`` (or ``signal``) and the
output as base64 (``out-data``/``err-data``, absent when empty; ``*-truncated`` past 16 MiB).
Once a finished status has been returned the pid is forgotten: it is read exactly once.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import libvirt
import libvirt_qemu

from kvmksm.errors import WorkloadFailed

CALL_TIMEOUT = 10  # seconds libvirt waits for one agent reply
POLL = 0.2  # seconds between guest-exec-status calls
CHUNK = 48 * 1024  # bytes per guest-file-write / guest-file-read


class AgentError(WorkloadFailed):
    """The agent did not answer, refused, or a command failed: one line."""


@dataclass
class ExecResult:
    """A finished command: its exit status (or the signal that ended it) and its output."""

    exitcode: int | None
    signal: int | None
    stdout: bytes
    stderr: bytes
    truncated: bool  # the agent kept only the first 16 MiB of an output
    seconds: float

    @classmethod
    def from_status(cls, st: dict[str, Any], seconds: float = 0.0) -> ExecResult:
        """From a finished guest-exec-status reply."""
        return cls(
            exitcode=st.get("exitcode"),
            signal=st.get("signal"),
            stdout=base64.b64decode(st.get("out-data", "")),
            stderr=base64.b64decode(st.get("err-data", "")),
            truncated=bool(st.get("out-truncated") or st.get("err-truncated")),
            seconds=seconds,
        )

    def __str__(self) -> str:
        return self.status()

    @property
    def ok(self) -> bool:
        return self.exitcode == 0 and self.signal is None

    def status(self) -> str:
        """'exit 0', 'exit 3' or 'killed by signal 9'."""
        if self.signal is not None:
            return f"killed by signal {self.signal}"
        return f"exit {self.exitcode}"


class Agent:
    """The guest agent of one running domain."""

    def __init__(
        self,
        dom: libvirt.virDomain,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.dom = dom
        self.name = dom.name()
        self.clock, self.sleep = clock, sleep

    def call(self, execute: str, arguments: dict[str, Any] | None = None, timeout: int = 0) -> Any:
        """One agent command; its ``return`` value."""
        cmd: dict[str, Any] = {"execute": execute}
        if arguments:
            cmd["arguments"] = arguments
        try:
            reply = libvirt_qemu.qemuAgentCommand(
                self.dom, json.dumps(cmd), timeout or CALL_TIMEOUT, 0
            )
        except libvirt.libvirtError as e:
            why = _one_line(e.get_error_message() or str(e))
            raise AgentError(f"guest {self.name}: {execute}: {why}") from None
        try:
            data = json.loads(reply or "{}")
        except ValueError:
            raise AgentError(f"guest {self.name}: {execute}: not JSON: {reply[:200]!r}") from None
        if "return" not in data:
            raise AgentError(f"guest {self.name}: {execute}: {_one_line(str(data))}")
        return data["return"]

    def ping(self, timeout: int = 1) -> bool:
        try:
            self.call("guest-ping", timeout=timeout)
        except AgentError:
            return False
        return True

    def wait(self, timeout: float) -> float:
        """Wait until the agent answers; seconds waited. AgentError after ``timeout``."""
        start = self.clock()
        while not self.ping():
            if self.clock() - start > timeout:
                raise AgentError(
                    f"guest {self.name}: the guest agent did not answer in {timeout:g}s"
                )
            self.sleep(1.0)
        return self.clock() - start

    # -- commands ---------------------------------------------------------------------------
    def spawn(self, argv: Sequence[str], capture: bool = True, stdin: bytes | None = None) -> int:
        """Start ``argv`` in the guest and return its pid there (it runs on by itself)."""
        args: dict[str, Any] = {"path": argv[0], "arg": list(argv[1:]), "capture-output": capture}
        if stdin is not None:
            args["input-data"] = base64.b64encode(stdin).decode()
        return int(self.call("guest-exec", args)["pid"])

    def status(self, pid: int) -> dict[str, Any] | None:
        """The finished status of ``pid`` (read once: the agent then forgets it), or None
        while it runs."""
        st = self.call("guest-exec-status", {"pid": pid})
        return st if st.get("exited") else None

    def run(self, argv: Sequence[str], timeout: float, stdin: bytes | None = None) -> ExecResult:
        """Run ``argv`` to its end; AgentError if it is still running after ``timeout``."""
        start = self.clock()
        pid = self.spawn(argv, stdin=stdin)
        while True:
            st = self.status(pid)
            if st is not None:
                break
            if self.clock() - start > timeout:
                raise AgentError(
                    f"guest {self.name}: {_show(argv)} still running after {timeout:g}s "
                    f"(pid {pid} in the guest)"
                )
            self.sleep(POLL)
        return ExecResult.from_status(st, round(self.clock() - start, 3))

    def shell(self, command: str, timeout: float) -> ExecResult:
        """``/bin/sh -c command``."""
        return self.run(["/bin/sh", "-c", command], timeout)

    # -- files ------------------------------------------------------------------------------
    def write_file(self, path: str, data: bytes) -> None:
        """Write ``data`` to ``path`` in the guest (created or truncated)."""
        handle = self.call("guest-file-open", {"path": path, "mode": "wb"})
        try:
            for i in range(0, len(data), CHUNK) or [0]:
                part = data[i : i + CHUNK]
                done = self.call(
                    "guest-file-write",
                    {"handle": handle, "buf-b64": base64.b64encode(part).decode()},
                )
                if int(done.get("count", -1)) != len(part):
                    raise AgentError(
                        f"guest {self.name}: guest-file-write {path}: wrote "
                        f"{done.get('count')} of {len(part)} bytes"
                    )
        finally:
            self.call("guest-file-close", {"handle": handle})

    def read_file(self, path: str, limit: int = 16 << 20) -> bytes:
        """The contents of ``path`` in the guest (at most ``limit`` bytes)."""
        handle = self.call("guest-file-open", {"path": path, "mode": "rb"})
        out = bytearray()
        try:
            while len(out) < limit:
                got = self.call("guest-file-read", {"handle": handle, "count": CHUNK})
                out += base64.b64decode(got.get("buf-b64", ""))
                if got.get("eof") or not got.get("count"):
                    break
        finally:
            self.call("guest-file-close", {"handle": handle})
        return bytes(out[:limit])


def one_line(data: bytes, limit: int = 300) -> str:
    """Output as one line for a message: lines joined with ' | ', the end kept if long."""
    text = " | ".join(ln.strip() for ln in data.decode(errors="replace").splitlines() if ln.strip())
    return text if len(text) <= limit else "..." + text[-(limit - 3) :]


def keep(data: bytes, limit: int = 4096) -> str:
    """Output kept in a record: all of it up to ``limit`` bytes, else its first quarter and
    its end with how much was left out between them."""
    text = data.decode(errors="replace")
    if len(data) <= limit:
        return text
    head, tail = data[: limit // 4], data[-(limit - limit // 4) :]
    cut = len(data) - len(head) - len(tail)
    return (
        head.decode(errors="replace")
        + f"\n[... {cut} bytes left out ...]\n"
        + tail.decode(errors="replace")
    )


def _show(argv: Sequence[str]) -> str:
    text = " ".join(argv[2:] if argv[:2] == ["/bin/sh", "-c"] else argv)
    return repr(text if len(text) <= 80 else text[:77] + "...")


def _one_line(text: str) -> str:
    return " ".join(text.split())

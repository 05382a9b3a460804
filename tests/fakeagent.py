"""A stand-in for the QEMU guest agent, for fast tests: each "guest" is a folder on the host,
and ``guest-exec`` really runs the command here (paths under /run mapped into the folder), so
kvmksm's own guest programs (churn, probe) run for real with the same protocol the agent has:
exec returns a pid, status says ``exited: false`` until the end and forgets the pid once it
reported it, output comes base64-encoded, files open/write/read/close by handle.

Install with ``FakeAgents.install(monkeypatch)``; domains are ``FakeDom(name)``.
"""

from __future__ import annotations

import base64
import itertools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import libvirt
import libvirt_qemu
import pytest


def _error(msg: str) -> libvirt.libvirtError:
    """libvirtError takes its text from libvirt's last error when there is one: clear it."""
    libvirt.virResetLastError()
    return libvirt.libvirtError(msg)


class FakeDom:
    def __init__(self, name: str) -> None:
        self._name = name

    def name(self) -> str:
        return self._name


class FakeGuest:
    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "run").mkdir(parents=True, exist_ok=True)
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.handles: dict[int, Any] = {}
        self.pids = itertools.count(100)
        self.hnd = itertools.count(1000)
        self.calls: list[str] = []
        self.up = True  # False: the agent is "not connected"

    def path(self, p: str) -> Path:
        return self.root / p.lstrip("/")

    def map_arg(self, a: str) -> str:
        for prefix in ("/run/", "--status=/run/", "--dir=/run/"):
            if a.startswith(prefix):
                head = a[: len(prefix) - len("/run/")]
                return head + str(self.root / a[len(head) + 1 :])
        return a

    def handle(self, cmd: dict[str, Any]) -> Any:
        ex, args = cmd["execute"], cmd.get("arguments", {})
        self.calls.append(ex)
        if not self.up:
            raise _error("Guest agent is not responding: QEMU guest agent is not connected")
        if ex == "guest-ping":
            return {}
        if ex == "guest-exec":
            argv = [args["path"], *args.get("arg", [])]
            if argv[0] == "python3":
                argv[0] = sys.executable
            argv = [self.map_arg(a) for a in argv]
            if argv[:2] == ["/bin/sh", "-c"]:
                argv[2] = argv[2].replace(" /run/", f" {self.root}/run/")
            out = subprocess.PIPE if args.get("capture-output") else subprocess.DEVNULL
            inp = base64.b64decode(args["input-data"]) if "input-data" in args else None
            p = subprocess.Popen(
                argv, stdout=out, stderr=out, stdin=subprocess.PIPE if inp else subprocess.DEVNULL
            )
            if inp:
                assert p.stdin is not None
                p.stdin.write(inp)
                p.stdin.close()
            pid = next(self.pids)
            self.procs[pid] = p
            return {"pid": pid}
        if ex == "guest-exec-status":
            p = self.procs.get(args["pid"])
            if p is None:
                raise _error(
                    "internal error: unable to execute QEMU agent command "
                    "'guest-exec-status': Invalid parameter 'pid'"
                )
            if p.poll() is None:
                return {"exited": False}
            del self.procs[args["pid"]]
            st: dict[str, Any] = {"exited": True}
            if p.returncode < 0:
                st["signal"] = -p.returncode
            else:
                st["exitcode"] = p.returncode
            for key, stream in (("out-data", p.stdout), ("err-data", p.stderr)):
                data = stream.read() if stream else b""
                if data:
                    st[key] = base64.b64encode(data).decode()
            return st
        if ex == "guest-file-open":
            f = self.path(args["path"])
            mode = args.get("mode", "r")
            if "r" in mode and not f.exists():
                raise _error(
                    f"internal error: failed to open file '{args['path']}': "
                    "No such file or directory"
                )
            h = next(self.hnd)
            self.handles[h] = open(f, mode)  # noqa: SIM115 - closed by guest-file-close
            return h
        if ex == "guest-file-write":
            data = base64.b64decode(args["buf-b64"])
            self.handles[args["handle"]].write(data)
            return {"count": len(data), "eof": False}
        if ex == "guest-file-read":
            data = self.handles[args["handle"]].read(args.get("count", 4096))
            return {"count": len(data), "buf-b64": base64.b64encode(data).decode(), "eof": not data}
        if ex == "guest-file-close":
            self.handles.pop(args["handle"]).close()
            return {}
        raise _error(f"The command {ex} has not been found")

    def stop(self) -> None:
        for p in self.procs.values():
            p.kill()
            p.wait()


class FakeAgents:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.guests: dict[str, FakeGuest] = {}

    def guest(self, name: str) -> FakeGuest:
        if name not in self.guests:
            self.guests[name] = FakeGuest(self.tmp / name)
        return self.guests[name]

    def command(self, dom: FakeDom, cmd: str, timeout: int, flags: int) -> str:
        return json.dumps({"return": self.guest(dom.name()).handle(json.loads(cmd))})

    def install(self, monkeypatch: pytest.MonkeyPatch) -> FakeAgents:
        monkeypatch.setattr(libvirt_qemu, "qemuAgentCommand", self.command)
        return self

    def stop(self) -> None:
        for g in self.guests.values():
            g.stop()

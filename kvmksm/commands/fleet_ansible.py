"""Driving Ansible for `kvmksm fleet run`: the hosts of an inventory (ansible-inventory), one
playbook run (ansible-playbook with kvmksm's callback plugin writing a JSON line per task
result), and what those lines say per host. Ansible is the engine: kvmksm ships playbooks
(kvmksm/fleet/*.yml), not a remote runner of its own.

ansible-playbook runs in a session of its own, so a Ctrl-C at the terminal reaches kvmksm
first; kvmksm then interrupts the playbook (SIGINT to its process group: its SSH sessions end,
a local bench gets it too and restores the host) and runs stop.yml on every host.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvmksm.errors import Interrupted, UserError

FLEET_DATA = Path(__file__).resolve().parent.parent / "fleet"
CALLBACKS = FLEET_DATA / "callback_plugins"
NEED_ANSIBLE = (
    "kvmksm fleet needs Ansible on this machine (the controller): pip install 'kvmksm[fleet]' "
    "(ansible-core); the hosts need only Python 3 and SSH"
)


def require_ansible() -> None:
    for tool in ("ansible-playbook", "ansible-inventory"):
        if shutil.which(tool) is None:
            raise UserError(f"{tool} not found: {NEED_ANSIBLE}")


def ansible_version() -> str | None:
    try:
        out = subprocess.run(
            ["ansible-playbook", "--version"], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    first = out.splitlines()[0] if out else ""
    return first.replace("ansible-playbook", "").strip(" []") or None


# -- the inventory ----------------------------------------------------------------------
@dataclass
class InventoryHost:
    name: str
    groups: list[str]
    vars: dict[str, Any]

    @property
    def address(self) -> str | None:
        host = self.vars.get("ansible_host")
        if self.vars.get("ansible_connection") == "local":
            return "local"
        port = self.vars.get("ansible_port")
        if host is None:
            return None
        return f"{host}:{port}" if port else str(host)


def list_inventory(inventory: str, limit: str | None = None) -> list[InventoryHost]:
    """Every host of an inventory (INI, YAML, a folder, as Ansible reads them), with its
    groups and variables; UserError in one line when it names no host."""
    p = Path(inventory)
    if not p.exists():
        raise UserError(f"{inventory}: no such inventory file or folder")
    cmd = ["ansible-inventory", "-i", inventory, "--list"]
    if limit:
        cmd += ["--limit", limit]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env())
    if proc.returncode != 0:
        raise UserError(f"{inventory}: ansible-inventory failed: {_last_line(proc.stderr)}")
    try:
        data = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise UserError(f"{inventory}: ansible-inventory printed no inventory") from None
    hostvars = data.get("_meta", {}).get("hostvars", {})
    groups: dict[str, list[str]] = {}

    def walk(group: str, seen: tuple[str, ...]) -> None:
        """A host is in its group and in every group above it (children: in Ansible)."""
        entry = data.get(group, {})
        for h in entry.get("hosts", []):
            groups.setdefault(h, [])
            for g in seen:
                if g not in ("all", "ungrouped") and g not in groups[h]:
                    groups[h].append(g)
        for child in entry.get("children", []):
            if child not in seen:
                walk(child, (*seen, child))

    walk("all", ("all",))
    if not groups:
        why = _last_line(proc.stderr)
        raise UserError(
            f"{inventory}: no hosts in this inventory"
            + (f" (ansible-inventory: {why})" if why else "")
        )
    return [InventoryHost(h, g, dict(hostvars.get(h, {}))) for h, g in groups.items()]


# -- one playbook run -------------------------------------------------------------------
@dataclass
class TaskResult:
    host: str
    task: str
    status: str  # ok, failed, unreachable, skipped
    start: float
    end: float
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return max(0.0, self.end - self.start)

    @property
    def stdout(self) -> str:
        return str(self.data.get("stdout") or "")

    @property
    def message(self) -> str:
        """Why it failed, in one line."""
        for key in ("msg", "stderr", "stdout"):
            text = str(self.data.get(key) or "").strip()
            if text:
                return " ".join(text.split())[-400:]
        return self.status


@dataclass
class PlaybookRun:
    playbook: str
    returncode: int | None
    seconds: float
    results: list[TaskResult]
    interrupted: bool = False

    def for_host(self, host: str) -> list[TaskResult]:
        return [r for r in self.results if r.host == host]


def read_log(path: Path) -> list[TaskResult]:
    out = []
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return out
    for line in lines:
        try:
            e = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if e.get("event") != "result":
            continue
        data = {k: v for k, v in e.items() if k not in ("event", "host", "task", "status")}
        out.append(TaskResult(e["host"], e["task"], e["status"], e["start"], e["end"], data))
    return out


def run_playbook(
    name: str,
    inventory: str,
    extra_vars: dict[str, Any],
    folder: Path,
    limit: list[str] | None = None,
    forks: int = 5,
    on_result: Callable[[TaskResult], None] | None = None,
) -> PlaybookRun:
    """ansible-playbook kvmksm/fleet/NAME.yml; its output goes to folder/NAME.log, its results
    (read through the callback's JSON lines) come back. Ctrl-C or SIGTERM interrupts it
    (its whole process group) and returns with interrupted=True."""
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / f"{name}.jsonl"
    log.unlink(missing_ok=True)
    vars_file = folder / f"{name}.vars.json"
    vars_file.write_text(json.dumps(extra_vars, indent=1, default=str))
    cmd = [
        "ansible-playbook", "-i", inventory, str(FLEET_DATA / f"{name}.yml"),
        "-e", f"@{vars_file}", "--forks", str(max(1, forks)),
    ]  # fmt: skip
    if limit is not None:
        cmd += ["--limit", ",".join(limit) + ","]
    t0 = time.monotonic()
    seen = 0
    interrupted = False
    with open(folder / f"{name}.log", "w") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=_env(log),
            start_new_session=True,
        )
        try:
            while proc.poll() is None:
                time.sleep(0.2)
                seen = _follow(log, seen, on_result)
        except (KeyboardInterrupt, Interrupted):
            interrupted = True
            _interrupt(proc)
    _follow(log, seen, on_result)
    return PlaybookRun(name, proc.returncode, time.monotonic() - t0, read_log(log), interrupted)


def _follow(log: Path, seen: int, on_result: Callable[[TaskResult], None] | None) -> int:
    if on_result is None:
        return seen
    results = read_log(log)
    for r in results[seen:]:
        on_result(r)
    return len(results)


def _interrupt(proc: subprocess.Popen[bytes]) -> None:
    """SIGINT to the playbook's process group (as a Ctrl-C would be), then harder."""
    for sig, wait in ((signal.SIGINT, 30.0), (signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait)
            break
        except subprocess.TimeoutExpired:
            continue


def _env(log: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    theirs = env.get("ANSIBLE_CALLBACK_PLUGINS")
    env["ANSIBLE_CALLBACK_PLUGINS"] = str(CALLBACKS) + (f":{theirs}" if theirs else "")
    env.setdefault("ANSIBLE_PIPELINING", "True")  # fewer SSH round trips per module
    env.setdefault("ANSIBLE_RETRY_FILES_ENABLED", "False")
    env.setdefault("ANSIBLE_NOCOLOR", "True")
    env.setdefault("ANSIBLE_DEPRECATION_WARNINGS", "False")
    env.setdefault("ANSIBLE_LOCALHOST_WARNING", "False")
    env.setdefault("ANSIBLE_INVENTORY_UNPARSED_WARNING", "False")
    if log is not None:
        env["KVMKSM_FLEET_LOG"] = str(log)
    return env


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""

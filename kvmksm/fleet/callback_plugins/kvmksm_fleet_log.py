"""Ansible callback plugin of kvmksm fleet: one JSON line per task result and host (the task,
its status, when it started and ended, and the few result fields kvmksm reads: rc, stdout,
msg) appended to the file named by KVMKSM_FLEET_LOG, so the controller learns what happened
on every host (unreachable, failed, each phase's duration) without parsing Ansible's output.
It imports nothing of kvmksm: Ansible loads it in its own process."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = """
name: kvmksm_fleet_log
type: notification
short_description: task results as JSON lines for kvmksm fleet
description: Appends one JSON line per task result to the file KVMKSM_FLEET_LOG names.
"""

KEEP = ("rc", "stdout", "stderr", "msg", "changed", "skip_reason")
TAIL = 20000  # characters of stdout/stderr kept: enough for a probe's JSON and an error


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "notification"
    CALLBACK_NAME = "kvmksm_fleet_log"
    CALLBACK_NEEDS_ENABLED = False

    def __init__(self) -> None:
        super().__init__()
        self.path = os.environ.get("KVMKSM_FLEET_LOG")
        self.started: dict[tuple[str, str], float] = {}

    def _write(self, entry: dict[str, Any]) -> None:
        if not self.path:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry, default=str) + "\n")
            f.flush()

    def v2_runner_on_start(self, host: Any, task: Any) -> None:
        key = (host.get_name(), task._uuid)
        self.started[key] = time.time()
        self._write({"event": "start", "host": key[0], "task": task.get_name(), "t": time.time()})

    def _result(self, result: Any, status: str) -> None:
        host, task = result._host.get_name(), result._task
        end = time.time()
        start = self.started.pop((host, task._uuid), end)
        data = result._result if isinstance(result._result, dict) else {}
        kept = {k: data[k] for k in KEEP if k in data}
        for k in ("stdout", "stderr", "msg"):
            if isinstance(kept.get(k), str) and len(kept[k]) > TAIL:
                kept[k] = kept[k][-TAIL:]
        self._write(
            {
                "event": "result",
                "host": host,
                "task": task.get_name(),
                "status": status,
                "start": start,
                "end": end,
                **kept,
            }
        )

    def v2_runner_on_ok(self, result: Any) -> None:
        self._result(result, "ok")

    def v2_runner_on_failed(self, result: Any, ignore_errors: bool = False) -> None:
        self._result(result, "failed")

    def v2_runner_on_unreachable(self, result: Any) -> None:
        self._result(result, "unreachable")

    def v2_runner_on_skipped(self, result: Any) -> None:
        self._result(result, "skipped")

"""Open a page in real headless Chromium and report what happened, for report tests.

Talks the DevTools protocol over --remote-debugging-pipe (file descriptors 3 and 4, messages
ended by NUL), so no WebSocket library is needed. Network is blocked by the host resolver:
a page that tries to load anything from the network shows it as a request and an error.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import queue
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--host-resolver-rules=MAP * ~NOTFOUND",
]


@dataclass
class PageVisit:
    console: list[str] = field(default_factory=list)  # console messages, uncaught exceptions
    log: list[str] = field(default_factory=list)  # browser log entries (failed loads, ...)
    requests: list[str] = field(default_factory=list)  # every URL the page asked for
    facts: dict[str, Any] = field(default_factory=dict)  # what the probe script returned
    screenshot: Path | None = None


class _Pipe:
    def __init__(self, profile: Path) -> None:
        to_chrome_r, self._w = os.pipe()
        self._r, from_chrome_w = os.pipe()
        # Chromium reads commands on fd 3 and writes replies on fd 4. Move the child's ends
        # above 10 first so that placing them on 3 and 4 cannot clobber one with the other.
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_chrome_r, from_chrome_w)]
        os.close(to_chrome_r)
        os.close(from_chrome_w)

        def child_fds() -> None:
            os.dup2(high[0], 3)  # dup2 leaves 3 and 4 open across exec
            os.dup2(high[1], 4)

        self.proc = subprocess.Popen(
            [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            close_fds=False,  # closing would also close 3 and 4, made after the fork
            preexec_fn=child_fds,
        )
        for fd in high:
            os.close(fd)
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.replies: dict[int, dict[str, Any]] = {}
        self._cv = threading.Condition()
        self._next = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        buf = b""
        while chunk := os.read(self._r, 1 << 16):
            buf += chunk
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                msg = json.loads(raw)
                if "id" in msg:
                    with self._cv:
                        self.replies[msg["id"]] = msg
                        self._cv.notify_all()
                else:
                    self.events.put(msg)

    def call(self, method: str, session: str | None = None, timeout: float = 30, **params: Any):
        self._next += 1
        msg: dict[str, Any] = {"id": self._next, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        with self._cv:
            if not self._cv.wait_for(lambda: self._next in self.replies, timeout):
                raise TimeoutError(f"Chromium did not answer {method} in {timeout} s")
            reply = self.replies.pop(self._next)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except (OSError, TimeoutError, RuntimeError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._w)
        os.close(self._r)


def visit(
    url: str, profile: Path, probe: str, screenshot: Path | None = None, width: int = 1280
) -> PageVisit:
    """Load `url`, wait for load, evaluate `probe` (a JS expression giving JSON-able data),
    and take a full-page screenshot when asked."""
    pipe = _Pipe(profile)
    out = PageVisit()
    try:
        target = pipe.call("Target.createTarget", url="about:blank")["targetId"]
        session = pipe.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            pipe.call(f"{domain}.enable", session)
        metrics = {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False}
        pipe.call("Emulation.setDeviceMetricsOverride", session, **metrics)
        pipe.call("Page.navigate", session, url=url)
        deadline = time.monotonic() + 60
        loaded = False
        while not loaded or not pipe.events.empty():
            try:
                ev = pipe.events.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                break
            loaded |= _record(ev, out)
            if time.monotonic() > deadline:
                break
        if not loaded:
            raise TimeoutError(f"{url} did not finish loading")
        result = pipe.call("Runtime.evaluate", session, expression=probe, returnByValue=True)
        out.facts = result.get("result", {}).get("value") or {}
        if screenshot is not None:
            size = pipe.call("Page.getLayoutMetrics", session)["cssContentSize"]
            clip = {"x": 0, "y": 0, "width": width, "height": size["height"], "scale": 1}
            shot = pipe.call(
                "Page.captureScreenshot",
                session,
                format="png",
                captureBeyondViewport=True,
                clip=clip,
            )
            screenshot.write_bytes(base64.b64decode(shot["data"]))
            out.screenshot = screenshot
        while not pipe.events.empty():  # anything logged while probing
            _record(pipe.events.get(), out)
    finally:
        pipe.close()
    return out


def _record(ev: dict[str, Any], out: PageVisit) -> bool:
    """File one protocol event into `out`; True when it is the page's load event."""
    method, p = ev.get("method"), ev.get("params", {})
    if method == "Runtime.consoleAPICalled":
        args = " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
        out.console.append(f"console.{p.get('type')}: {args}")
    elif method == "Runtime.exceptionThrown":
        details = p["exceptionDetails"]
        what = details.get("exception", {}).get("description", "")
        out.console.append(f"exception: {details.get('text')} {what}")
    elif method == "Log.entryAdded":
        entry = p["entry"]
        out.log.append(f"{entry.get('level')}: {entry.get('text')} {entry.get('url', '')}")
    elif method == "Network.requestWillBeSent":
        out.requests.append(p["request"]["url"])
    return method == "Page.loadEventFired"

"""libvirt's events: a guest that stops, crashes or is destroyed, and a connection that closes
(libvirtd restarted or killed), told to a callback as they happen.

libvirt delivers events only through an event loop registered *before* the connection is
opened (``virEventRegisterDefaultImpl``) and run by someone (``virEventRunDefaultImpl`` in a
loop): ``ensure_event_loop`` does both once per process, in a daemon thread. Callbacks then
run in that thread: they must be quick and must not call back into libvirt.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import libvirt

_loop_lock = threading.Lock()
_loop_thread: threading.Thread | None = None


def ensure_event_loop() -> None:
    """Register libvirt's default event loop and run it in a daemon thread (once)."""
    global _loop_thread
    with _loop_lock:
        if _loop_thread is not None:
            return
        libvirt.virEventRegisterDefaultImpl()
        _loop_thread = threading.Thread(target=_run_loop, name="kvmksm-libvirt-events", daemon=True)
        _loop_thread.start()


def _run_loop() -> None:
    while True:
        try:
            libvirt.virEventRunDefaultImpl()
        except Exception:  # noqa: BLE001 - one bad dispatch must not end event delivery
            continue


# What each lifecycle event that ends a running guest means, in the user's words.
# (event, detail) -> reason; detail None: any detail of that event.
_STOPPED = {
    libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN: "shut down from inside",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED: "destroyed (virsh destroy or another libvirt "
    "client)",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_MIGRATED: "migrated away",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_SAVED: "saved to a file and stopped",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_FAILED: "crashed (its QEMU process ended unexpectedly)",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_FROM_SNAPSHOT: "stopped by a snapshot revert",
}
_STOPPED_NAMES = {
    libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED: "destroyed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_MIGRATED: "migrated",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_SAVED: "saved",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_FAILED: "failed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_FROM_SNAPSHOT: "from snapshot",
}
_CRASHED = {
    libvirt.VIR_DOMAIN_EVENT_CRASHED_PANICKED: "crashed (guest kernel panic)",
    libvirt.VIR_DOMAIN_EVENT_CRASHED_CRASHLOADED: "crashed (guest kernel panic, crash kernel "
    "loaded)",
}
# Why a shut-off domain is off (virDomainGetState), for a stop seen after the fact.
_SHUTOFF = {
    libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN: "shut down from inside",
    libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED: "destroyed (virsh destroy or another libvirt client)",
    libvirt.VIR_DOMAIN_SHUTOFF_CRASHED: "crashed (its QEMU process ended unexpectedly)",
    libvirt.VIR_DOMAIN_SHUTOFF_MIGRATED: "migrated away",
    libvirt.VIR_DOMAIN_SHUTOFF_SAVED: "saved to a file and stopped",
    libvirt.VIR_DOMAIN_SHUTOFF_FAILED: "failed to start",
    libvirt.VIR_DOMAIN_SHUTOFF_FROM_SNAPSHOT: "stopped by a snapshot revert",
    libvirt.VIR_DOMAIN_SHUTOFF_DAEMON: "stopped by libvirtd on restart",
}


def stop_reason(event: int, detail: int) -> str | None:
    """The reason a lifecycle event ended a running guest ('crashed (...)', 'shut down from
    inside', ...), with libvirt's own names; None for events that do not end it."""
    if event == libvirt.VIR_DOMAIN_EVENT_STOPPED:
        text = _STOPPED.get(detail, "stopped")
        return f"{text}; libvirt: stopped, {_STOPPED_NAMES.get(detail, detail)}"
    if event == libvirt.VIR_DOMAIN_EVENT_CRASHED:
        return f"{_CRASHED.get(detail, 'crashed')}; libvirt: crashed"
    return None


def state_reason(dom: libvirt.virDomain) -> str | None:
    """Why a domain is not running now (None when it runs), from virDomainGetState."""
    state, reason = dom.state()
    if state in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_BLOCKED):
        return None
    if state == libvirt.VIR_DOMAIN_SHUTOFF:
        return f"{_SHUTOFF.get(reason, 'shut off')}; libvirt: shut off"
    if state == libvirt.VIR_DOMAIN_CRASHED:
        return "crashed (guest kernel panic); libvirt: crashed"
    if state == libvirt.VIR_DOMAIN_PAUSED:
        return None  # still there, memory and all (KSM goes on merging it)
    return f"not running (libvirt state {state}, reason {reason})"


_CLOSE = {
    libvirt.VIR_CONNECT_CLOSE_REASON_ERROR: "connection error",
    libvirt.VIR_CONNECT_CLOSE_REASON_EOF: "libvirtd closed the connection",
    libvirt.VIR_CONNECT_CLOSE_REASON_KEEPALIVE: "libvirtd stopped answering (keepalive)",
}


class LifecycleEvents:
    """Lifecycle and close callbacks on one connection, for a set of domain names.

    ``on_stop(name, reason)`` when one of ``names`` stops or crashes; ``on_close(reason)``
    when the connection closes (not when we close it). Both run in the event loop thread.
    ``stop()`` deregisters (also on a connection that is already dead)."""

    def __init__(
        self,
        conn: libvirt.virConnect,
        names: Callable[[], set[str]],
        on_stop: Callable[[str, str], None],
        on_close: Callable[[str], None],
    ) -> None:
        self.conn = conn
        self.names = names
        self.on_stop = on_stop
        self.on_close = on_close
        self._closing = False
        self._cb_id: int | None = conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._lifecycle, None
        )
        try:
            conn.registerCloseCallback(self._closed, None)
            self._close_cb = True
        except libvirt.libvirtError:  # drivers without it (the test driver): no close events
            self._close_cb = False

    def _lifecycle(self, _conn: Any, dom: Any, event: int, detail: int, _opaque: Any) -> None:
        if self._closing:
            return
        reason = stop_reason(event, detail)
        if reason is None:
            return
        name = dom.name()
        if name in self.names():
            self.on_stop(name, reason)

    def _closed(self, _conn: Any, reason: int, _opaque: Any) -> None:
        if self._closing or reason == libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT:
            return
        self.on_close(_CLOSE.get(reason, f"closed (reason {reason})"))

    def stop(self) -> None:
        self._closing = True
        if self._cb_id is not None:
            try:
                self.conn.domainEventDeregisterAny(self._cb_id)
            except libvirt.libvirtError:
                pass
            self._cb_id = None
        if self._close_cb:
            try:
                self.conn.unregisterCloseCallback()
            except libvirt.libvirtError:
                pass
            self._close_cb = False

"""Opening a libvirt connection: which URI, and one-line errors instead of tracebacks."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import libvirt

from kvmksm.errors import UserError

DEFAULT_URI = "qemu:///system"
# How long a run waits for libvirtd to come back (a restart takes a few seconds).
RECONNECT_TIMEOUT = 60.0


def _silence(_ctx: object, _err: object) -> None:
    # libvirt prints every error to stderr by default; kvmksm reports them itself.
    return None


libvirt.registerErrorHandler(_silence, None)


def resolve_uri(cli: str | None = None, scenario: str | None = None) -> str:
    """The URI to open: -c/--connect, then LIBVIRT_DEFAULT_URI (as virsh), then the
    scenario's `connect`, then qemu:///system."""
    return cli or os.environ.get("LIBVIRT_DEFAULT_URI") or scenario or DEFAULT_URI


def open_connection(uri: str, read_only: bool = False) -> libvirt.virConnect:
    """A connection, or a UserError that says how to get one. ``read_only``
    (virConnectOpenReadOnly): libvirt itself refuses every change through it, for commands
    that only look (doctor, watch)."""
    try:
        return libvirt.openReadOnly(uri) if read_only else libvirt.open(uri)
    except libvirt.libvirtError as e:
        hint = ""
        if uri.startswith("qemu") and "socket" in str(e).lower():
            hint = " (is libvirtd running? scripts/setup.sh starts it)"
        raise UserError(
            f"cannot connect to libvirt at {uri}: {e.get_error_message()}{hint}"
        ) from None


def alive(conn: libvirt.virConnect | None) -> bool:
    """True when the connection still reaches libvirtd (one cheap call: a closed socket is
    only noticed on use where no event loop watches it)."""
    if conn is None:
        return False
    try:
        conn.getLibVersion()
    except libvirt.libvirtError:
        return False
    return True


def reconnect(
    uri: str,
    timeout: float = RECONNECT_TIMEOUT,
    poll: float = 1.0,
    stop: Callable[[], bool] = lambda: False,
    sleep: Callable[[float], None] = time.sleep,
) -> libvirt.virConnect | None:
    """A new read-write connection to ``uri``, trying every ``poll`` seconds for up to
    ``timeout`` seconds (libvirtd being restarted); None when it did not come back in time or
    ``stop()`` said to give up."""
    end = time.monotonic() + timeout
    while True:
        try:
            return libvirt.open(uri)
        except libvirt.libvirtError:
            pass
        if stop() or time.monotonic() + poll > end:
            return None
        sleep(poll)


def open_read_only(uri: str) -> libvirt.virConnect:
    """A read-only connection (see open_connection)."""
    return open_connection(uri, read_only=True)


def is_local(conn: libvirt.virConnect) -> bool:
    """True when the hypervisor runs on this host, so its files (console logs, /proc) are ours
    to read."""
    uri = conn.getURI()
    scheme = uri.split(":", 1)[0]
    return "+" not in scheme or scheme.endswith("+unix")


def versions(conn: libvirt.virConnect) -> dict[str, Any]:
    """libvirt and hypervisor versions for the run record's host facts."""

    def dotted(n: int) -> str:
        return f"{n // 1_000_000}.{n // 1000 % 1000}.{n % 1000}"

    out: dict[str, Any] = {"libvirt_uri": conn.getURI(), "libvirt": dotted(conn.getLibVersion())}
    try:
        out[conn.getType().lower()] = dotted(conn.getVersion())
    except libvirt.libvirtError:
        pass
    out["libvirt_node_memory"] = node_memory(conn)
    return out


def node_memory(conn: libvirt.virConnect) -> dict[str, Any]:
    """libvirt's own view of KSM, as `virsh node-memory-tune` shows it: the shm_* values
    (pages_to_scan, sleep_millisecs, pages_shared, ..., merge_across_nodes) read through the
    daemon. {"error": why} when the driver has none (the test driver, a remote host that
    refuses)."""
    try:
        return dict(conn.getMemoryParameters(0))
    except libvirt.libvirtError as e:
        return {"error": e.get_error_message()}


def error_code(e: libvirt.libvirtError) -> int:
    return e.get_error_code() or 0

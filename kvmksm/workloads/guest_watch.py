"""A bench's guests while it runs: one that stops, and libvirtd going away and coming back.

A run's guests are its scenario: when one stops (crashed, shut down from inside, destroyed,
its QEMU process killed) the figures after that describe fewer guests than the scenario says.
GuestWatch hears it from libvirt's lifecycle events and from the sampler's per-guest probe
(the QEMU process gone), whichever comes first; it records a ``guest_lost`` event (guest,
time, reason) and halts the run, which then fails with one line::

    guest kvmksm-0a1b2c3d-tiny-02 was lost at t=41.3s: crashed (its QEMU process ended
    unexpectedly; libvirt: stopped, failed)

libvirtd restarting closes the run's connection while the guests go on running. The watch
records ``libvirt_lost`` and, at the run's next wait, reconnects (up to 60 s), records
``libvirt_reconnected``, asks libvirt about every guest (one may have stopped while nobody
listened) and lets the run go on; if libvirtd does not come back the run fails with that
reason, and teardown reconnects once more before it removes the guests.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import libvirt

from kvmksm.errors import WorkloadFailed
from kvmksm.results.events import Kind
from kvmksm.virt.conn import RECONNECT_TIMEOUT, alive, reconnect
from kvmksm.virt.lifecycle import LifecycleEvents, state_reason
from kvmksm.workloads.base import RunContext

# Seconds the sampler's finding waits for libvirt to say why the process went (libvirtd was
# seen to take 1.9 s to report a QEMU killed with SIGKILL on a busy 2-CPU host).
CONFIRM = 3.0


class GuestLost(WorkloadFailed):
    """A guest of the run stopped while it ran: its figures no longer describe the scenario."""

    def __init__(self, domain: str, t: float, reason: str) -> None:
        self.domain, self.t, self.reason = domain, t, reason
        super().__init__(f"guest {domain} was lost at t={t:.1f}s: {reason}")


class LibvirtGone(WorkloadFailed):
    """libvirtd went away and did not come back in time."""


class GuestWatch:
    """Lifecycle events of the run's guests on its connection, plus the probe's hook.

    ``on_reconnect(conn)`` is called in the main thread with the new connection, so the
    workload and its clones use it from then on."""

    def __init__(
        self,
        ctx: RunContext,
        uri: str,
        conn: libvirt.virConnect,
        on_reconnect: Callable[[libvirt.virConnect], None],
        timeout: float = RECONNECT_TIMEOUT,
        poll: float = 1.0,
    ) -> None:
        self.ctx = ctx
        self.uri = uri
        self.conn = conn
        self.on_reconnect = on_reconnect
        self.timeout = timeout
        self.poll = poll
        self.names: set[str] = set()
        self.lost: dict[str, str] = {}
        self.disconnected: tuple[float, str] | None = None  # (t, why) while libvirtd is away
        self._lock = threading.Lock()
        self._pending: list[threading.Thread] = []  # losses waiting for libvirt's reason
        self._found: dict[str, float] = {}  # when the sampler found a guest's process gone
        self._closed = False
        self._events = self._listen(conn)

    def _listen(self, conn: libvirt.virConnect) -> LifecycleEvents:
        return LifecycleEvents(conn, lambda: self.names, self._stopped, self._conn_closed)

    def follow(self, names: list[str]) -> None:
        """Watch these guests (before they are started, so no stop goes unheard)."""
        self.names |= set(names)

    # -- what tells us (event loop thread, sampler thread) ---------------------------------
    def _stopped(self, name: str, reason: str) -> None:
        self.guest_lost(name, reason, "libvirt event")

    def process_gone(self, name: str, pid: int) -> None:
        """The sampler's probe found the guest's QEMU process gone. libvirt, which tells why,
        says so too, a second or two later: wait for its word up to CONFIRM seconds (in a
        thread of its own: the sampler's tick must not wait). The loss is dated when the
        sampler found it."""
        if name in self.names and name not in self.lost:
            t = self.ctx.record.now()
            self._found.setdefault(name, t)
            thread = threading.Thread(
                target=self._confirm, args=(name, pid, t), name="kvmksm-guest-lost", daemon=True
            )
            with self._lock:
                self._pending.append(thread)
            thread.start()

    def _confirm(self, name: str, pid: int, t: float) -> None:
        deadline = time.monotonic() + CONFIRM
        while time.monotonic() < deadline and not self._closed:
            if name in self.lost or self.disconnected:
                break  # libvirt's event said it; or there is no libvirtd to ask
            why = _why_not_running(self.conn, name)
            if why:
                self.guest_lost(name, why, "sampler, reason from libvirt", t)
                return
            time.sleep(0.1)
        self.guest_lost(name, f"its QEMU process (pid {pid}) exited", "sampler", t)

    def guest_lost(self, name: str, reason: str, noticed_by: str, t: float | None = None) -> None:
        """Record the loss (once a guest) and halt the run; ``t`` is when it was noticed.
        All of it under the lock, and ``lost`` filled last: a confirming thread that sees the
        guest lost (and so ends, letting the main thread's join return) finds the run halted."""
        with self._lock:
            if self._closed or name not in self.names or name in self.lost:
                return
            t = self.ctx.record.now() if t is None else t
            found = self._found.get(name)
            if found is not None and found < t:  # the sampler saw it first, libvirt said why
                t, noticed_by = found, f"sampler, reason from {noticed_by}"
            # Dated when it was noticed (`time` says when it was recorded).
            self.ctx.record.event(
                Kind.GUEST_LOST, f"{name}: {reason}", t=t, domain=name, reason=reason, by=noticed_by
            )
            self.ctx.halt(GuestLost(name, t, reason))
            self.lost[name] = reason

    def _conn_closed(self, why: str) -> None:
        with self._lock:
            if self._closed or self.disconnected is not None:
                return
            self.disconnected = (self.ctx.record.now(), why)
        self.ctx.record.event(
            Kind.LIBVIRT_LOST,
            f"{self.uri}: {why}; reconnecting (up to {self.timeout:g}s)",
            reason=why,
        )

    # -- the main thread ------------------------------------------------------------------
    def attend(self) -> None:
        """At each wait of the run: raise why it must stop; reconnect if libvirtd went away.
        A guest found gone stops the run here at once, while libvirt is asked why."""
        self._settle()
        self.ctx.check_halt()
        if self.disconnected is None:
            return
        self._reconnect()

    def connection_lost(self) -> bool:
        """libvirtd went away (an event said so, or the connection no longer answers)."""
        if self.disconnected is None and not alive(self.conn):
            self._conn_closed("the connection no longer answers")
        return self.disconnected is not None

    def lost_libvirt_error(self, during: str) -> LibvirtGone:
        t, why = self.disconnected or (self.ctx.record.now(), "gone")
        return LibvirtGone(f"libvirtd at {self.uri} went away {during} (t={t:.1f}s: {why})")

    def _reconnect(self) -> None:
        assert self.disconnected is not None
        t_lost, why = self.disconnected
        self._events.stop()
        t0 = time.monotonic()
        new = reconnect(self.uri, self.timeout, self.poll, stop=lambda: self.ctx.halted is not None)
        self.ctx.check_halt()  # a guest lost meanwhile ends the run anyway
        if new is None:
            raise LibvirtGone(
                f"libvirtd at {self.uri} went away at t={t_lost:.1f}s ({why}) and did not come "
                f"back within {self.timeout:g}s"
            )
        old, self.conn = self.conn, new
        try:
            old.close()
        except libvirt.libvirtError:
            pass
        self._events = self._listen(new)
        with self._lock:
            self.disconnected = None
        secs = round(time.monotonic() - t0, 3)
        self.ctx.record.event(Kind.LIBVIRT_RECONNECTED, f"{self.uri} after {secs:g}s", seconds=secs)
        self.on_reconnect(new)
        # A guest may have stopped while no one listened: ask libvirt how each one is.
        for name in sorted(self.names):
            why_off = _why_not_running(new, name)
            if why_off:
                self.guest_lost(name, why_off, "libvirt state after reconnecting")
        self.ctx.check_halt()

    def _settle(self) -> None:
        """Wait for the losses found meanwhile to be recorded (CONFIRM seconds at most)."""
        with self._lock:
            pending, self._pending = self._pending, []
        for thread in pending:
            thread.join(CONFIRM + 1.0)

    def close(self) -> None:
        """Stop listening (before teardown destroys the guests: that is no loss)."""
        self._settle()
        with self._lock:
            self._closed = True
        self._events.stop()


def _why_not_running(conn: libvirt.virConnect, name: str) -> str | None:
    try:
        return state_reason(conn.lookupByName(name))
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return "gone from libvirt (undefined)"
        return None  # cannot tell: the probe still watches its process


def wait(ctx: RunContext, watch: GuestWatch | None, seconds: float, step: float = 0.5) -> None:
    """Sleep ``seconds``, attending to the watch at least every ``step`` seconds."""
    end = time.monotonic() + seconds
    while True:
        if watch is not None:
            watch.attend()
        else:
            ctx.check_halt()
        left = end - time.monotonic()
        if left <= 0:
            return
        ctx.sleep(min(left, step))

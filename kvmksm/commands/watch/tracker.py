"""Keeping a watch's guest list up to date: re-listed in a background thread, so a slow
libvirtd never delays a sample; guests that start or stop become events."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from kvmksm.commands.watch.guests import GuestInfo, GuestLister
from kvmksm.host.state import bench_holder
from kvmksm.results.events import Kind
from kvmksm.results.record import RunRecord


# -- keeping the guest list up to date -----------------------------------------------------------
class GuestTracker:
    """Re-lists guests every ``relist`` seconds in a thread; the sampler's probe reads
    ``pids()`` (a dict swapped whole, never blocked by libvirt)."""

    def __init__(
        self,
        lister: GuestLister,
        record: RunRecord,
        relist: float,
        say: Callable[[str], None],
        lock_dir: Path | None = None,
    ) -> None:
        self.lister = lister
        self.record = record
        self.relist = relist
        self.say = say
        self.lock_dir = lock_dir
        self.current: dict[str, GuestInfo] = {}
        self.seen: dict[str, dict[str, Any]] = {}  # run.json "guests": every guest ever seen
        self.bench: str | None = None
        self._failing = False
        self._first = True
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def pids(self) -> dict[str, int]:
        cur = self.current
        return {n: g.pid for n, g in cur.items() if g.pid is not None}

    def refresh(self) -> None:
        try:
            new = self.lister.list()
        except Exception as e:  # keep the last list; sampling goes on
            if not self._failing:
                self._failing = True
                self.record.event(Kind.GUEST_LIST_FAILED, f"{self.lister.source}: {e}")
                self.say(f"cannot list guests ({e}); keeping the last list and retrying")
            return
        if self._failing:
            self._failing = False
            self.record.event(Kind.GUEST_LIST_OK, f"{self.lister.source} answers again")
            self.say("guest listing works again")
        old, self.current = self.current, new
        changed = False
        for name in sorted(set(old) - set(new)):
            changed = True
            self._gone(old[name])
        for name in sorted(new):
            g, before = new[name], old.get(name)
            if before is None:
                changed = True
                self._appeared(g)
            elif before.pid != g.pid:
                changed = True
                if before.pid is not None:
                    self._gone(before)  # restarted: a new QEMU process
                self._appeared(g)
        if changed:
            self.record.update(guests=[dict(v) for v in self.seen.values()])
        self._first = False

    def _appeared(self, g: GuestInfo) -> None:
        t = self.record.now()
        entry = self.seen.setdefault(g.name, {**asdict(g), "first_seen_t": t})
        entry.update({k: v for k, v in asdict(g).items() if v is not None}, last_seen_t=None)
        where = f"pid {g.pid}" if g.pid is not None else "no QEMU process found: no per-VM rows"
        detail = f"{g.name} ({where}){' running when the watch started' if self._first else ''}"
        self.record.event(Kind.GUEST_APPEARED, detail, domain=g.name, pid=g.pid)
        self.say(f"guest appeared: {detail}")

    def _gone(self, g: GuestInfo) -> None:
        if g.name in self.seen:
            self.seen[g.name]["last_seen_t"] = self.record.now()
        self.record.event(Kind.GUEST_GONE, f"{g.name} (pid {g.pid})", domain=g.name, pid=g.pid)
        self.say(f"guest gone: {g.name}")

    def check_bench(self) -> None:
        holder = bench_holder(self.lock_dir)
        if holder == self.bench:
            return
        if holder is not None:
            msg = f"a kvmksm bench is running ({holder}): the figures include its workload"
            self.record.event(Kind.BENCH_RUNNING, msg, holder=holder)
        else:
            msg = "the kvmksm bench run has ended"
            self.record.event(Kind.BENCH_ENDED, msg)
        self.bench = holder
        self.say(msg)

    def _loop(self) -> None:
        while not self._stop.wait(self.relist):
            self.refresh()
            self.check_bench()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="kvmksm-guests", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)  # a hung libvirtd must not keep the record open
            self._thread = None

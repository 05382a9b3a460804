"""The clones of one run: create (with rollback), start, wait until up, find pids, tear down.

This is what the ``vms`` workload drives::

    clones = Clones(conn, workload, record="20250101T120000Z-host", recorder=active_run)
    clones.check()          # read only: base shut off, pool usable, boot method possible
    try:
        clones.create()     # define + storage for every clone; on failure undoes all of it
        clones.start()
        clones.wait_up()    # BootError (a WorkloadFailed) with the console tail
        pids = clones.pids()
        ...
    finally:
        problems = clones.teardown()   # never raises; idempotent
"""

from __future__ import annotations

import re
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import libvirt

from kvmksm.errors import UserError, WorkloadFailed
from kvmksm.host import paths
from kvmksm.host.fs import HostFS
from kvmksm.host.qemu import PidNotFound, find_qemu_pid
from kvmksm.results.events import Kind
from kvmksm.scenario.model import VmsWorkload
from kvmksm.virt.boot import BootError, Pending, console_tail, wait_up
from kvmksm.virt.cleanup import find_leftovers, remove_clone, remove_leftovers
from kvmksm.virt.conn import RECONNECT_TIMEOUT, alive, is_local, reconnect
from kvmksm.virt.domains import (
    Base,
    CloneDisk,
    ClonePlan,
    clone_xml,
    interface_count,
    load_base,
    macs_in_use,
    new_macs,
    new_uuid,
)
from kvmksm.virt.volumes import (
    OWNED_POOL,
    Pool,
    create_copy,
    create_overlay,
    ensure_pool,
    volume_name,
)


def _volume_exists(pool: libvirt.virStoragePool, name: str) -> bool:
    try:
        pool.storageVolLookupByName(name)
    except libvirt.libvirtError:
        return False
    return True


class Recorder(Protocol):
    """Where created objects are noted as they appear (kvmksm.host.state.ActiveRun fits)."""

    def created(self, kind: str, **ident: Any) -> None: ...
    def removed(self, kind: str, **ident: Any) -> None: ...


class _NoRecorder:
    def created(self, kind: str, **ident: Any) -> None:
        pass

    def removed(self, kind: str, **ident: Any) -> None:
        pass


def new_run_id() -> str:
    """8 hex digits: short enough for readable names, and the shape cleanup matches on."""
    return secrets.token_hex(4)


@dataclass
class Guest:
    name: str
    uuid: str
    index: int
    macs: list[str]
    volumes: list[tuple[str, str]]  # (pool, volume) created so far
    console: str | None
    started: float | None = None  # monotonic
    boot_seconds: float | None = None
    pid: int | None = None
    defined: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "uuid": self.uuid,
            "macs": self.macs,
            "volumes": [f"{p}/{v}" for p, v in self.volumes],
            "pid": self.pid,
            "boot_seconds": self.boot_seconds,
        }


@dataclass
class Clones:
    """N clones of one base for one run. Every object it makes is tagged with ``run``."""

    conn: libvirt.virConnect
    spec: VmsWorkload
    record: str = ""  # run record id, stored in each clone's tag
    run: str = field(default_factory=new_run_id)
    recorder: Recorder = field(default_factory=_NoRecorder)
    log: Callable[[Kind, str], None] = lambda kind, detail: None  # run events
    guests: list[Guest] = field(default_factory=list)
    base: Base | None = None
    pool: Pool | None = None
    # Volume names this run's clones tried and failed to create: if they exist, they are not ours.
    foreign: set[tuple[str, str]] = field(default_factory=set)
    # How long teardown waits for libvirtd to come back when the connection has died.
    reconnect_timeout: float = RECONNECT_TIMEOUT

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[0-9a-f]{8}", self.run):
            raise ValueError(f"run id must be 8 hex digits, got {self.run!r}")
        self.uri: str = self.conn.getURI()  # to reconnect to, should libvirtd restart

    # -- read-only checks -------------------------------------------------------------
    def check(self) -> Base:
        """Everything that can be known before creating anything; raises UserError."""
        s = self.spec
        self.base = load_base(self.conn, s.base)
        if s.boot.method == "console" and not is_local(self.conn):
            raise UserError(
                "boot.method console reads the guests' console logs, which needs libvirt on "
                "this host; use boot.method agent or delay with a remote URI"
            )
        if s.boot.method == "agent" and "org.qemu.guest_agent.0" not in self.base.xml:
            raise UserError("boot.method agent needs a guest agent channel in the base domain")
        if s.guest_fill and "<kernel>" not in self.base.xml:
            raise UserError(
                "guest_fill needs a direct-kernel-boot base (<kernel>, <cmdline>), as the tiny "
                "image built by 'kvmksm image build' is"
            )
        try:
            active = self.conn.storagePoolLookupByName(s.pool).isActive()
        except libvirt.libvirtError:
            if s.pool not in ("default", OWNED_POOL):
                raise UserError(
                    f"storage pool {s.pool!r} not found at {self.conn.getURI()}"
                ) from None
            active = True  # create() makes kvmksm's own pool
        if not active:
            raise UserError(f"storage pool {s.pool!r} is not active (virsh pool-start {s.pool})")
        return self.base

    # -- creation ---------------------------------------------------------------------
    def create(self) -> list[Guest]:
        """Define every clone, then make its disks; on any failure remove all this run's clones
        made and re-raise. Each domain is defined before its storage (as virt-manager's
        cloner does), so a bad XML fails before any disk work."""
        if self.base is None:
            self.check()
        assert self.base is not None
        try:
            self.pool = ensure_pool(self.conn, self.spec.pool)
            if self.pool.created:
                # Kept for later runs (not a leftover), so only the run's events say so.
                self.log(Kind.POOL_CREATED, f"{self.pool.name} at {self.pool.path}")
            paths.console_dir().mkdir(parents=True, exist_ok=True)
            taken = macs_in_use(self.conn)
            for i in range(1, self.spec.clones + 1):
                self._create_one(i, taken)
        except BaseException:
            self.teardown()
            raise
        return self.guests

    def plan(self, index: int, taken: set[str]) -> ClonePlan:
        assert self.base is not None and self.pool is not None
        s = self.spec
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", self.base.name.removeprefix("kvmksm-"))
        name = f"kvmksm-{self.run}-{stem}-{index:02d}"
        disks = []
        for d in self.base.disks:
            fmt = "qcow2" if s.disk == "overlay" else d.format
            vol = volume_name(name, d.target, fmt)
            disks.append(CloneDisk(d.target, self.pool.name, vol, f"{self.pool.path}/{vol}", fmt))
        extra = ""
        if s.guest_fill:
            extra = f"kvmksm.fill={s.guest_fill.size} kvmksm.byte={s.guest_fill.byte}"
        return ClonePlan(
            name=name,
            uuid=new_uuid(),
            run=self.run,
            index=index,
            base=self.base.name,
            domain_type=s.domain_type,
            disks=disks,
            macs=new_macs(interface_count(self.base.xml), taken),
            console=str(paths.console_dir() / f"{name}.log"),
            memory=s.memory,
            cmdline_extra=extra,
            record=self.record,
        )

    def _create_one(self, index: int, taken: set[str]) -> Guest:
        assert self.base is not None and self.pool is not None
        plan = self.plan(index, taken)
        xml = clone_xml(self.base.xml, plan)
        for d in plan.disks:
            if _volume_exists(self.pool.pool, d.volume):
                self.foreign.add((d.pool, d.volume))
                raise UserError(f"volume {d.pool}/{d.volume} already exists")
        g = Guest(plan.name, plan.uuid, index, plan.macs, [], plan.console)
        self.guests.append(g)
        try:
            self.conn.defineXML(xml)
        except libvirt.libvirtError as e:
            raise UserError(f"cannot define clone {plan.name}: {e.get_error_message()}") from None
        g.defined = True
        self.recorder.created("domain", name=plan.name, uuid=plan.uuid, run=self.run)
        for base_disk, d in zip(self.base.disks, plan.disks, strict=True):
            try:
                if self.spec.disk == "overlay":
                    vol = create_overlay(self.pool.pool, d.volume, base_disk)
                else:
                    vol = create_copy(self.conn, self.pool.pool, d.volume, base_disk)
            except libvirt.libvirtError as e:
                self.foreign.add((d.pool, d.volume))
                raise UserError(
                    f"cannot create volume {d.pool}/{d.volume} for {plan.name}: "
                    f"{e.get_error_message()}"
                ) from None
            g.volumes.append((d.pool, d.volume))
            self.recorder.created("volume", pool=d.pool, name=d.volume)
            if vol.path() != d.path:
                # Not a plain dir pool layout: point the defined domain at the real path.
                d.path = vol.path()
                self.conn.defineXML(clone_xml(self.base.xml, plan))
        self.log(Kind.GUEST_DEFINED, f"{plan.name} ({self.spec.disk} of {self.base.name})")
        return g

    # -- running ----------------------------------------------------------------------
    def start(self) -> None:
        """Start every clone (one after another; starting returns before the guest boots)."""
        for g in self.guests:
            dom = self.conn.lookupByName(g.name)
            try:
                dom.create()
            except libvirt.libvirtError as e:
                raise BootError(
                    g.name, f"could not start: {e.get_error_message()}", console_tail(g.console)
                ) from None
            g.started = time.monotonic()
            self.log(Kind.GUEST_STARTED, g.name)

    def wait_up(self) -> dict[str, float]:
        """Block until every guest is up (scenario's boot method); {name: boot seconds}.
        Raises BootError (a WorkloadFailed) naming the guest, the reason and its console tail."""
        pend = [
            Pending(self.conn.lookupByName(g.name), g.console, g.started or time.monotonic())
            for g in self.guests
        ]

        def up(name: str, secs: float) -> None:
            self.log(Kind.GUEST_UP, f"{name} after {secs:.1f}s")

        times = wait_up(pend, self.spec.boot, on_up=up)
        for g in self.guests:
            g.boot_seconds = times.get(g.name)
        return times

    def pids(self, fs: HostFS | None = None) -> dict[str, int]:
        """{guest name: QEMU pid}, each verified against the process's command line."""
        out = {}
        for g in self.guests:
            try:
                g.pid = find_qemu_pid(g.name, fs)
            except PidNotFound as e:
                raise WorkloadFailed(str(e)) from None
            out[g.name] = g.pid
        return out

    def save_consoles(self, dest: Path) -> list[Path]:
        """Copy the console logs (e.g. into the run record) before teardown deletes them."""
        dest.mkdir(parents=True, exist_ok=True)
        saved = []
        for g in self.guests:
            if g.console and Path(g.console).exists():
                saved.append(Path(shutil.copy(g.console, dest / f"{g.name}.log")))
        return saved

    # -- teardown ---------------------------------------------------------------------
    def teardown(self) -> list[str]:
        """Destroy, strip and undefine every clone of this run, delete volumes and console
        logs. Idempotent, never raises; returns what could not be removed.

        A connection that died (libvirtd restarted) is opened again first, waiting up to
        ``reconnect_timeout`` seconds: the guests run on without libvirtd and must still go."""
        problems: list[str] = []
        if not alive(self.conn):
            new = reconnect(self.uri, self.reconnect_timeout)
            if new is None:
                left = [g.name for g in self.guests if g.defined or g.volumes]
                return [
                    f"libvirtd at {self.uri} did not answer within {self.reconnect_timeout:g}s: "
                    f"{', '.join(left) or 'nothing'} left with their volumes; run `kvmksm "
                    "clean` once it is back"
                ]
            self.log(Kind.LIBVIRT_RECONNECTED, f"{self.uri} for teardown")
            try:
                self.conn.close()
            except libvirt.libvirtError:
                pass
            self.conn = new
        for g in reversed(self.guests):
            p = remove_clone(self.conn, g.name, list(g.volumes), g.console, tag_volumes=False)
            problems += p
            if not p:
                for pool, vol in g.volumes:
                    self.recorder.removed("volume", pool=pool, name=vol)
                if g.defined:
                    self.recorder.removed("domain", name=g.name, uuid=g.uuid, run=self.run)
                    self.log(Kind.GUEST_REMOVED, g.name)
        try:  # anything of this run the list above missed (e.g. a kill mid-create)
            left = find_leftovers(self.conn, self.run)
            left.volumes = [v for v in left.volumes if v not in self.foreign]
            problems += remove_leftovers(self.conn, left)
        except Exception as e:  # noqa: BLE001 - teardown never raises
            problems.append(f"looking for leftovers of run {self.run}: {e}")
        return problems

    def describe(self) -> dict[str, Any]:
        """What the run record keeps about the guests."""
        return {
            "uri": self.conn.getURI(),
            "run": self.run,
            "base": self.base.name if self.base else None,
            "pool": self.pool.name if self.pool else None,
            "pool_created": bool(self.pool and self.pool.created),
            "disk": self.spec.disk,
            "domain_type": self.spec.domain_type,
            "guests": [g.as_dict() for g in self.guests],
        }

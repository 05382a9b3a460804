"""The vms workload: clones of a base VM, started with ksmd off; then KSM on until the merge
curve is steady; optionally unmerge; everything torn down. Each phase is an event.

Imported only for VM scenarios: libvirt-python is an optional extra (kvmksm[vms])."""

from __future__ import annotations

import os
import time
import xml.etree.ElementTree as ET
from typing import Any

from kvmksm.analysis.steady import SteadyDetector
from kvmksm.errors import UserError
from kvmksm.host.fs import HostFS
from kvmksm.host.ksm import Ksm
from kvmksm.host.process import MergedPages, ProcessGone, read_process
from kvmksm.results.events import Kind
from kvmksm.sampling.guest_rows import VmProbe
from kvmksm.sampling.sampler import Probe
from kvmksm.scenario.model import VmsWorkload
from kvmksm.units import format_size
from kvmksm.virt.boot import BootError
from kvmksm.virt.clones import Clones
from kvmksm.virt.conn import is_local, open_connection, resolve_uri, versions
from kvmksm.virt.guest_memory import base_problem
from kvmksm.virt.lifecycle import ensure_event_loop
from kvmksm.virt.tiny_image import outdated
from kvmksm.workloads import sharing
from kvmksm.workloads.base import RunContext, Workload, require_counters, require_fits
from kvmksm.workloads.guest_watch import GuestWatch, wait
from kvmksm.workloads.guest_work import GuestWork, require_agent

POLL = 0.05  # seconds between steady-state readings (a reading is three sysfs reads)


def _memory_of(xml: str) -> int:
    """Bytes of <memory> in a domain XML."""
    el = ET.fromstring(xml).find("memory")
    if el is None or not el.text:
        return 0
    scale = {
        "b": 1,
        "bytes": 1,
        "kib": 1024,
        "k": 1024,
        "mib": 1 << 20,
        "m": 1 << 20,
        "gib": 1 << 30,
        "g": 1 << 30,
    }
    return int(el.text) * scale.get(el.get("unit", "KiB").lower(), 1024)


class VmsRun(Workload):
    def __init__(self, spec: VmsWorkload, connect: str | None = None) -> None:
        self.spec = spec
        self.connect = connect
        self.conn: Any = None
        self.clones: Clones | None = None
        self.pids: dict[str, int] = {}
        self.fs: HostFS | None = None
        self.watch: GuestWatch | None = None
        self.work: GuestWork | None = None  # guest_run, churn, probe (through the agents)

    # -- before anything is created -------------------------------------------------------
    def preflight(self, fs: HostFS, ksm: Ksm) -> None:
        self.fs = fs
        require_counters(fs, ksm, self.spec.expect, "workload.expect")
        self.uri = resolve_uri(self.connect, self.spec.connect)
        # Before the connection is opened: libvirt ties a connection to the event loop
        # there is when it opens (guests stopping, libvirtd going away are events).
        ensure_event_loop()
        self.conn = open_connection(self.uri)
        try:
            self._check_base(Clones(self.conn, self.spec), fs)
        except BaseException:
            self.conn.close()
            self.conn = None
            raise

    def _check_base(self, clones: Clones, fs: HostFS) -> None:
        try:
            base = clones.check()  # base exists and is shut off, pool usable, boot possible
        except UserError as e:
            name = getattr(self.spec.base, "domain", None)
            if name and "not found" in str(e) and name.startswith("kvmksm-"):
                kind = "debian" if name.startswith("kvmksm-debian") else "tiny"
                cmd = "kvmksm image build" + (" debian" if kind == "debian" else "")
                raise UserError(
                    f"base domain '{name}' not found at {self.uri}: build the {kind} base image "
                    f"first with: {cmd} --name {name}"
                ) from None
            if name and "not found" in str(e):
                raise UserError(
                    f"base domain '{name}' not found at {self.uri}: define your guest there "
                    f"and shut it off (virsh -c {self.uri} define ...), or run the "
                    "self-contained scenario instead: kvmksm bench scenarios/tiny3.yaml"
                ) from None
            raise
        require_agent(self.spec, base.xml)
        stale = outdated(base.xml)
        if stale:
            raise UserError(
                f"base domain {base.name!r}: {stale}; rebuild it with: kvmksm image build "
                f"--name {base.name}"
            )
        memory = self.spec.memory or _memory_of(base.xml)
        if is_local(self.conn):  # the base's kernel and initrd are files on this host
            fill = self.spec.guest_fill.size if self.spec.guest_fill else 0
            problem = base_problem(base.xml, memory, fill)
            if problem:
                raise UserError(f"workload: clones of {base.name}: {problem}")
        require_fits(fs, self.spec.clones, memory, "clones")

    def probes(self) -> list[Probe]:
        assert self.fs is not None
        return [VmProbe(self.fs, lambda: dict(self.pids), on_gone=self._process_gone)]

    def _process_gone(self, name: str, pid: int) -> None:
        if self.watch is not None:
            self.watch.process_gone(name, pid)

    def _use(self, conn: Any) -> None:
        """A new connection after libvirtd came back: the clones use it from now on."""
        self.conn = conn
        if self.clones is not None:
            self.clones.conn = conn

    # -- the timeline ---------------------------------------------------------------------
    def run(self, ctx: RunContext) -> None:
        spec = self.spec
        ctx.record.data["host"].update(versions(self.conn))
        ctx.record.save()

        self.clones = clones = Clones(
            self.conn, spec, record=ctx.record.dir.name, recorder=ctx.active, log=ctx.record.event
        )
        self.watch = watch = GuestWatch(ctx, self.uri, self.conn, self._use)
        ctx.record.event(
            Kind.WORKLOAD_START,
            f"{spec.clones} clones ({spec.disk}) of {clones.check().name}, type {spec.domain_type}",
        )
        with ctx.phase(f"creating {spec.clones} clones"):
            clones.create()
        watch.follow([g.name for g in clones.guests])
        with ctx.phase(f"starting {spec.clones} guests"):
            clones.start()
        with ctx.phase(f"waiting for {spec.clones} guests to come up ({spec.boot.method})"):
            try:
                times = clones.wait_up()
            except BootError:
                # A guest cannot be asked whether it is up while libvirtd is away: say that.
                if watch.connection_lost():
                    raise watch.lost_libvirt_error("while the guests were booting") from None
                raise
        ctx.record.event(Kind.ALL_UP, f"slowest boot {max(times.values()):.1f}s")
        watch.attend()
        self.pids = clones.pids(ctx.fs)
        ctx.record.update(guests=[self._guest_info(g) for g in clones.guests])
        self.work = GuestWork.of(self.conn, [g.name for g in clones.guests], spec)
        if self.work:
            self.work.before_ksm(ctx)
        with ctx.phase(f"settling for {spec.settle:g}s"):
            wait(ctx, watch, spec.settle)
        ctx.record.event(Kind.SETTLE_DONE, f"{spec.settle:g}s")
        if self.work:
            self.work.probe(ctx, "off", ksm="off")

        ctx.ksm.write("run", 1)
        ctx.record.event(Kind.KSM_ON, "run=1")
        self._until_steady(ctx)
        if spec.plateau > 0:
            # Savings and ksmd's cost at rest are measured over this stretch of the curve.
            with ctx.phase(f"holding the plateau for {spec.plateau:g}s"):
                wait(ctx, watch, spec.plateau)
        # Ends the plateau window (also with plateau: 0), so what follows stays out of it.
        ctx.record.event(Kind.PLATEAU_DONE, f"{spec.plateau:g}s after steady")
        if self.work:  # after the plateau window: the probe's writes stay out of it
            self.work.probe(ctx, "on", ksm="on")
            self.work.finish(ctx)
        # Who shares with whom, and how much more could merge: after the plateau window.
        sharing.measure(ctx, self.pids, spec.sharing)
        watch.attend()
        self._reconcile(ctx)
        ctx.check("steady", spec.expect)
        if spec.unmerge:
            with ctx.phase("unmerging (run=2)"):
                t = time.monotonic()
                ctx.ksm.write("run", 2)  # returns once every merged page is split again
                secs = time.monotonic() - t
            ctx.record.event(
                Kind.UNMERGE,
                "run=2",
                seconds=round(secs, 4),
                pages_sharing=ctx.ksm.read("pages_sharing"),
            )
        watch.attend()  # a guest lost at the very end still fails the run

    def _guest_info(self, g: Any) -> dict[str, Any]:
        info = dict(g.as_dict())
        try:
            info["memory_kb"] = self.conn.lookupByName(g.name).maxMemory()
        except Exception:  # a guest that vanished is reported by the probe, not here
            info["memory_kb"] = None
        return info

    def _until_steady(self, ctx: RunContext) -> None:
        spec = self.spec.steady
        start = time.monotonic()
        page = os.sysconf("SC_PAGE_SIZE")
        # Where ksmd is in its pass (Linux 6.7+): the detector's window is in pages scanned.
        has_scanned = "pages_scanned" in ctx.ksm.counters()
        # The guests' own merged pages (ksm_stat) are what this run is about: unlike the
        # host-wide pages_sharing, other users of KSM on the host cannot move them.
        guests = MergedPages(ctx.fs, list(self.pids.values()))
        curve = "the guests' ksm_merging_pages" if guests.read() is not None else "pages_sharing"
        det = SteadyDetector(spec, curve=curve)
        try:
            with ctx.phase("KSM on: waiting for the merge curve to level off") as update:
                while True:
                    if self.watch is not None:
                        self.watch.attend()  # a guest lost: stop waiting for steady at once
                    scans = int(ctx.ksm.read("full_scans"))
                    sharing = int(ctx.ksm.read("pages_sharing"))
                    scanned = int(ctx.ksm.read("pages_scanned")) if has_scanned else None
                    merged = guests.read() if det.curve != "pages_sharing" else None
                    if merged is None and det.curve != "pages_sharing":
                        # A guest's process went away: go on with the host-wide counter.
                        det = SteadyDetector(spec)
                    elapsed = time.monotonic() - start
                    value = merged if merged is not None else sharing
                    if det.update(elapsed, scans, value, scanned):
                        ctx.record.event(
                            Kind.STEADY,
                            det.reason,
                            seconds=round(elapsed, 3),
                            pages_sharing=sharing,
                        )
                        return
                    if elapsed > spec.timeout:
                        ctx.record.event(
                            Kind.STEADY_TIMEOUT,
                            f"not steady after {spec.timeout:g}s (pages_sharing {sharing})",
                            seconds=round(elapsed, 3),
                            pages_sharing=sharing,
                        )
                        return
                    update(
                        f"KSM on {elapsed:.0f}s: pages_sharing {sharing} "
                        f"({format_size(sharing * page)} saved), "
                        f"{scans - (det.start_scans or scans)} full scans"
                    )
                    ctx.sleep(POLL)
        finally:
            guests.close()

    def _reconcile(self, ctx: RunContext) -> None:
        """The sum of the guests' ksm_merging_pages against pages_shared + pages_sharing.

        Each KSM page mapped k times counts 1 in pages_shared, k-1 in pages_sharing and k
        in the merging pages of the processes mapping it, so with only our guests merging
        the two must match, up to what changed between the reads."""

        per_vm: dict[str, int | None] = {}
        for name, pid in self.pids.items():
            try:
                per_vm[name] = read_process(ctx.fs, pid)["ksm_merging_pages"]
            except ProcessGone:
                per_vm[name] = None
        c = ctx.ksm.read_counters()
        total = sum(v for v in per_vm.values() if v)
        glob = c.get("pages_shared", 0) + c.get("pages_sharing", 0)
        rel = abs(total - glob) / glob if glob else 0.0
        ctx.record.update(
            reconciliation={
                "t": ctx.record.now(),
                "per_vm_merging_pages": per_vm,
                "sum_merging_pages": total,
                "pages_shared_plus_sharing": glob,
                "relative_difference": round(rel, 6),
            }
        )
        ctx.record.event(
            Kind.RECONCILED,
            f"sum of guests' ksm_merging_pages {total} vs pages_shared + "
            f"pages_sharing {glob} ({rel:.3%})",
        )

    # -- teardown --------------------------------------------------------------------------
    def teardown(self, ctx: RunContext) -> list[str]:
        problems: list[str] = []
        if self.watch is not None:
            self.watch.close()  # destroying our own guests is no loss
            self.watch = None
        if self.clones is not None:
            try:
                self.clones.save_consoles(ctx.record.dir / "consoles")
            except OSError as e:
                problems.append(f"saving console logs: {e}")
            problems += self.clones.teardown()
            self.conn = self.clones.conn  # teardown reconnects when libvirtd went away
            self.clones = None
        self.pids = {}
        self.work = None
        if self.conn is not None:
            try:
                self.conn.close()
            except Exception:
                pass
            self.conn = None
        return problems

"""``kvmksm watch``: record KSM and every running guest on a live host, changing nothing.

What the seed's author did by hand (``while true; do cat .../pages_shared; sleep 1; done``),
made safe for production hosts: the host row (every KSM counter and knob, ksmd's CPU, host
memory) and, for every running guest, its QEMU process's ksm_stat and RSS, each second, into
the same run record as ``bench`` writes, so report, compare and plan read it.

Read-only by construction: nothing here writes a KSM knob (Ksm.write is never called, files
are opened O_RDONLY), the libvirt connection is ``openReadOnly``, no domain is created,
started or stopped, and the bench lock is not taken (a bench may run meanwhile; the record
says so, since its figures then include a benchmark).

Guests are re-listed in a background thread every few seconds, so a slow libvirtd never
delays a sample; guests that start or stop appear in and leave the per-VM data with events
``guest_appeared`` / ``guest_gone``. Without libvirt, QEMU processes are found in /proc.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console, Group, JustifyMethod, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from kvmksm.errors import Interrupted, UserError
from kvmksm.host.facts import host_facts
from kvmksm.host.fs import KSM_DIR, HostFS
from kvmksm.host.ksm import Ksm, ksm_processes
from kvmksm.host.qemu import PidNotFound, find_qemu_pid
from kvmksm.host.state import LOCK_NAME, ActiveRun, state_dir
from kvmksm.results.record import RunRecord
from kvmksm.sampling.guest_rows import VmProbe
from kvmksm.sampling.sampler import Sampler
from kvmksm.signals import signals_ignored, signals_raise
from kvmksm.units import format_size

DEFAULT_RELIST = 3.0  # seconds between guest listings
PID_TRIES = 3  # listings in a row that may fail to find a guest's QEMU pid before we give up
RUN_EVENTS = {0: "ksm_off", 1: "ksm_on", 2: "unmerge"}  # observed changes of `run`


# -- where the guests come from ------------------------------------------------------------
@dataclass
class GuestInfo:
    name: str
    pid: int | None  # None: no QEMU process found for it (no per-VM rows)
    uuid: str | None = None
    memory_kb: int | None = None


class GuestLister(Protocol):
    source: str  # how guests are found, said to the user and kept in the record

    def list(self) -> dict[str, GuestInfo]:
        """The running guests now; raises when the source cannot answer."""
        ...

    def facts(self) -> dict[str, Any]:
        """Versions etc. for the record's host facts."""
        ...

    def close(self) -> None: ...


class LibvirtGuests:
    """Every running domain of a read-only libvirt connection, with its QEMU pid."""

    def __init__(self, uri: str, fs: HostFS) -> None:
        import libvirt

        self._libvirt = libvirt
        self.uri = uri
        self.fs = fs
        self.conn = libvirt.openReadOnly(uri)
        self.source = f"libvirt {self.conn.getURI()} (read-only)"
        # Per running incarnation (name, domain id): a restarted guest gets a new id and pid.
        self._known: dict[tuple[str, int], GuestInfo] = {}
        self._tries: dict[tuple[str, int], int] = {}

    def facts(self) -> dict[str, Any]:
        from kvmksm.virt.conn import versions

        try:
            return versions(self.conn)
        except self._libvirt.libvirtError:
            return {"libvirt_uri": self.uri}

    def driver(self) -> str:
        return str(self.conn.getType())

    def list(self) -> dict[str, GuestInfo]:
        lv = self._libvirt
        try:
            doms = self.conn.listAllDomains(lv.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        except lv.libvirtError:
            # libvirtd restarted: reconnect once; a second failure is the caller's to report.
            with contextlib.suppress(lv.libvirtError):
                self.conn.close()
            self.conn = lv.openReadOnly(self.uri)
            doms = self.conn.listAllDomains(lv.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        out: dict[str, GuestInfo] = {}
        keys = set()
        for dom in doms:
            try:
                key = (dom.name(), dom.ID())
                info = self._known.get(key)
                if info is None:
                    info = GuestInfo(key[0], None, dom.UUIDString(), int(dom.maxMemory()))
                    self._known[key] = info
            except lv.libvirtError:
                continue  # stopped between the listing and the questions
            keys.add(key)
            if info.pid is None and self._tries.get(key, 0) < PID_TRIES:
                self._tries[key] = self._tries.get(key, 0) + 1
                with contextlib.suppress(PidNotFound):
                    info.pid = find_qemu_pid(info.name, self.fs)
            out[info.name] = replace(info)  # a copy: the tracker compares old and new
        for key in set(self._known) - keys:
            self._known.pop(key, None)
            self._tries.pop(key, None)
        return out

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.close()


def qemu_guest_name(cmdline: bytes) -> str | None:
    """The guest name of a QEMU command line (``-name guest=NAME,...`` or ``-name NAME``);
    '' for a QEMU without -name; None when it is not QEMU. ``kvm`` is QEMU too (Proxmox)."""
    argv = cmdline.decode(errors="replace").rstrip("\0").split("\0")
    exe = os.path.basename(argv[0]) if argv else ""
    if "qemu" not in exe and exe != "kvm":
        return None
    for i, arg in enumerate(argv[:-1]):
        if arg in ("-name", "--name"):
            value = argv[i + 1].removeprefix("guest=")
            # a ',' inside the name is written ',,'
            return value.replace(",,", "\0").split(",")[0].replace("\0", ",")
    return ""


class ProcGuests:
    """QEMU processes found in /proc, for hosts without libvirt (or without libvirt-python)."""

    source = "QEMU processes in /proc (names from -name; no memory sizes)"

    def __init__(self, fs: HostFS) -> None:
        self.fs = fs

    def facts(self) -> dict[str, Any]:
        return {}

    def list(self) -> dict[str, GuestInfo]:
        out: dict[str, GuestInfo] = {}
        try:
            entries = self.fs.listdir("proc")
        except OSError:
            return out
        for entry in sorted((e for e in entries if e.isdigit()), key=int):
            try:
                name = qemu_guest_name(self.fs.path(f"proc/{entry}/cmdline").read_bytes())
            except OSError:
                continue
            if name is None:
                continue
            name = name or f"qemu-{entry}"
            if name in out:
                name = f"{name}#{entry}"  # two QEMUs with one -name: keep both apart
            out[name] = GuestInfo(name, int(entry))
        return out

    def close(self) -> None:
        return None


def open_lister(connect: str | None, fs: HostFS) -> tuple[GuestLister, str | None]:
    """The guest source and, when it is not libvirt, a line saying why and what that costs.

    A URI the user named (-c or LIBVIRT_DEFAULT_URI) must work; the default one may be absent.
    """
    fallback = "guests are found as QEMU processes in /proc instead (no memory sizes)"
    try:
        import libvirt

        from kvmksm.virt.conn import is_local, resolve_uri
    except ImportError:
        return ProcGuests(fs), f"libvirt-python is not installed: {fallback}"
    explicit = connect or os.environ.get("LIBVIRT_DEFAULT_URI")
    uri = resolve_uri(connect)
    try:
        lister = LibvirtGuests(uri, fs)
    except libvirt.libvirtError as e:
        msg = f"cannot connect to libvirt at {uri}: {e.get_error_message()}"
        if explicit:
            raise UserError(msg) from None
        return ProcGuests(fs), f"{msg}: {fallback}"
    if not is_local(lister.conn):
        lister.close()
        raise UserError(
            f"{uri} is a remote libvirt: kvmksm watch reads this host's /sys and /proc, "
            "so run it on the host the guests run on"
        )
    driver = lister.driver()
    if driver != "QEMU":
        return lister, f"libvirt driver {driver}: only QEMU guests have per-VM figures"
    return lister, None


# -- is a bench running? ---------------------------------------------------------------------
def bench_holder(directory: Path | None = None) -> str | None:
    """What the bench lock's holder wrote, when a ``kvmksm bench`` holds it; else None.

    The kernel's lock table (/proc/locks) tells whether the flock is held without taking it:
    even a shared lock for a moment would make a bench starting just then refuse to run.
    The lock is on the real host whatever KVMKSM_ROOT says, so this reads the real /proc.
    """
    path = (directory or state_dir()) / LOCK_NAME
    try:
        st = os.stat(path)
        text = path.read_text(errors="replace").strip()
    except OSError:
        return None
    try:
        locks: str | None = HostFS("/").read("proc/locks")
    except OSError:
        locks = None
    if locks is not None:
        ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        if not any("FLOCK" in ln.split() and ident in ln.split() for ln in locks.splitlines()):
            return None
    elif not text:  # no lock table: a released lock leaves the file empty
        return None
    active = ActiveRun.load(directory)
    if active and active.get("run_dir"):
        text += f", record {active['run_dir']}"
    return text or "holder unknown"


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
                self.record.event("guest_list_failed", f"{self.lister.source}: {e}")
                self.say(f"cannot list guests ({e}); keeping the last list and retrying")
            return
        if self._failing:
            self._failing = False
            self.record.event("guest_list_ok", f"{self.lister.source} answers again")
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
        self.record.event("guest_appeared", detail, domain=g.name, pid=g.pid)
        self.say(f"guest appeared: {detail}")

    def _gone(self, g: GuestInfo) -> None:
        if g.name in self.seen:
            self.seen[g.name]["last_seen_t"] = self.record.now()
        self.record.event("guest_gone", f"{g.name} (pid {g.pid})", domain=g.name, pid=g.pid)
        self.say(f"guest gone: {g.name}")

    def check_bench(self) -> None:
        holder = bench_holder(self.lock_dir)
        if holder == self.bench:
            return
        if holder is not None:
            msg = f"a kvmksm bench is running ({holder}): the figures include its workload"
            self.record.event("bench_running", msg, holder=holder)
        else:
            msg = "the kvmksm bench run has ended"
            self.record.event("bench_ended", msg)
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


# -- what the user sees ------------------------------------------------------------------------
def saved_bytes(row: Mapping[str, Any], page_size: int) -> int | None:
    """Memory saved, as analysis counts it: (pages_sharing + ksm_zero_pages) x page size."""
    if row.get("pages_sharing") is None:
        return None
    return (int(row["pages_sharing"]) + int(row.get("ksm_zero_pages") or 0)) * page_size


def guest_saves(vm: Mapping[str, Any], page_size: int) -> float:
    """What one guest saves, for sorting: the kernel's ksm_process_profit, else merged pages."""
    if vm.get("ksm_process_profit") is not None:
        return float(vm["ksm_process_profit"])
    if vm.get("ksm_merging_pages") is not None:
        return float(vm["ksm_merging_pages"]) * page_size
    return float("-inf")


def _size(n: float | None) -> str:
    return "—" if n is None else format_size(n)


def _num(v: Any) -> str:
    return "—" if v is None or v == "" else f"{int(v):,}"


def _run_state(run: Any) -> str:
    return {0: "off", 1: "on", 2: "unmerging"}.get(run, "—" if run is None else str(run))


def fmt_seconds(s: float) -> str:
    s = int(round(s))
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return "".join(f"{v}{u}" for v, u in ((h, "h"), (m, "m"), (sec, "s")) if v) or "0s"


def render(
    row: Mapping[str, Any],
    vms: Mapping[str, Mapping[str, Any]],
    guests: Mapping[str, GuestInfo],
    page_size: int,
    footer: str = "",
    max_guests: int = 40,
) -> RenderableType:
    """The live view: host-wide figures, then one line per guest, biggest saver first."""
    host = Table.grid(padding=(0, 2))
    for _ in range(4):
        host.add_column()
    saved = saved_bytes(row, page_size)
    cpu = row.get("ksmd_cpu")
    avail, total = row.get("MemAvailable"), row.get("MemTotal")
    cells = [
        ("KSM", f"{_run_state(row.get('run'))}"),
        ("memory saved", _size(saved)),
        ("pages_shared", _num(row.get("pages_shared"))),
        ("pages_sharing", _num(row.get("pages_sharing"))),
        ("pages_unshared", _num(row.get("pages_unshared"))),
        ("pages_volatile", _num(row.get("pages_volatile"))),
        ("ksm_zero_pages", _num(row.get("ksm_zero_pages"))),
        ("full_scans", _num(row.get("full_scans"))),
        ("general_profit", _size(row.get("general_profit"))),
        ("ksmd CPU", "—" if cpu is None else f"{cpu:.1f} %"),
        ("scan", f"{_num(row.get('pages_to_scan'))} pages / {_num(row.get('sleep_millisecs'))} ms"),
        (
            "host memory",
            "—"
            if avail is None or total is None
            else f"{format_size(avail * 1024)} available of {format_size(total * 1024)}",
        ),
    ]
    for i in range(0, len(cells), 2):
        pair = cells[i : i + 2]
        host.add_row(*[x for k, v in pair for x in (Text(k, style="bold"), v)])

    table = Table(title=f"{len(guests)} running guest(s)", title_justify="left", expand=False)
    columns: tuple[tuple[str, JustifyMethod], ...] = (
        ("domain", "left"),
        ("pid", "right"),
        ("merging pages", "right"),
        ("merged", "right"),
        ("zero pages", "right"),
        ("profit", "right"),
        ("RSS", "right"),
    )
    for col, just in columns:
        table.add_column(col, justify=just)
    order = sorted(guests, key=lambda n: (-guest_saves(vms.get(n, {}), page_size), n))
    for name in order[:max_guests]:
        vm = vms.get(name, {})
        merging = vm.get("ksm_merging_pages")
        rss = vm.get("rss_kb")
        table.add_row(
            name,
            _num(guests[name].pid),
            _num(merging),
            _size(None if merging is None else merging * page_size),
            _num(vm.get("ksm_zero_pages")),
            _size(vm.get("ksm_process_profit")),
            _size(None if rss is None else rss * 1024),
        )
    parts: list[RenderableType] = [host, table]
    if len(order) > max_guests:
        parts.append(Text(f"... and {len(order) - max_guests} more guests", style="dim"))
    if footer:
        parts.append(Text(footer, style="dim"))
    return Group(*parts)


def plain_line(
    row: Mapping[str, Any],
    vms: Mapping[str, Mapping[str, Any]],
    guests: Mapping[str, GuestInfo],
    page_size: int,
) -> str:
    """One line per sample for logs and pipes: key=value, no thousands separators."""
    parts = [f"t={row.get('t', 0):.1f}s"]
    for k in ("run", "pages_shared", "pages_sharing", "pages_unshared", "full_scans"):
        if row.get(k) is not None:
            parts.append(f"{k}={row[k]}")
    saved = saved_bytes(row, page_size)
    if saved is not None:
        parts.append(f"saved={saved / 2**20:.1f}MiB")
    if row.get("ksmd_cpu") is not None:
        parts.append(f"ksmd_cpu={row['ksmd_cpu']:.1f}%")
    parts.append(f"guests={len(guests)}")
    best = max(vms.values(), key=lambda v: guest_saves(v, page_size), default=None)
    if best is not None and (best.get("ksm_process_profit") or 0) > 0:
        parts.append(f"top={best['domain']}:{best['ksm_process_profit'] / 2**20:.1f}MiB")
    return " ".join(parts)


# -- the watch itself --------------------------------------------------------------------------
@dataclass
class WatchResult:
    status: str  # passed (closed cleanly: Ctrl-C, SIGTERM or --duration) | error
    record_dir: Path
    ended_by: str
    error: str | None
    report: Path | None

    @property
    def exit_code(self) -> int:
        return 0 if self.status == "passed" else 1


def watch(
    output: Path,
    duration: float | None = None,
    connect: str | None = None,
    interval: float = 1.0,
    relist: float = DEFAULT_RELIST,
    fs: HostFS | None = None,
    console: Console | None = None,
    lister: GuestLister | None = None,
    report: bool = True,
) -> WatchResult:
    """Watch until Ctrl-C, SIGTERM/SIGHUP or ``duration`` seconds; write the record (and the
    report). Raises UserError before anything starts when it cannot watch at all."""
    fs = fs or HostFS()
    console = console or Console(highlight=False)
    ksm = Ksm(fs)
    notes: list[str] = []
    if not ksm.available():
        notes.append(
            f"KSM is not available ({fs.path(KSM_DIR)} is missing): recording host memory "
            "and the guests' RSS only"
        )
    if lister is None:
        lister, note = open_lister(connect, fs)
        if note:
            notes.append(note)
    if os.geteuid() != 0:
        notes.append("not root: other users' /proc/<pid>/ksm_stat cannot be read")

    scenario = {
        "name": "watch",
        "description": "kvmksm watch: a live host, recorded without changing anything",
        "sample_interval": interval,
        "knobs": {},
        "workload": {
            "type": "watch",
            "connect": connect,
            "guests": lister.source,
            "duration": duration,
        },
    }
    record = RunRecord.create(output, scenario, None, kind="watch")
    knobs = ksm.read_knobs() if ksm.available() else {}
    facts = host_facts(fs)
    with contextlib.suppress(Exception):
        facts.update(lister.facts())
    record.update(
        host=facts,
        knobs_before=knobs,
        knobs_during=knobs,  # watch sets nothing: the knobs in force are the ones found
        counters_before=ksm.read_counters() if ksm.available() else {},
        watch={"guests": lister.source, "interval": interval, "relist": relist, "notes": notes},
    )
    page_size = int(facts.get("page_size") or 4096)
    messages: queue.SimpleQueue[str] = queue.SimpleQueue()
    tracker = GuestTracker(lister, record, relist, messages.put)
    probe = VmProbe(fs, tracker.pids)
    sampler: Sampler | None = None
    status, error, ended_by = "error", None, "error"
    view = _LiveView(console, page_size) if console.is_terminal else _PlainView(console, page_size)

    view.message(f"kvmksm watch: recording to {record.dir}")
    view.message(
        f"  host: KSM counters and knobs (read only), ksmd CPU, memory; guests: {lister.source}"
    )
    for n in notes:
        view.message(f"  note: {n}")
        record.event("watch_note", n)
    with signals_raise():
        try:
            record.event("run_start", f"watching; guests from {lister.source}")
            tracker.check_bench()
            tracker.refresh()
            _note_other_users(fs, record, tracker, messages.put)
            sampler = Sampler(fs, record, interval, [probe])
            knob_names = [k for k in knobs if k in sampler.source.columns]
            sampler.start()
            tracker.start()
            ended_by = _loop(view, sampler, probe, tracker, record, knob_names, duration, messages)
            status = "passed"
        except (KeyboardInterrupt, Interrupted) as e:
            status = "passed"  # stopping is how a watch ends
            ended_by = "Ctrl-C" if isinstance(e, KeyboardInterrupt) else str(e).split()[-1]
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
            record.event("error", error, traceback=traceback.format_exc())
        finally:
            with signals_ignored():
                view.close()
                _close(record, sampler, tracker, lister, ksm, knobs, status, ended_by)
                record.finish(status, error)
    _drain(messages, view)
    report_path = _write_report(record.dir, console) if report else None
    _summary(console, record, tracker, ended_by, report_path, error)
    return WatchResult(status, record.dir, ended_by, error, report_path)


def _loop(
    view: _View,
    sampler: Sampler,
    probe: VmProbe,
    tracker: GuestTracker,
    record: RunRecord,
    knob_names: list[str],
    duration: float | None,
    messages: queue.SimpleQueue[str],
) -> str:
    """Show each new sample until the duration is up; returns why it ended."""
    end = None if duration is None else time.monotonic() + duration
    last: dict[str, Any] | None = None
    prev_knobs: dict[str, Any] | None = None
    while True:
        now = time.monotonic()
        if end is not None and now >= end:
            return f"--duration {fmt_seconds(duration or 0)} reached"
        time.sleep(0.05 if end is None else max(0.0, min(0.05, end - now)))
        _drain(messages, view)
        row = sampler.last
        if row is last or not row:
            continue
        last = row
        prev_knobs = _observe_knobs(record, row, knob_names, prev_knobs, view)
        left = None if end is None else max(0.0, end - time.monotonic())
        view.update(row, probe.last, tracker.current, record, left)


def _observe_knobs(
    record: RunRecord,
    row: Mapping[str, Any],
    names: list[str],
    prev: dict[str, Any] | None,
    view: _View,
) -> dict[str, Any]:
    """Knob changes someone else made while we watched, as events (`run` as ksm_on/off)."""
    cur = {k: row.get(k) for k in names}
    if prev is not None:
        for k in names:
            if cur[k] == prev[k]:
                continue
            change = f"{k} {prev[k]} -> {cur[k]} (changed on the host; kvmksm watch only reads)"
            kind = RUN_EVENTS.get(cur[k], "knob_changed") if k == "run" else "knob_changed"
            record.event(kind, change, knob=k, before=prev[k], after=cur[k])
            view.message(change)
    return cur


def _note_other_users(
    fs: HostFS, record: RunRecord, tracker: GuestTracker, say: Callable[[str], None]
) -> None:
    """Processes other than the guests with KSM memory also count in the host-wide figures."""
    guests = set(tracker.pids().values()) | {os.getpid()}
    others = ksm_processes(fs, exclude=guests)
    if not others:
        return
    names = ", ".join(f"{o['comm']} (pid {o['pid']})" for o in others[:5])
    more = f" and {len(others) - 5} more" if len(others) > 5 else ""
    msg = f"processes that are not guests have memory registered with KSM: {names}{more}"
    record.event("other_ksm_users", msg, processes=others)
    say(msg)


def _close(
    record: RunRecord,
    sampler: Sampler | None,
    tracker: GuestTracker,
    lister: GuestLister,
    ksm: Ksm,
    knobs: dict[str, Any],
    status: str,
    ended_by: str,
) -> None:
    """Stop the threads and close the record; never raises (runs on every exit path)."""
    problems = []
    if sampler is not None:
        try:
            sampler.stop()
        except Exception as e:
            problems.append(f"sampler: {e}")
        if sampler.errors:
            record.event("sampler_errors", "; ".join(sampler.errors[:5]), count=len(sampler.errors))
    tracker.stop()
    lister.close()
    for name in tracker.current:
        if name in tracker.seen and tracker.seen[name].get("last_seen_t") is None:
            tracker.seen[name]["last_seen_t"] = record.now()
    after: dict[str, Any] = {}
    try:
        after = ksm.read_knobs() if ksm.available() else {}
    except OSError as e:
        problems.append(f"reading the knobs at the end: {e}")
    changed = {k: [v, after.get(k)] for k, v in knobs.items() if after.get(k) != v}
    if changed:
        record.event(
            "knobs_changed", f"changed on the host during the watch (not by kvmksm): {changed}"
        )
    if problems:
        record.event("close_problems", "; ".join(problems))
    record.update(knobs_after=after, guests=[dict(v) for v in tracker.seen.values()])
    record.event("watch_end", ended_by)
    record.event("run_end", status)


def _write_report(run_dir: Path, console: Console) -> Path | None:
    try:
        from kvmksm.views.report import write_report
    except ImportError:
        return None
    try:
        return write_report(run_dir)
    except (Exception, KeyboardInterrupt) as e:  # the record is what matters
        console.print(
            f"kvmksm: report not written ({e or type(e).__name__}); "
            f"rebuild it with: kvmksm report {run_dir}",
            markup=False,
            soft_wrap=True,
        )
        return None


def _summary(
    console: Console,
    record: RunRecord,
    tracker: GuestTracker,
    ended_by: str,
    report: Path | None,
    error: str | None,
) -> None:
    seen = sorted(tracker.seen)
    guests = f"{len(seen)} guest(s)" + (f" ({', '.join(seen[:10])})" if seen else "")
    dur = record.data.get("duration_s") or 0.0
    console.print(
        f"watch ended: {ended_by}, after {fmt_seconds(dur)}; {guests} seen",
        markup=False,
        soft_wrap=True,
    )
    if error:
        console.print(f"error: {error}", markup=False, soft_wrap=True)
    console.print(f"record: {record.dir}", markup=False, soft_wrap=True)
    if report is not None:
        console.print(f"report: {report}", markup=False, soft_wrap=True)


def _drain(messages: queue.SimpleQueue[str], view: _View) -> None:
    while True:
        try:
            view.message(messages.get_nowait())
        except queue.Empty:
            return


class _View(Protocol):
    def message(self, text: str) -> None: ...

    def update(
        self,
        row: Mapping[str, Any],
        vms: Mapping[str, Mapping[str, Any]],
        guests: Mapping[str, GuestInfo],
        record: RunRecord,
        left: float | None,
    ) -> None: ...

    def close(self) -> None: ...


class _PlainView:
    """Not a terminal: one line per sample, and one per message."""

    def __init__(self, console: Console, page_size: int) -> None:
        self.console = console
        self.page_size = page_size

    def message(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)
        with contextlib.suppress(OSError, ValueError):
            self.console.file.flush()  # a pipe (| tee, a log) gets each line as it comes

    def update(
        self,
        row: Mapping[str, Any],
        vms: Mapping[str, Mapping[str, Any]],
        guests: Mapping[str, GuestInfo],
        record: RunRecord,
        left: float | None,
    ) -> None:
        self.message(plain_line(row, vms, guests, self.page_size))

    def close(self) -> None:
        return None


class _LiveView:
    """A terminal: a rich Live panel redrawn on every sample; messages scroll above it."""

    def __init__(self, console: Console, page_size: int) -> None:
        self.console = console
        self.page_size = page_size
        self.live: Live | None = None

    def message(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def update(
        self,
        row: Mapping[str, Any],
        vms: Mapping[str, Mapping[str, Any]],
        guests: Mapping[str, GuestInfo],
        record: RunRecord,
        left: float | None,
    ) -> None:
        footer = f"t={row.get('t', 0):.0f}s  record {record.dir}  Ctrl-C stops"
        if left is not None:
            footer += f" (or in {fmt_seconds(left)})"
        max_guests = max(5, self.console.size.height - 16)
        view = render(row, vms, guests, self.page_size, footer, max_guests)
        if self.live is None:
            self.live = Live(view, console=self.console, auto_refresh=False)
            self.live.start()
        self.live.update(view, refresh=True)

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None

"""`kvmksm doctor`: what a run needs and what would spoil its figures, one line each with
what to do. Reads only: it takes no lock, writes no file, and opens libvirt read-only."""

from __future__ import annotations

import os
import shutil
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from kvmksm.host.fs import KSM_DIR, HostFS
from kvmksm.host.ksm import KNOWN_KNOBS, Ksm, ksm_processes
from kvmksm.host.state import ActiveRun, HostLock, bench_holder
from kvmksm.scenario.model import Scenario, VmsWorkload
from kvmksm.security import SIDE_CHANNEL_NOTE
from kvmksm.units import format_size
from kvmksm.virt.guest_memory import base_problem

# Daemons that rewrite KSM knobs while they run (they would change a run's settings mid-way).
KSM_MANAGERS = ("ksmtuned", "tuned", "ksmctl", "momd")


@dataclass
class Finding:
    level: str  # ok | note | warn | fail
    what: str
    fix: str = ""


def diagnose(fs: HostFS, scenario: Scenario | None = None, uri: str | None = None) -> list[Finding]:
    out: list[Finding] = []
    ksm = Ksm(fs)
    out += _ksm(fs, ksm)
    out += _managers(fs)
    out += _thp(fs)
    out += _other_users(fs)
    out += _state()
    if scenario is None or isinstance(scenario.workload, VmsWorkload):
        vms = scenario.workload if scenario is not None else None
        found = _libvirt(fs, vms, uri)
        if vms is None:  # only VM scenarios need libvirt: a problem is a warning here
            found = [
                Finding("warn" if f.level == "fail" else f.level, f.what, f.fix) for f in found
            ]
        out += found
    out.append(Finding("note", SIDE_CHANNEL_NOTE))
    return out


def _ksm(fs: HostFS, ksm: Ksm) -> list[Finding]:
    if not ksm.available():
        return [
            Finding(
                "fail",
                f"KSM sysfs missing: {fs.path(KSM_DIR)}",
                "use a kernel built with CONFIG_KSM=y",
            )
        ]
    out = []
    run = fs.path(f"{KSM_DIR}/run")
    if os.access(run, os.W_OK) and os.geteuid() == 0:
        out.append(Finding("ok", f"KSM sysfs present and writable ({fs.path(KSM_DIR)})"))
    else:
        out.append(
            Finding(
                "fail", f"KSM knobs are not writable by this user ({run})", "run kvmksm as root"
            )
        )
    missing = [k for k in KNOWN_KNOBS if k not in ksm.knobs()]
    if missing:
        out.append(
            Finding(
                "ok",
                f"this kernel lacks the knobs {', '.join(missing)}",
                "scenarios that set them are refused; remove them for this kernel",
            )
        )
    state = ksm.read("run")
    if state == 1:
        out.append(
            Finding(
                "warn",
                "ksmd is running now (run=1)",
                "a bench switches it off and back on afterwards; "
                "pages merged by others count in the host-wide figures",
            )
        )
    return out


def _managers(fs: HostFS) -> list[Finding]:
    found = []
    for name in KSM_MANAGERS:
        pid = fs.pid_of(name)
        if pid:
            found.append(f"{name} (pid {pid})")
    if found:
        return [
            Finding(
                "warn",
                f"a KSM manager is running: {', '.join(found)}",
                "stop it during runs: it rewrites KSM knobs mid-run (e.g. systemctl stop ksmtuned)",
            )
        ]
    return [Finding("ok", "no KSM manager (ksmtuned, tuned...) running")]


def _thp(fs: HostFS) -> list[Finding]:
    try:
        text = fs.read("sys/kernel/mm/transparent_hugepage/enabled")
    except OSError:
        return [Finding("ok", "no transparent huge pages on this kernel")]
    mode = text[text.index("[") + 1 : text.index("]")] if "[" in text else text.strip()
    if mode == "always":
        return [
            Finding(
                "warn",
                "THP is 'always': guest memory is backed by huge pages that "
                "KSM must split before merging, which slows and reduces merging",
                "echo madvise > /sys/kernel/mm/transparent_hugepage/enabled, or "
                "compare runs only under the same THP mode",
            )
        ]
    return [Finding("ok", f"THP mode is '{mode}'")]


def _other_users(fs: HostFS) -> list[Finding]:
    others = ksm_processes(fs)
    if not others:
        return [Finding("ok", "no other process has memory registered with KSM")]
    names = ", ".join(f"{o['comm']} ({o['pid']})" for o in others[:5])
    return [
        Finding(
            "warn",
            f"{len(others)} other process(es) use KSM: {names}",
            "their pages add to the host-wide counters; stop them for exact figures",
        )
    ]


def _state() -> list[Finding]:
    """A run in progress, or the state a killed one left, read without taking the lock (a
    bench starting meanwhile must not find it held by doctor)."""
    lock = HostLock()
    holder = bench_holder()
    if holder:
        return [
            Finding(
                "warn",
                f"another kvmksm run is using KSM on this host ({holder})",
                "wait for it to finish",
            )
        ]
    active = ActiveRun.load()
    if active:
        return [
            Finding(
                "fail",
                f"a killed run left state behind (record {active.get('run_dir')}, "
                f"{len(active.get('created', []))} object(s))",
                "run: kvmksm clean",
            )
        ]
    return [Finding("ok", f"no kvmksm run in progress ({lock.path})")]


def _libvirt(fs: HostFS, w: VmsWorkload | None, uri: str | None) -> list[Finding]:
    try:
        import libvirt  # noqa: F401

        from kvmksm.virt.conn import is_local, open_read_only, resolve_uri, versions
        from kvmksm.virt.tiny_image import outdated
    except ImportError:
        return [Finding("fail", "libvirt-python is not installed", "run scripts/setup.sh")]
    uri = resolve_uri(uri, w.connect if w else None)
    try:
        conn = open_read_only(uri)
    except Exception as e:
        return [Finding("fail", str(e), "start libvirtd (scripts/setup.sh does)")]
    out = [Finding("ok", f"libvirtd reachable at {uri} (libvirt {versions(conn)['libvirt']})")]
    if w is None:
        conn.close()
        return out
    if w.domain_type == "kvm" and not os.path.exists("/dev/kvm"):
        out.append(
            Finding(
                "fail",
                "domain_type kvm but /dev/kvm is missing",
                "use domain_type: qemu (TCG) or load the kvm module",
            )
        )
    base_mem = None
    base_xml = None
    if hasattr(w.base, "domain"):
        try:
            dom = conn.lookupByName(w.base.domain)
        except Exception:
            out.append(
                Finding(
                    "fail",
                    f"base domain '{w.base.domain}' not found at {uri}",
                    "define it, or for the tiny image run: kvmksm image build",
                )
            )
        else:
            if dom.isActive():
                out.append(
                    Finding(
                        "fail",
                        f"base domain '{w.base.domain}' is running",
                        f"shut it down: virsh shutdown {w.base.domain}",
                    )
                )
            else:
                out.append(Finding("ok", f"base domain '{w.base.domain}' is shut off"))
            base_mem = dom.maxMemory() * 1024
            base_xml = dom.XMLDesc(0)
            out += _sharing(w.base.domain, base_xml)
    else:
        base_mem = w.base.memory
    per_guest = w.memory or base_mem
    stale = outdated(base_xml) if base_xml else None
    if stale:
        out.append(
            Finding(
                "fail",
                f"base domain '{w.base.domain}': {stale}",
                f"kvmksm image build --name {w.base.domain}",
            )
        )
    if per_guest and base_xml and is_local(conn):
        problem = base_problem(base_xml, per_guest, w.guest_fill.size if w.guest_fill else 0)
        if problem:
            out.append(Finding("fail", problem, "change workload.memory or guest_fill"))
    if per_guest:
        need = per_guest * w.clones
        avail = fs.meminfo().get("MemAvailable", 0) * 1024
        level = "ok" if need < 0.8 * avail else "fail"
        out.append(
            Finding(
                level,
                f"memory for {w.clones} clones x {format_size(per_guest)} = {format_size(need)}; "
                f"available {format_size(avail)}",
                "" if level == "ok" else "use fewer or smaller clones (keep 20% headroom)",
            )
        )
    if not shutil.which("qemu-img"):
        out.append(Finding("warn", "qemu-img not found", "install qemu-utils"))
    conn.close()
    return out


def _sharing(name: str, xml: str) -> list[Finding]:
    """<memoryBacking><nosharepages/> makes QEMU mark guest memory unmergeable
    (MADV_UNMERGEABLE): its clones keep it, and KSM never merges their memory."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return []
    if root.find("memoryBacking/nosharepages") is None:
        return []
    return [
        Finding(
            "warn",
            f"base domain '{name}' has <memoryBacking><nosharepages/>: KSM never merges "
            "the memory of its clones",
            f"remove <nosharepages/> from its XML (virsh edit {name})",
        )
    ]

"""Finding and removing what kvmksm runs left on a host (``kvmksm clean``).

Only tagged objects are ever touched: domains with a ``<kvmksm:clone>`` metadata tag (never
the ``<kvmksm:base>`` tiny base), volumes named ``kvmksm-<8 hex>-...``, and console logs in
kvmksm's own console directory.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import libvirt

from kvmksm.host import paths
from kvmksm.host.fs import HostFS
from kvmksm.virt.domains import destroy, dom_gone, read_tag, undefine
from kvmksm.virt.volumes import delete_volume, tagged_volumes

_CONSOLE_RE = re.compile(r"^kvmksm-[0-9a-f]{8}-.*\.log$")


@dataclass
class Leftovers:
    domains: list[str] = field(default_factory=list)  # tagged clones
    volumes: list[tuple[str, str]] = field(default_factory=list)  # (pool, volume)
    consoles: list[Path] = field(default_factory=list)
    unsearched_pools: list[str] = field(default_factory=list)  # inactive: volumes not listed

    def empty(self) -> bool:
        return not (self.domains or self.volumes or self.consoles)

    def describe(self) -> list[str]:
        return (
            [f"domain {d}" for d in self.domains]
            + [f"volume {p}/{v}" for p, v in self.volumes]
            + [f"console log {c}" for c in self.consoles]
        )


def find_leftovers(
    conn: libvirt.virConnect, run: str | None = None, fs: HostFS | None = None
) -> Leftovers:
    """Every tagged clone domain and kvmksm volume at ``conn`` (of one run if ``run`` is set),
    and console logs that no process has open. Reads only.

    Console logs are files on this host, whatever ``conn`` is: one that a running guest
    writes (virtlogd or QEMU holds it open) is never a leftover, even when that guest belongs
    to another connection or to a run in progress."""
    left = Leftovers()
    for dom in conn.listAllDomains(0):
        tag = read_tag(dom)
        if tag and tag.kind == "clone" and (run is None or tag.attrs.get("run") == run):
            left.domains.append(dom.name())
    vols, left.unsearched_pools = tagged_volumes(conn)
    left.volumes = [(p, v) for p, v in vols if run is None or v.startswith(f"kvmksm-{run}-")]
    cdir = paths.console_dir()
    if cdir.is_dir():
        logs = [
            p
            for p in cdir.iterdir()
            if _CONSOLE_RE.match(p.name) and (run is None or p.name.startswith(f"kvmksm-{run}-"))
        ]
        busy = open_files(fs or HostFS()) if logs else set()
        left.consoles = sorted(p for p in logs if str(p) not in busy)
    left.domains.sort()
    return left


def open_files(fs: HostFS) -> set[str]:
    """Paths some process has open (the targets of /proc/*/fd/*)."""
    out: set[str] = set()
    proc = fs.path("proc")
    try:
        pids = [p for p in os.listdir(proc) if p.isdigit()]
    except OSError:
        return out
    for pid in pids:
        fd_dir = proc / pid / "fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue  # gone, or a kernel thread
        for fd in fds:
            try:
                out.add(os.readlink(fd_dir / fd))
            except OSError:
                continue
    return out


def remove_leftovers(conn: libvirt.virConnect, left: Leftovers) -> list[str]:
    """Destroy and undefine the domains, delete the volumes and logs. Never raises: returns
    what could not be removed."""
    problems: list[str] = []
    for name in left.domains:
        problems += remove_clone(conn, name)
    for pool, vol in left.volumes:
        p = delete_volume(conn, pool, vol)
        if p:
            problems.append(p)
    for path in left.consoles:
        p = remove_console(path)
        if p:
            problems.append(p)
    return problems


def remove_clone(
    conn: libvirt.virConnect,
    name: str,
    volumes: list[tuple[str, str]] | None = None,
    console: str | None = None,
    tag_volumes: bool = True,
) -> list[str]:
    """Stop, strip and undefine one tagged clone: destroy, delete its volumes, undefine, delete
    its console log. Idempotent; refuses an untagged domain; never raises.

    ``volumes`` are deleted; with ``tag_volumes`` so are the volumes the clone's tag names (for
    a run that was killed before it could say which it had made)."""
    problems: list[str] = []
    try:
        try:
            dom = conn.lookupByName(name)
        except libvirt.libvirtError as e:
            if not dom_gone(e):  # libvirtd away: the clone may well be there still
                return [f"cannot look up {name}: {e.get_error_message()}"]
            dom = None
        if dom is not None:
            tag = read_tag(dom)
            if tag is None or tag.kind != "clone":
                return [f"refusing to remove domain {name}: it has no kvmksm clone tag"]
            if tag_volumes:
                volumes = (volumes or []) + [v for v in tag.volumes if v not in (volumes or [])]
            console = console or tag.attrs.get("console")
            if p := destroy(dom):
                problems.append(p)
        for pool, vol in volumes or []:
            if p := delete_volume(conn, pool, vol):
                problems.append(p)
        # Undefine last: until then the tag still says which volumes are the clone's.
        if dom is not None and (p := undefine(dom)):
            problems.append(p)
        if console and (p := remove_console(Path(console))):
            problems.append(p)
    except Exception as e:  # noqa: BLE001 - teardown reports, never raises
        problems.append(f"removing {name}: {e}")
    return problems


def remove_console(path: Path) -> str | None:
    """Delete a console log, only inside kvmksm's console directory."""
    if path.parent != paths.console_dir() or not _CONSOLE_RE.match(path.name):
        return f"refusing to delete {path}: not a kvmksm console log"
    try:
        path.unlink(missing_ok=True)
    except OSError as e:
        return f"cannot delete {path}: {e.strerror}"
    return None

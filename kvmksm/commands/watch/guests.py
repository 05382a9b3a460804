"""Where a watch finds the running guests: every domain of a read-only libvirt connection
with its QEMU pid, or, without libvirt, the QEMU processes in /proc."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, replace
from typing import Any, Protocol

from kvmksm.errors import UserError
from kvmksm.host.fs import HostFS
from kvmksm.host.qemu import PidNotFound, find_qemu_pid, qemu_processes

PID_TRIES = 3  # listings in a row that may fail to find a guest's QEMU pid before we give up


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
        import libvirt  # an optional extra: imported where it is used

        self._libvirt = libvirt
        self.uri = uri
        self.fs = fs
        self.conn = libvirt.openReadOnly(uri)
        self.source = f"libvirt {self.conn.getURI()} (read-only)"
        # Per running incarnation (name, domain id): a restarted guest gets a new id and pid.
        self._known: dict[tuple[str, int], GuestInfo] = {}
        self._tries: dict[tuple[str, int], int] = {}

    def facts(self) -> dict[str, Any]:
        from kvmksm.virt.conn import versions  # needs libvirt, which this lister has

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


class ProcGuests:
    """QEMU processes found in /proc, for hosts without libvirt (or without libvirt-python)."""

    source = "QEMU processes in /proc (names from -name; no memory sizes)"

    def __init__(self, fs: HostFS) -> None:
        self.fs = fs

    def facts(self) -> dict[str, Any]:
        return {}

    def list(self) -> dict[str, GuestInfo]:
        return {name: GuestInfo(name, pid) for name, pid in qemu_processes(self.fs).items()}

    def close(self) -> None:
        return None


def open_lister(connect: str | None, fs: HostFS) -> tuple[GuestLister, str | None]:
    """The guest source and, when it is not libvirt, a line saying why and what that costs.

    A URI the user named (-c or LIBVIRT_DEFAULT_URI) must work; the default one may be absent.
    """
    fallback = "guests are found as QEMU processes in /proc instead (no memory sizes)"
    try:  # libvirt-python is an optional extra (kvmksm[vms])
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

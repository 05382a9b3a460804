"""The QEMU process behind a guest, for per-VM attribution (``/proc/<pid>/ksm_stat``).

libvirt writes the pid to ``/run/libvirt/qemu/<name>.pid`` (system) or
``$XDG_RUNTIME_DIR/libvirt/qemu/run/<name>.pid`` (session). A pid file can be stale and pids
are reused, so the process's command line must name the guest (``-name guest=<name>,...``).
Everything is read through HostFS so tests can point it at a fake tree.
"""

from __future__ import annotations

import os

from kvmksm.host.fs import HostFS

SYSTEM_PID_DIR = "run/libvirt/qemu"


class PidNotFound(LookupError):
    pass


def pid_dirs() -> list[str]:
    dirs = [SYSTEM_PID_DIR]
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        dirs.append(f"{xdg.lstrip('/')}/libvirt/qemu/run")
    return dirs


def guest_name(cmdline: bytes) -> str | None:
    """The guest name of a QEMU command line (NUL-separated argv): ``-name guest=NAME,...`` or
    ``-name NAME``; '' for a QEMU without -name; None when it is not QEMU at all (``kvm`` is
    QEMU too, as Proxmox names it)."""
    argv = cmdline.decode(errors="replace").rstrip("\0").split("\0")
    exe = os.path.basename(argv[0]) if argv else ""
    if "qemu" not in exe and exe != "kvm":
        return None
    for i, arg in enumerate(argv[:-1]):
        if arg in ("-name", "--name"):
            value = argv[i + 1].removeprefix("guest=")
            # -name guest=NAME,debug-threads=on ; a ',' inside NAME is written ',,'
            return value.replace(",,", "\0").split(",")[0].replace("\0", ",")
    return ""


def names_guest(cmdline: bytes, name: str) -> bool:
    """Whether a QEMU argv (NUL-separated) is the one running guest ``name``."""
    return guest_name(cmdline) == name


def qemu_processes(fs: HostFS) -> dict[str, int]:
    """{guest name: pid} of every QEMU process in /proc, for hosts without libvirt. A QEMU
    without -name is ``qemu-<pid>``; two with one name are kept apart as ``name#<pid>``."""
    out: dict[str, int] = {}
    try:
        entries = fs.listdir("proc")
    except OSError:
        return out
    for entry in sorted((e for e in entries if e.isdigit()), key=int):
        try:
            name = guest_name(fs.path(f"proc/{entry}/cmdline").read_bytes())
        except OSError:
            continue
        if name is None:
            continue
        name = name or f"qemu-{entry}"
        out[f"{name}#{entry}" if name in out else name] = int(entry)
    return out


def find_qemu_pid(name: str, fs: HostFS | None = None) -> int:
    """The pid of the QEMU running guest ``name``: libvirt's pid file, checked against the
    process's command line; if no pid file checks out, a scan of /proc. Raises PidNotFound."""
    fs = fs or HostFS()
    for d in pid_dirs():
        try:
            pid = int(fs.read(f"{d}/{name}.pid").split()[0])
        except (OSError, ValueError, IndexError):
            continue
        if _is_guest(fs, pid, name):
            return pid
    for entry in fs.listdir("proc") if fs.exists("proc") else []:
        if entry.isdigit() and _is_guest(fs, int(entry), name):
            return int(entry)
    raise PidNotFound(f"no QEMU process runs guest {name!r}")


def _is_guest(fs: HostFS, pid: int, name: str) -> bool:
    try:
        cmdline = fs.path(f"proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return names_guest(cmdline, name)

"""Fake QEMU processes in a fake /proc (and libvirt's pid files in a fake /run): the one helper
every test of QEMU discovery, per-guest sampling and watch builds its guests with."""

from __future__ import annotations

import shutil
from pathlib import Path


def qemu_argv(name: str, exe: str = "/usr/bin/qemu-system-x86_64") -> bytes:
    """A QEMU command line as libvirt starts it (NUL-separated, a ',' in a name doubled)."""
    args = [exe, "-name", f"guest={name},debug-threads=on", "-m", "256", "-S"]
    return "\0".join(args).encode() + b"\0"


def proc(root: Path, pid: int, cmdline: bytes, comm: str = "qemu-system-x86") -> Path:
    """A /proc/<pid> with this command line (any program: a QEMU or not)."""
    d = root / "proc" / str(pid)
    d.mkdir(parents=True, exist_ok=True)
    (d / "cmdline").write_bytes(cmdline)
    (d / "comm").write_text(comm + "\n")
    return d


def add_qemu(
    root: Path,
    pid: int,
    name: str,
    merging: int = 0,
    rss_kb: int = 100_000,
    ksm_stat: bool = True,
    exe: str = "/usr/bin/qemu-system-x86_64",
) -> Path:
    """A QEMU running guest `name`: command line, statm (RSS) and, unless the kernel is too
    old for it, ksm_stat with `merging` merged pages."""
    d = proc(root, pid, qemu_argv(name, exe))
    (d / "statm").write_text(f"999999 {rss_kb // 4} 100 10 0 5000 0\n")  # pages of 4 KiB
    if ksm_stat:
        set_merging(root, pid, merging)
    return d


def set_merging(root: Path, pid: int, merging: int) -> None:
    (root / "proc" / str(pid) / "ksm_stat").write_text(
        f"ksm_rmap_items {merging + 10}\nksm_zero_pages 0\nksm_merging_pages {merging}\n"
        f"ksm_process_profit {merging * 4096 - 640}\nksm_merge_any: no\nksm_mergeable: yes\n"
    )


def exit_qemu(root: Path, pid: int) -> None:
    """The process exits: first a zombie (what the kernel shows through files a reader holds
    open: an empty ksm_stat, a statm of zeros), then reaped (its /proc directory gone)."""
    d = root / "proc" / str(pid)
    (d / "ksm_stat").write_text("")
    (d / "statm").write_text("0 0 0 0 0 0 0\n")
    shutil.rmtree(d)


def pidfile(root: Path, name: str, pid: int | str) -> None:
    """libvirt's /run/libvirt/qemu/<name>.pid (system instance)."""
    d = root / "run/libvirt/qemu"
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{name}.pid").write_text(f"{pid}\n")

"""Facts about the host that a record needs to be compared with another one."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from typing import Any

from kvmksm.host.fs import HostFS
from kvmksm.host.ksm import parse_value


def host_facts(fs: HostFS | None = None) -> dict[str, Any]:
    fs = fs or HostFS()
    facts: dict[str, Any] = {
        "kernel_release": _read(fs, "proc/sys/kernel/osrelease") or platform.release(),
        "kernel_version": _read(fs, "proc/sys/kernel/version"),
        "hostname": _read(fs, "proc/sys/kernel/hostname") or platform.node(),
        "arch": platform.machine(),
        "cpu_model": _cpu_model(fs),
        "cpus": os.cpu_count(),
        "page_size": os.sysconf("SC_PAGE_SIZE"),
        "python": platform.python_version(),
    }
    try:
        facts["mem_total_kb"] = fs.meminfo().get("MemTotal")
    except OSError:
        facts["mem_total_kb"] = None
    for name in ("enabled", "defrag"):
        text = _read(fs, f"sys/kernel/mm/transparent_hugepage/{name}")
        facts[f"thp_{name}"] = parse_value(text) if text else None
    facts["numa_nodes"] = _count_nodes(fs)
    facts["virtualization"] = virtualization(fs, facts["cpu_model"])
    return facts


def virtualization(fs: HostFS, cpu_model: str | None = None) -> str:
    """What this kernel runs on, as far as it can tell: "none" (no hypervisor flag: bare
    metal), "qemu-tcg" (QEMU's software emulation), or "vm" with what names the hypervisor.
    Timings are only comparable between hosts that say the same here and have one CPU model."""
    text = _read(fs, "proc/cpuinfo") or ""
    flags = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    if "hypervisor" not in flags.split():
        return "none"
    if cpu_model and "TCG" in cpu_model:
        return "qemu-tcg"
    vendor = _read(fs, "sys/class/dmi/id/sys_vendor") or _read(fs, "sys/hypervisor/type")
    return f"vm ({vendor})" if vendor else "vm"


def tool_version(cmd: list[str]) -> str | None:
    """First line of `cmd --version`, or None when the tool is absent."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0].strip() if out else None


def _read(fs: HostFS, rel: str) -> str | None:
    try:
        return fs.read(rel).strip()
    except OSError:
        return None


def _cpu_model(fs: HostFS) -> str | None:
    text = _read(fs, "proc/cpuinfo") or ""
    for line in text.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or None


def _count_nodes(fs: HostFS) -> int | None:
    try:
        return sum(1 for n in fs.listdir("sys/devices/system/node") if n[4:].isdigit())
    except OSError:
        return None

"""The one place kvmksm reads and writes /sys and /proc.

Everything host-side goes through a HostFS so tests can point it at a fake tree
(``HostFS("/tmp/fake")``) or set ``KVMKSM_ROOT`` for a whole process.
"""

from __future__ import annotations

import os
from pathlib import Path

KSM_DIR = "sys/kernel/mm/ksm"


class HostFS:
    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root if root is not None else os.environ.get("KVMKSM_ROOT", "/"))

    def path(self, rel: str) -> Path:
        return self.root / rel.lstrip("/")

    def exists(self, rel: str) -> bool:
        return self.path(rel).exists()

    def read(self, rel: str) -> str:
        return self.path(rel).read_text()

    def write(self, rel: str, value: str) -> None:
        # sysfs wants one write() of the whole value; open without truncation
        # semantics mattering (sysfs ignores O_TRUNC) and without buffering.
        fd = os.open(self.path(rel), os.O_WRONLY | os.O_TRUNC)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)

    def listdir(self, rel: str) -> list[str]:
        return sorted(os.listdir(self.path(rel)))

    def open_fd(self, rel: str) -> int:
        """An fd kept open and re-read with pread(fd, n, 0): cheaper than reopening each tick."""
        return os.open(self.path(rel), os.O_RDONLY)

    # -- /proc helpers ---------------------------------------------------------
    def pid_of(self, comm: str) -> int | None:
        """The first process whose /proc/<pid>/comm is ``comm`` (for kernel threads like ksmd)."""
        proc = self.path("proc")
        try:
            entries = os.listdir(proc)
        except FileNotFoundError:
            return None
        for name in sorted(entries, key=lambda n: (len(n), n)):
            if not name.isdigit():
                continue
            try:
                if (proc / name / "comm").read_text().strip() == comm:
                    return int(name)
            except OSError:
                continue
        return None

    def meminfo(self) -> dict[str, int]:
        """/proc/meminfo as {field: kB}."""
        return parse_meminfo(self.read("proc/meminfo"))

    def vmstat(self) -> dict[str, int]:
        return parse_keyvalue(self.read("proc/vmstat"))

    def kernel_release(self) -> str:
        """The running kernel's release (``uname -r``) as this tree says it."""
        try:
            return self.read("proc/sys/kernel/osrelease").strip()
        except OSError:
            return os.uname().release


def parse_meminfo(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key.strip()] = int(parts[0])
    return out


def parse_keyvalue(text: str) -> dict[str, int]:
    """Lines of ``key value`` (as /proc/vmstat and /proc/<pid>/ksm_stat), numeric values only."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


def parse_stat_cpu_ticks(stat: str) -> int:
    """utime + stime (clock ticks) from a /proc/<pid>/stat line; comm may hold spaces."""
    fields = stat[stat.rindex(")") + 2 :].split()
    # fields[0] is state (field 3); utime/stime are fields 14/15
    return int(fields[11]) + int(fields[12])

"""A memory cgroup for the processes workload, as LTP's ksm03 runs in one.

cgroup v2 (`memory.max`) where the unified hierarchy has the memory controller, else
cgroup v1 (`memory.limit_in_bytes`), as on hosts where only v1's memory is mounted.
"""

from __future__ import annotations

import os
import time

from kvmksm.errors import UserError
from kvmksm.host.fs import HostFS

V1 = "sys/fs/cgroup/memory"
V2 = "sys/fs/cgroup"


class MemoryCgroup:
    def __init__(self, fs: HostFS, name: str, limit: int) -> None:
        self.fs = fs
        self.name = name
        self.limit = limit
        self.version, self.rel = self._choose()

    def _choose(self) -> tuple[int, str]:
        if self.fs.exists(f"{V1}/memory.limit_in_bytes"):
            return 1, f"{V1}/{self.name}"
        try:
            controllers = self.fs.read(f"{V2}/cgroup.controllers").split()
        except OSError:
            controllers = []
        if "memory" in controllers:
            return 2, f"{V2}/{self.name}"
        raise UserError(
            "workload.cgroup: no memory cgroup controller on this host "
            "(neither cgroup v1 memory nor cgroup v2 with memory is mounted)"
        )

    @property
    def path(self) -> str:
        return str(self.fs.path(self.rel))

    def create(self) -> None:
        if self.version == 2:
            subtree = self.fs.read(f"{V2}/cgroup.subtree_control").split()
            if "memory" not in subtree:
                raise UserError(
                    f"cgroup v2: the memory controller is not enabled for child groups of "
                    f"{self.fs.path(V2)} (echo +memory > cgroup.subtree_control)"
                )
        os.mkdir(self.fs.path(self.rel))
        knob = "memory.max" if self.version == 2 else "memory.limit_in_bytes"
        self.fs.write(f"{self.rel}/{knob}", str(self.limit))

    def add(self, pid: int) -> None:
        self.fs.write(f"{self.rel}/cgroup.procs", str(pid))

    def remove(self) -> None:
        """Remove the group once its processes are gone (rmdir says EBUSY until then)."""
        path = self.fs.path(self.rel)
        for _ in range(100):
            try:
                os.rmdir(path)
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.05)
        os.rmdir(path)  # one last time, letting the error say why

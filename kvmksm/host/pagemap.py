"""Which physical pages a process maps: /proc/<pid>/smaps, /proc/<pid>/pagemap,
/proc/kpageflags, /proc/kpagecount, and page contents through /proc/<pid>/mem.

Used to tell which guests share which KSM pages and how much more could merge. Everything
goes through HostFS, so tests can lay out a fake tree: pagemap, kpageflags and kpagecount are
arrays of little-endian 64-bit words indexed by virtual page number (pagemap) or page frame
number (kpage*), which a sparse file imitates. Reading needs root: without CAP_SYS_ADMIN
pagemap shows no frame numbers. Nothing here writes, and nothing reads a page that is not
present (reading /proc/<pid>/mem there would fault it in and change what is measured).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from kvmksm.host.fs import HostFS

# /proc/<pid>/pagemap (Documentation/admin-guide/mm/pagemap.rst)
PM_PFN_MASK = (1 << 55) - 1
PM_SWAPPED = 1 << 62
PM_PRESENT = 1 << 63
# /proc/kpageflags bits (include/uapi/linux/kernel-page-flags.h)
KPF_SLAB = 7
KPF_KSM = 21
KPF_ZERO_PAGE = 24

ENTRY = 8  # bytes per pagemap / kpageflags / kpagecount entry
PAGEMAP_CHUNK = 1 << 20  # entries per pread: 8 MiB of pagemap covers 4 GiB of guest memory
# Frames closer than this are read in one pread of kpageflags/kpagecount: a syscall costs
# about what the kernel spends on a few dozen entries (bench/bench_sharing.py measures it).
KPAGE_GAP = 64
KPAGE_MAX_SPAN = 1 << 20

_HEADER = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) [0-9a-f]+ \S+ \d+\s*(.*)$")


def page_size() -> int:
    return os.sysconf("SC_PAGE_SIZE")


@dataclass
class Mapping:
    """One line of /proc/<pid>/smaps with its VmFlags."""

    start: int
    end: int
    perms: str
    path: str
    flags: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def mergeable(self) -> bool:
        """MADV_MERGEABLE (or prctl PR_SET_MEMORY_MERGE): KSM may merge its pages."""
        return "mg" in self.flags

    @property
    def anonymous_private(self) -> bool:
        # QEMU's guest RAM: anonymous, or a private memfd (shared mappings never merge).
        return self.perms[3] == "p" and (not self.path or self.path.startswith("/memfd:"))

    def as_dict(self) -> dict[str, object]:
        return {"start": hex(self.start), "size": self.size, "path": self.path}


def parse_smaps(text: str) -> list[Mapping]:
    out: list[Mapping] = []
    for line in text.splitlines():
        m = _HEADER.match(line)
        if m:
            out.append(Mapping(int(m[1], 16), int(m[2], 16), m[3], m[4].strip()))
        elif line.startswith("VmFlags:") and out:
            out[-1].flags = line.split()[1:]
    return out


def read_mappings(fs: HostFS, pid: int) -> list[Mapping]:
    return parse_smaps(fs.read(f"proc/{pid}/smaps"))


def mergeable_regions(maps: list[Mapping]) -> list[Mapping]:
    """Every mapping KSM may merge: what it can share and what could be shared."""
    return [m for m in maps if m.mergeable and m.anonymous_private]


def guest_ram(maps: list[Mapping], memory: int | None) -> Mapping | None:
    """QEMU's guest RAM: the private anonymous mapping as large as the guest's memory
    (QEMU maps each RAM block once; the firmware and ROM blocks are a few hundred KiB);
    without the size, or when none matches, the largest mergeable one."""
    anon = [m for m in maps if m.anonymous_private]
    if memory:
        exact = [m for m in anon if m.size == memory]
        if exact:
            return max(exact, key=lambda m: m.mergeable)
    merge = [m for m in anon if m.mergeable]
    return max(merge, key=lambda m: m.size) if merge else None


# -- reading arrays of 64-bit words -----------------------------------------------------
def _pread_into(fd: int, out: np.ndarray, offset: int, what: str) -> None:
    view = memoryview(out).cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise OSError(f"{what}: short read at offset {offset + done}")
        done += n


def read_pagemap(fd: int, start: int, end: int, ps: int) -> np.ndarray:
    """The pagemap entries of [start, end) (one uint64 per page), from an open pagemap fd."""
    n = (end - start) // ps
    out = np.empty(n, dtype="<u8")
    for i in range(0, n, PAGEMAP_CHUNK):
        part = out[i : i + PAGEMAP_CHUNK]
        _pread_into(fd, part, (start // ps + i) * ENTRY, "pagemap")
    return out


def spans(pfns: np.ndarray, gap: int = KPAGE_GAP) -> Iterator[tuple[int, int, int, int]]:
    """(first pfn, count, i, j) for runs of sorted unique pfns[i:j] with gaps under `gap`."""
    if not len(pfns):
        return
    cut = np.flatnonzero(np.diff(pfns) > gap) + 1
    starts = np.concatenate([[0], cut])
    ends = np.concatenate([cut, [len(pfns)]])
    for i, j in zip(starts.tolist(), ends.tolist(), strict=True):
        # Keep one read bounded even where every frame is needed.
        for a in range(i, j, KPAGE_MAX_SPAN):
            b = min(j, a + KPAGE_MAX_SPAN)
            first = int(pfns[a])
            yield first, int(pfns[b - 1]) - first + 1, a, b


def read_kpage(fs: HostFS, name: str, pfns: np.ndarray, gap: int = KPAGE_GAP) -> np.ndarray:
    """/proc/kpageflags or /proc/kpagecount (`name`) for sorted unique `pfns`, one uint64
    each, reading only the stretches of the file that hold them."""
    out = np.empty(len(pfns), dtype="<u8")
    fd = os.open(fs.path(f"proc/{name}"), os.O_RDONLY)
    try:
        for first, count, i, j in spans(pfns, gap):
            buf = np.empty(count, dtype="<u8")
            _pread_into(fd, buf, first * ENTRY, name)
            out[i:j] = buf[pfns[i:j] - first]
    finally:
        os.close(fd)
    return out


def bit(words: np.ndarray, n: int) -> np.ndarray:
    return ((words >> np.uint64(n)) & np.uint64(1)).astype(bool)


# -- one process's mergeable pages --------------------------------------------------------
@dataclass
class ProcessPages:
    """The present pages of a process's mergeable mappings at one moment."""

    pid: int
    regions: list[Mapping]
    vaddr: np.ndarray  # byte address of each present page
    pfn: np.ndarray  # its page frame
    virtual_pages: int  # pages of the regions, present or not
    swapped: int


def present_pages(fs: HostFS, pid: int, regions: list[Mapping], ps: int) -> ProcessPages:
    """vaddr and pfn of every present page of `regions` (flags are read later, for all
    processes at once)."""
    addrs, pfns = [], []
    virtual = swapped = 0
    fd = os.open(fs.path(f"proc/{pid}/pagemap"), os.O_RDONLY)
    try:
        for r in regions:
            pm = read_pagemap(fd, r.start, r.end, ps)
            virtual += len(pm)
            present = (pm & np.uint64(PM_PRESENT)) != 0
            swapped += int(np.count_nonzero((pm & np.uint64(PM_SWAPPED)) != 0))
            idx = np.flatnonzero(present)
            addrs.append(np.uint64(r.start) + idx.astype("<u8") * np.uint64(ps))
            pfns.append(pm[idx] & np.uint64(PM_PFN_MASK))
    finally:
        os.close(fd)
    empty = np.empty(0, dtype="<u8")
    return ProcessPages(
        pid,
        regions,
        np.concatenate(addrs) if addrs else empty,
        np.concatenate(pfns) if pfns else empty,
        virtual,
        swapped,
    )


def check_pfns_visible(pages: list[ProcessPages]) -> None:
    """Without CAP_SYS_ADMIN the kernel zeroes every frame number: say so, not 'no sharing'."""
    present = sum(len(p.pfn) for p in pages)
    if present and not any(int(p.pfn.max(initial=0)) for p in pages):
        raise PermissionError(
            "/proc/<pid>/pagemap shows no page frame numbers: reading them needs root "
            "(CAP_SYS_ADMIN)"
        )


class MemReader:
    """Page contents of a process through /proc/<pid>/mem; only ever asked for present
    pages, so the read faults nothing in."""

    def __init__(self, fs: HostFS, pid: int) -> None:
        self.fd = os.open(fs.path(f"proc/{pid}/mem"), os.O_RDONLY)

    def read(self, addr: int, size: int, buf: bytearray) -> memoryview:
        view = memoryview(buf)[:size]
        done = 0
        while done < size:
            n = os.preadv(self.fd, [view[done:]], addr + done)
            if n <= 0:
                raise OSError(f"/proc/<pid>/mem: short read at {addr + done:#x}")
            done += n
        return view

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> MemReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

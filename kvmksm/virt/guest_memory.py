"""How much memory a direct-kernel-boot guest needs: the kernel's floor, read from its bzImage
header, and the tiny image's rule for how much of the rest a guest may fill.

Measured with Debian's 6.1 kernel under TCG (the tiny image, its minimal initramfs, and the
command line words of ``tiny_image.CMDLINE``): below the floor (about 82 MiB) a guest resets
before printing anything, or the kernel overwrites the initrd while decompressing itself; above
it, the kernel and its boot-time allocations take about 64 MiB of what the guest has (96 MiB
guests fill 33 MiB, not 34), and a fill closer than that panics ("System is deadlocked on
memory") or thrashes for minutes.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from kvmksm.units import format_size

FILL_HEADROOM = 64 << 20  # guest memory - guest_fill must be at least this


def kernel_floor(kernel: Path, initrd: Path | None = None) -> int | None:
    """Bytes of guest RAM below which an x86 bzImage cannot start; None if ``kernel`` is not one.

    The decompressor needs ``init_size`` bytes from ``pref_address`` (16 MiB on distribution
    kernels), and QEMU loads the initrd at the top of RAM, so it must fit above that. Debian
    6.1: 16 + 63.6 MiB + 1.7 MiB of initramfs = 81.3 MiB; 80 MiB gets the initrd overwritten
    ("Initramfs unpacking failed: invalid magic"), 64 MiB resets the guest, 82 MiB boots.
    """
    with open(kernel, "rb") as f:
        header = f.read(0x268)
    if len(header) < 0x268 or header[0x202:0x206] != b"HdrS":
        return None
    version = int.from_bytes(header[0x206:0x208], "little")
    if version < 0x20A:  # pref_address and init_size came with boot protocol 2.10
        return None
    pref_address = int.from_bytes(header[0x258:0x260], "little")
    init_size = int.from_bytes(header[0x260:0x264], "little")
    return pref_address + init_size + (initrd.stat().st_size if initrd else 0)


def memory_problem(memory: int, fill: int, floor: int | None, kernel: str) -> str | None:
    """Why guests of ``memory`` bytes filling ``fill`` bytes cannot work, or None."""
    if floor is not None and memory < floor:
        return (
            f"memory {format_size(memory)} is below the {format_size(floor)} that kernel "
            f"{kernel} needs to start (bzImage pref_address + init_size, plus the initrd): "
            f"use at least {format_size(_round_up_mib(floor))}"
        )
    headroom = format_size(FILL_HEADROOM)
    if fill and fill > memory - FILL_HEADROOM:
        return (
            f"guest_fill {format_size(fill)} does not fit in guests of {format_size(memory)}: "
            f"tiny guests may fill at most memory - {headroom} (their kernel keeps the rest); "
            f"use memory >= {format_size(fill + FILL_HEADROOM)} "
            f"or guest_fill <= {format_size(max(0, memory - FILL_HEADROOM))}"
        )
    return None


def base_problem(xml: str, memory: int, fill: int) -> str | None:
    """``memory_problem`` for clones of a base domain (its XML): the kernel's floor when it
    boots a readable x86 bzImage directly (<os><kernel>), and the fill rule for guest_fill."""
    os_el = ET.fromstring(xml).find("os")
    kernel = os_el.findtext("kernel") if os_el is not None else None
    initrd = os_el.findtext("initrd") if os_el is not None else None
    floor = None
    if kernel:
        try:
            floor = kernel_floor(Path(kernel), Path(initrd) if initrd else None)
        except OSError:  # not readable here: libvirt will say what is wrong with it
            floor = None
    return memory_problem(memory, fill, floor, Path(kernel).name if kernel else "")


def _round_up_mib(n: int) -> int:
    return -(-n // (1 << 20)) << 20

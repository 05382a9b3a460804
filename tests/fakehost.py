"""A fake /sys + /proc tree for fast tests of logic and failure paths."""

from __future__ import annotations

import os
from pathlib import Path

KNOBS = {
    "run": "0",
    "pages_to_scan": "100",
    "sleep_millisecs": "20",
    "max_page_sharing": "256",
    "merge_across_nodes": "1",
    "use_zero_pages": "0",
    "stable_node_chains_prune_millisecs": "2000",
    "smart_scan": "1",
    "advisor_mode": "[none] scan-time",
    "advisor_max_cpu": "70",
}
COUNTERS = {
    "pages_shared": "0",
    "pages_sharing": "0",
    "pages_unshared": "0",
    "pages_volatile": "0",
    "full_scans": "0",
    "pages_scanned": "0",
    "pages_skipped": "0",
    "ksm_zero_pages": "0",
    "general_profit": "0",
    "stable_node_chains": "0",
    "stable_node_dups": "0",
}
# What a 5.15 kernel has: no smart_scan, no advisor, no ksm_zero_pages, no pages_scanned.
OLD_KERNEL_DROP = (
    "smart_scan",
    "advisor_mode",
    "advisor_max_cpu",
    "ksm_zero_pages",
    "pages_scanned",
    "pages_skipped",
)
MEMINFO = """MemTotal:       24684084 kB
MemFree:        23630712 kB
MemAvailable:   24238684 kB
Buffers:           10000 kB
Cached:           780408 kB
AnonPages:         75980 kB
AnonHugePages:         0 kB
Shmem:              8872 kB
"""
KSMD_PID = 37


def make_tree(root: Path, old_kernel: bool = False) -> Path:
    ksm = root / "sys/kernel/mm/ksm"
    ksm.mkdir(parents=True)
    for name, value in {**KNOBS, **COUNTERS}.items():
        if old_kernel and name in OLD_KERNEL_DROP:
            continue
        p = ksm / name
        p.write_text(value + "\n")
        os.chmod(p, 0o644 if name in KNOBS else 0o444)
    proc = root / "proc"
    (proc / str(KSMD_PID)).mkdir(parents=True)
    (proc / str(KSMD_PID) / "comm").write_text("ksmd\n")
    set_ksmd_ticks(root, 0)
    (proc / "meminfo").write_text(MEMINFO)
    (proc / "vmstat").write_text("nr_free_pages 100\ncow_ksm 0\nksm_swpin_copy 0\n")
    (proc / "sys/kernel").mkdir(parents=True)
    (proc / "sys/kernel/osrelease").write_text("6.18.0-fake\n")
    (proc / "sys/kernel/hostname").write_text("fakehost\n")
    (proc / "cpuinfo").write_text("model name\t: Fake CPU\n")
    (root / "sys/kernel/mm/transparent_hugepage").mkdir(parents=True)
    (root / "sys/kernel/mm/transparent_hugepage/enabled").write_text("always [madvise] never\n")
    return root


def set_ksmd_ticks(root: Path, ticks: int) -> None:
    stat = f"{KSMD_PID} (ksmd) S 2 0 0 0 -1 2097216 0 0 0 0 0 {ticks} 0 0 39 19 1 0 9 0 0"
    (root / f"proc/{KSMD_PID}/stat").write_text(stat + "\n")


def knob_values(root: Path) -> dict[str, str]:
    ksm = root / "sys/kernel/mm/ksm"
    return {p.name: p.read_text().strip() for p in ksm.iterdir() if p.stat().st_mode & 0o200}


def set_counter(root: Path, name: str, value: int) -> None:
    (root / "sys/kernel/mm/ksm" / name).write_text(f"{value}\n")

"""Who shares with whom and the sharing potential on the real kernel: three host processes
with MADV_MERGEABLE pages of known contents, ksmd pinned for exact counts (LTP's knobs),
then the matrix, the sums against pages_shared/pages_sharing and the potential, exactly."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections.abc import Iterator

import pytest

from kvmksm.analysis.potential import measure_potential
from kvmksm.analysis.sharing import measure_sharing
from kvmksm.host.fs import HostFS
from kvmksm.host.ksm import Ksm

pytestmark = pytest.mark.realksm

# One page per entry; equal names are equal contents (random bytes seeded by the name and a
# per-test salt, so nothing else on the host has them). A and B share X, B and C share Y,
# all three share Z; P (five times) and Q (twice) are duplicates inside A and C.
LAYOUT = {
    "A": ["X"] * 2 + ["Z"] + ["P"] * 5 + ["a1", "a2", "a3"],
    "B": ["X"] * 3 + ["Y", "Z", "b1", "b2"],
    "C": ["Y"] * 4 + ["Z"] + ["Q"] * 2 + ["c1", "c2", "c3", "c4"],
}
CHILD = """
import json, mmap, os, random, sys
names, salt = json.loads(sys.argv[1]), sys.argv[2]
ps = mmap.PAGESIZE
m = mmap.mmap(-1, len(names) * ps, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
m.madvise(mmap.MADV_MERGEABLE)
for i, name in enumerate(names):
    m[i * ps : (i + 1) * ps] = random.Random(salt + name).randbytes(ps)
print(os.getpid(), flush=True)
sys.stdin.read()
"""
EXACT = {
    "max_page_sharing": 1 << 16,
    "smart_scan": 0,
    "pages_to_scan": 1 << 16,
    "sleep_millisecs": 0,
    "use_zero_pages": 0,
}


@pytest.fixture
def children() -> Iterator[dict[str, int]]:
    salt = f"{random.getrandbits(64):x}/"
    procs = {}
    for name, pages in LAYOUT.items():
        rng = random.Random(name)
        order = list(pages)
        rng.shuffle(order)  # twins apart, not in runs
        procs[name] = subprocess.Popen(
            [sys.executable, "-c", CHILD, json.dumps(order), salt],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
    try:
        yield {name: int(p.stdout.readline()) for name, p in procs.items()}
    finally:
        for p in procs.values():
            p.stdin.close()
            p.wait(10)


def test_who_shares_with_whom_exactly(real_ksm: Ksm, children: dict[str, int]) -> None:
    fs = HostFS("/")
    saved = real_ksm.read_knobs()
    try:
        real_ksm.write("run", 2)  # max_page_sharing can only change with nothing merged
        real_ksm.set_knobs(EXACT)
        real_ksm.write("run", 1)
        real_ksm.wait_full_scans(3, timeout=120)
        # ksmd stopped, merged pages kept: the counters hold still while pages are read.
        real_ksm.write("run", 0)
        s, snap = measure_sharing(fs, real_ksm, children, tolerance=0.0)
        p = measure_potential(fs, snap, max_page_sharing=EXACT["max_page_sharing"])
    finally:
        real_ksm.restore(saved)
    assert s["guests"] == ["A", "B", "C"]
    assert s["pairs"] == [[3, 2, 1], [2, 3, 2], [1, 2, 3]]
    assert s["self_only"] == [1, 0, 1]
    assert (s["frames"], s["mappings"], s["saved"]) == (5, 20, 15)
    assert s["mappings_per_guest"] == [8, 5, 7]
    assert s["frames_by_sharers"] == {"1": 2, "2": 2, "3": 1}
    assert s["foreign_mappings"] == 0  # the salted contents are ours alone
    per = {g["name"]: g for g in s["per_guest"]}
    for name in LAYOUT:  # each process's own count, from the kernel, agrees exactly
        assert per[name]["ksm_merging_pages"] == per[name]["ksm_mappings"]
        assert per[name]["ram"]["size"] == len(LAYOUT[name]) * 4096
    # The sums against the global counters: exact when no one else uses KSM. Others'
    # mergeable processes (guests of other sessions on this host) merge too when ksmd runs:
    # each merged mapping of any process counts once in pages_shared + pages_sharing and once
    # in its ksm_merging_pages, all frozen with ksmd stopped, so ours plus theirs is exact.
    c = s["counters_after"]
    if s["only_these_guests"]:
        assert (c["pages_shared"], c["pages_sharing"]) == (5, 15)
        assert all(x["passed"] for x in s["checks"]), s["checks"]
    else:
        theirs = s["other_ksm_users"]["merging_pages"]
        assert c["pages_shared"] + c["pages_sharing"] == s["mappings"] + theirs, s
        assert c["pages_shared"] >= 5 and c["pages_sharing"] >= 15
    # Potential as constructed: 29 pages, 14 distinct contents, all merged already.
    assert (p["pages"], p["distinct"], p["pages_with_twin"]) == (29, 14, 20)
    assert (p["potential"], p["achieved"], p["frames_now"]) == (15, 15, 14)
    assert p["potential_within_guests"] == 5 + 2 + 4
    assert p["achieved_pct_of_potential"] == 100.0
    assert p["bytes_read"] == 29 * 4096 and p["not_present_pages"] == 0
    assert real_ksm.read_knobs() == saved

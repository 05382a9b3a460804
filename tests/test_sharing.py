"""Who shares with whom and the sharing potential, on a fake /proc: smaps, pagemap,
kpageflags, kpagecount and /proc/<pid>/mem laid out as sparse files with known contents."""

from __future__ import annotations

import contextlib
import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from kvmksm.analysis.potential import measure_potential, potential, time_to_fraction
from kvmksm.analysis.sharing import measure_sharing, sharing_matrix
from kvmksm.host.fs import KSM_DIR, HostFS
from kvmksm.host.ksm import Ksm
from kvmksm.host.pagemap import (
    KPF_KSM,
    KPF_ZERO_PAGE,
    PM_PRESENT,
    guest_ram,
    mergeable_regions,
    parse_smaps,
    read_kpage,
    spans,
)
from kvmksm.results.record import RunRecord
from kvmksm.views import charts
from kvmksm.views.report import write_report
from kvmksm.workloads.sharing import AUTO_LIMIT, wanted
from kvmksm.workloads.sharing import measure as measure_step

from .recordgen import vm_record

PS = 4096
ANON, MMAP = 1 << 12, 1 << 11
KSM_FLAGS = (1 << KPF_KSM) | ANON | MMAP
ZERO_PFN = 7

QEMU_SMAPS = """\
55d0c4a00000-55d0c4b00000 r-xp 00000000 fd:01 1234 /usr/bin/qemu-system-x86_64
Size:               1024 kB
VmFlags: rd ex mr mw me
7f9d4e400000-7f9d4e401000 rw-p 00000000 00:00 0
Size:                  4 kB
VmFlags: rd wr mr mw me dc ac dd hg mg
7f9d4e600000-7f9d4e800000 rw-p 00000000 00:00 0
Size:               2048 kB
VmFlags: rd wr mr mw me dc ac dd hg mg
7f9d4fe00000-7f9d6fe00000 rw-p 00000000 00:00 0
Size:             524288 kB
Rss:              102400 kB
VmFlags: rd wr mr mw me dc ac dd hg mg
7f9d70000000-7f9d90000000 rw-s 00000000 00:01 99 /memfd:shared (deleted)
Size:             524288 kB
VmFlags: rd wr sh mr mw me ms sd mg
7f9da0000000-7f9da4000000 rw-p 00000000 00:00 0
Size:              65536 kB
VmFlags: rd wr mr mw me ac
"""
# As the kernel writes them: a space after the inode of an unnamed mapping and after VmFlags.
QEMU_SMAPS = QEMU_SMAPS.replace(" 0\n", " 0 \n").replace("hg mg\n", "hg mg \n")


def test_parse_smaps_and_find_guest_ram() -> None:
    maps = parse_smaps(QEMU_SMAPS)
    assert len(maps) == 6
    assert maps[0].path == "/usr/bin/qemu-system-x86_64" and not maps[0].mergeable
    regions = mergeable_regions(maps)
    # The shared memfd is flagged mg but KSM never merges shared memory; the heap is not mg.
    assert [r.size for r in regions] == [4096, 2 << 20, 512 << 20]
    assert guest_ram(maps, 512 << 20).start == 0x7F9D4FE00000
    # Without the size, or with a size no mapping has, the largest mergeable one.
    assert guest_ram(maps, None).size == 512 << 20
    assert guest_ram(maps, 123 << 20).size == 512 << 20
    # A guest whose RAM is not mergeable (mem-merge=off) is still found by its size.
    assert guest_ram(maps, 64 << 20).start == 0x7F9DA0000000


def _put_words(path: Path, words: dict[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    with open(path, "r+b") as f:
        for index, value in words.items():
            f.seek(index * 8)
            f.write(struct.pack("<Q", value))


def _put_bytes(path: Path, at: dict[int, bytes]) -> None:
    path.touch()
    with open(path, "r+b") as f:
        for offset, data in at.items():
            f.seek(offset)
            f.write(data)


def _page(byte: int) -> bytes:
    return bytes([byte]) * PS


# Frames: 100 X (A twice, B once), 101 Y (B once, C twice), 102 Z (A, B, C), 103 P (A three
# times), 104 S (C once: its other mappings are gone); 500.. ordinary pages; 7 the zero page.
CONTENT = {100: _page(ord("X")), 101: _page(ord("Y")), 102: _page(ord("Z"))}
CONTENT |= {103: _page(ord("P")), 104: _page(ord("S")), 500: _page(ord("N"))}
CONTENT |= {501: _page(ord("N")), 502: _page(ord("u")), 503: bytes(PS)}
GARBAGE = _page(0xEE)  # what /proc/<pid>/mem holds where nothing may be read
PROCS = {  # name: (pid, start, [pfn or None (not present) per page], ksm_zero_pages)
    "A": (1001, 0x10000000, [100, 100, 103, 103, 103, 102, 500, None], 0),
    "B": (1002, 0x20000000, [100, 101, 102, 501, 502], 0),
    "C": (1003, 0x30000000, [101, 101, 102, 104, ZERO_PFN, ZERO_PFN, 503], 2),
}


def _fake_host(root: Path, foreign: bool = False) -> HostFS:
    """Three processes A, B, C on a fake /proc, KSM counters to match."""
    flags, counts = {}, {}
    for pid, start, pfns, kz in PROCS.values():
        d = root / f"proc/{pid}"
        d.mkdir(parents=True)
        size = len(pfns) * PS
        (d / "smaps").write_text(
            f"{start:x}-{start + size:x} rw-p 00000000 00:00 0 \nSize: {size // 1024} kB\n"
            "VmFlags: rd wr mr mw me ac mg\n"
            f"{start + size:x}-{start + 2 * size:x} rw-p 00000000 00:00 0 \n"
            "VmFlags: rd wr mr mw me ac\n"
        )
        _put_words(
            d / "pagemap",
            {start // PS + i: (PM_PRESENT | p) if p is not None else 0 for i, p in enumerate(pfns)},
        )
        merging = sum(1 for p in pfns if p is not None and 100 <= p < 200)
        (d / "ksm_stat").write_text(
            f"ksm_rmap_items {len(pfns)}\nksm_zero_pages {kz}\nksm_merging_pages {merging}\n"
        )
        (d / "comm").write_text("qemu\n")
        _put_bytes(
            d / "mem",
            {
                start + i * PS: CONTENT.get(p, GARBAGE) if p != ZERO_PFN else GARBAGE
                for i, p in enumerate(pfns)
            },
        )
        for p in pfns:
            if p is not None:
                flags[p] = KSM_FLAGS if 100 <= p < 200 else ANON | MMAP
                counts[p] = counts.get(p, 0) + 1
    flags[ZERO_PFN] = 1 << KPF_ZERO_PAGE
    flags[3] = KSM_FLAGS | (1 << 7)  # a slab page that looks like KSM: nobody maps it
    if foreign:
        counts[102] += 1  # someone else maps Z too
        other = root / "proc/2000"
        other.mkdir()
        (other / "ksm_stat").write_text("ksm_rmap_items 9\nksm_merging_pages 1\n")
        (other / "comm").write_text("other\n")
    _put_words(root / "proc/kpageflags", flags)
    _put_words(root / "proc/kpagecount", counts)
    ksm = root / KSM_DIR
    for name, value in {"pages_shared": 5, "pages_sharing": 8, "ksm_zero_pages": 2}.items():
        (ksm / name).write_text(f"{value}\n")
    return HostFS(root)


def _names() -> dict[str, int]:
    return {name: v[0] for name, v in PROCS.items()}


def test_matrix_self_only_and_sums_on_a_fake_host(fake_root: Path) -> None:
    fs = _fake_host(fake_root)
    memory = {name: len(v[2]) * PS for name, v in PROCS.items()}
    s, snap = measure_sharing(fs, Ksm(fs), _names(), memory)
    assert s["guests"] == ["A", "B", "C"]
    assert s["pairs"] == [[3, 2, 1], [2, 3, 2], [1, 2, 3]]
    assert s["self_only"] == [1, 0, 0]  # P: A's own triple; S is mapped only once
    assert (s["frames"], s["mappings"], s["saved"]) == (5, 13, 8)
    assert s["mappings_per_guest"] == [6, 3, 4]
    assert s["frames_by_sharers"] == {"1": 2, "2": 2, "3": 1}
    assert s["frames_mapped_once"] == 1
    assert s["foreign_mappings"] == 0 and s["only_these_guests"]
    a, b, c = s["per_guest"]
    assert a["ram"] == {"start": "0x10000000", "size": 8 * PS, "path": ""}
    assert (a["virtual_pages"], a["present_pages"]) == (8, 7)
    assert c["zero_page_mappings"] == 2 and s["zero_page_mappings"] == 2
    checks = {x["name"]: x for x in s["checks"]}
    assert checks["KSM frames = pages_shared"]["observed"] == 5
    assert checks["mappings - frames = pages_sharing"]["expected"] == 8
    assert all(x["passed"] for x in s["checks"]), s["checks"]
    assert checks["C: KSM mappings = ksm_merging_pages"]["observed"] == 4
    assert list(snap.zero_pfns) == [ZERO_PFN]
    json.dumps(s)  # plain data, straight into run.json


def test_counters_that_disagree_fail_the_check(fake_root: Path) -> None:
    fs = _fake_host(fake_root)
    (fake_root / KSM_DIR / "pages_sharing").write_text("100\n")
    s, _ = measure_sharing(fs, Ksm(fs), _names())
    bad = [x for x in s["checks"] if not x["passed"]]
    assert [x["name"] for x in bad] == ["mappings - frames = pages_sharing"]
    assert bad[0]["difference"] == -92


def test_other_ksm_users_are_named(fake_root: Path) -> None:
    fs = _fake_host(fake_root, foreign=True)
    s, _ = measure_sharing(fs, Ksm(fs), _names())
    assert s["foreign_mappings"] == 1 and not s["only_these_guests"]
    assert s["other_ksm_users"] == {
        "processes": 1,
        "merging_pages": 1,
        "zero_pages": 0,
        "largest": [{"pid": 2000, "comm": "other", "ksm_merging_pages": 1}],
    }
    assert "other processes use KSM" in s["checks"][0]["note"]


def test_no_frame_numbers_without_root(fake_root: Path) -> None:
    fs = _fake_host(fake_root)
    for pid, start, pfns, _ in PROCS.values():  # what an unprivileged reader sees
        _put_words(
            fake_root / f"proc/{pid}/pagemap",
            {start // PS + i: PM_PRESENT for i in range(len(pfns))},
        )
    with pytest.raises(PermissionError, match="needs root"):
        measure_sharing(fs, Ksm(fs), _names())


def test_potential_on_a_fake_host(fake_root: Path) -> None:
    fs = _fake_host(fake_root)
    _, snap = measure_sharing(fs, Ksm(fs), _names())
    p = measure_potential(fs, snap, max_page_sharing=2, guest_memory=20 * PS)
    # 17 pages with frames + C's 2 KSM zero pages; contents X3 Y3 Z3 P3 S1 N2 u1 zero3.
    assert (p["pages"], p["distinct"], p["zero_pages"]) == (19, 8, 3)
    assert p["pages_with_twin"] == 17
    assert p["potential"] == 11
    assert p["potential_within_max_page_sharing"] == 19 - 13
    assert p["potential_within_guests"] == 3 + 0 + 3
    assert (p["frames_now"], p["achieved"]) == (9, 10)
    assert p["achieved_pct_of_potential"] == pytest.approx(100 * 10 / 11, abs=1e-3)
    assert p["ceiling_pct"] == pytest.approx(200 / 3, abs=1e-3)
    assert p["potential_pct_of_memory"] == pytest.approx(100 * 11 / 20)
    # Nothing was read where a page is not present or is the zero page (GARBAGE there).
    assert p["bytes_read"] == 17 * PS
    assert (p["zero_page_mappings"], p["not_present_pages"]) == (2, 1)
    by = {g["name"]: g for g in p["per_guest"]}
    assert by["B"] == {
        "name": "B",
        "pages": 5,
        "zero_pages": 0,
        "distinct": 5,
        "potential_alone": 0,
        "pages_with_twin": 4,  # X, Y, Z and N have twins in other guests; u does not
    }
    assert by["C"]["zero_pages"] == 3 and by["C"]["potential_alone"] == 3


def test_potential_counts_zero_pages_by_use_zero_pages() -> None:
    zh = __import__("kvmksm.analysis.potential", fromlist=["zero_hash"]).zero_hash(PS)
    h = [np.array([zh, zh, 5, 5, 6], dtype="<u8"), np.array([5, 7], dtype="<u8")]
    base = potential(["a", "b"], h, [1, 0], frames_now=7, ps=PS)
    assert (base["pages"], base["distinct"], base["potential"]) == (8, 4, 4)
    assert base["achieved"] == 1
    zp = potential(["a", "b"], h, [1, 0], frames_now=7, ps=PS, use_zero_pages=True)
    assert zp["potential"] == 5  # the three zero pages need no frame at all
    one = potential(["a", "b"], h, [1, 0], frames_now=7, ps=PS, max_page_sharing=1)
    assert one["potential_within_max_page_sharing"] == 0
    assert potential([], [], [], 0, PS)["potential"] == 0


def test_sharing_matrix_of_nothing() -> None:
    s = sharing_matrix(["a", "b"], [np.empty(0, "<u8"), np.empty(0, "<u8")])
    assert s["pairs"] == [[0, 0], [0, 0]] and s["frames"] == 0 and s["self_only"] == [0, 0]
    assert sharing_matrix([], [])["pairs"] == []


@pytest.mark.parametrize("gap", [0, 1, 5, 64, 1 << 20])
def test_read_kpage_reads_exactly_the_frames_asked(tmp_path: Path, gap: int) -> None:
    rng = np.random.default_rng(3)
    pfns = np.unique(rng.integers(0, 200_000, 3000)).astype("<u8")
    _put_words(tmp_path / "proc/kpageflags", {int(p): int(p) * 3 + 1 for p in pfns})
    got = read_kpage(HostFS(tmp_path), "kpageflags", pfns, gap)
    assert (got == pfns * np.uint64(3) + np.uint64(1)).all()
    covered = sum(j - i for _, _, i, j in spans(pfns, gap))
    assert covered == len(pfns)


def test_time_to_fraction() -> None:
    s = pd.DataFrame({"t": [0.0, 1, 2, 3, 4], "pages_sharing": [0, 10, 50, 95, 99]})
    assert time_to_fraction(s, 1.0, 100) == 2.0
    assert time_to_fraction(s, 1.0, 1000) is None
    assert time_to_fraction(s, None, 100) is None


def test_auto_setting() -> None:
    assert wanted(None, {"a": 1 << 30})[0]
    on, why = wanted(None, {"a": AUTO_LIMIT, "b": 1})
    assert not on and "workload.sharing: true" in why
    assert wanted(True, {"a": AUTO_LIMIT * 2})[0] and not wanted(False, {"a": 1})[0]


def test_heatmap_and_report(fake_root: Path, tmp_path: Path) -> None:
    fs = _fake_host(fake_root)
    s, snap = measure_sharing(fs, Ksm(fs), _names())
    p = measure_potential(fs, snap)
    svg = charts.sharing_heatmap(
        ["kvmksm-ab-tiny-01", "kvmksm-ab-tiny-02"], [[4, 3], [3, 4]], [1, 2]
    )
    assert svg and "Who shares with whom" in svg and ">01<" in svg.replace(" ", "")
    d = vm_record(tmp_path / "vm")
    meta = json.loads((d / "run.json").read_text())
    s["taken"] = p["taken"] = "after the plateau window"
    s["t"] = p["t"] = 150.0
    meta.update(sharing=s, potential=p)
    (d / "run.json").write_text(json.dumps(meta))
    html = write_report(d).read_text()
    part = html[html.index('<section id="sharing">') : html.index('<section id="events">')]
    assert 'id="chart-sharing"' in part and 'href="#sharing"' in html
    assert "13 times by 3 guests" in part
    assert "KSM frames = pages_shared" in part and "differs" not in part
    assert "Potential" in part and "Ceiling (N-1)/N" in part


def test_report_names_other_ksm_users(fake_root: Path, tmp_path: Path) -> None:
    fs = _fake_host(fake_root, foreign=True)
    s, _ = measure_sharing(fs, Ksm(fs), _names())
    d = vm_record(tmp_path / "vm")
    meta = json.loads((d / "run.json").read_text())
    meta["sharing"] = s
    (d / "run.json").write_text(json.dumps(meta))
    html = write_report(d).read_text()
    assert "Other processes use KSM too</strong> (1 with 1 merged pages; 1 mappings" in html


def test_report_says_when_sharing_was_not_measured(tmp_path: Path) -> None:
    d = vm_record(tmp_path / "vm")
    meta = json.loads((d / "run.json").read_text())
    meta["sharing"] = {"error": "pagemap needs root"}
    (d / "run.json").write_text(json.dumps(meta))
    html = write_report(d).read_text()
    assert "Not measured:</strong> pagemap needs root" in html


class _Ctx:
    """What the sharing step uses of a RunContext."""

    def __init__(self, fs: HostFS, record: RunRecord) -> None:
        self.fs, self.ksm, self.record = fs, Ksm(fs), record

    @contextlib.contextmanager
    def phase(self, text: str) -> Iterator[Any]:
        yield lambda *a, **k: None


def _step_record(tmp_path: Path) -> RunRecord:
    rec = RunRecord.create(tmp_path / "out", {"name": "step"}, None)
    rec.update(guests=[{"name": n, "memory_kb": len(v[2]) * 4} for n, v in PROCS.items()])
    return rec


def test_step_records_matrix_and_potential_with_events(fake_root: Path, tmp_path: Path) -> None:
    fs = _fake_host(fake_root)
    rec = _step_record(tmp_path)
    measure_step(_Ctx(fs, rec), _names(), None)  # type: ignore[arg-type]
    meta = json.loads((rec.dir / "run.json").read_text())
    assert meta["sharing"]["pairs"] == [[3, 2, 1], [2, 3, 2], [1, 2, 3]]
    assert meta["sharing"]["per_guest"][0]["ram"]["size"] == 8 * PS
    assert meta["potential"]["potential"] == 11
    assert "after the plateau window" in meta["potential"]["taken"]
    ev = {e["kind"]: e for e in meta["events"]}
    assert "sums match the counters" in ev["sharing_matrix"]["detail"]
    assert ev["sharing_potential"]["seconds"] >= 0
    assert "potential 11 pages, achieved 10" in ev["sharing_potential"]["detail"]


def test_step_skipped_or_failed_is_recorded(fake_root: Path, tmp_path: Path) -> None:
    fs = _fake_host(fake_root)
    rec = _step_record(tmp_path)
    measure_step(_Ctx(fs, rec), _names(), False)  # type: ignore[arg-type]
    assert "sharing" not in rec.data
    assert rec.data["events"][-1]["kind"] == "sharing_skipped"
    measure_step(_Ctx(fs, rec), {"A": 4242}, True)  # type: ignore[arg-type]  # no such process
    assert rec.data["events"][-1]["kind"] == "sharing_failed"
    assert "4242/smaps" in rec.data["sharing"]["error"] and "potential" not in rec.data

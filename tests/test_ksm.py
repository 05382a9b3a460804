from __future__ import annotations

from pathlib import Path

import pytest

from kvmksm.errors import UserError
from kvmksm.host.fs import HostFS, parse_keyvalue, parse_meminfo, parse_stat_cpu_ticks
from kvmksm.host.ksm import Ksm, parse_value

from .fakehost import make_tree, set_counter


def test_parse_values() -> None:
    assert parse_value("98304\n") == 98304
    assert parse_value("[none] scan-time\n") == "none"
    assert parse_value("none [scan-time]") == "scan-time"
    assert parse_value("-3") == -3


def test_knobs_and_counters_split_by_mode(fake_fs: HostFS) -> None:
    ksm = Ksm(fake_fs)
    assert "run" in ksm.knobs() and "pages_to_scan" in ksm.knobs()
    assert "pages_sharing" in ksm.counters() and "run" not in ksm.counters()
    knobs = ksm.read_knobs()
    assert knobs["advisor_mode"] == "none"
    assert knobs["max_page_sharing"] == 256


def test_counter_parsing(fake_root: Path, fake_fs: HostFS) -> None:
    set_counter(fake_root, "pages_sharing", 98302)
    set_counter(fake_root, "pages_shared", 2)
    counters = Ksm(fake_fs).read_counters()
    assert counters["pages_sharing"] == 98302
    assert counters["pages_shared"] == 2
    assert "advisor_mode" not in counters


def test_missing_knob_on_older_kernel(tmp_path: Path) -> None:
    ksm = Ksm(HostFS(make_tree(tmp_path, old_kernel=True)))
    ksm.check_knobs(["pages_to_scan", "max_page_sharing"])
    with pytest.raises(
        UserError,
        match=r"knob 'smart_scan' is not available on this kernel "
        r"\(.*\); it appeared in Linux 6\.7",
    ):
        ksm.check_knobs({"smart_scan": 0})
    with pytest.raises(UserError, match=r"'pages_sharing' is a read-only KSM counter"):
        ksm.check_knobs(["pages_sharing"])
    with pytest.raises(UserError, match=r"'bogus' is not a KSM knob"):
        ksm.check_knobs(["bogus"])


def test_no_ksm_at_all(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="KSM is not available"):
        Ksm(HostFS(tmp_path)).require()


def test_set_and_restore_order(
    fake_fs: HostFS, fake_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writes themselves, in the order the kernel sees them: the advisor first (it tunes
    pages_to_scan), `run` last, on set and on restore, whatever order they were given in."""
    ksm = Ksm(fake_fs)
    saved = ksm.read_knobs()
    writes: list[tuple[str, str]] = []
    real_write = fake_fs.write

    def spy(rel: str, value: str) -> None:
        writes.append((rel.rsplit("/", 1)[-1], value))
        real_write(rel, value)

    monkeypatch.setattr(fake_fs, "write", spy)
    ksm.set_knobs({"run": 1, "pages_to_scan": 5000, "advisor_mode": "scan-time"})
    assert writes == [("advisor_mode", "scan-time"), ("pages_to_scan", "5000"), ("run", "1")]
    assert ksm.read("pages_to_scan") == 5000 and ksm.read("run") == 1
    writes.clear()
    ksm.write("sleep_millisecs", 7)  # changed by someone: restored too
    writes.clear()
    assert ksm.restore(saved) == []
    names = [name for name, _ in writes]
    assert names[0] == "advisor_mode" and names[-1] == "run"
    assert sorted(names) == ["advisor_mode", "pages_to_scan", "run", "sleep_millisecs"]
    assert ksm.read_knobs() == saved
    # a knob already at its value is not written at all
    writes.clear()
    assert ksm.restore(saved) == [] and writes == []


def test_wait_full_scans_times_out(fake_fs: HostFS) -> None:
    with pytest.raises(TimeoutError, match="did not finish 3 full scans within 0.05s"):
        Ksm(fake_fs).wait_full_scans(3, timeout=0.05)


def test_proc_parsers() -> None:
    assert parse_meminfo("MemTotal:  100 kB\nHugePages_Total: 0\n") == {
        "MemTotal": 100,
        "HugePages_Total": 0,
    }
    assert parse_keyvalue("ksm_merging_pages 5\nksm_merge_any: no\n") == {"ksm_merging_pages": 5}
    stat = "37 (ksm d) S 2 0 0 0 -1 2097216 0 0 0 0 7 11 0 0 39 19 1 0 9"
    assert parse_stat_cpu_ticks(stat) == 18


def test_pid_of_finds_kernel_thread(fake_fs: HostFS) -> None:
    assert fake_fs.pid_of("ksmd") == 37
    assert fake_fs.pid_of("nope") is None

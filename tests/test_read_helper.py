"""Per-guest reads shared with helper processes (kvmksm.sampling.read_helper): the same rows
as one process reading alone, guests that go or fail in a helper's share, and helpers that
die, stall or lose their sampler. Fake /proc trees for the logic, real processes for what the
kernel shows."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmksm.host.fs import HostFS
from kvmksm.results.record import RunRecord
from kvmksm.sampling import read_helper
from kvmksm.sampling.guest_rows import SHARE, VmProbe, helpers_for
from kvmksm.sampling.sampler import Sampler

from .fakeqemu import add_qemu, exit_qemu, set_merging


def guests(root: Path, n: int) -> dict[str, int]:
    mapping = {}
    for i in range(n):
        add_qemu(root, 7000 + i, f"g{i:02d}", merging=10 * i, rss_kb=4 * (1000 + i))
        mapping[f"g{i:02d}"] = 7000 + i
    return mapping


def alive(pid: int) -> bool:
    """Still a process (not exited and reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def probes(fake_root: Path) -> Iterator[list[VmProbe]]:
    made: list[VmProbe] = []
    yield made
    for p in made:
        p.close()


def probe(made: list[VmProbe], root: Path, mapping: dict[str, int], **kw: object) -> VmProbe:
    p = VmProbe(HostFS(root), lambda: dict(mapping), **kw)  # type: ignore[arg-type]
    made.append(p)
    return p


def test_helpers_give_the_rows_one_process_gives(fake_root: Path, probes: list) -> None:
    mapping = guests(fake_root, 7)
    alone = probe(probes, fake_root, mapping, helpers=0)
    shared = probe(probes, fake_root, mapping, helpers=2)
    rows = shared.rows(1.0)
    assert rows == alone.rows(1.0)
    assert [r[1] for r in rows] == sorted(mapping)  # domain order, across the shares
    pids = shared.helper_pids
    assert len(pids) == 2 and all(alive(p) for p in pids)
    # Files held open in the helpers follow the content, as in this process.
    set_merging(fake_root, 7006, 12345)  # the last share's last guest
    rows = shared.rows(2.0)
    assert rows == alone.rows(2.0)
    assert rows[-1][5] == 12345
    # A guest added, another removed: shares are dealt again, rows still the same.
    add_qemu(fake_root, 7100, "a-first", merging=3)
    mapping["a-first"] = 7100
    del mapping["g03"]
    assert shared.rows(3.0) == alone.rows(3.0)
    assert shared.problems == []
    shared.close()
    assert not any(alive(p) for p in pids)  # ended and reaped


def test_guests_gone_or_failing_in_a_helpers_share(fake_root: Path, probes: list) -> None:
    mapping = guests(fake_root, 6)
    told: list[tuple[str, int]] = []
    shared = probe(probes, fake_root, mapping, helpers=1, on_gone=lambda d, p: told.append((d, p)))
    alone = probe(probes, fake_root, mapping, helpers=0)
    shared.rows(1.0)
    alone.rows(1.0)
    exit_qemu(fake_root, 7004)  # in the helper's share (the second half)
    # A file whose layout changes under the held descriptor: read by path from then on.
    (fake_root / "proc/7005/ksm_stat").write_text("ksm_rmap_items 5\n")
    rows = shared.rows(2.0)
    assert rows == alone.rows(2.0)
    assert [r[1] for r in rows] == ["g00", "g01", "g02", "g03", "g05"]
    assert rows[-1][3:7] == (5, None, None, None) and rows[-1][7] == 4 * 1005
    assert told == [("g04", 7004)]
    shared.rows(3.0)
    assert told == [("g04", 7004)]  # told once
    assert shared.gone == 2  # g04 at tick 2 and tick 3
    assert shared.problems == []


def test_a_helper_killed_mid_run_costs_no_row(fake_root: Path) -> None:
    """Through the sampler, as a run has it: the tick keeps every guest, in order, and the
    record says what happened."""
    mapping = guests(fake_root, 6)
    fs = HostFS(fake_root)
    shared = VmProbe(fs, lambda: dict(mapping), helpers=1)
    record = RunRecord.create(fake_root / "rec", {"name": "t"}, None)
    sampler = Sampler(fs, record, probes=[shared])
    try:
        sampler.tick()
        (pid,) = shared.helper_pids
        os.kill(pid, signal.SIGKILL)
        sampler.tick()
        assert list(shared.last) == sorted(mapping)
        assert shared.helper_pids == []
        assert len(sampler.errors) == 1
        assert f"helper {pid}" in sampler.errors[0] and "exit status -9" in sampler.errors[0]
        assert "every guest read by the sampler itself" in sampler.errors[0]
        set_merging(fake_root, 7005, 77)
        sampler.tick()
        assert shared.last["g05"]["ksm_merging_pages"] == 77
        assert len(sampler.errors) == 1
    finally:
        sampler.stop(final_tick=False)
    lines = (record.dir / "vm_samples.csv").read_text().splitlines()
    assert len(lines) == 1 + 3 * 6  # a header and six rows a tick, none lost


def test_a_helper_that_stalls_is_given_up(
    fake_root: Path, probes: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    mapping = guests(fake_root, 4)
    shared = probe(probes, fake_root, mapping, helpers=1)
    shared.rows(1.0)  # started (at any speed) and holding its share
    monkeypatch.setattr(read_helper, "ANSWER_TIMEOUT", 0.3)
    (pid,) = shared.helper_pids
    os.kill(pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        rows = shared.rows(2.0)
        assert time.monotonic() - start < 2.0
        assert [r[1] for r in rows] == sorted(mapping)
        assert len(shared.problems) == 1 and "no answer from helper" in shared.problems[0]
        assert not alive(pid)  # a stopped helper is killed, not left behind
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_a_helper_ends_with_its_sampler_even_one_killed(fake_root: Path) -> None:
    """SIGKILL leaves no chance to clean up: the helper sees its input end and exits."""
    guests(fake_root, 3)
    code = textwrap.dedent(
        f"""
        import json, time
        from kvmksm.host.fs import HostFS
        from kvmksm.sampling.guest_rows import VmProbe
        m = {{"g00": 7000, "g01": 7001, "g02": 7002}}
        p = VmProbe(HostFS({str(fake_root)!r}), lambda: m, helpers=1)
        p.rows(1.0)
        print(json.dumps(p.helper_pids), flush=True)
        time.sleep(60)
        """
    )
    sampler = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert sampler.stdout is not None
    (pid,) = json.loads(sampler.stdout.readline())
    assert alive(pid)
    sampler.kill()
    sampler.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and Path(f"/proc/{pid}/status").exists():
        status = Path(f"/proc/{pid}/status").read_text()
        if "State:\tZ" in status:
            break  # exited; its parent (gone) is not there to reap it: init will
        time.sleep(0.05)
    else:
        assert not Path(f"/proc/{pid}").exists(), "the helper outlived its sampler"


def test_how_many_helpers() -> None:
    cpus = len(os.sched_getaffinity(0))
    assert helpers_for(10) == 0
    assert helpers_for(2 * SHARE - 1) == 0
    assert helpers_for(2 * SHARE) == min(cpus, 2) - 1
    assert helpers_for(100 * SHARE) == cpus - 1


# -- real processes ------------------------------------------------------------------------------
def test_real_processes_read_in_shares(tmp_path: Path) -> None:
    """40 real processes: a helper reads what this process reads, and sees one exit."""
    procs = [
        subprocess.Popen([sys.executable, "-S", "-c", "import time; time.sleep(120)"])
        for _ in range(40)
    ]
    try:
        mapping = {f"p{i:02d}": p.pid for i, p in enumerate(procs)}
        alone = VmProbe(HostFS(), lambda: dict(mapping), helpers=0)
        shared = VmProbe(HostFS(), lambda: dict(mapping), helpers=1)
        a, s = alone.rows(1.0), shared.rows(1.0)
        assert [r[:3] for r in s] == [r[:3] for r in a] and len(s) == 40
        # RSS from statm, ksm_stat's fields present: real figures, not None.
        assert all(r[7] > 1000 and r[3] is not None for r in s)
        procs[-1].kill()
        procs[-1].wait()
        s = shared.rows(2.0)
        assert len(s) == 39 and shared.gone == 1 and shared.problems == []
        alone.close()
        shared.close()
    finally:
        for p in procs:
            p.kill()
            p.wait()

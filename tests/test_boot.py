"""Waiting for guests: console markers, failures and timeouts, with fake domains and clock."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmksm.scenario.model import BootWait
from kvmksm.virt.boot import BootError, Pending, console_tail, wait_up


class FakeDom:
    def __init__(self, name: str, active: bool = True) -> None:
        self._name, self.active = name, active

    def name(self) -> str:
        return self._name

    def isActive(self) -> int:  # noqa: N802 - libvirt's name
        return int(self.active)


class Clock:
    """A clock that a scripted sleep advances, running ``script[t]`` when time reaches t."""

    def __init__(self, script: dict[float, object]) -> None:
        self.t = 0.0
        self.script = dict(script)

    def now(self) -> float:
        return self.t

    def sleep(self, dt: float) -> None:
        self.t = round(self.t + dt, 3)
        for at in sorted(k for k in self.script if k <= self.t):
            self.script.pop(at)()  # type: ignore[operator]


def test_marker_split_across_reads_is_seen(tmp_path: Path) -> None:
    log = tmp_path / "g1.log"
    log.write_text("booting...\nKVMKSM-RE")
    clock = Clock({1.0: lambda: log.open("a").write("ADY fill=0\n")})
    up = wait_up([Pending(FakeDom("g1"), str(log), 0.0)], BootWait(), clock.now, clock.sleep)
    assert up == {"g1": 1.0}


def test_failure_marker_fails_with_console_tail(tmp_path: Path) -> None:
    log = tmp_path / "g1.log"
    log.write_text("line one\nKVMKSM-FAILED: bad kvmksm.fill=x kvmksm.byte=97\n")
    clock = Clock({})
    with pytest.raises(BootError) as e:
        wait_up([Pending(FakeDom("g1"), str(log), 0.0)], BootWait(), clock.now, clock.sleep)
    assert e.value.domain == "g1"
    assert "reported a failure (KVMKSM-FAILED: bad kvmksm.fill=x" in str(e.value)
    assert "  | line one" in str(e.value)


def test_stopped_guest_fails_fast(tmp_path: Path) -> None:
    log = tmp_path / "g2.log"
    log.write_text("Kernel panic - not syncing: VFS: Unable to mount root fs\n")
    dom = FakeDom("g2")
    clock = Clock({2.0: lambda: setattr(dom, "active", False)})
    with pytest.raises(BootError, match="g2 stopped before it came up") as e:
        wait_up([Pending(dom, str(log), 0.0)], BootWait(timeout=300), clock.now, clock.sleep)
    assert "Unable to mount root fs" in e.value.tail
    assert clock.t < 3


def test_timeout_names_the_slow_guest(tmp_path: Path) -> None:
    fast, slow = tmp_path / "fast.log", tmp_path / "slow.log"
    fast.write_text("KVMKSM-READY\n")
    slow.write_text("still booting\n")
    clock = Clock({})
    guests = [Pending(FakeDom("fast"), str(fast), 0.0), Pending(FakeDom("slow"), str(slow), 0.0)]
    with pytest.raises(BootError, match="slow did not print 'KVMKSM-READY' .* within 5s"):
        wait_up(guests, BootWait(timeout=5), clock.now, clock.sleep)


def test_missing_console_log_fails(tmp_path: Path) -> None:
    clock = Clock({})
    with pytest.raises(BootError, match="has no console log at .*gone.log"):
        wait_up(
            [Pending(FakeDom("g"), str(tmp_path / "gone.log"), 0.0)],
            BootWait(timeout=300),
            clock.now,
            clock.sleep,
        )
    assert clock.t < 11


def test_delay_method(tmp_path: Path) -> None:
    clock = Clock({})
    up = wait_up(
        [Pending(FakeDom("g"), None, 0.0)],
        BootWait(method="delay", delay=3),
        clock.now,
        clock.sleep,
    )
    assert up == {"g": 3.0}


def test_console_tail_keeps_last_lines(tmp_path: Path) -> None:
    log = tmp_path / "c.log"
    log.write_text("".join(f"line {i}\r\n" for i in range(100)))
    tail = console_tail(str(log), lines=3)
    assert tail == "  | line 97\n  | line 98\n  | line 99"
    assert console_tail(str(tmp_path / "missing")) == ""

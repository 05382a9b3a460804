"""Waiting for guests: console markers, failures and timeouts, with fake domains and clock."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmksm.scenario.model import BootWait
from kvmksm.virt.boot import (
    PANIC_GRACE,
    BootError,
    Pending,
    console_tail,
    panic_cause,
    read_console,
    wait_up,
)

CONSOLES = Path(__file__).parent / "fixtures" / "consoles"


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
    log.write_text("Run /init as init process\nreboot: Power down\n")
    dom = FakeDom("g2")
    clock = Clock({2.0: lambda: setattr(dom, "active", False)})
    with pytest.raises(BootError, match="g2 stopped before it came up") as e:
        wait_up([Pending(dom, str(log), 0.0)], BootWait(timeout=300), clock.now, clock.sleep)
    assert "reboot: Power down" in e.value.tail
    assert e.value.panic is None
    assert clock.t < 3


# Real console logs of tiny guests that panicked (Debian 6.1 under TCG, panic=-1), and the
# one line each must give.
PANICS = {
    "oom-fill-96mib.log": "System is deadlocked on memory"
    " (in init (pid 1); out of memory, no killable process)",
    "oom-unpacking-debian-initrd-128mib.log": "System is deadlocked on memory"
    " (in kworker/u2:0 (pid 9); out of memory, no killable process;"
    " while unpacking the initramfs)",
    "initrd-overwritten-80mib.log": "VFS: Unable to mount root fs on unknown-block(0,0)"
    " (in swapper/0 (pid 1);"
    " initramfs unpacking failed: invalid magic at start of compressed archive)",
}


@pytest.mark.parametrize(("log", "cause"), PANICS.items())
def test_panic_cause_from_real_consoles(log: str, cause: str) -> None:
    assert panic_cause(read_console(str(CONSOLES / log))) == cause


def test_panic_cause_none_without_a_panic() -> None:
    assert panic_cause("Run /init as init process\nKVMKSM-READY fill=0\n") is None
    assert panic_cause("") is None
    # A kernel with UID in its task line (6.10 on), and the end marker of a panic=0 kernel.
    text = (
        "Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100\n"
        "CPU: 0 UID: 0 PID: 1 Comm: init Not tainted 6.12.9-amd64 #1\n"
        "---[ end Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100 ]---\n"
    )
    assert panic_cause(text) == "Attempted to kill init! exitcode=0x00000100 (in init (pid 1))"


def test_guest_that_panics_is_one_line_before_its_console_tail(tmp_path: Path) -> None:
    log = tmp_path / "g3.log"
    log.write_bytes((CONSOLES / "oom-fill-96mib.log").read_bytes())
    dom = FakeDom("g3")
    clock = Clock({1.0: lambda: setattr(dom, "active", False)})
    with pytest.raises(BootError) as e:
        wait_up([Pending(dom, str(log), 0.0)], BootWait(timeout=300), clock.now, clock.sleep)
    first, *rest = str(e.value).splitlines()
    assert first == (
        "guest g3: kernel panic during boot: System is deadlocked on memory"
        " (in init (pid 1); out of memory, no killable process); last console lines:"
    )
    assert e.value.panic == PANICS["oom-fill-96mib.log"]
    # The panic line is farther from the end than the tail reaches: only the search finds it.
    assert rest and all(line.startswith("  | ") for line in rest)
    assert "Kernel panic" not in e.value.tail
    assert clock.t < 3


def test_panic_without_panic_reboot_fails_after_a_grace(tmp_path: Path) -> None:
    """A kernel without panic=-1 hangs after the panic: reported without waiting out the
    boot timeout, as soon as the rest of its report had time to arrive."""
    log = tmp_path / "g4.log"
    log.write_text("Run /init as init process\n")
    text = (CONSOLES / "initrd-overwritten-80mib.log").read_text()
    clock = Clock({5.0: lambda: log.write_text(text)})
    with pytest.raises(BootError, match="^guest g4: kernel panic during boot: VFS: Unable"):
        wait_up(
            [Pending(FakeDom("g4"), str(log), 0.0)], BootWait(timeout=300), clock.now, clock.sleep
        )
    assert 5 + PANIC_GRACE <= clock.t < 5 + PANIC_GRACE + 1


def test_stopped_without_console_output(tmp_path: Path) -> None:
    log = tmp_path / "g5.log"
    log.write_text("")
    dom = FakeDom("g5", active=False)
    clock = Clock({})
    with pytest.raises(BootError, match="g5 stopped before it came up, without a line on its"):
        wait_up([Pending(dom, str(log), 0.0)], BootWait(), clock.now, clock.sleep)


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

"""Finding a guest's QEMU pid in a fake /run and /proc tree."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmksm.host.fs import HostFS
from kvmksm.host.qemu import PidNotFound, find_qemu_pid, names_guest

from .fakeqemu import pidfile, proc, qemu_argv


def test_pid_file_checked_against_cmdline(tmp_path: Path) -> None:
    proc(tmp_path, 4242, qemu_argv("kvmksm-0123abcd-tiny-01"))
    pidfile(tmp_path, "kvmksm-0123abcd-tiny-01", 4242)
    assert find_qemu_pid("kvmksm-0123abcd-tiny-01", HostFS(tmp_path)) == 4242


def test_stale_pid_file_falls_back_to_a_proc_scan(tmp_path: Path) -> None:
    # The pid file names a pid now used by another guest; the right QEMU is found by scanning.
    proc(tmp_path, 100, qemu_argv("other"))
    proc(tmp_path, 200, b"/bin/sh\0-c\0sleep 1\0")
    proc(tmp_path, 300, qemu_argv("g1"))
    pidfile(tmp_path, "g1", 100)
    assert find_qemu_pid("g1", HostFS(tmp_path)) == 300


def test_missing_guest_raises(tmp_path: Path) -> None:
    proc(tmp_path, 100, qemu_argv("other"))
    pidfile(tmp_path, "g1", "garbage")
    with pytest.raises(PidNotFound, match="g1"):
        find_qemu_pid("g1", HostFS(tmp_path))


def test_names_guest_parses_qemu_name_option() -> None:
    # libvirt doubles a comma inside a name: guest "a,b" is "-name guest=a,,b,debug-threads=on".
    assert names_guest(qemu_argv("a,,b"), "a,b")
    assert not names_guest(qemu_argv("a,,b"), "a")
    assert names_guest(b"/usr/bin/qemu-kvm\0-name\0plain\0", "plain")
    assert not names_guest(b"/usr/bin/python3\0-name\0guest=g\0", "g")  # not a QEMU
    assert not names_guest(qemu_argv("g10"), "g1")

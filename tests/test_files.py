"""The results folder's writers: atomic for regular files, and never replacing anything that
is not one (`-o /dev/null` once replaced /dev/null with a plain file)."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from kvmksm.results.files import OutputError, write_json, write_text


def test_a_regular_file_is_replaced_whole(tmp_path: Path) -> None:
    f = tmp_path / "sub" / "page.html"
    write_text(f, "one")
    write_text(f, "two")
    assert f.read_text() == "two"
    assert sorted(p.name for p in f.parent.iterdir()) == ["page.html"]  # no .tmp left


def test_a_fifo_is_written_into_and_stays_a_fifo(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()))
    reader.start()
    write_json(fifo, {"a": 1})
    reader.join(10)
    assert got == ['{\n "a": 1\n}\n']
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]


def test_a_symlink_keeps_pointing_at_its_target(tmp_path: Path) -> None:
    target = tmp_path / "real.json"
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    write_text(link, "new")
    assert link.is_symlink() and target.read_text() == "new"


def test_a_folder_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match=f"^{tmp_path}: cannot write: Is a directory$"):
        write_text(tmp_path, "x")

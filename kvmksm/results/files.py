"""Writing the files of a results folder: atomically (a reader never sees half a file), and
CSV rows appended as they come (a crash loses at most the row being written).

Every JSON document and HTML page kvmksm writes goes through write_json / write_text.
"""

from __future__ import annotations

import csv
import io
import json
import os
import stat
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kvmksm.errors import UserError


class OutputError(UserError):
    """The results folder cannot be written (full, read-only, gone): one line naming the
    path and the error. Raised by the writers here so callers need not catch OSError."""

    exit_code = 1


def output_error(path: Path, e: OSError) -> OutputError:
    return OutputError(f"{path}: cannot write: {e.strerror or e}")


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` to a temporary file beside `path`, then rename it into place.

    Only a regular file is replaced so: a device, FIFO or socket (`-o /dev/null`, `-o
    /dev/stdout`) is written into as it is (renaming over /dev/null once turned it into a
    plain file, and no guest could start after that), and a symlink's target is what is
    written, the link stays."""
    path = Path(path)
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    try:
        special = path.exists() and not stat.S_ISREG(path.stat().st_mode)
    except OSError as e:
        raise output_error(path, e) from None
    if special:  # a folder too: open() then says "Is a directory"
        try:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        except OSError as e:
            raise output_error(path, e) from None
        return path
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise output_error(path, e) from None
    return path


def write_json(path: str | Path, data: Any) -> Path:
    """One JSON document (indented, one key a line at the top), atomically."""
    return write_text(path, json.dumps(data, indent=1, default=str) + "\n")


def read_json(path: Path, what: str) -> Any:
    """A JSON document, or one line saying why it cannot be read (`what` names the kind)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path.parent}: not a kvmksm {what} (no {path.name})") from None
    except IsADirectoryError:
        raise UserError(f"{path}: a folder, not a {what} file") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None


class CsvAppender:
    """Appends rows, each written through at once, so a crash loses at most the row being
    written.

    A write that fails (a full disk) leaves no half row behind: the file is cut back to its
    last whole row. The first failure raises OutputError (after telling ``on_error``); from
    then on rows are dropped (counted in ``dropped``), so a full disk costs one error, not
    one a tick, and what is written stays a readable CSV."""

    def __init__(
        self, path: Path, columns: list[str], on_error: Callable[[str], None] | None = None
    ) -> None:
        self.path = path
        self.columns = columns
        self.on_error = on_error
        self.failed: str | None = None
        self.dropped = 0
        self.rows = 0
        self._buf = io.StringIO()
        self._w = csv.DictWriter(self._buf, fieldnames=columns, extrasaction="ignore")
        self._seq = csv.writer(self._buf)  # the same (default) dialect: write_sequences
        self._size = 0
        self._fd = -1
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as e:
            raise output_error(path, e) from None
        self._w.writeheader()
        self._flush()

    def _flush(self) -> None:
        data = self._buf.getvalue().encode()
        self._buf.seek(0)
        self._buf.truncate()
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as e:
            try:
                os.ftruncate(self._fd, self._size)  # no half row: the file ends on a whole one
            except OSError:
                pass
            err = output_error(self.path, e)
            self.failed = str(err)
            if self.on_error is not None:
                self.on_error(self.failed)
            raise err from None
        self._size += len(data)

    def stop(self) -> None:
        """Write no more (the record cannot be written): later rows are dropped."""
        self.failed = self.failed or "stopped"

    def write(self, row: dict[str, Any]) -> None:
        if self.failed:
            self.dropped += 1
            return
        self._w.writerow(row)
        self._flush()
        self.rows += 1

    def write_many(self, rows: list[dict[str, Any]]) -> None:
        if self.failed:
            self.dropped += len(rows)
            return
        self._w.writerows(rows)
        self._flush()
        self.rows += len(rows)

    def write_sequences(self, rows: Sequence[Sequence[Any]]) -> None:
        """Rows as sequences in ``columns`` order: no dict per row (a thousand guests a tick)."""
        if self.failed:
            self.dropped += len(rows)
            return
        self._seq.writerows(rows)
        self._flush()
        self.rows += len(rows)

    def close(self) -> None:
        if self._fd >= 0:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = -1

"""Writing the files of a results folder: atomically (a reader never sees half a file), and
CSV rows appended as they come (a crash loses at most the row being written).

Every JSON document and HTML page kvmksm writes goes through write_json / write_text.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
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
    """Write `text` to a temporary file beside `path`, then rename it into place."""
    path = Path(path)
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
    """Appends rows and flushes each one, so a crash loses at most the row being written."""

    def __init__(self, path: Path, columns: list[str]) -> None:
        self.path = path
        self.columns = columns
        try:
            self._f = open(path, "w", newline="")  # noqa: SIM115 - closed in close()
            self._w = csv.DictWriter(self._f, fieldnames=columns, extrasaction="ignore")
            self._seq = csv.writer(self._f)  # the same (default) dialect: write_sequences
            self._w.writeheader()
            self._f.flush()
        except OSError as e:
            raise output_error(path, e) from None
        self.rows = 0

    def write(self, row: dict[str, Any]) -> None:
        try:
            self._w.writerow(row)
            self._f.flush()
        except OSError as e:
            raise output_error(self.path, e) from None
        self.rows += 1

    def write_many(self, rows: list[dict[str, Any]]) -> None:
        try:
            self._w.writerows(rows)
            self._f.flush()
        except OSError as e:
            raise output_error(self.path, e) from None
        self.rows += len(rows)

    def write_sequences(self, rows: Sequence[Sequence[Any]]) -> None:
        """Rows as sequences in ``columns`` order: no dict per row (a thousand guests a tick)."""
        try:
            self._seq.writerows(rows)
            self._f.flush()
        except OSError as e:
            raise output_error(self.path, e) from None
        self.rows += len(rows)

    def close(self) -> None:
        if not self._f.closed:
            try:
                self._f.close()
            except OSError:  # a full disk fails the last flush: the rows before it stay
                pass

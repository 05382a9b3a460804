"""Per-guest samples on disk: a CSV file for short runs, hourly Parquet parts for long ones.

One row per guest per tick (t, domain, pid, the ksm_stat fields, rss_kb) soon outgrows CSV:
a week of 200 guests at 1 Hz is 121 million rows, about 6 GiB as text. So:

- rows go to ``vm_samples.csv`` (each tick's rows written and flushed at once, as samples.csv)
  until the run is an hour old or the file holds SWITCH_ROWS rows, whichever comes first;
- after that into ``vm_samples/part-NNNN.parquet``, one part per hour of the run
  (NNNN = hours since the start). A part is written as ``.part-NNNN.parquet.open`` and renamed
  when its hour is over, so every ``part-*.parquet`` is a complete file and a crash loses at
  most the hour being written. Rows are buffered in memory only up to a row group
  (GROUP_ROWS rows) and encoded by a writer thread, so the sampler's tick stays short.

In a part, t is kept as integer milliseconds (``t_ms``); within a row group the rows are
sorted by guest, then time, so each guest's series is contiguous: time and the slowly moving
counters then delta-encode to a few bits a value, the guest name is a dictionary code, and
snappy compresses the rest (about 3 bytes a guest-sample on noisy synthetic guests, see
bench/RESULTS.md; zstd would save a fifth of that but reads at half the speed). Readers get
the same columns from either form: ``t`` in seconds.

pyarrow is imported only when a part is written or read.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvmksm.errors import UserError
from kvmksm.results.files import CsvAppender, OutputError, output_error

VM_SAMPLES = "vm_samples.csv"
PARTS_DIR = "vm_samples"
SWITCH_SECONDS = 3600.0  # CSV for the first hour of a run...
SWITCH_ROWS = 1_000_000  # ...or its first million rows (about 50 MB), whichever comes first
PART_SECONDS = 3600.0  # one Parquet part per hour after that
GROUP_ROWS = 131_072  # rows buffered before a row group is written (about 9 MB in memory)
CHUNK_ROWS = 1_000_000  # rows per chunk when reading a CSV file
INT32_COLUMNS = ("pid",)

if TYPE_CHECKING:  # numpy and pandas are imported where used: a short run needs neither
    import numpy as np
    import pandas as pd


def part_name(index: int) -> str:
    return f"part-{index:04d}.parquet"


# -- writing --------------------------------------------------------------------------------
class GuestSamplesWriter:
    """Takes each tick's rows (sequences in ``columns`` order: t, domain, then integers, any
    of them None) and lays them out by the rule above. The same interface as CsvAppender."""

    def __init__(
        self,
        directory: Path,
        columns: list[str],
        switch_seconds: float | None = None,
        switch_rows: int | None = None,
        part_seconds: float | None = None,
        group_rows: int | None = None,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        if columns[:2] != ["t", "domain"]:
            raise ValueError("per-guest rows start with t and domain")
        self.dir = Path(directory)
        self.columns = columns
        self.path = self.dir / VM_SAMPLES
        # the module's figures unless given (read here, so tests can change them)
        self.switch_seconds = SWITCH_SECONDS if switch_seconds is None else switch_seconds
        self.switch_rows = SWITCH_ROWS if switch_rows is None else switch_rows
        self.part_seconds = PART_SECONDS if part_seconds is None else part_seconds
        self.group_rows = GROUP_ROWS if group_rows is None else group_rows
        # As CsvAppender: the first failed write raises OutputError after telling on_error;
        # later rows are dropped (a full disk costs one error, not one a tick).
        self.on_error = on_error
        self.failed: str | None = None
        self.dropped = 0
        self._csv: CsvAppender | None = CsvAppender(self.path, columns, on_error=self._csv_failed)
        self._parts: _Parts | None = None
        self.rows = 0

    def _csv_failed(self, message: str) -> None:
        self.failed = message
        if self.on_error is not None:
            self.on_error(message)

    def _parts_failed(self, e: OutputError) -> OutputError:
        self._csv_failed(str(e))
        return e

    def stop(self) -> None:
        """Write no more (the record cannot be written): later rows are dropped."""
        self.failed = self.failed or "stopped"
        if self._csv is not None:
            self._csv.stop()

    @property
    def parts_started(self) -> bool:
        return self._parts is not None

    def write_sequences(self, rows: Sequence[Sequence[Any]]) -> None:
        if not rows:
            return
        if self.failed:
            self.dropped += len(rows)
            return
        try:
            if self._csv is not None:
                t = float(rows[0][0])
                if t >= self.switch_seconds or self._csv.rows >= self.switch_rows:
                    self._switch()
            if self._csv is not None:
                self._csv.write_sequences(rows)
            else:
                assert self._parts is not None
                self._parts.add(rows)
        except OutputError as e:
            if self._csv is None:  # the CSV's own failure has told on_error already
                raise self._parts_failed(e) from None
            raise
        self.rows += len(rows)

    def write_frame(self, frame: pd.DataFrame) -> None:
        """Many ticks at once (generators, tests), laid out as tick-by-tick writes would be,
        but whole hours at a time."""
        import numpy as np

        t = frame["t"].to_numpy(float)
        if self._csv is not None:
            room = max(0, self.switch_rows - self._csv.rows)
            early = np.flatnonzero(t < self.switch_seconds)[:room]
            if len(early):
                self.write_sequences(
                    list(frame.iloc[early][self.columns].itertuples(index=False, name=None))
                )
                frame, t = frame.iloc[len(early) :], t[len(early) :]
            if not len(frame):
                return
            self._switch()
        assert self._parts is not None
        hours = (t // self.part_seconds).astype(np.int64)
        for h in np.unique(hours):
            hour = frame[hours == h]
            for at in range(0, len(hour), self.group_rows):  # row groups as a run makes them
                piece = hour.iloc[at : at + self.group_rows]
                values = [piece[c].to_numpy(float) for c in self.columns[2:]]
                self._parts.add_arrays(
                    piece["t"].to_numpy(float), piece["domain"].to_numpy(object), values
                )
                self.rows += len(piece)

    def _switch(self) -> None:
        if self._csv is not None:
            self._csv.close()
            self._csv = None
        self._parts = _Parts(self.dir / PARTS_DIR, self.columns, self.part_seconds, self.group_rows)

    def close(self) -> None:
        if self._csv is not None:
            self._csv.close()
        if self._parts is not None:
            self._parts.close()


class _Parts:
    """The hourly Parquet parts: a buffer of column arrays in the sampler's thread, encoding and
    writing in one writer thread, at most one row group in flight (memory stays bounded)."""

    def __init__(self, folder: Path, columns: list[str], part_seconds: float, group_rows: int):

        self.folder = folder
        self.columns = columns
        self.part_seconds = part_seconds
        self.group_rows = group_rows
        try:
            folder.mkdir(exist_ok=True)
        except OSError as e:
            raise output_error(folder, e) from None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="kvmksm-parts")
        self._pending: Future[None] | None = None
        self._part: int | None = None
        self._buf: list[list[np.ndarray]] = []
        self._n = 0
        self._writer: Any = None  # pyarrow ParquetWriter, touched only by the writer thread
        self._closed = False

    def add(self, rows: Sequence[Sequence[Any]]) -> None:
        import numpy as np

        cols = list(zip(*rows, strict=True))
        # float: None becomes NaN (a field this kernel lacks), written as null
        values = [np.array(c, dtype=float) for c in cols[2:]]
        self.add_arrays(np.array(cols[0], dtype=float), np.array(cols[1], dtype=object), values)

    def add_arrays(self, t: np.ndarray, domain: np.ndarray, values: list[np.ndarray]) -> None:
        """Rows as columns, all within one hour of the run (a tick, or a whole hour)."""
        part = int(float(t[0]) // self.part_seconds)
        if part != self._part:
            if self._part is not None:
                self._submit(close=True)
            self._part = part
        self._buf.append([t, domain, *values])
        self._n += len(t)
        if self._n >= self.group_rows:
            self._submit(close=False)

    def _submit(self, close: bool) -> None:
        buf, self._buf, self._n = self._buf, [], 0
        self._wait()
        assert self._part is not None
        self._pending = self._pool.submit(self._write, buf, self._part, close)

    def _wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            try:
                pending.result()
            except OSError as e:
                raise output_error(self.folder, e) from None

    def _write(self, buf: list[list[np.ndarray]], part: int, close: bool) -> None:
        """In the writer thread: one row group into the open part; close and rename it."""
        import pyarrow.parquet as pq

        final = self.folder / part_name(part)
        temp = self.folder / f".{final.name}.open"
        if buf:
            table = _table(buf, self.columns)
            if self._writer is None:
                self._writer = pq.ParquetWriter(temp, table.schema, **_parquet_options(table))
            self._writer.write_table(table, row_group_size=table.num_rows)
        if close and self._writer is not None:
            self._writer.close()
            self._writer = None
            os.replace(temp, final)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._part is not None:
                self._submit(close=True)
            self._wait()
        finally:
            self._pool.shutdown(wait=True)


def _table(buf: list[list[np.ndarray]], columns: list[str]) -> Any:
    """Buffered ticks as one Arrow table, sorted by guest then time (see the module doc)."""
    import numpy as np
    import pyarrow as pa

    cols = [np.concatenate([b[i] for b in buf]) for i in range(len(columns))]
    return _arrow_table(columns, cols[0], cols[1], cols[2:], pa)


def _arrow_table(
    columns: Sequence[str], t: np.ndarray, domain: np.ndarray, values: list[np.ndarray], pa: Any
) -> Any:
    import numpy as np

    t_ms = np.rint(np.asarray(t, dtype=float) * 1000).astype(np.int64)
    names, codes = np.unique(np.asarray(domain, dtype=object).astype(str), return_inverse=True)
    order = np.lexsort((t_ms, codes))
    arrays = {
        "t_ms": pa.array(t_ms[order]),
        "domain": pa.DictionaryArray.from_arrays(
            pa.array(codes[order].astype(np.int32)), pa.array(names.tolist(), pa.string())
        ),
    }
    for name, col in zip(columns[2:], values, strict=True):
        col = np.asarray(col, dtype=float)[order]
        missing = np.isnan(col)
        kind = pa.int32() if name in INT32_COLUMNS else pa.int64()
        ints = np.where(missing, 0, col).astype(np.int64)
        arrays[name] = pa.array(ints, type=kind, mask=missing if missing.any() else None)
    return pa.table(arrays)


def _parquet_options(table: Any) -> dict[str, Any]:
    ints = [n for n in table.column_names if n != "domain"]
    return {
        "compression": "snappy",
        "use_dictionary": ["domain"],
        "column_encoding": dict.fromkeys(ints, "DELTA_BINARY_PACKED"),
    }


def write_parts(directory: Path, frames: Iterable[pd.DataFrame], columns: list[str]) -> int:
    """Lay out whole frames of rows (t, domain, ...) by the rule above, for tests and
    generators: each frame may span any stretch of time. Returns the rows written."""
    writer = GuestSamplesWriter(Path(directory), columns)
    try:
        for frame in frames:
            writer.write_frame(frame)
    finally:
        writer.close()
    return writer.rows


# -- reading --------------------------------------------------------------------------------
@dataclass
class Chunk:
    """A stretch of rows as arrays: ``t_ms`` (integer milliseconds since the run started),
    guest ``codes`` into ``names``, and each asked-for column (int64, or float with NaN where
    some row has no value). ``by_guest`` when the rows are sorted by guest then time within
    each row group (Parquet), else in tick order (CSV)."""

    t_ms: np.ndarray
    codes: np.ndarray
    names: list[str]
    values: dict[str, np.ndarray]
    by_guest: bool

    @property
    def t(self) -> np.ndarray:
        """Seconds, as the CSV files and the host samples have them."""
        return self.t_ms / 1000.0

    def __len__(self) -> int:
        return len(self.t_ms)


class GuestSamples:
    """The per-guest samples of one record, whichever form they are in."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self.csv = self.dir / VM_SAMPLES
        self.folder = self.dir / PARTS_DIR

    @property
    def parts(self) -> list[Path]:
        return sorted(self.folder.glob("part-*.parquet")) if self.folder.is_dir() else []

    def exists(self) -> bool:
        return self.csv.is_file() or bool(self.parts)

    def files(self) -> list[Path]:
        return ([self.csv] if self.csv.is_file() else []) + self.parts

    def columns(self) -> list[str]:
        import pandas as pd

        cols: list[str] = []
        if self.csv.is_file():
            head = pd.read_csv(self.csv, nrows=0)
            cols = list(head.columns)
        for part in self.parts[:1]:
            import pyarrow.parquet as pq

            names = pq.read_schema(part).names
            cols += [c for c in ("t" if n == "t_ms" else n for n in names) if c not in cols]
        return cols

    def read(self) -> pd.DataFrame | None:
        """Every row as one frame, in tick order (t, then guests in the order written)."""
        import pandas as pd

        frames = []
        if self.csv.is_file():
            frames.append(_read_csv(self.csv, {"domain": "category"}))
        if self.parts:
            frames.append(_read_parts(self.folder))
        if not frames:
            return None
        if len(frames) == 1:
            return frames[0]
        for f in frames:
            if "domain" in f.columns:
                f["domain"] = f["domain"].astype(object)
        frame = pd.concat(frames, ignore_index=True)
        frame["domain"] = frame["domain"].astype("category")
        return frame

    def chunks(
        self,
        columns: Sequence[str],
        start: float | None = None,
        end: float | None = None,
        rows: int = CHUNK_ROWS,
    ) -> Iterator[Chunk]:
        """The rows with start <= t <= end (each bound optional) in pieces of bounded size,
        with only the columns asked for (those the record lacks are left out)."""
        wanted = [c for c in columns if c not in ("t", "domain")]
        if self.csv.is_file():
            yield from _csv_chunks(self.csv, wanted, start, end, rows)
        for part in self.parts:
            yield from _part_chunks(part, wanted, start, end)


def _read_csv(path: Path, dtype: dict[str, str] | None = None) -> pd.DataFrame:
    import pandas as pd

    empty = pd.DataFrame({"t": pd.Series(dtype=float)})
    try:
        frame = pd.read_csv(path, dtype=dtype)  # type: ignore[arg-type]
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return empty
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path}: not a readable samples file: {e}") from None
    if "t" not in frame.columns:
        raise UserError(f"{path}: no 't' column: not a kvmksm samples file")
    return frame


def _read_parts(folder: Path) -> pd.DataFrame:
    """All parts of a folder: one pandas call (files starting with '.' are left out by
    pyarrow's dataset discovery, so a part still being written is never read)."""
    import pandas as pd

    try:
        frame = pd.read_parquet(folder, engine="pyarrow")
    except (OSError, ValueError) as e:
        raise UserError(f"{folder}: unreadable per-guest samples: {e}") from None
    frame.insert(0, "t", frame.pop("t_ms").to_numpy() / 1000.0)
    # rows are by guest within each row group: back to tick order, guests in name order
    frame = frame.sort_values(["t", "domain"], kind="stable", ignore_index=True)
    return frame


def _csv_chunks(
    path: Path, wanted: list[str], start: float | None, end: float | None, rows: int
) -> Iterator[Chunk]:
    import numpy as np
    import pandas as pd

    try:
        header = list(pd.read_csv(path, nrows=0).columns)
    except pd.errors.EmptyDataError:
        return
    if "t" not in header or "domain" not in header:
        raise UserError(f"{path}: no 't' and 'domain' columns: not a kvmksm per-guest samples file")
    use = ["t", "domain", *[c for c in wanted if c in header]]
    try:
        reader = pd.read_csv(path, usecols=use, chunksize=rows, dtype={"domain": "category"})
        for frame in reader:
            t = frame["t"].to_numpy(float)
            keep = ~np.isnan(t) & frame["domain"].notna().to_numpy()
            if start is not None:
                keep &= t >= start
            if end is not None:
                keep &= t <= end
            if not keep.all():
                frame, t = frame[keep], t[keep]
            if not len(frame):
                continue
            dom = frame["domain"]
            values = {c: pd.to_numeric(frame[c], errors="coerce").to_numpy() for c in use[2:]}
            yield Chunk(
                np.rint(t * 1000).astype(np.int64),
                dom.cat.codes.to_numpy(),
                [str(n) for n in dom.cat.categories],
                values,
                False,
            )
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path}: not a readable samples file: {e}") from None


def _part_chunks(
    part: Path, wanted: list[str], start: float | None, end: float | None
) -> Iterator[Chunk]:
    """A part as one chunk (an hour: 720,000 rows at 200 guests), only its row groups that
    reach into [start, end]."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(part)
    except (OSError, pa.ArrowException) as e:
        raise UserError(f"{part}: unreadable per-guest samples: {e}") from None
    names = pf.schema_arrow.names
    use = ["t_ms", "domain", *[c for c in wanted if c in names]]
    t_index = names.index("t_ms")
    lo = None if start is None else int(np.floor(start * 1000))
    hi = None if end is None else int(np.ceil(end * 1000))
    groups = []
    for i in range(pf.num_row_groups):
        stats = pf.metadata.row_group(i).column(t_index).statistics
        if stats is not None and stats.has_min_max:
            if (lo is not None and stats.max < lo) or (hi is not None and stats.min > hi):
                continue
        groups.append(i)
    if not groups:
        return
    try:
        table = pf.read_row_groups(groups, columns=use, use_threads=True)
    except (OSError, pa.ArrowException) as e:
        raise UserError(f"{part}: unreadable per-guest samples: {e}") from None
    t_ms = table.column("t_ms").to_numpy()
    dom = table.column("domain").unify_dictionaries().combine_chunks()
    codes = dom.indices.to_numpy(zero_copy_only=False)
    # int64 where every row has a value, float with NaN where some have none
    values = {c: table.column(c).to_numpy() for c in use[2:]}
    del table
    if lo is not None or hi is not None:
        keep = np.ones(len(t_ms), bool)
        if lo is not None:
            keep &= t_ms >= lo
        if hi is not None:
            keep &= t_ms <= hi
        if not keep.all():
            t_ms, codes = t_ms[keep], codes[keep]
            values = {c: v[keep] for c, v in values.items()}
    if len(t_ms):
        yield Chunk(t_ms, codes, dom.dictionary.to_pylist(), values, True)

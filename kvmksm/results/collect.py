"""Finding records: run folders, experiment folders, fleet folders (kvmksm fleet run: each
host's record or experiment, as its fleet.json lists them), and folders holding any of these,
as compare, plan and fleet take them. Every command that reads several records iterates
through here."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from kvmksm.errors import UserError
from kvmksm.results.experiment import INDEX, is_experiment, load_runs
from kvmksm.results.fleet import INDEX as FLEET_INDEX
from kvmksm.results.fleet import host_dirs, is_fleet
from kvmksm.results.record import RUN_JSON, Record, is_record, load_record

MAX_DEPTH = 4  # folders of folders of records (a fleet of experiments) and no deeper


def iter_records(paths: Sequence[str | Path]) -> Iterator[tuple[str, Record]]:
    """(argument it came from, record) for every record under the arguments, in order."""
    for arg in paths:
        for d in sources(arg):
            if is_fleet(d):  # each host's folder, as its index lists them
                for _, host_dir in host_dirs(d):
                    for sub in _below(host_dir, 1):
                        yield from _records(str(arg), sub)
            else:
                yield from _records(str(arg), d)


def _records(arg: str, d: Path) -> Iterator[tuple[str, Record]]:
    if is_experiment(d):
        yield from ((arg, rec) for _, rec in load_runs(d))
    else:
        yield arg, load_record(d)


def sources(arg: str | Path) -> list[Path]:
    """The record and experiment folders an argument names; one clear line when none."""
    p = Path(arg)
    if p.is_file():
        if p.name in (RUN_JSON, INDEX, FLEET_INDEX):
            raise UserError(f"{arg}: a file: give the folder that holds it ({p.parent})")
        raise UserError(f"{arg}: a file, not a run record or experiment folder")
    if not p.is_dir():
        raise UserError(f"{arg}: no such run record or experiment folder")
    found = _below(p, 0)
    if not found:
        raise UserError(f"{arg}: holds no run record or experiment")
    return found


def _below(p: Path, depth: int) -> list[Path]:
    if is_fleet(p) or is_experiment(p) or is_record(p):
        return [p]
    if depth >= MAX_DEPTH:
        return []
    try:
        children = sorted(c for c in p.iterdir() if c.is_dir() and not c.name.startswith("."))
    except OSError:
        return []
    return [d for c in children for d in _below(c, depth + 1)]

"""Tables as a terminal shows them (rich, boxed, fitted to the window) and as a pipe or a file
gets them: plain aligned text, no box drawing, nothing wrapped or cut, one line per row, so
that grep, a log and a diff see whole rows."""

from __future__ import annotations

import io

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text


def print_table(console: Console, table: Table) -> None:
    """On a terminal as rich draws it; elsewhere plain, each row on one line however long."""
    if console.is_terminal:
        console.print(table)
        return
    for line in plain_lines(console, table):
        console.print(line, markup=False, highlight=False, soft_wrap=True, crop=False)


def plain_lines(console: Console, table: Table) -> list[str]:
    """The table as plain text lines: columns aligned by spaces, trailing spaces dropped."""
    table.box = None
    table.show_edge = False
    table.pad_edge = False
    table.expand = False
    for col in table.columns:
        col.no_wrap = True
        col.overflow = "ignore"
    # rich wraps a title to the table's width: it goes on a line of its own instead
    title = Text.from_markup(str(table.title)).plain if table.title else None
    table.title = None
    width = Measurement.get(console, console.options.update_width(1_000_000), table).maximum
    wide = Console(file=io.StringIO(), width=max(width, 1), color_system=None, highlight=False)
    with wide.capture() as cap:
        wide.print(table)
    lines = [line.rstrip() for line in cap.get().splitlines()]
    return ([title] if title else []) + lines

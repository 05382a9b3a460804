"""How long work tells the user where it is, without printing itself.

Library code (a bench, an experiment, an image build) takes a Progress and calls it; the
views give one that draws a spinner and lines on a terminal, tests and quiet callers the
Silent one. Nothing here prints.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Protocol


class Progress(Protocol):
    def phase(self, text: str) -> contextlib.AbstractContextManager[Callable[[str], None]]:
        """A step that takes a while: shown until it ends; the callable updates its text."""
        ...

    def note(self, text: str) -> None:
        """A line worth keeping on screen (a run starts, a point of an experiment is done)."""
        ...

    def warn(self, text: str) -> None:
        """Something the user should know that does not stop the work."""
        ...


class Silent:
    """Progress that shows nothing."""

    @contextlib.contextmanager
    def phase(self, text: str) -> Iterator[Callable[[str], None]]:
        yield lambda _text: None

    def note(self, text: str) -> None:
        return None

    def warn(self, text: str) -> None:
        return None

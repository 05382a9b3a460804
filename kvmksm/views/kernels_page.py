"""kernels.html: a kernel comparison of fleet records (placeholder: the compare page)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from kvmksm.commands.compare import collect, compare
from kvmksm.views.compare_page import compare_page


def write_kernels_page(paths: Sequence[str | Path], out: Path) -> Path:
    return compare_page(compare(collect(paths)), out)

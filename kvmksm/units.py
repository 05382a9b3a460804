"""Sizes ('128MiB') and durations ('30s', '15m') as scenario files write them."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BeforeValidator, PlainSerializer

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kib": 1024,
    "m": 1024**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gib": 1024**3,
    "t": 1024**4,
    "tib": 1024**4,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
}
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
_DUR_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|min|s|m|h|d)")


def parse_size(value: object) -> int:
    """Bytes from 128MiB, 1GiB, 4096, '2G' (IEC: K/M/G mean KiB/MiB/GiB; kB/MB/GB are SI)."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 128MiB")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("expected a size such as 128MiB, not a negative number")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m and m.group(2).lower() in _SIZE_UNITS:
            return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
    raise ValueError(f"expected a size such as 128MiB, 1GiB or 4096 (bytes), got {value!r}")


def parse_duration(value: object) -> float:
    """Seconds from 30s, 15m, 1h30m, 500ms, or a plain number of seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s or 15m")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("expected a duration such as 30s, not a negative number")
        return float(value)
    if isinstance(value, str):
        text = value.strip().replace(" ", "")
        if text and _DUR_PART.sub("", text) == "":
            return sum(float(n) * _DURATION_UNITS[u] for n, u in _DUR_PART.findall(text))
    raise ValueError(f"expected a duration such as 30s, 15m or 1h30m, got {value!r}")


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    """'1h2m3s': whole seconds, as parse_duration reads them back."""
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return "".join(f"{v}{u}" for v, u in ((h, "h"), (m, "m"), (sec, "s")) if v) or "0s"


Size = Annotated[int, BeforeValidator(parse_size)]
Duration = Annotated[float, BeforeValidator(parse_duration), PlainSerializer(float)]

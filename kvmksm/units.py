"""Sizes ('128MiB') and durations ('30s', '15m') as scenario files write them."""

from __future__ import annotations

import math
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


# Bounds that keep every size and duration a finite number the rest of kvmksm (mmap,
# time.sleep, float arithmetic) can use: far above anything a host has or a run lasts.
MAX_SIZE = 2**63 - 1  # bytes: what an off_t holds
MAX_DURATION = 366 * 86400.0  # seconds


def parse_size(value: object) -> int:
    """Bytes from 128MiB, 1GiB, 4096, '2G' (IEC: K/M/G mean KiB/MiB/GiB; kB/MB/GB are SI)."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 128MiB")
    size: float | None = None
    if isinstance(value, int):
        if value < 0:
            raise ValueError("expected a size such as 128MiB, not a negative number")
        size = value
    elif isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m and m.group(2).lower() in _SIZE_UNITS:
            size = float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
    if size is None:
        raise ValueError(
            f"expected a size such as 128MiB, 1GiB or 4096 (bytes), got {_short(value)}"
        )
    if not size <= MAX_SIZE:  # also false for NaN and infinity
        raise ValueError(f"expected a size below 8 EiB, got {_short(value)}")
    return int(size)


def parse_duration(value: object) -> float:
    """Seconds from 30s, 15m, 1h30m, 500ms, or a plain number of seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s or 15m")
    seconds: float | None = None
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("expected a duration such as 30s, not a negative number")
        seconds = float(value) if value <= MAX_DURATION else math.inf  # a huge int: no float
    elif isinstance(value, str):
        text = value.strip().replace(" ", "")
        if text and _DUR_PART.sub("", text) == "":
            seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in _DUR_PART.findall(text))
    if seconds is None:
        raise ValueError(f"expected a duration such as 30s, 15m or 1h30m, got {_short(value)}")
    if not seconds <= MAX_DURATION:  # also false for NaN and infinity
        raise ValueError(f"expected a finite duration of at most 366d, got {_short(value)}")
    return seconds


def _short(value: object) -> str:
    if isinstance(value, int) and value.bit_length() > 128:
        return f"a number of {value.bit_length()} bits"  # repr of a huge int may even fail
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_duration(seconds: float, approx: bool = False) -> str:
    """Seconds as scenario files write durations, which parse_duration reads back: '1h2m3s',
    '3d4h'. With `approx`, the two largest units only (an estimate: '1h30m', not '1h30m7s')."""
    s = int(round(seconds))
    if s < 60 and seconds < 1 and seconds > 0:
        return f"{seconds:g}s"
    d, rest = divmod(s, 86400)
    h, rest = divmod(rest, 3600)
    m, sec = divmod(rest, 60)
    parts = [(v, u) for v, u in ((d, "d"), (h, "h"), (m, "m"), (sec, "s")) if v]
    if approx and parts:
        first = [u for _, u in parts][0]
        keep = "dhms"["dhms".index(first) : "dhms".index(first) + 2]
        parts = [(v, u) for v, u in parts if u in keep]
    return "".join(f"{v}{u}" for v, u in parts) or "0s"


Size = Annotated[int, BeforeValidator(parse_size)]
Duration = Annotated[float, BeforeValidator(parse_duration), PlainSerializer(float)]

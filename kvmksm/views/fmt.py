"""Numbers as every view shows them: thousands separators, fewer decimals the larger the
number, '—' for nothing. Sizes and compact durations are kvmksm.units'."""

from __future__ import annotations

from typing import Any

from kvmksm.units import format_size

NOTHING = "—"


def fmt_num(v: Any) -> str:
    """Thousands separators, and fewer decimals the larger the number."""
    if v is None or v == "":
        return NOTHING
    if isinstance(v, bool) or not isinstance(v, int | float):
        return str(v)
    if isinstance(v, int) or float(v).is_integer():
        return f"{int(v):,}"
    a = abs(v)
    digits = 0 if a >= 100 else 1 if a >= 10 else 2 if a >= 0.1 else 3
    return f"{v:,.{digits}f}"


def fmt_sig(v: float | None, digits: int = 3) -> str:
    """A fitted coefficient with `digits` significant figures, no exponent for the sizes kvmksm
    prints, and 0 for anything below a millionth of a unit (1.1e-15 is rounding, not data)."""
    if v is None:
        return NOTHING
    if abs(v) < 1e-6:
        return "0"
    text = f"{v:,.{digits}g}"
    if "e" in text:  # very large: thousands separators instead of an exponent
        return f"{v:,.0f}"
    return text


def fmt_value(v: Any, unit: str = "") -> str:
    if isinstance(v, list):
        return " – ".join(fmt_num(x) for x in v) + (f" {unit}" if unit else "")
    text = fmt_num(v)
    return f"{text} {unit}" if unit and text != NOTHING else text


def fmt_duration(seconds: Any) -> str:
    """'86,399 s (23 h 59 min)': seconds as recorded, and the same for a person."""
    if not isinstance(seconds, int | float):
        return NOTHING
    text = fmt_value(seconds, "s")
    if seconds >= 3600:
        return f"{text} ({int(seconds // 3600)} h {int(seconds % 3600 // 60)} min)"
    if seconds >= 60:
        return f"{text} ({int(seconds // 60)} min {int(seconds % 60)} s)"
    return text


def fmt_expected(expected: Any) -> str:
    if isinstance(expected, dict):
        lo, hi = expected.get("min"), expected.get("max")
        if lo is not None and hi is not None:
            return f"{fmt_num(lo)} … {fmt_num(hi)}"
        if lo is not None:
            return f"≥ {fmt_num(lo)}"
        if hi is not None:
            return f"≤ {fmt_num(hi)}"
        return "any"
    return fmt_num(expected)


def fmt_size(n: float | None) -> str:
    return NOTHING if n is None else format_size(n)


def fmt_count(v: Any) -> str:
    """A counter: whole number with separators."""
    return NOTHING if v is None or v == "" else f"{int(v):,}"

"""The HTML pages: one Jinja2 environment for all of them (run report, compare, plan), each
page a self-contained file written atomically. Nothing in a page depends on when or where it
was built, so rebuilding from the same records gives the same bytes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from kvmksm.results.files import write_text
from kvmksm.views.fmt import fmt_duration, fmt_expected, fmt_num, fmt_sig, fmt_value

_ENV: Environment | None = None


def env() -> Environment:
    """The Jinja2 environment of every kvmksm HTML page, with the views' number formats."""
    global _ENV
    if _ENV is None:
        e = Environment(
            loader=PackageLoader("kvmksm", "templates"),
            autoescape=select_autoescape(["html", "j2"]),
            undefined=StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        e.filters["num"] = fmt_num
        e.filters["sig"] = fmt_sig
        e.filters["expected"] = fmt_expected
        e.filters["value"] = fmt_value
        e.filters["duration"] = fmt_duration
        e.filters["secs"] = lambda t: f"{t:,.2f}" if isinstance(t, int | float) else "—"
        _ENV = e
    return _ENV


def render(template: str, **context: Any) -> str:
    return env().get_template(template).render(**context)


def write_page(path: Path, template: str, **context: Any) -> Path:
    return write_text(path, render(template, **context))

"""The report's "Inside the guests" section: what guest_run printed, what the churn cost
(copy-on-write breaks, what stayed merged) and the guests' write latency with KSM off and on.
Its context only; the HTML is templates/_guests.html.j2."""

from __future__ import annotations

from typing import Any

from kvmksm.analysis.guest_work import churn_figures, guest_run_rows, probe_figures
from kvmksm.analysis.windows import Windows
from kvmksm.results.record import Record
from kvmksm.units import format_size


def guest_section(record: Record, w: Windows) -> dict[str, Any] | None:
    """None when the run did nothing inside its guests."""
    runs = guest_run_rows(record)
    churn = churn_figures(record, w)
    probe = probe_figures(record)
    if not (runs or churn or probe):
        return None
    if churn:
        churn = dict(
            churn,
            size_text=format_size(churn["size"] or 0),
            rate_text=f"{format_size(churn['rate'] or 0)}/s",
            achieved_text=(
                f"{format_size(churn['achieved_rate_min'])}/s"
                if churn.get("achieved_rate_min") is not None
                else "—"
            ),
        )
    if probe:
        probe = dict(probe, size_text=format_size(probe["size"] or 0))
    return {"runs": runs, "churn": churn, "probe": probe}

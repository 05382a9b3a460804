"""The HTML report: one self-contained file, a pure function of a run record.

Nothing in it depends on when or where it was built (no build time, fixed SVG ids), so
rebuilding from the same directory gives the same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from kvmksm.analysis.metrics import Analysis, analyse, configured_scan_rate
from kvmksm.analysis.potential import time_to_fraction
from kvmksm.analysis.windows import page_size
from kvmksm.results.files import write_text
from kvmksm.results.meta import Event, Host, RunMeta, Workload
from kvmksm.results.record import REPORT, RUN_JSON, Record, load_record
from kvmksm.security import SIDE_CHANNEL_NOTE
from kvmksm.units import format_size
from kvmksm.views import charts, html
from kvmksm.views.fmt import fmt_duration, fmt_num, fmt_value
from kvmksm.views.guest_section import guest_section

# Metrics shown as cards at the top, in this order; all of them are in the table below.
HEADLINE = (
    "plateau_saved_mib",
    "plateau_saved_pct",
    "plateau_saved_pct_of_ceiling",
    "time_to_50pct_s",
    "time_to_90pct_s",
    "ksmd_cpu_s",
    "mib_per_cpu_s",
    "general_profit_mib",
    "unmerge_s",
    "scan_rate",
)
STATUS_CLASS = {"passed": "ok", "failed": "bad", "error": "bad", "interrupted": "warn"}
KNOWN_FILES = ("samples.csv", "vm_samples.csv", RUN_JSON)
MANY_EVENTS = 40  # longer event lists start folded


def write_report(run_dir: str | Path) -> Path:
    """Write RUN_DIR/report.html from the record in RUN_DIR and return its path."""
    record = load_record(run_dir)
    return write_text(record.dir / REPORT, render_report(record))


def warm_up() -> None:
    """Pay a process's one-time costs of a first report ahead, in a thread while a run waits
    on the kernel: the first chart (charts.warm_up) and the page's templates compiled."""
    charts.warm_up()
    for name in ("report.html.j2", "_guests.html.j2"):
        html.env().get_template(name)


def render_report(record: Record) -> str:
    return html.render("report.html.j2", **build_context(record))


def build_context(record: Record) -> dict[str, Any]:
    meta = record.meta
    a = analyse(record)
    ps = page_size(record)
    notes = _footnotes(a)
    checks = record.checks
    scenario = meta.scenario.model_dump(mode="json", exclude_unset=True)
    return {
        "meta": meta,
        "title": _title(meta),
        "status": meta.status,
        "status_class": STATUS_CLASS.get(meta.status, "muted"),
        "summary": _summary(record, ps),
        "cards": _cards(a, notes),
        "metrics": [_row(k, m, notes) for k, m in a.metrics.items()],
        "footnotes": [(notes[k], k, _row(k, m, notes)) for k, m in a.metrics.items()],
        "windows": a.windows,
        "charts": _charts(record, a, ps),
        "checks": checks,
        "checks_passed": sum(1 for c in checks if c.passed),
        "events": [_event_row(e) for e in record.events],
        "events_open": len(record.events) <= MANY_EVENTS,
        "host": _host_rows(meta.host),
        "knobs": _knob_rows(meta),
        "scenario_yaml": yaml.safe_dump(scenario, sort_keys=False, allow_unicode=True).strip(),
        "files": _files(record),
        "vm": a.vm,
        "vm_chart": charts.vm_chart(record.samples, record.events, a.windows, a.vm, ps)
        if a.vm and not record.samples.empty
        else None,
        "vm_guests": len(a.vm.rows) if a.vm else 0,
        "security_note": SIDE_CHANNEL_NOTE,
        "sharing": _sharing_view(record, a, ps),
        "guest_work": guest_section(record, a.windows),
    }


def _sharing_view(record: Record, a: Analysis, ps: int) -> dict[str, Any] | None:
    """The sharing matrix as a heat map and the potential beside the (N-1)/N ceiling."""
    s, p = record.meta.sharing, record.meta.potential
    if not isinstance(s, dict) and not isinstance(p, dict):
        return None
    s, p = s or {}, p or {}
    mib = ps / 1024**2
    rows: list[tuple[str, Any, str]] = []
    if "potential" in p:
        mem = p.get("guest_memory_pages")

        def pct(pages: Any) -> str:
            return f"{fmt_num(100.0 * pages / mem)} % of guest memory" if mem else ""

        t_on = a.windows.t_on
        t90 = time_to_fraction(record.samples, t_on, p["potential"])
        t90r = time_to_fraction(record.samples, t_on, p.get("potential_within_max_page_sharing"))
        rows = [
            ("Pages read", p["pages"], f"{fmt_num(p['pages'] * mib)} MiB"),
            ("Distinct contents", p["distinct"], f"{fmt_num(p['zero_pages'])} zero pages"),
            ("Pages with a twin", p["pages_with_twin"], pct(p["pages_with_twin"])),
            ("Potential", p["potential"], pct(p["potential"])),
            (
                "Potential, max_page_sharing " + fmt_num(p.get("max_page_sharing")),
                p["potential_within_max_page_sharing"],
                pct(p["potential_within_max_page_sharing"]),
            ),
            ("Potential inside each guest alone", p["potential_within_guests"], ""),
            ("Achieved (same pages, same moment)", p["achieved"], pct(p["achieved"])),
            ("Achieved, of potential", fmt_value(p["achieved_pct_of_potential"], "%"), ""),
            ("Ceiling (N-1)/N", fmt_value(p["ceiling_pct"], "%"), "of guest memory"),
            ("Time to 90 % of potential", fmt_value(t90, "s"), "after KSM went on"),
            ("Time to 90 % of the max_page_sharing potential", fmt_value(t90r, "s"), ""),
            (
                "Cost",
                fmt_value(p.get("seconds"), "s"),
                f"{fmt_value(p.get('seconds_per_gib_read'), 's')} per GiB read",
            ),
        ]
    chart = None
    if s.get("guests") and s.get("pairs"):
        chart = charts.sharing_heatmap(s["guests"], s["pairs"], s["self_only"])
    if s.get("guests") is not None:
        # Records from this version on have every key; defaults keep the page rendering.
        s = {"t": None, "taken": "", "foreign_mappings": 0, "frames_by_sharers": {}, **s}
        s["other_ksm_users"] = {
            "processes": 0,
            "merging_pages": 0,
            **(s.get("other_ksm_users") or {}),
        }
        s["checks"] = [{"note": "", "difference": None, **c} for c in s.get("checks", [])]
    return {
        "matrix": s,
        "potential": {"taken": "", **p},
        "chart": chart,
        "rows": [(k, v if isinstance(v, str) else fmt_num(v), n) for k, v, n in rows],
        "error": s.get("error") or p.get("error"),
    }


def _title(meta: RunMeta) -> str:
    return f"{meta.scenario.name} on {meta.host.hostname or 'unknown host'}"


def _summary(record: Record, ps: int) -> list[tuple[str, str]]:
    meta = record.meta
    rows = [
        ("Scenario", meta.scenario.name),
        ("Scenario file", meta.scenario_file or "—"),
        ("Workload", _workload_text(meta.workload)),
        ("Kernel", meta.host.kernel_release or "—"),
        ("Started", meta.started or "—"),
        ("Finished", meta.finished or "—"),
        ("Duration", fmt_duration(meta.duration_s)),
        ("Samples", f"{len(record.samples):,} rows; page size {ps:,} bytes"),
        ("Kind", f"{meta.kind} (record format {meta.format})"),
    ]
    return [(k, str(v)) for k, v in rows]


def _workload_text(w: Workload) -> str:
    if w.type == "vms":
        src = (w.base.domain or w.base.image) if w.base else None
        mem = w.memory or (w.base.memory if w.base else None)
        text = f"{w.clones} clones of {src or '?'}"
        if mem:
            text += f", {fmt_num(mem / 1024**2)} MiB each"
        fill = w.guest_fill
        if fill:
            text += f", each fills {fmt_num(fill['size'] / 1024**2)} MiB with byte {fill['byte']}"
        return text + f" ({w.domain_type or 'kvm'})"
    if w.type == "processes":
        return f"{w.count} processes x {fmt_num((w.size or 0) / 1024**2)} MiB"
    return w.type


def _cards(a: Analysis, notes: dict[str, int]) -> list[dict[str, Any]]:
    m = a.metrics
    sub = {
        "plateau_saved_mib": _join(("peak {}", m["peak_saved_mib"])),
        "plateau_saved_pct": _join(("of {} guest memory", m["guest_memory_mib"])),
        "plateau_saved_pct_of_ceiling": _join(
            ("ceiling (N-1)/N = {} of guest memory", m["ceiling_pct"])
        ),
        "ksmd_cpu_s": _join(
            ("{} to reach the savings", m["ksmd_cpu_to_plateau_s"]),
            (f"{{}} {a.windows.cost_what}", m["ksmd_cpu_plateau_pct"]),
        ),
        "scan_rate": _join(
            ("configured {}", m["scan_rate_configured"]),
            ("{} of it achieved", m["scan_rate_pct"]),
        ),
    }
    cards = []
    for key in HEADLINE:
        metric = m[key]
        if metric["value"] is None and metric.get("note", "").startswith("not defined"):
            continue  # a figure that means nothing for this workload is not shown as a card
        extra = sub.get(key) or metric.get("note", "")
        cards.append(dict(metric, key=key, note_no=notes[key], sub=extra))
    return cards


def _row(key: str, metric: dict[str, Any], notes: dict[str, int]) -> dict[str, Any]:
    return {"note": "", **metric, "key": key, "note_no": notes[key]}


def _join(*parts: tuple[str, dict[str, Any]]) -> str:
    """'32.6 % of guest memory; guest memory 768 MiB' from the metrics that have a value."""
    return "; ".join(
        template.format(fmt_value(m["value"], m["unit"]))
        for template, m in parts
        if m["value"] is not None
    )


def _footnotes(a: Analysis) -> dict[str, int]:
    return {k: i + 1 for i, k in enumerate(a.metrics)}


def _charts(record: Record, a: Analysis, ps: int) -> list[dict[str, str]]:
    s, events, w = record.samples, record.events, a.windows
    if s.empty:
        return []
    configured, _ = configured_scan_rate(record, w)
    zoom = charts.zoom_window(s, w)
    out = [
        (
            "merge",
            "Merge curves",
            charts.merge_chart(s, events, w, ps, checks=record.checks),
            "Counters in pages (left axis) and the same scale in MiB (right axis), each held "
            "until the next sample (a sample is also taken at every event that matters). The "
            "green area is memory saved. Vertical lines are the run's events; the shaded band "
            f"is the window the savings are taken over ({w.where.removeprefix('at ')}); dots "
            "are the scenario's checks where they were taken.",
        ),
        (
            "merge-zoom",
            "Merge curves, zoomed",
            charts.merge_chart(s, events, w, ps, zoom, record.checks) if zoom else None,
            "The same curves from just before KSM went on until well into the plateau, where "
            "the whole run is too long to see the rise.",
        ),
        (
            "cost",
            "ksmd's cost",
            charts.cost_chart(s, events, w, configured),
            "ksmd's CPU use as a percentage of one CPU each sample, its running total in CPU "
            "seconds, and how fast it scanned against pages_to_scan / sleep_millisecs.",
        ),
        (
            "memory",
            "Host memory",
            charts.memory_chart(s, events, w),
            "The host's /proc/meminfo over the run, in GiB.",
        ),
    ]
    return [{"id": i, "title": t, "svg": svg, "caption": c} for i, t, svg, c in out if svg]


def _event_row(e: Event) -> dict[str, Any]:
    extra = e.model_dump(exclude={"t", "time", "kind", "detail"}, exclude_none=True)
    return {
        "t": e.t,
        "time": e.time,
        "kind": e.kind,
        "detail": e.detail,
        "extra": ", ".join(f"{k}={v}" for k, v in extra.items() if k != "traceback"),
    }


def _host_rows(host: Host) -> list[tuple[str, str]]:
    rows = []
    for key, value in host.model_dump(mode="json", exclude_unset=True).items():
        text = json.dumps(value) if isinstance(value, dict | list) else str(value)
        if key == "mem_total_kb" and isinstance(value, int | float):
            text = f"{value / 1024**2:,.1f} GiB ({value:,} kB)"
        rows.append((key, text))
    return rows


def _knob_rows(meta: RunMeta) -> list[dict[str, Any]]:
    sources = [meta.knobs_before, meta.knobs_during, meta.knobs_after]
    names: list[str] = []
    for src in sources:
        names += [n for n in src if n not in names]
    rows = []
    for name in names:
        before, during, after = (src.get(name, "") for src in sources)
        rows.append(
            {
                "name": name,
                "before": before,
                "during": during,
                "after": after,
                "changed": name in sources[1] and during != before,
                "restored": after == before or name not in sources[2],
            }
        )
    return rows


def _files(record: Record) -> list[dict[str, Any]]:
    names = list(dict.fromkeys([*record.meta.files.values(), *KNOWN_FILES]))
    out = []
    for name in names:
        path = record.dir / name
        if path.is_file():
            out.append({"name": name, "size": format_size(path.stat().st_size)})
        elif path.is_dir() and any(path.iterdir()):  # a long run's hourly Parquet parts
            size = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
            out.append({"name": name, "size": format_size(size)})
    return out

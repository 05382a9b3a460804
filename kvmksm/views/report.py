"""The HTML report: one self-contained file, a pure function of a run record.

Nothing in it depends on when or where it was built (no build time, fixed SVG ids), so
rebuilding from the same directory gives the same bytes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from kvmksm.analysis.metrics import Analysis, analyse, configured_scan_rate, page_size
from kvmksm.analysis.potential import time_to_fraction
from kvmksm.results.record import REPORT, RUN_JSON, Record, load_record
from kvmksm.views import charts

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
    out = record.dir / REPORT
    tmp = out.with_suffix(".html.tmp")
    tmp.write_text(render_report(record), encoding="utf-8")
    os.replace(tmp, out)  # a reader never sees half a report
    return out


def render_report(record: Record) -> str:
    return html_env().get_template("report.html.j2").render(**build_context(record))


def html_env() -> Environment:
    """The Jinja2 environment of every kvmksm HTML page (report, compare, plan)."""
    env = Environment(
        loader=PackageLoader("kvmksm", "templates"),
        autoescape=select_autoescape(["html", "j2"]),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["num"] = fmt_num
    env.filters["expected"] = fmt_expected
    env.filters["value"] = fmt_value
    env.filters["duration"] = fmt_duration
    env.filters["secs"] = lambda t: f"{t:,.2f}" if isinstance(t, int | float) else "—"
    return env


def build_context(record: Record) -> dict[str, Any]:
    meta = record.meta
    a = analyse(record)
    ps = page_size(record)
    notes = _footnotes(a)
    scenario = meta.get("scenario") or {}
    checks = record.checks
    return {
        "meta": meta,
        "title": _title(meta),
        "status": meta.get("status", "unknown"),
        "status_class": STATUS_CLASS.get(meta.get("status", ""), "muted"),
        "summary": _summary(record, ps),
        "cards": _cards(a, notes),
        "metrics": [_row(k, m, notes) for k, m in a.metrics.items()],
        "footnotes": [(notes[k], k, _row(k, m, notes)) for k, m in a.metrics.items()],
        "windows": a.windows,
        "charts": _charts(record, a, ps),
        "checks": checks,
        "checks_passed": sum(1 for c in checks if c.get("passed")),
        "events": [_event_row(e) for e in record.events],
        "events_open": len(record.events) <= MANY_EVENTS,
        "host": _host_rows(meta.get("host") or {}),
        "knobs": _knob_rows(meta),
        "scenario_yaml": yaml.safe_dump(scenario, sort_keys=False, allow_unicode=True).strip(),
        "files": _files(record),
        "vm": a.vm,
        "vm_chart": charts.vm_chart(record.samples, record.events, a.windows, a.vm, ps)
        if a.vm and not record.samples.empty
        else None,
        "vm_guests": len(a.vm.rows) if a.vm else 0,
        "sharing": _sharing_view(record, a, ps),
    }


def _sharing_view(record: Record, a: Analysis, ps: int) -> dict[str, Any] | None:
    """The sharing matrix as a heat map and the potential beside the (N-1)/N ceiling."""
    s, p = record.meta.get("sharing"), record.meta.get("potential")
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


def _title(meta: dict[str, Any]) -> str:
    name = (meta.get("scenario") or {}).get("name") or "run"
    host = (meta.get("host") or {}).get("hostname") or "unknown host"
    return f"{name} on {host}"


def _summary(record: Record, ps: int) -> list[tuple[str, str]]:
    meta, host = record.meta, record.meta.get("host") or {}
    workload = (meta.get("scenario") or {}).get("workload") or {}
    rows = [
        ("Scenario", f"{(meta.get('scenario') or {}).get('name', '?')}"),
        ("Scenario file", meta.get("scenario_file") or "—"),
        ("Workload", _workload_text(workload)),
        ("Kernel", host.get("kernel_release") or "—"),
        ("Started", meta.get("started") or "—"),
        ("Finished", meta.get("finished") or "—"),
        ("Duration", fmt_duration(meta.get("duration_s"))),
        ("Samples", f"{len(record.samples):,} rows; page size {ps:,} bytes"),
        ("Kind", f"{meta.get('kind', '?')} (record format {meta.get('format')})"),
    ]
    return [(k, str(v)) for k, v in rows]


def _workload_text(w: dict[str, Any]) -> str:
    if w.get("type") == "vms":
        base = w.get("base") or {}
        src = base.get("domain") or base.get("image") or "?"
        mem = w.get("memory") or base.get("memory")
        text = f"{w.get('clones')} clones of {src}"
        if mem:
            text += f", {fmt_num(mem / 1024**2)} MiB each"
        fill = w.get("guest_fill")
        if fill:
            text += f", each fills {fmt_num(fill['size'] / 1024**2)} MiB with byte {fill['byte']}"
        return text + f" ({w.get('domain_type', 'kvm')})"
    if w.get("type") == "processes":
        size = w.get("size") or 0
        return f"{w.get('count')} processes x {fmt_num(size / 1024**2)} MiB"
    return w.get("type") or "—"


def _cards(a: Analysis, notes: dict[str, int]) -> list[dict[str, Any]]:
    m = a.metrics
    sub = {
        "plateau_saved_mib": _join(("peak {}", m["peak_saved_mib"])),
        "plateau_saved_pct": _join(("of {} guest memory", m["guest_memory_mib"])),
        "plateau_saved_pct_of_ceiling": _join(
            ("ceiling (N-1)/N = {} of guest memory", m["ceiling_pct"])
        ),
        "ksmd_cpu_s": _join(
            ("{} to reach the plateau", m["ksmd_cpu_to_plateau_s"]),
            ("{} on the plateau", m["ksmd_cpu_plateau_pct"]),
        ),
        "scan_rate": _join(
            ("configured {}", m["scan_rate_configured"]),
            ("{} of it achieved", m["scan_rate_pct"]),
        ),
    }
    cards = []
    for key in HEADLINE:
        metric = m[key]
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
            charts.merge_chart(s, events, w, ps),
            "Counters in pages (left axis) and the same scale in MiB (right axis). The green "
            "area is memory saved. Vertical lines are the run's events; the shaded band is the "
            "plateau the metrics are taken over.",
        ),
        (
            "merge-zoom",
            "Merge curves, zoomed",
            charts.merge_chart(s, events, w, ps, zoom) if zoom else None,
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


def _event_row(e: dict[str, Any]) -> dict[str, Any]:
    extra = {k: v for k, v in e.items() if k not in ("t", "time", "kind", "detail")}
    return {
        "t": e.get("t"),
        "time": e.get("time", ""),
        "kind": e.get("kind", ""),
        "detail": e.get("detail", ""),
        "extra": ", ".join(f"{k}={v}" for k, v in extra.items()),
    }


def _host_rows(host: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    for key, value in host.items():
        text = json.dumps(value) if isinstance(value, dict | list) else str(value)
        if key == "mem_total_kb" and isinstance(value, int | float):
            text = f"{value / 1024**2:,.1f} GiB ({value:,} kB)"
        rows.append((key, text))
    return rows


def _knob_rows(meta: dict[str, Any]) -> list[dict[str, Any]]:
    sources = [meta.get(k) or {} for k in ("knobs_before", "knobs_during", "knobs_after")]
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
    names = list(dict.fromkeys([*(record.meta.get("files") or {}).values(), *KNOWN_FILES]))
    out = []
    for name in names:
        path = record.dir / name
        if path.is_file():
            out.append({"name": name, "size": _size(path.stat().st_size)})
    return out


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1024
    return ""


# -- formatting -----------------------------------------------------------------------
def fmt_num(v: Any) -> str:
    """Thousands separators, and fewer decimals the larger the number."""
    if v is None or v == "":
        return "—"
    if isinstance(v, bool) or not isinstance(v, int | float):
        return str(v)
    if isinstance(v, int) or float(v).is_integer():
        return f"{int(v):,}"
    a = abs(v)
    digits = 0 if a >= 100 else 1 if a >= 10 else 2 if a >= 0.1 else 3
    return f"{v:,.{digits}f}"


def fmt_duration(seconds: Any) -> str:
    """'86,399 s (23 h 59 min)': seconds as recorded, and the same for a person."""
    if not isinstance(seconds, int | float):
        return "—"
    text = fmt_value(seconds, "s")
    if seconds >= 3600:
        return f"{text} ({int(seconds // 3600)} h {int(seconds % 3600 // 60)} min)"
    if seconds >= 60:
        return f"{text} ({int(seconds // 60)} min {int(seconds % 60)} s)"
    return text


def fmt_value(v: Any, unit: str = "") -> str:
    if isinstance(v, list):
        return " – ".join(fmt_num(x) for x in v) + (f" {unit}" if unit else "")
    text = fmt_num(v)
    return f"{text} {unit}" if unit and text != "—" else text


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

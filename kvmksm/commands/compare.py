"""kvmksm compare: run records side by side.

Records are pooled from the arguments (run directories, experiment directories, or folders
holding either) and grouped by what they ran: the scenario (its name aside), the knobs in
effect, the kernel and the host. Records with the same configuration are repeats of one
another. Each group is set against the first: mean and spread over its repeats, the
difference, and whether that difference is beyond the noise by Welch's t-test (it does not
assume equal spreads). Below three repeats on either side the test has too little to go on,
and the comparison says so instead of guessing.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table
from scipy import stats

from kvmksm.analysis.outcome import COMPARED, Outcome, aligned_curve, outcome
from kvmksm.errors import UserError
from kvmksm.results.record import RUN_JSON, Record, load_record

MIN_REPEATS = 3  # per side, for the test to say anything
ALPHA = 0.05
# Shown when they differ, but records that differ only in these are still repeats.
SOFT = ("scenario.name", "scenario.description", "host.python", "tool.version")
# Fields that do not change what is measured.
IGNORED_SCENARIO = ("repeats", "matrix", "knobs", "connect")
IGNORED_HOST = ("python",)
SHORT = {
    "host.kernel_release": "kernel",
    "host.hostname": "host",
    "scenario.workload.count": "count",
    "scenario.workload.clones": "clones",
}
USABLE = ("passed", "failed")  # a failed check still leaves good measurements


@dataclass
class Run:
    record: Record
    outcome: Outcome
    source: str  # the argument it came from
    config: dict[str, str]

    @property
    def status(self) -> str:
        return str(self.record.meta.get("status", "?"))

    @property
    def name(self) -> str:
        return f"{self.record.dir.parent.name}/{self.record.dir.name}"


def make_run(record: Record, source: str) -> Run:
    return Run(record, outcome(record), source, config_of(record))


# -- collecting ----------------------------------------------------------------------
def collect(paths: Sequence[str | Path]) -> list[Run]:
    """Every record under the arguments: a run directory, an experiment directory (its runs),
    or a folder whose subfolders are either."""
    from kvmksm.commands.experiment import INDEX, load_runs

    runs: list[Run] = []
    for arg in paths:
        p = Path(arg)
        if (p / INDEX).exists():
            runs += [make_run(rec, str(arg)) for _, rec in load_runs(p)]
        elif (p / RUN_JSON).exists():
            runs.append(make_run(load_record(p), str(arg)))
        elif p.is_dir():
            children = sorted(
                c
                for c in p.iterdir()
                if c.is_dir()
                and not c.name.startswith(".")
                and ((c / RUN_JSON).exists() or (c / INDEX).exists())
            )
            if not children:
                raise UserError(f"{p}: holds no run record or experiment")
            for c in children:
                for run in collect([c]):
                    run.source = str(arg)
                    runs.append(run)
        else:
            raise UserError(f"{p}: no such run record or experiment directory")
    return runs


# -- configuration ----------------------------------------------------------------------
def config_of(record: Record) -> dict[str, str]:
    """What a record ran, flattened to 'scenario.workload.count': '4' and so on."""
    meta = record.meta
    out: dict[str, str] = {}
    sc = {k: v for k, v in (meta.get("scenario") or {}).items() if k not in IGNORED_SCENARIO}
    _flatten("scenario", sc, out)
    for k, v in sorted((meta.get("knobs_during") or {}).items()):
        if k != "run":
            out[f"knobs.{k}"] = _text(v)
    for k, v in (meta.get("host") or {}).items():
        if k not in IGNORED_HOST:
            out[f"host.{k}"] = _text(v)
    out["tool.version"] = _text((meta.get("tool") or {}).get("version"))
    return out


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            if k in ("connect", "expect"):  # where libvirt is, what is judged: not measured
                continue
            _flatten(f"{prefix}.{k}", v, out)
    elif prefix.endswith(".steps") and isinstance(value, list):
        out[prefix] = "; ".join(_step_text(s) for s in value)
    else:
        out[prefix] = _text(value)


def _step_text(step: dict[str, Any]) -> str:
    from kvmksm.scenario.model import PatternSpec

    action = str(step.get("action"))
    if action != "fill":
        return action
    pats = []
    for p in step.get("patterns") or []:
        try:
            pats.append(PatternSpec.model_validate(p).describe() if isinstance(p, dict) else p)
        except ValueError:
            pats.append(_text(p))
    if pats and all(p == pats[0] for p in pats):
        return f"fill {pats[0]} (all)"  # the count is a field of its own
    return "fill " + "/".join(str(p) for p in pats)


def _text(v: Any) -> str:
    if isinstance(v, str):
        return v
    return json.dumps(v, sort_keys=True, separators=(",", ":"))


def _kind(field_name: str) -> str:
    if field_name == "host.kernel_release" or field_name == "host.kernel_version":
        return "kernel"
    return field_name.split(".", 1)[0]


# -- statistics -------------------------------------------------------------------------
def mean_sd(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    v = [x for x in values if x is not None]
    if not v:
        return None, None
    return float(np.mean(v)), (float(np.std(v, ddof=1)) if len(v) > 1 else None)


def difference(
    base: Sequence[float], other: Sequence[float], alpha: float = ALPHA
) -> dict[str, Any]:
    """other - base, with Welch's t-test over the repeats and a 95% interval of the difference."""
    a, b = np.asarray(base, float), np.asarray(other, float)
    out: dict[str, Any] = {"diff": None, "diff_pct": None, "p": None, "ci95": None}
    if not len(a) or not len(b):
        return out | {"verdict": "no data"}
    diff = float(b.mean() - a.mean())
    out["diff"] = diff
    out["diff_pct"] = diff / abs(a.mean()) * 100 if a.mean() else None
    if len(a) < MIN_REPEATS or len(b) < MIN_REPEATS:
        return out | {
            "verdict": "too few repeats to tell",
            "why": f"{len(a)} and {len(b)} runs; the test needs {MIN_REPEATS} on each side",
        }
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    if va == 0 and vb == 0:  # exact counters: every repeat gave the same number
        same = diff == 0
        return out | {
            "verdict": "same" if same else "beyond noise",
            "why": "every repeat gave the same value on each side",
        }
    with warnings.catch_warnings():  # nearly equal values: scipy warns, the p is still fine
        warnings.simplefilter("ignore", RuntimeWarning)
        p = float(stats.ttest_ind(b, a, equal_var=False).pvalue)
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (
        (va**2 / (len(a) - 1) if va else 0.0) + (vb**2 / (len(b) - 1) if vb else 0.0)
    )
    half = float(stats.t.ppf(0.975, df)) * se
    out.update(p=p, ci95=[diff - half, diff + half], df=df)
    beyond = p < alpha
    out["verdict"] = "beyond noise" if beyond else "within noise"
    out["why"] = f"Welch's t-test p={p:.3g} ({'<' if beyond else '>='} {alpha:g})"
    return out


# -- the comparison ---------------------------------------------------------------------
@dataclass
class Group:
    id: str
    label: str
    runs: list[Run]
    config: dict[str, str]

    def values(self, key: str) -> list[float]:
        return [v for r in self.runs if (v := r.outcome.value(key)) is not None]


@dataclass
class Comparison:
    groups: list[Group]
    differences: list[dict[str, Any]]
    warnings: list[str]
    metrics: list[dict[str, Any]]
    pareto: dict[str, Any] | None
    excluded: list[dict[str, str]]
    alpha: float
    sources: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "min_repeats": MIN_REPEATS,
            "test": "Welch's t-test (two-sided) on the repeats of each group against group A",
            "groups": [
                {
                    "id": g.id,
                    "label": g.label,
                    "n": len(g.runs),
                    "records": [str(r.record.dir) for r in g.runs],
                    "config": g.config,
                }
                for g in self.groups
            ],
            "differences": self.differences,
            "warnings": self.warnings,
            "metrics": self.metrics,
            "pareto": self.pareto,
            "excluded": self.excluded,
        }


def compare(runs: list[Run], by_argument: bool = False, alpha: float = ALPHA) -> Comparison:
    if not runs:
        raise UserError("nothing to compare: no run records")
    warnings: list[str] = []
    excluded = [
        {"record": str(r.record.dir), "status": r.status} for r in runs if r.status not in USABLE
    ]
    usable = [r for r in runs if r.status in USABLE]
    if excluded:
        warnings.append(
            f"{len(excluded)} record(s) left out because they did not finish "
            f"({', '.join(sorted({e['status'] for e in excluded}))})"
        )
    if not usable:
        raise UserError("nothing to compare: no record finished (all error or interrupted)")
    groups = _group(usable, by_argument)
    differences = _differences(groups)
    _label(groups, differences, by_argument)
    warnings += _warnings(groups, differences)
    metrics = _metrics(groups, alpha)
    pareto = None
    if len(groups) > 1 and any(d["kind"] == "knobs" for d in differences):
        from kvmksm.analysis.pareto import cost_benefit

        pareto = cost_benefit(groups)
    sources = list(dict.fromkeys(r.source for r in runs))
    return Comparison(groups, differences, warnings, metrics, pareto, excluded, alpha, sources)


def _group(runs: list[Run], by_argument: bool) -> list[Group]:
    keyed: dict[Any, list[Run]] = {}
    for r in runs:
        key = r.source if by_argument else _key(r.config)
        keyed.setdefault(key, []).append(r)
    groups = []
    for i, members in enumerate(keyed.values()):
        gid = _letters(i)
        groups.append(Group(gid, gid, members, members[0].config))
    return groups


def _key(config: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in config.items() if k not in SOFT))


def _letters(i: int) -> str:
    s = ""
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        s = chr(65 + r) + s
    return s


def _differences(groups: list[Group]) -> list[dict[str, Any]]:
    """Every configuration field whose value is not the same in all records."""
    names = list(dict.fromkeys(k for g in groups for r in g.runs for k in r.config))
    out = []
    for name in names:
        per_group = {}
        for g in groups:
            vals = {r.config.get(name, "—") for r in g.runs}
            per_group[g.id] = vals.pop() if len(vals) == 1 else "varies: " + ", ".join(sorted(vals))
        all_vals = {r.config.get(name, "—") for g in groups for r in g.runs}
        if len(all_vals) > 1:
            out.append(
                {"field": name, "kind": _kind(name), "soft": name in SOFT, "values": per_group}
            )
    return out


def _label(groups: list[Group], differences: list[dict[str, Any]], by_argument: bool) -> None:
    telling = [d for d in differences if not d["soft"] and not d["field"].startswith("tool.")]
    # Knobs and sizes first: in a sweep they are the point; then kernel, host, the rest.
    order = {"knobs": 0, "scenario": 1, "kernel": 2, "host": 3}
    telling.sort(key=lambda d: order.get(d["kind"], 4))
    for g in groups:
        parts = [
            f"{short_name(d['field'])}={show(d['field'], d['values'][g.id])}" for d in telling[:3]
        ]
        label = ", ".join(parts) + (" …" if len(telling) > 3 else "")
        if by_argument:
            src = Path(g.runs[0].source).name or g.runs[0].source
            label = f"{src}: {label}" if label else src
        g.label = label or "all runs"


def short_name(field_name: str) -> str:
    """'knobs.pages_to_scan' -> 'pages_to_scan'; 'scenario.workload.base.memory' ->
    'base.memory' (a bare 'memory' or 'size' would not say whose)."""
    if field_name in SHORT:
        return SHORT[field_name]
    parts = field_name.split(".")
    generic = ("memory", "size", "byte", "type", "image", "domain")
    return ".".join(parts[-2:]) if parts[-1] in generic and len(parts) > 2 else parts[-1]


def show(field_name: str, value: str) -> str:
    """A value as a label shows it: sizes in MiB/GiB rather than bytes."""
    leaf = field_name.rsplit(".", 1)[-1]
    if (leaf in ("memory", "size", "memory_limit") or leaf.endswith("_kb")) and value.isdigit():
        from kvmksm.units import format_size

        return format_size(int(value) * (1024 if leaf.endswith("_kb") else 1))
    return value


def _warnings(groups: list[Group], differences: list[dict[str, Any]]) -> list[str]:
    out = []
    fields = {d["field"]: d for d in differences}
    if "scenario.workload.type" in fields:
        out.append(
            "NOT COMPARABLE: the records ran different workloads (processes and vms): their "
            "figures measure different things"
        )
    scen = [
        d["field"].removeprefix("scenario.")
        for d in differences
        if d["kind"] == "scenario" and not d["soft"] and d["field"] != "scenario.workload.type"
    ]
    if scen:
        out.append(
            "different scenarios: the groups differ in "
            + ", ".join(scen[:6])
            + (" …" if len(scen) > 6 else "")
            + "; a difference in the figures may come from the workload, not only from the "
            "kernel or the knobs"
        )
    if "host.hostname" in fields:
        out.append(
            "different hosts: CPU, memory and firmware differ along with whatever else "
            "differs; compare kernels on one host where you can"
        )
    few = [g.id for g in groups if len(g.runs) < MIN_REPEATS]
    if few and len(groups) > 1:
        out.append(
            f"too few repeats to tell a difference from noise for group(s) {', '.join(few)}: "
            f"run each configuration at least {MIN_REPEATS} times (repeats: {MIN_REPEATS})"
        )
    others = sorted(
        {r.name for g in groups for r in g.runs if r.record.event_time("other_ksm_users")}
    )
    if others:
        out.append(
            f"{len(others)} record(s) saw other processes using KSM during the run: the "
            "host-wide counters include their pages"
        )
    return out


def _metrics(groups: list[Group], alpha: float) -> list[dict[str, Any]]:
    base = groups[0]
    out = []
    for key, better in COMPARED.items():
        per = {}
        meta = None
        for g in groups:
            vals = g.values(key)
            mean, sd = mean_sd(vals)
            per[g.id] = {
                "n": len(vals),
                "mean": mean,
                "sd": sd,
                "cv_pct": sd / abs(mean) * 100 if sd is not None and mean else None,
                "min": min(vals) if vals else None,
                "max": max(vals) if vals else None,
                "values": vals,
            }
            meta = meta or next(
                (r.outcome.metrics[key] for r in g.runs if key in r.outcome.metrics), None
            )
        if meta is None or all(p["n"] == 0 for p in per.values()):
            continue
        vs = {}
        for g in groups[1:]:
            d = difference(base.values(key), g.values(key), alpha)
            if d["verdict"] == "beyond noise" and d["diff"]:
                d["better"] = (d["diff"] > 0) == (better == "higher")
            vs[g.id] = d
        out.append(
            {
                "key": key,
                "label": meta["label"],
                "unit": meta["unit"],
                "definition": meta["definition"],
                "better": better,
                "groups": per,
                "vs_baseline": vs,
            }
        )
    return out


# -- output -----------------------------------------------------------------------------
WIDE = 3  # more groups than this: one row per group instead of one column per group
HEADLINE = ("plateau_saved_mib", "time_to_90pct_s", "ksmd_cpu_to_plateau_s", "mib_per_cpu_s")
MARK = {"beyond noise": "", "within noise": " =", "same": " =", "too few repeats to tell": " ?"}


def terminal(cmp: Comparison, console: Console) -> None:
    from kvmksm.views.report import fmt_num

    for g in cmp.groups:
        console.print(f"[bold]{g.id}[/] = {g.label} ({len(g.runs)} run(s))", soft_wrap=True)
    if len(cmp.groups) > WIDE:
        _terminal_wide(cmp, console, fmt_num)
    else:
        _terminal_narrow(cmp, console, fmt_num)
    if cmp.pareto:
        front = [p for p in cmp.pareto["points"] if p["front"]]
        console.print(
            "Pareto front (most saved for the ksmd CPU spent): "
            + "; ".join(f"{p['group']} ({p['label']})" for p in front),
            soft_wrap=True,
        )
    for w in cmp.warnings:
        console.print(f"[yellow]warning:[/] {w}", soft_wrap=True)


def _terminal_narrow(cmp: Comparison, console: Console, fmt: Any) -> None:
    if cmp.differences:
        t = Table(title="What differs", title_justify="left")
        t.add_column("field")
        for g in cmp.groups:
            t.add_column(g.id)
        for d in cmp.differences:
            t.add_row(d["field"], *(_short(d["values"][g.id]) for g in cmp.groups))
        console.print(t)
    base = cmp.groups[0].id
    t = Table(
        title=f"Metrics (mean ± sd over repeats; each group against {base})", title_justify="left"
    )
    t.add_column("metric")
    for g in cmp.groups:
        t.add_column(f"{g.id}", justify="right")
    for g in cmp.groups[1:]:
        t.add_column(f"{g.id} - {base}", justify="right")
    for m in cmp.metrics:
        row = [f"{m['label']} ({m['unit']})" if m["unit"] else m["label"]]
        for g in cmp.groups:
            s = m["groups"][g.id]
            row.append(f"{_mean_text(s, fmt)} (n={s['n']})")
        for g in cmp.groups[1:]:
            row.append(_diff_text(m["vs_baseline"][g.id], fmt))
        t.add_row(*row)
    console.print(t)


def _terminal_wide(cmp: Comparison, console: Console, fmt: Any) -> None:
    """Many groups: one row each, the headline metrics, a mark against the first group."""
    fields = [d["field"] for d in cmp.differences if not d["soft"]]
    if fields:
        console.print("differs: " + ", ".join(fields), soft_wrap=True)
    metrics = [m for m in cmp.metrics if m["key"] in HEADLINE]
    t = Table(
        title=f"Mean ± sd over repeats; against {cmp.groups[0].id}: + better, - worse, "
        "= within noise, ? too few repeats",
        title_justify="left",
    )
    t.add_column("group")
    t.add_column("n", justify="right")
    for m in metrics:
        t.add_column(f"{m['label']} ({m['unit']})", justify="right")
    for g in cmp.groups:
        row = [g.id, str(len(g.runs))]
        for m in metrics:
            text = _mean_text(m["groups"][g.id], fmt)
            d = m["vs_baseline"].get(g.id)
            if d is not None:
                text += MARK.get(d["verdict"], "")
                if "better" in d:
                    text += " +" if d["better"] else " -"
            row.append(text)
        t.add_row(*row)
    console.print(t)


def _mean_text(s: dict[str, Any], fmt: Any) -> str:
    if s["mean"] is None:
        return "—"
    text = fmt(s["mean"])
    return text + (f" ± {fmt(s['sd'])}" if s["sd"] else "")


def _diff_text(d: dict[str, Any], fmt: Any) -> str:
    if d["diff"] is None:
        return "—"
    text = ("+" if d["diff"] > 0 else "") + fmt(d["diff"])
    if d["diff_pct"] is not None:
        text += f" ({d['diff_pct']:+.1f}%)"
    verdict = d["verdict"]
    if "better" in d:
        verdict += ", better" if d["better"] else ", worse"
    if d.get("p") is not None:
        verdict += f", p={d['p']:.2g}"
    mark = {"beyond noise": "[bold]", "within noise": "[dim]"}.get(d["verdict"], "")
    return f"{text} {mark}{verdict}{'[/]' if mark else ''}"


def _short(text: str, width: int = 40) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def write_html(cmp: Comparison, path: Path) -> Path:
    from kvmksm.analysis.pareto import pareto_chart
    from kvmksm.views import plots
    from kvmksm.views.report import html_env

    path = Path(path)
    here = path.parent.resolve()
    groups = []
    for g in cmp.groups:
        rows = []
        for r in g.runs:
            report = r.record.dir / "report.html"
            rows.append(
                {
                    "name": r.name,
                    "status": r.status,
                    "started": r.record.meta.get("started"),
                    "kernel": (r.record.meta.get("host") or {}).get("kernel_release"),
                    "host": (r.record.meta.get("host") or {}).get("hostname"),
                    "link": os.path.relpath(report.resolve(), here) if report.exists() else None,
                }
            )
        groups.append({"id": g.id, "label": g.label, "n": len(g.runs), "runs": rows})
    ctx = {
        "title": _title(cmp),
        "groups": groups,
        "differences": cmp.differences,
        "warnings": cmp.warnings,
        "metrics": cmp.metrics,
        "ids": [g.id for g in cmp.groups],
        "base": cmp.groups[0].id,
        "pareto": cmp.pareto,
        "alpha": cmp.alpha,
        "min_repeats": MIN_REPEATS,
        "overlay": overlay_chart(cmp),
        "pareto_svg": pareto_chart(cmp.pareto) if cmp.pareto else None,
        "sources": cmp.sources,
        "colours": {g.id: plots.colour(i) for i, g in enumerate(cmp.groups)},
    }
    html = html_env().get_template("compare.html.j2").render(**ctx)
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(html, encoding="utf-8")
    os.replace(tmp, path)
    return path


def _title(cmp: Comparison) -> str:
    names = sorted(
        {str((r.record.meta.get("scenario") or {}).get("name")) for g in cmp.groups for r in g.runs}
    )
    return f"{', '.join(names)}: {len(cmp.groups)} configuration(s) compared"


def overlay_chart(cmp: Comparison) -> str | None:
    """Memory saved and ksmd CPU of every run against seconds since KSM went on."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    from kvmksm.views import charts, plots

    curves = [(g, r, aligned_curve(r.record, r.outcome)) for g in cmp.groups for r in g.runs]
    curves = [c for c in curves if len(c[2])]
    if not curves:
        return None
    span = max(float(c["t"].max()) for _, _, c in curves)
    scale, unit = charts.time_scale(span)
    has_cpu = any(c["ksmd_cpu"].notna().any() for _, _, c in curves)

    def build() -> Figure:
        fig = Figure(figsize=(charts.WIDTH, 6.4 if has_cpu else 4.2), layout="constrained")
        axes = fig.subplots(2 if has_cpu else 1, 1, sharex=True, squeeze=False)[:, 0]
        colour = {g.id: plots.colour(i) for i, g in enumerate(cmp.groups)}
        seen: set[str] = set()
        for g, _, c in curves:
            label = None if g.id in seen else f"{g.id}: {g.label}"
            seen.add(g.id)
            x = c["t"].to_numpy(float) / scale
            xs, ys = charts.reduce_minmax(x, c["saved_mib"].to_numpy(float))
            axes[0].plot(xs, ys, color=colour[g.id], lw=1.3, alpha=0.85, label=label)
            if has_cpu:
                xs, ys = charts.reduce_minmax(x, c["ksmd_cpu"].fillna(0).to_numpy(float))
                axes[1].plot(xs, ys, color=colour[g.id], lw=1.0, alpha=0.7)
        for ax in axes:
            ax.axvline(0, color="#2e7d32", lw=1.0, ls="-")
            ax.set_ylim(bottom=0)
        axes[0].set_title("Memory saved, aligned at KSM on (t = 0)")
        axes[0].set_ylabel("MiB saved")
        axes[0].yaxis.set_major_formatter(FuncFormatter(plots.thousands))
        axes[0].legend(loc="lower right")
        if has_cpu:
            axes[1].set_ylabel("ksmd, % of one CPU")
        axes[-1].set_xlabel(f"time since KSM on ({unit})")
        return fig

    return plots.render("overlay", "Memory saved and ksmd CPU, aligned at KSM on", build)


def default_output(paths: Sequence[str | Path], name: str) -> Path:
    """Inside the experiment when comparing one; else in the current folder."""
    from kvmksm.commands.experiment import INDEX

    if len(paths) == 1 and (Path(paths[0]) / INDEX).exists():
        return Path(paths[0]) / name
    return Path(name)

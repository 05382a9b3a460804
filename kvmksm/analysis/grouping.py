"""What each record ran, and records grouped by it.

A record's configuration is its scenario (the name aside), the knobs in effect, the kernel
and the host, flattened to ``'scenario.workload.count': '4'`` and so on. Records alike in all
of it are repeats of one another; compare sets groups side by side, plan fits along a sweep.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmksm.analysis.metrics import Analysis, analyse
from kvmksm.results.record import Record
from kvmksm.scenario.model import PatternSpec
from kvmksm.units import format_size

# Shown when they differ, but records that differ only in these are still repeats.
SOFT = ("scenario.name", "scenario.description", "host.python", "tool.version")
# Fields that do not change what is measured.
IGNORED_SCENARIO = ("repeats", "matrix", "knobs", "connect")
# libvirt's view of KSM (node-memory-tune): its shm_* counters change from run to run, and
# its knobs are the run's knobs, already compared; left in, no two VM runs would be repeats.
IGNORED_HOST = ("python", "libvirt_node_memory")
SHORT = {
    "host.kernel_release": "kernel",
    "host.hostname": "host",
    "scenario.workload.count": "count",
    "scenario.workload.clones": "clones",
}
USABLE = ("passed", "failed")  # a failed check still leaves good measurements
# Fields that vary along a size sweep and so do not split records into configurations.
SIZE_FIELDS = ("scenario.workload.count", "scenario.workload.clones")


@dataclass
class Run:
    """A record with its analysis, the argument it came from and its configuration."""

    record: Record
    analysis: Analysis
    source: str
    config: dict[str, str]

    @property
    def status(self) -> str:
        return self.record.meta.status

    @property
    def name(self) -> str:
        return self.record.name

    def value(self, key: str) -> float | None:
        return self.analysis.value(key)


def make_run(record: Record, source: str) -> Run:
    return Run(record, analyse(record), source, config_of(record))


# -- configuration ----------------------------------------------------------------------
def config_of(record: Record) -> dict[str, str]:
    """What a record ran, flattened to 'scenario.workload.count': '4' and so on."""
    meta = record.meta
    out: dict[str, str] = {}
    scenario = meta.scenario.model_dump(mode="json", exclude_unset=True)
    _flatten("scenario", {k: v for k, v in scenario.items() if k not in IGNORED_SCENARIO}, out)
    for k, v in sorted(meta.knobs_during.items()):
        if k != "run":
            out[f"knobs.{k}"] = _text(v)
    for k, v in meta.host.model_dump(mode="json", exclude_unset=True).items():
        if k not in IGNORED_HOST:
            out[f"host.{k}"] = _text(v)
    out["tool.version"] = _text(meta.tool.get("version"))
    if meta.skipped:  # optional knobs and expectations this kernel lacks (scenario.portable)
        out["skipped"] = ", ".join(
            dict.fromkeys(f"{x.get('name')} ({x.get('kind')})" for x in meta.skipped)
        )
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


def kind_of(field_name: str) -> str:
    if field_name in ("host.kernel_release", "host.kernel_version"):
        return "kernel"
    return field_name.split(".", 1)[0]


def key_of(config: dict[str, str], leave_out: tuple[str, ...] = ()) -> tuple[tuple[str, str], ...]:
    """What makes records repeats of one another (soft fields and `leave_out` aside)."""
    return tuple(sorted((k, v) for k, v in config.items() if k not in SOFT + leave_out))


# -- groups -----------------------------------------------------------------------------
@dataclass
class Group:
    id: str
    label: str
    runs: list[Run]
    config: dict[str, str]

    def values(self, key: str) -> list[float]:
        return [v for r in self.runs if (v := r.value(key)) is not None]


def group_runs(runs: list[Run], by_argument: bool = False) -> list[Group]:
    """Repeats together (or one group per argument), lettered A, B, ... in order of first run."""
    keyed: dict[Any, list[Run]] = {}
    for r in runs:
        keyed.setdefault(r.source if by_argument else key_of(r.config), []).append(r)
    return [
        Group(letters(i), letters(i), members, members[0].config)
        for i, members in enumerate(keyed.values())
    ]


def letters(i: int) -> str:
    s = ""
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        s = chr(65 + r) + s
    return s


def differences(groups: list[Group]) -> list[dict[str, Any]]:
    """Every configuration field whose value is not the same in all records."""
    names = list(dict.fromkeys(k for g in groups for r in g.runs for k in r.config))
    out = []
    for name in names:
        per_group = {}
        for g in groups:
            vals = {r.config.get(name, "—") for r in g.runs}
            per_group[g.id] = vals.pop() if len(vals) == 1 else "varies: " + ", ".join(sorted(vals))
        if len({r.config.get(name, "—") for g in groups for r in g.runs}) > 1:
            out.append(
                {"field": name, "kind": kind_of(name), "soft": name in SOFT, "values": per_group}
            )
    return out


def label_groups(groups: list[Group], diffs: list[dict[str, Any]], by_argument: bool) -> None:
    """Each group's label: the (up to three) fields that tell it apart."""
    telling = [d for d in diffs if not d["soft"] and not d["field"].startswith("tool.")]
    # Knobs and sizes first: in a sweep they are the point; then kernel, host, the rest.
    # When the kernel differs it leads: knobs a kernel lacks then differ only because of it.
    order = {"knobs": 0, "scenario": 1, "kernel": 2, "host": 3}
    if any(d["kind"] == "kernel" for d in telling):
        order = {"kernel": -1, **{k: v for k, v in order.items() if k != "kernel"}}
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


def varying(runs: list[Run], leave_out: tuple[str, ...] = ()) -> list[str]:
    """Configuration fields (soft ones and `leave_out` aside) that differ among the runs."""
    names = list(dict.fromkeys(k for r in runs for k in r.config))
    return [
        k for k in names if k not in SOFT + leave_out and len({r.config.get(k) for r in runs}) > 1
    ]


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
        return format_size(int(value) * (1024 if leaf.endswith("_kb") else 1))
    return value

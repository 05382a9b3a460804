"""A kernel comparison: the groups of a comparison (kvmksm.commands.compare) read as kernels
side by side, with what else differs between the machines they ran on, which differences
are real, and which figures are not comparable at all.

Counts (memory saved, exact counters) mean the same thing on any machine. Timings and CPU
seconds do not: they are only set side by side between hosts with the same CPU model, the
same virtualisation (a guest under TCG emulates every instruction; a bare host does not)
and the same number of CPUs. Groups are sorted into such timing classes; a timing figure of
two groups in different classes is reported as "not comparable", never with a verdict.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvmksm.analysis.grouping import Group
from kvmksm.analysis.stats import difference, mean_sd
from kvmksm.commands.compare import Comparison
from kvmksm.scenario.portable import summary

# (key, label, unit, better, timing): the figures a kernel comparison shows, in order.
FIGURES: tuple[tuple[str, str, str, str, bool], ...] = (
    ("plateau_saved_mib", "Memory saved", "MiB", "higher", False),
    ("general_profit_mib", "general_profit", "MiB", "higher", False),
    ("time_to_90pct_s", "Time to steady (90% of the savings)", "s", "lower", True),
    ("ksmd_cpu_to_plateau_s", "ksmd CPU to get there", "s", "lower", True),
    ("ksmd_cpu_s_per_gib", "ksmd CPU per GiB saved", "s/GiB", "lower", True),
    ("ksmd_cpu_per_full_scan_ms", "ksmd CPU per full scan", "ms", "lower", True),
    ("full_scan_s", "Time per full scan", "s", "lower", True),
    ("unmerge_s", "Unmerge (run=2)", "s", "lower", True),
)
MACHINE = ("cpu_model", "virtualization", "cpus")


@dataclass
class KernelComparison:
    cmp: Comparison
    kernels: list[dict[str, Any]]  # one per group: id, kernel, machine, hosts, skipped
    classes: list[list[str]]  # group ids whose timings can be set side by side
    figures: list[dict[str, Any]]
    counts: list[dict[str, Any]]  # exact checks: per group the values observed
    statements: list[str] = field(default_factory=list)

    def comparable(self, a: str, b: str) -> bool:
        return any(a in c and b in c for c in self.classes)


def run_value(run: Any, key: str) -> float | None:
    if key == "ksmd_cpu_s_per_gib":
        cpu, saved = run.value("ksmd_cpu_to_plateau_s"), run.value("plateau_saved_mib")
        return cpu / (saved / 1024) if cpu is not None and saved else None
    return run.value(key)


def machine_of(g: Group) -> dict[str, Any]:
    host = g.runs[0].record.meta.host
    return {
        "cpu_model": host.cpu_model,
        "virtualization": host.virtualization or "unknown",
        "cpus": host.cpus,
        "mem_total_kb": host.mem_total_kb,
    }


def kernel_comparison(cmp: Comparison) -> KernelComparison:
    groups = cmp.groups
    kernels = []
    classes: dict[tuple[Any, ...], list[str]] = {}
    for g in groups:
        m = machine_of(g)
        classes.setdefault(tuple(m[k] for k in MACHINE), []).append(g.id)
        skipped = g.runs[0].record.meta.skipped
        kernels.append(
            {
                "id": g.id,
                "label": g.label,
                "kernel": g.runs[0].record.meta.host.kernel_release,
                "hosts": sorted({r.record.meta.host.hostname or "?" for r in g.runs}),
                "runs": len(g.runs),
                "passed": sum(r.status == "passed" for r in g.runs),
                "machine": m,
                "skipped": summary(skipped) if skipped else "",
            }
        )
    out = KernelComparison(cmp, kernels, list(classes.values()), [], [])
    out.figures = _figures(out, groups)
    out.counts = _counts(groups)
    out.statements = _statements(out)
    return out


def _figures(kc: KernelComparison, groups: list[Group]) -> list[dict[str, Any]]:
    base = groups[0]
    rows = []
    for key, label, unit, better, timing in FIGURES:
        values = {g.id: [v for r in g.runs if (v := run_value(r, key)) is not None] for g in groups}
        if not any(values.values()):
            continue
        per = {}
        for g in groups:
            mean, sd = mean_sd(values[g.id])
            per[g.id] = {"mean": mean, "sd": sd, "n": len(values[g.id])}
        vs = {}
        for g in groups[1:]:
            if timing and not kc.comparable(base.id, g.id):
                vs[g.id] = {"verdict": "not comparable", "why": "different machines (timing)"}
                continue
            d = difference(values[base.id], values[g.id], kc.cmp.alpha)
            if d["verdict"] == "beyond noise" and d["diff"]:
                d["better"] = (d["diff"] > 0) == (better == "higher")
            vs[g.id] = d
        rows.append(
            {"key": key, "label": label, "unit": unit, "better": better, "timing": timing,
             "groups": per, "vs_base": vs}
        )  # fmt: skip
    return rows


def _counts(groups: list[Group]) -> list[dict[str, Any]]:
    """Every check of the scenario: per group the values its runs observed (one value when
    all repeats agree), whether they passed, or that the kernel has no such counter."""
    names: list[str] = []
    expected: dict[str, Any] = {}
    for g in groups:
        for r in g.runs:
            for c in r.record.checks:
                if c.name not in expected:
                    names.append(c.name)
                    expected[c.name] = c.expected
    rows = []
    for name in names:
        per = {}
        for g in groups:
            obs = [c for r in g.runs for c in r.record.checks if c.name == name]
            if not obs:
                skipped = {s["name"] for s in g.runs[0].record.meta.skipped}
                counter = name.rsplit(": ", 1)[-1]
                per[g.id] = {"absent": True, "skipped": counter in skipped}
                continue
            vals = sorted({str(c.observed) for c in obs})
            per[g.id] = {
                "absent": False,
                "values": vals,
                "passed": all(c.passed for c in obs),
                "n": len(obs),
            }
        rows.append({"name": name, "expected": expected[name], "groups": per})
    return rows


def _statements(kc: KernelComparison) -> list[str]:
    """Plain sentences: which differences are real, which are noise, what cannot be said."""
    out = []
    ids = [k["id"] for k in kc.kernels]
    kernel = {k["id"]: k["kernel"] for k in kc.kernels}
    if len(kc.classes) > 1:
        parts = []
        for c in kc.classes:
            m = next(k["machine"] for k in kc.kernels if k["id"] == c[0])
            parts.append(f"{', '.join(c)} ({m['virtualization']}, {m['cpu_model']})")
        out.append(
            "Timings are comparable only within: " + "; ".join(parts) + ". Between these "
            "machines only counts (memory saved, exact counters) are set side by side."
        )
    for row in kc.figures:
        same, noise, few = [], [], []
        for gid in ids[1:]:
            d = row["vs_base"].get(gid)
            if not d:
                continue
            v = d["verdict"]
            if v == "beyond noise":
                pct = f" ({d['diff_pct']:+.1f}%)" if d.get("diff_pct") is not None else ""
                word = "better" if d.get("better") else "worse"
                out.append(
                    f"REAL: {row['label']}, {kernel[gid]} against {kernel[ids[0]]}: "
                    f"{word}{pct}, {d.get('why', '')}"
                )
            elif v == "same":
                same.append(kernel[gid])
            elif v == "within noise":
                noise.append(f"{kernel[gid]} (p = {d['p']:.2g})" if d.get("p") else kernel[gid])
            elif v == "too few repeats to tell":
                few.append(kernel[gid])
        against = f"against {kernel[ids[0]]}"
        if same:
            out.append(f"same: {row['label']} {against}, every repeat alike: {', '.join(same)}")
        if noise:
            out.append(f"within noise: {row['label']} {against}: {', '.join(noise)}")
        if few:
            out.append(f"cannot tell (fewer than 3 repeats): {row['label']}: {', '.join(few)}")
    return out

"""Real Debian guests: the image build, and the figures of Debian runs, printed from records.

    python3 bench/bench_debian.py build
        a fresh `kvmksm image build debian` into a temporary data folder (base domain
        debian-bench, removed afterwards): seconds per step, image size
    flock /tmp/kvmksm-realksm.lock python3 bench/bench_debian.py run debian3 [--knob K=V ...]
        `kvmksm bench` of a bundled scenario (knobs pinned on top with --knob), then its figures
    python3 bench/bench_debian.py summary RECORD|EXPERIMENT ...
        per run: guests, boot to agent, saved (share of guest memory, zero pages and the rest),
        time to 50/90 %, ksmd CPU per GiB saved, KSM on to steady against the theory of three
        full scans, and for churn and probe runs the copy-on-write breaks and write latency
    python3 bench/bench_debian.py predict EXPERIMENT --fit 1,2,4 --check 6
        `kvmksm plan` fitted on some clone counts, its saving for another against the run

The theory of three full scans: ksmd counts only pages that are present, so a full scan is
(pages scanned + pages skipped in the first full scan after KSM on) / (pages_to_scan x 1000 /
sleep_millisecs) seconds, and three of them is the least a steady curve can take (two to
merge, one to see nothing move). Uses real KSM and libvirt for `run`: hold the lock.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kvmksm.analysis.guest_work import churn_figures, probe_figures  # noqa: E402
from kvmksm.results.collect import iter_records  # noqa: E402
from kvmksm.results.record import Record  # noqa: E402
from kvmksm.scenario.load import resolve_path  # noqa: E402

GIB = 1 << 30
MIB = 1 << 20


def metric(meta: Any, key: str) -> float | None:
    m = meta.metrics.get(key)
    return m.get("value") if isinstance(m, dict) else None


def first_scan(s: pd.DataFrame, t_on: float) -> tuple[float | None, float | None]:
    """Pages in one whole pass of ksmd after KSM on (from the end of its first full scan to the
    end of the second: the first may have started mid-pass), and that pass's seconds."""
    after = s[s.t >= t_on].reset_index(drop=True)
    if after.empty or "full_scans" not in after:
        return None, None
    ends = after.index[after.full_scans.diff() > 0]
    if len(ends) < 2:
        return None, None
    a, b = after.loc[ends[0]], after.loc[ends[1]]
    pages = None
    if "pages_scanned" in after:
        pages = float(b.pages_scanned - a.pages_scanned)
        if "pages_skipped" in after:
            pages += float(b.pages_skipped - a.pages_skipped)
    return pages, float(b.t - a.t)


def figures(rec: Record) -> dict[str, Any]:
    meta = rec.meta
    ps = meta.host.page_size
    ev = {e.kind: e for e in meta.events}
    knobs = meta.knobs_during
    n = len(meta.guests)
    boots = [g.boot_seconds for g in meta.guests if g.boot_seconds is not None]
    saved = metric(meta, "plateau_saved_mib")
    cpu = metric(meta, "ksmd_cpu_to_plateau_s")
    out: dict[str, Any] = {
        "dir": str(rec.dir),
        "status": meta.status,
        "guests": n,
        "kernel": meta.host.kernel_release,
        "knobs": {
            k: knobs.get(k)
            for k in (
                "pages_to_scan",
                "sleep_millisecs",
                "smart_scan",
                "use_zero_pages",
                "max_page_sharing",
            )
        },
        "boot": (min(boots), statistics.median(boots), max(boots)) if boots else None,
        "saved_mib": saved,
        "saved_pct": metric(meta, "plateau_saved_pct"),
        "t50": metric(meta, "time_to_50pct_s"),
        "t90": metric(meta, "time_to_90pct_s"),
        "ksmd_cpu_s": cpu,
        "ksmd_cpu_per_gib": cpu / (saved / 1024) if cpu and saved else None,
        "ksmd_plateau_pct": metric(meta, "ksmd_cpu_plateau_pct"),
        "general_profit_mib": metric(meta, "general_profit_mib"),
    }
    # zero pages: KSM's own count with use_zero_pages=1; the page contents (potential) always
    s = rec.samples
    steady = ev.get("steady")
    on = ev.get("ksm_on")
    if steady is not None and "ksm_zero_pages" in s:
        row = s[s.t <= steady.t].iloc[-1]
        out["ksm_zero_mib"] = float(row.ksm_zero_pages) * ps / MIB
        out["sharing_mib"] = float(row.pages_sharing) * ps / MIB
    pot = meta.potential or {}
    if "zero_pages" in pot:
        out["present_mib"] = pot["pages"] * ps / MIB
        out["zero_present_mib"] = pot["zero_pages"] * ps / MIB
        out["potential_mib"] = pot["potential"] * ps / MIB
        out["achieved_of_potential_pct"] = pot.get("achieved_pct_of_potential")
    if on is not None and steady is not None:
        pages, secs = first_scan(s, on.t)
        rate = knobs.get("pages_to_scan", 0) * 1000 / max(knobs.get("sleep_millisecs", 1), 1)
        out["steady_s"] = steady.t - on.t
        out["first_scan_pages"] = pages
        out["first_scan_s"] = secs
        out["theory_3_scans_s"] = 3 * pages / rate if pages and rate else None
        out["full_scans_to_steady"] = int(
            s[s.t <= steady.t].full_scans.iloc[-1] - s[s.t <= on.t].full_scans.iloc[-1]
        )
    ch = churn_figures(rec)
    if ch:
        out["churn"] = {
            k: ch.get(k)
            for k in (
                "size",
                "rate",
                "achieved_rate_min",
                "cow_ksm_merge",
                "cow_ksm_per_s_plateau",
                "pages_volatile_plateau",
            )
        }
    pr = probe_figures(rec)
    if pr:
        out["probe"] = {
            r["phase"]: {k: r[k] for k in ("p50_us", "p99_us", "p999_us", "max_us", "cow_ksm")}
            for r in pr["rows"]
        }
    return out  # fmt: skip


def show(f: dict[str, Any]) -> None:
    def n(v: Any, fmt: str = ".1f") -> str:
        return "—" if v is None else format(v, fmt)

    k = f["knobs"]
    print(
        f"{f['dir']}: {f['status']}, {f['guests']} guests, kernel {f['kernel']}, pages_to_scan "
        f"{k['pages_to_scan']} / {k['sleep_millisecs']} ms, smart_scan {k['smart_scan']}, "
        f"use_zero_pages {k['use_zero_pages']}, max_page_sharing {k['max_page_sharing']}"
    )
    if f["boot"]:
        print(f"  boot to agent: {n(f['boot'][0])} / {n(f['boot'][1])} / {n(f['boot'][2])} s "
              "(fastest / median / slowest guest)")  # fmt: skip
    print(
        f"  saved {n(f['saved_mib'])} MiB = {n(f['saved_pct'])} % of guest memory "
        f"(general_profit {n(f['general_profit_mib'])} MiB); time to 50 % {n(f['t50'])} s, "
        f"to 90 % {n(f['t90'])} s"
    )
    print(
        f"  ksmd CPU to the plateau {n(f['ksmd_cpu_s'], '.2f')} s = "
        f"{n(f['ksmd_cpu_per_gib'], '.2f')} CPU s per GiB saved; on the plateau "
        f"{n(f['ksmd_plateau_pct'])} % of a CPU"
    )
    if "ksm_zero_mib" in f:
        print(f"  at steady: pages_sharing {n(f['sharing_mib'])} MiB + ksm_zero_pages "
              f"{n(f['ksm_zero_mib'])} MiB")  # fmt: skip
    if "present_mib" in f:
        print(
            f"  contents (after the plateau): {n(f['present_mib'])} MiB present, of which "
            f"{n(f['zero_present_mib'])} MiB zero pages; potential {n(f['potential_mib'])} MiB, "
            f"achieved {n(f['achieved_of_potential_pct'])} % of it"
        )
    if "steady_s" in f:
        print(
            f"  KSM on -> steady {n(f['steady_s'])} s ({f['full_scans_to_steady']} full scans); "
            f"a whole pass {n(f['first_scan_pages'], '.0f')} pages in {n(f['first_scan_s'])} s; "
            f"theory of 3 full scans {n(f['theory_3_scans_s'])} s"
        )
    if "churn" in f:
        c = f["churn"]
        print(
            f"  churn {c['size'] / MIB:.0f} MiB at {c['rate'] / MIB:.1f} MiB/s (slowest guest "
            f"{n((c['achieved_rate_min'] or 0) / MIB, '.2f')} MiB/s): cow_ksm +"
            f"{n(c['cow_ksm_merge'], '.0f')} KSM on -> plateau end, "
            f"{n(c['cow_ksm_per_s_plateau'])}/s on the plateau; pages_volatile "
            f"{n(c['pages_volatile_plateau'], '.0f')}"
        )
    if "probe" in f:
        for phase, p in f["probe"].items():
            print(
                f"  probe {phase}: write p50 {p['p50_us']} us, p99 {p['p99_us']} us, p99.9 "
                f"{p['p999_us']} us, max {p['max_us']} us; cow_ksm +{p['cow_ksm']}"
            )


def cmd_summary(a: argparse.Namespace) -> None:
    # kvmksm's own iteration: experiments' runs in order, no unfinished (.running) folders
    for _, rec in iter_records(a.paths):
        show(figures(rec))


def cmd_run(a: argparse.Namespace) -> None:
    data = yaml.safe_load(resolve_path(a.scenario).read_text())
    for kv in a.knob:
        k, _, v = kv.partition("=")
        data.setdefault("knobs", {})[k] = int(v) if v.lstrip("-").isdigit() else v
    for kv in a.set:
        k, _, v = kv.partition("=")
        data["workload"][k] = yaml.safe_load(v)
    out = Path(a.output)
    with tempfile.TemporaryDirectory() as d:
        sc = Path(d) / f"{data['name']}.yaml"
        sc.write_text(yaml.safe_dump(data, sort_keys=False))
        t = time.monotonic()
        p = subprocess.run([sys.executable, "-m", "kvmksm", "bench", str(sc), "-o", str(out)])
        print(f"kvmksm bench {a.scenario} {' '.join(a.knob + a.set)}: exit {p.returncode}, "
              f"{time.monotonic() - t:.0f} s")  # fmt: skip
    latest = max((out / data["name"]).iterdir(), key=lambda x: x.stat().st_mtime)
    for _, rec in iter_records([latest]):
        show(figures(rec))


def cmd_build(a: argparse.Namespace) -> None:
    import libvirt

    with tempfile.TemporaryDirectory(prefix="bench-debian-", dir="/var/tmp") as d:
        env = dict(os.environ, KVMKSM_DATA_DIR=d)
        t = time.monotonic()
        p = subprocess.run(
            [sys.executable, "-m", "kvmksm", "image", "build", "debian", "--name", a.name],
            env=env,
        )
        wall = time.monotonic() - t
        m = (
            json.loads((Path(d) / "images" / f"{a.name}.json").read_text())
            if p.returncode == 0
            else {}
        )
        conn = libvirt.open("qemu:///system")
        try:
            conn.lookupByName(a.name).undefine()
        except libvirt.libvirtError:
            pass
        conn.close()
    if p.returncode != 0:
        sys.exit(f"build failed (exit {p.returncode})")
    s = m["seconds"]
    print(
        f"image build: {wall:.1f} s wall (private apt lookup {s['apt']} s, mmdebstrap "
        f"{s['mmdebstrap']} s, mke2fs -d {s['mke2fs']} s, qcow2 {s['qcow2']} s); "
        f"{len(m['packages'])} packages, kernel {m['kernel_release']}, qcow2 "
        f"{m['image_bytes'] / MIB:.0f} MiB, initrd {m['initrd_bytes'] / MIB:.1f} MiB"
    )


def cmd_predict(a: argparse.Namespace) -> None:
    fit = {int(x) for x in a.fit.split(",")}
    runs = {}
    for _, rec in iter_records([a.experiment]):
        if rec.meta.status in ("passed", "failed"):
            runs[len(rec.meta.guests)] = rec.dir
    paths = [str(runs[k]) for k in sorted(fit)]
    # `kvmksm plan --check` states the prediction, its 95% interval and the error itself.
    with tempfile.TemporaryDirectory() as tmp:
        p = subprocess.run(
            [sys.executable, "-m", "kvmksm", "plan", *paths, "--check", str(runs[a.check]),
             "-o", str(Path(tmp) / "plan.html")],
            capture_output=True,
            text=True,
        )  # fmt: skip
    print(p.stdout, end="")
    if p.returncode not in (0, 1):
        sys.exit(p.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--name", default="debian-bench")
    r = sub.add_parser("run")
    r.add_argument("scenario")
    r.add_argument("--knob", action="append", default=[], help="K=V pinned on top")
    r.add_argument("--set", action="append", default=[], help="workload field K=YAML")
    r.add_argument("-o", "--output", default=str(REPO / "reports"))
    s = sub.add_parser("summary")
    s.add_argument("paths", nargs="+")
    p = sub.add_parser("predict")
    p.add_argument("experiment")
    p.add_argument("--fit", default="1,2,4")
    p.add_argument("--check", type=int, default=6)
    a = ap.parse_args()
    {"build": cmd_build, "run": cmd_run, "summary": cmd_summary, "predict": cmd_predict}[a.cmd](a)


if __name__ == "__main__":
    main()

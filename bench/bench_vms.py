"""VM runs end to end: from `run=1` to detecting the steady state, against the theoretical
time of 3 full scans at the configured rate:

    mergeable pages / (pages_to_scan x 1000 / sleep_millisecs) x 3

where the mergeable pages are all guest RAM (QEMU marks it MADV_MERGEABLE).

    flock /tmp/kvmksm-realksm.lock python3 bench/bench_vms.py [scenarios/tiny3.yaml] --runs 5

Also printed, per run: the full scans ksmd really made by the steady point and its real pace
(it scans slower than configured: each batch's work and the sleep's rounding to the timer
tick come on top of sleep_millisecs), and how much the guests' merged pages rose after the
steady point (to the end of the plateau): a detector that stops early shows it there.

Needs the tiny base image (`kvmksm image build`). Uses real KSM and libvirt: run it alone.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from kvmksm.commands.bench import bench
from kvmksm.scenario import load as scenario


def one(path: Path, out: Path) -> dict[str, float]:
    import pandas as pd

    sc = scenario.load(path)
    res = bench(sc, out)
    meta = json.loads((res.record_dir / "run.json").read_text())
    ev = {e["kind"]: e for e in meta["events"]}
    assert "steady" in ev, f"no steady state: {res.status} {res.error}"
    knobs = meta["knobs_during"]
    pages = sum(g["memory_kb"] for g in meta["guests"]) * 1024 // meta["host"]["page_size"]
    rate = knobs["pages_to_scan"] * 1000 / max(knobs["sleep_millisecs"], 1)
    theory = 3 * pages / rate
    on, steady = ev["ksm_on"]["t"], ev["steady"]["t"]
    took = steady - on
    rec = meta.get("reconciliation", {})
    boots = [g["boot_seconds"] for g in meta["guests"]]
    # The passes ksmd really made (1 Hz samples): when full_scans went up, and the pages
    # scanned per second while KSM was on; and how much the guests merged after steady.
    s = pd.read_csv(res.record_dir / "samples.csv")
    during = s[(s.t >= on) & (s.t <= steady)]
    ends = during.t[during.full_scans.diff() > 0].tolist()
    per_pass = (ends[-1] - ends[0]) / (len(ends) - 1) if len(ends) > 1 else float("nan")
    scanned_rate = float("nan")
    if "pages_scanned" in s and len(during) > 1:
        scanned_rate = (during.pages_scanned.iloc[-1] - during.pages_scanned.iloc[0]) / (
            during.t.iloc[-1] - during.t.iloc[0]
        )
    v = pd.read_csv(res.record_dir / "vm_samples.csv")
    merged = v.groupby("t").ksm_merging_pages.sum()
    end = ev.get("plateau_done", ev["steady"])["t"]
    at = merged[merged.index <= steady].iloc[-1]
    later = merged[(merged.index >= steady) & (merged.index <= end)].max()
    return {
        "status": res.status,
        "took": took,
        "theory": theory,
        "ratio": took / theory,
        "pages": pages,
        "rate": rate,
        "per_pass": per_pass,
        "scanned_rate": scanned_rate,
        "rise_after": (later - at) / at if at else float("nan"),
        "sharing": ev["steady"].get("pages_sharing", 0),
        "rel": rec.get("relative_difference", float("nan")),
        "boot": max(boots),
        "unmerge": ev.get("unmerge", {}).get("seconds", float("nan")),
        "reason": ev["steady"]["detail"],
    }


def main() -> None:
    import statistics

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("scenario", nargs="?", default=str(scenario.SCENARIO_DIR / "tiny3.yaml"))
    ap.add_argument("--runs", type=int, default=1)
    a = ap.parse_args()
    ratios, passes = [], []
    with tempfile.TemporaryDirectory() as d:
        for i in range(a.runs):
            r = one(Path(a.scenario), Path(d))
            ratios.append(r["ratio"])
            passes.append(r["took"] / r["per_pass"])
            print(
                f"run {i + 1} ({r['status']}): KSM on -> steady {r['took']:.1f} s; theory for "
                f"3 full scans of {r['pages']} pages at {r['rate']:.0f} pages/s = "
                f"{r['theory']:.1f} s; ratio {r['ratio']:.2f}"
            )
            print(
                f"  ksmd really: {r['per_pass']:.1f} s a full scan, "
                f"{r['scanned_rate']:.0f} pages/s; steady after "
                f"{r['took'] / r['per_pass']:.2f} scans' time; the guests merged "
                f"{r['rise_after']:+.2%} more after steady"
            )
            print(
                f"  pages_sharing at steady {r['sharing']}; per-VM sum vs global "
                f"{r['rel']:.3%}; slowest boot {r['boot']:.1f} s; unmerge {r['unmerge']:.2f} s"
            )
            print(f"  steady: {r['reason']}")
    if a.runs > 1:
        print(
            f"steady/theory over {a.runs} runs: median {statistics.median(ratios):.2f}, "
            f"min {min(ratios):.2f}, max {max(ratios):.2f}; in scans: median "
            f"{statistics.median(passes):.2f}"
        )


if __name__ == "__main__":
    main()

"""VM runs end to end: from `run=1` to detecting the steady state, against the theoretical
time of 3 full scans at the configured rate:

    mergeable pages / (pages_to_scan x 1000 / sleep_millisecs) x 3

where the mergeable pages are all guest RAM (QEMU marks it MADV_MERGEABLE).

    flock /tmp/kvmksm-realksm.lock python3 bench/bench_vms.py [scenarios/tiny3.yaml] --runs 1

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
    sc = scenario.load(path)
    res = bench(sc, out)
    meta = json.loads((res.record_dir / "run.json").read_text())
    ev = {e["kind"]: e for e in meta["events"]}
    assert "steady" in ev, f"no steady state: {res.status} {res.error}"
    knobs = meta["knobs_during"]
    pages = sum(g["memory_kb"] for g in meta["guests"]) * 1024 // meta["host"]["page_size"]
    rate = knobs["pages_to_scan"] * 1000 / max(knobs["sleep_millisecs"], 1)
    theory = 3 * pages / rate
    took = ev["steady"]["t"] - ev["ksm_on"]["t"]
    rec = meta.get("reconciliation", {})
    boots = [g["boot_seconds"] for g in meta["guests"]]
    return {
        "status": res.status,
        "took": took,
        "theory": theory,
        "ratio": took / theory,
        "pages": pages,
        "rate": rate,
        "sharing": ev["steady"].get("pages_sharing", 0),
        "rel": rec.get("relative_difference", float("nan")),
        "boot": max(boots),
        "unmerge": ev.get("unmerge", {}).get("seconds", float("nan")),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("scenario", nargs="?", default=str(scenario.SCENARIO_DIR / "tiny3.yaml"))
    ap.add_argument("--runs", type=int, default=1)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        for i in range(a.runs):
            r = one(Path(a.scenario), Path(d))
            print(
                f"run {i + 1} ({r['status']}): KSM on -> steady {r['took']:.1f} s; theory for "
                f"3 full scans of {r['pages']} pages at {r['rate']:.0f} pages/s = "
                f"{r['theory']:.1f} s; ratio {r['ratio']:.2f} (target <= 1.5)"
            )
            print(
                f"  pages_sharing at steady {r['sharing']}; per-VM sum vs global "
                f"{r['rel']:.3%}; slowest boot {r['boot']:.1f} s; unmerge {r['unmerge']:.2f} s"
            )


if __name__ == "__main__":
    main()

"""The seed's LTP ksm03 scenario on the real kernel: how long the whole run takes against
the floor of its own fills plus the 3 full scans per round that it must wait for.

    flock /tmp/kvmksm-realksm.lock python3 bench/bench_ksm03.py --runs 5

Uses real KSM (host-wide): run it alone; every knob is restored after each run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from kvmksm.commands.bench import bench
from kvmksm.scenario import load as scenario


def one(out: Path) -> dict[str, float]:
    sc = scenario.load(scenario.SCENARIO_DIR / "ltp-ksm03.yaml")
    res = bench(sc, out)
    assert res.status == "passed", res.error
    import json

    meta = json.loads((res.record_dir / "run.json").read_text())
    ev = meta["events"]
    fills = sum(e["seconds"] for e in ev if e["kind"] == "round_filled")
    scans = sum(e["seconds"] for e in ev if e["kind"] == "scans_done")
    unmerge = sum(e["seconds"] for e in ev if e["kind"] == "unmerge")
    first_fill = next(e for e in ev if e["kind"] == "round_filled")
    return {
        "total": meta["duration_s"],
        "fills": fills,
        "scans": scans,
        "floor": fills + scans,
        "ratio": meta["duration_s"] / (fills + scans),
        "unmerge": unmerge,
        "ratio_unmerge": meta["duration_s"] / (fills + scans + unmerge),
        "setup": first_fill["t"] - first_fill["seconds"],  # until the first fill began
        "verify": sum(e["seconds"] for e in ev if e["kind"] == "verified"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for i in range(a.runs):
            r = one(Path(d))
            rows.append(r)
            print(
                f"run {i + 1}: total {r['total']:.2f} s = {r['ratio']:.2f} x floor "
                f"(fills {r['fills']:.2f} s + 3 full scans x 4 rounds {r['scans']:.2f} s); "
                f"{r['ratio_unmerge']:.2f} x with the unmerge ({r['unmerge']:.2f} s); "
                f"setup {r['setup']:.2f} s, verifying {r['verify']:.2f} s"
            )
    ratios = [r["ratio"] for r in rows]
    with_unmerge = [r["ratio_unmerge"] for r in rows]
    print(
        f"median total {statistics.median(r['total'] for r in rows):.2f} s; "
        f"ratio to floor: median {statistics.median(ratios):.2f}, max {max(ratios):.2f}; "
        f"with the unmerge in the floor: median {statistics.median(with_unmerge):.2f}; "
        f"all 30 checks passed in every run"
    )


if __name__ == "__main__":
    main()

"""`kvmksm bench ltp-ksm03` as a user times it (start-up, run, report), side by side with
LTP's own ksm03 binary and, if asked, another kvmksm tree; run alternately, N times each.

    flock /tmp/kvmksm-realksm.lock python3 bench/bench_ksm03_cli.py --runs 5 \\
        --ltp /tmp/ltp-build/testcases/kernel/mem/ksm/ksm03 --baseline /work/main

Each command is one fresh process; its wall time is taken from start to exit. Real KSM is
global: run this alone, under the real-KSM lock. kvmksm restores the knobs it sets; LTP's
ksm03 does not restore pages_to_scan (it is not in its save_restore list), so this script
puts back, after every command, any knob found changed, and says which.
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

from kvmksm.host.fs import HostFS
from kvmksm.host.ksm import Ksm

ROOT = Path(__file__).resolve().parent.parent


def kvmksm_cmd(tree: Path, out: Path) -> tuple[list[str], dict[str, str]]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    return [sys.executable, "-m", "kvmksm", "bench", "ltp-ksm03", "-o", str(out)], env


def run(cmd: list[str], cwd: str, env: dict[str, str] | None = None) -> tuple[float, int, str]:
    # From a neutral folder: `python -m` puts the current folder first on sys.path, so from
    # inside a tree every "other tree" would be this one.
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=cwd)
    return time.perf_counter() - t0, p.returncode, p.stdout + p.stderr


def last_run(out: Path) -> dict[str, float]:
    """The run inside the command: its own duration and its floor (fills + scans)."""
    runs = sorted(out.glob("ltp-ksm03/*/run.json"), key=lambda p: p.stat().st_mtime)
    meta = json.loads(runs[-1].read_text())
    ev = meta["events"]
    fills = sum(e["seconds"] for e in ev if e["kind"] == "round_filled")
    scans = sum(e["seconds"] for e in ev if e["kind"] == "scans_done")
    return {"run": meta["duration_s"], "floor": fills + scans}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--ltp", type=Path, help="LTP's ksm03 binary (an absolute path)")
    ap.add_argument("--baseline", type=Path, help="another kvmksm tree to time alike")
    args = ap.parse_args()
    kinds: list[tuple[str, Path | None]] = [("kvmksm", ROOT)]
    if args.baseline:
        kinds.append((f"kvmksm ({args.baseline})", args.baseline))
    if args.ltp:
        kinds.append(("LTP ksm03", None))
    times: dict[str, list[float]] = {k: [] for k, _ in kinds}
    inner: dict[str, list[dict[str, float]]] = {k: [] for k, _ in kinds}
    ksm = Ksm(HostFS())
    saved = ksm.read_knobs()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(args.runs):
                for name, tree in kinds:
                    if tree is None:
                        secs, code, text = run([str(args.ltp)], tmp)
                        ok = code == 0 and "TFAIL" not in text and "TBROK" not in text
                        extra = ""
                    else:
                        out = Path(tmp) / f"out{len(inner[name])}-{abs(hash(name))}"
                        cmd, env = kvmksm_cmd(tree, out)
                        secs, code, text = run(cmd, tmp, env)
                        ok = code == 0
                        r = last_run(out)
                        inner[name].append(r)
                        extra = (
                            f" (run {r['run']:.2f} s = {r['run'] / r['floor']:.2f} x fills + scans "
                            f"{r['floor']:.2f} s)"
                        )
                    if not ok:
                        print(text[-2000:], file=sys.stderr)
                        raise SystemExit(f"{name} failed (exit {code})")
                    times[name].append(secs)
                    extra += _put_back(ksm, saved)  # every command starts alike
                    print(f"run {i + 1} {name}: {secs:.2f} s{extra}", flush=True)
    finally:
        problems = ksm.restore(saved)
        if problems or ksm.read_knobs() != saved:
            print(f"RESTORE FAILED: {problems}", file=sys.stderr)
    for name, _ in kinds:
        t = times[name]
        line = f"{name}: median {statistics.median(t):.2f} s (min {min(t):.2f}, max {max(t):.2f})"
        if inner[name]:
            ratio = statistics.median(r["run"] / r["floor"] for r in inner[name])
            run_s = statistics.median(r["run"] for r in inner[name])
            line += f"; the run inside: median {run_s:.2f} s, {ratio:.2f} x its floor"
        print(line)
    return 0


def _put_back(ksm: Ksm, saved: dict[str, Any]) -> str:
    """Restore any knob the last command left changed; what it was, for the run's line."""
    left = {k: v for k, v in ksm.read_knobs().items() if saved.get(k) != v}
    if not left:
        return ""
    ksm.restore(saved)
    was = {k: saved[k] for k in left}
    return f"; left {left} changed (was {was}): put back"


if __name__ == "__main__":
    raise SystemExit(main())

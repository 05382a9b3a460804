"""Wall time of `kvmksm fleet run` split into its phases, and how it grows with the number of
hosts: boots N Debian guests (TCG, SSH through 127.0.0.1 forwards), then runs a small
processes scenario on 1, 2, ... N of them, each time into a fresh kvmksm_root so every host
installs from scratch, and prints per count: the phases (probe, bundles, run playbook) and
per host install / run / gather. Run it under the real-KSM lock:

  flock /tmp/kvmksm-realksm.lock python3 bench/bench_fleet.py \\
      --guest IMAGE:KERNEL:INITRD --key KEY [--hosts 1,2,3] [--scenario ltp-ksm03-small]

The machine's other work shares its 2 CPUs with the guests: say so with any figure.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from kvmksm.commands.fleet import fleet_run
from kvmksm.host import paths
from kvmksm.scenario.load import resolve_path
from kvmksm.virt.conn import open_connection, resolve_uri
from kvmksm.virt.lab import GuestSpec, Lab, inventory

ONE_RUN = """\
name: fleet-bench
sample_interval: 1s
knobs: {max_page_sharing: 12288, pages_to_scan: 12288, sleep_millisecs: 0, smart_scan: 0}
optional: [smart_scan]
workload:
  type: processes
  count: 3
  size: 16MiB
  steps:
    - action: fill
      patterns: [c, a, a]
      expect: {pages_shared: 2, pages_sharing: 12286}
    - action: unmerge
      expect: {pages_shared: 0, pages_sharing: 0}
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--guest", required=True, metavar="IMAGE:KERNEL:INITRD")
    ap.add_argument("--key", type=Path, required=True)
    ap.add_argument("--hosts", default="1,2,3")
    ap.add_argument("--scenario", help="default: one run of LTP ksm03's first round, 3 x 16 MiB")
    ap.add_argument("--memory", type=int, default=1024)
    args = ap.parse_args()
    counts = [int(x) for x in args.hosts.split(",")]
    spec = GuestSpec(*(Path(p).resolve() for p in args.guest.split(":")))
    tmp = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    scenario = tmp / "fleet-bench.yaml"
    if args.scenario:
        scenario = resolve_path(args.scenario)
    else:
        scenario.write_text(ONE_RUN)
    conn = open_connection(resolve_uri())
    rows = []
    # QEMU runs as libvirt's user: the overlays go where it can read them, not in a 0700 tmp
    with Lab(conn, paths.data_dir() / "lab", args.key, memory_mib=args.memory) as lab:
        t0 = time.monotonic()
        guests = lab.boot([spec] * max(counts), progress=lambda s: print(s, file=sys.stderr))
        print(f"booted {len(guests)} guests in {time.monotonic() - t0:.0f}s", file=sys.stderr)
        for n in counts:
            inv = tmp / f"hosts-{n}.ini"
            text = inventory(guests[:n], args.key, localhost=False)
            inv.write_text(
                text.replace("[guests:vars]", f"[guests:vars]\nkvmksm_root=/opt/kvmksm-bench-{n}")
            )
            t = time.monotonic()
            result = fleet_run(str(inv), str(scenario), tmp / "out")
            wall = time.monotonic() - t
            hosts = result.hosts
            per = {
                k: [h["timings"].get(f"{k}_s", 0.0) for h in hosts]
                for k in ("install", "run", "gather")
            }
            rows.append((n, wall, result.index["timings"], per, [h["status"] for h in hosts]))
            print(f"{n} host(s): {wall:.0f}s, {result.status}", file=sys.stderr)
    print(
        "| hosts | wall | probe | bundles | run playbook | install (mean / max) "
        "| run (mean / max) | gather (mean / max) | statuses |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for n, wall, tm, per, statuses in rows:
        cells = [f"{statistics.mean(v):.0f} / {max(v):.0f} s" for v in per.values()]
        print(
            f"| {n} | {wall:.0f} s | {tm.get('probe_s', 0):.0f} s | {tm.get('bundles_s', 0):.0f} s "
            f"| {tm.get('run_playbook_s', 0):.0f} s | {' | '.join(cells)} | {', '.join(statuses)} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""How fast kvmksm clones guests: define + disk per clone (no boot), qcow2 overlays vs full
copies, side by side. Prints per-guest milliseconds and removes everything it made.

    python3 bench/bench_clone.py                  # 20 clones of kvmksm-tiny, then of a 256 MiB base
    python3 bench/bench_clone.py -n 50 --base-mib 1024 -c qemu:///system
    python3 bench/bench_clone.py --boot 1,2,3     # also: seconds until tiny guests are up (TCG)
    python3 bench/bench_clone.py -n 1 --repeat 1 --base-mib 0 --boot 1,2,3 --boot-repeat 3 \
        --memory 136MiB --fill 64MiB               # boot times only, 3 times each (medians)

Booting guests makes them KSM users: run it under the real-KSM lock
(flock /tmp/kvmksm-realksm.lock python3 bench/bench_clone.py ...).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import libvirt  # noqa: E402

from kvmksm.scenario.model import VmsWorkload  # noqa: E402
from kvmksm.virt.clones import Clones  # noqa: E402
from kvmksm.virt.conn import open_connection, resolve_uri  # noqa: E402
from kvmksm.virt.tiny_image import build_image  # noqa: E402
from kvmksm.virt.volumes import ensure_pool  # noqa: E402

BENCH_VOLUME = "bench-clone-base.qcow2"


def time_clones(
    conn: libvirt.virConnect, base: dict[str, object], mode: str, n: int
) -> dict[str, float]:
    spec = VmsWorkload.model_validate(
        {"type": "vms", "domain_type": "qemu", "base": base, "clones": n, "disk": mode}
    )
    clones = Clones(conn, spec)
    clones.check()  # reading the base is a one-off, not per clone
    t0 = time.perf_counter()
    clones.create()
    created = time.perf_counter() - t0
    t1 = time.perf_counter()
    problems = clones.teardown()
    removed = time.perf_counter() - t1
    if problems:
        raise SystemExit("teardown problems: " + "; ".join(problems))
    return {"create_s": created, "per_guest_ms": created / n * 1000, "teardown_s": removed}


def time_boot(
    conn: libvirt.virConnect, base: str, n: int, domain_type: str, memory: str, fill: str
) -> dict[str, float]:
    """Start ``n`` tiny clones together; seconds from each start until KVMKSM-READY on the
    host, and the guests' own uptime when they printed it."""
    spec = VmsWorkload.model_validate(
        {
            "type": "vms",
            "domain_type": domain_type,
            "base": {"domain": base},
            "clones": n,
            "memory": memory,
            "guest_fill": {"size": fill, "byte": "a"},
            "boot": {"timeout": "10m"},
        }
    )
    clones = Clones(conn, spec)
    uptimes = []
    try:
        clones.create()
        clones.start()
        times = list(clones.wait_up().values())
        for g in clones.guests:
            m = re.search(r"KVMKSM-READY .*uptime=([0-9.]+)", Path(g.console or "").read_text())
            uptimes.append(float(m.group(1)) if m else float("nan"))
    finally:
        problems = clones.teardown()
    if problems:
        raise SystemExit("teardown problems: " + "; ".join(problems))
    return {
        "first": min(times),
        "median": statistics.median(times),
        "last": max(times),
        "guest": statistics.median(uptimes),
    }


def make_volume_base(conn: libvirt.virConnect, mib: int) -> str:
    """A qcow2 base volume of ``mib`` MiB of non-zero data in kvmksm's pool (so full copies
    go through libvirt's own copy, createXMLFrom)."""
    pool = ensure_pool(conn, "kvmksm").pool
    try:
        pool.storageVolLookupByName(BENCH_VOLUME).delete(0)
    except libvirt.libvirtError:
        pass
    raw = pool.createXML(
        f"<volume><name>{BENCH_VOLUME}.raw</name><capacity unit='MiB'>{mib}</capacity>"
        "<target><format type='raw'/></target></volume>",
        0,
    )
    with open(raw.path(), "r+b") as f:
        block = os.urandom(1 << 20)
        for _ in range(mib):
            f.write(block)
    vol = pool.createXMLFrom(
        f"<volume><name>{BENCH_VOLUME}</name><capacity unit='MiB'>{mib}</capacity>"
        "<target><format type='qcow2'/></target></volume>",
        raw,
        0,
    )
    raw.delete(0)
    return vol.path()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("-n", "--clones", type=int, default=20)
    ap.add_argument("-c", "--connect", help="libvirt URI (default as kvmksm: qemu:///system)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per mode; the median is shown")
    ap.add_argument("--base-mib", type=int, default=256, help="size of the data base (0: skip)")
    ap.add_argument("--boot", help="comma-separated guest counts to boot (e.g. 1,2,3)")
    ap.add_argument("--domain-type", default="qemu", choices=["qemu", "kvm"], help="for --boot")
    ap.add_argument("--boot-repeat", type=int, default=1, help="boots per count (medians)")
    ap.add_argument("--memory", default="136MiB", help="guest memory for --boot")
    ap.add_argument("--fill", default="64MiB", help="guest_fill for --boot")
    ap.add_argument("--base", default="kvmksm-tiny", help="tiny base domain (built if missing)")
    ap.add_argument(
        "--no-build", action="store_true", help="clone --base as it is (e.g. an older image)"
    )
    args = ap.parse_args()

    conn = open_connection(resolve_uri(args.connect))
    if args.no_build:
        conn.lookupByName(args.base)  # fails here if it does not exist
        label = f"{args.base} (as found)"
    else:
        tiny = build_image(conn, name=args.base, progress=lambda s: None)
        label = f"{tiny.domain} ({tiny.image.stat().st_size >> 20} MiB qcow2 file)"
    bases: list[tuple[str, dict[str, object]]] = [(label, {"domain": args.base})]
    data_vol = None
    if args.base_mib:
        data_vol = make_volume_base(conn, args.base_mib)
        bases.append(
            (
                f"{args.base_mib} MiB of data (qcow2 pool volume)",
                {"image": data_vol, "memory": "256MiB"},
            )
        )
    print(f"# {args.clones} clones per run, median of {args.repeat} runs, {conn.getURI()}")
    print(f"{'base':44} {'disk':8} {'per guest':>10} {'all':>8} {'teardown':>9}")
    try:
        for label, base in bases:
            for mode in ("overlay", "copy"):
                runs = [time_clones(conn, base, mode, args.clones) for _ in range(args.repeat)]
                med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                print(
                    f"{label:44} {mode:8} {med['per_guest_ms']:8.1f}ms "
                    f"{med['create_s']:7.2f}s {med['teardown_s']:8.2f}s",
                    flush=True,
                )
    finally:
        if data_vol:
            conn.storageVolLookupByPath(data_vol).delete(0)
    if args.boot:
        print(
            f"\n# tiny guests started together ({args.memory}, {args.fill} fill, type "
            f"{args.domain_type}), median of {args.boot_repeat} boot(s) of each count"
        )
        print(f"{'guests':>6} {'first up':>9} {'median':>8} {'last up':>8} {'guest uptime':>13}")
        for n in (int(x) for x in args.boot.split(",")):
            runs = [
                time_boot(conn, args.base, n, args.domain_type, args.memory, args.fill)
                for _ in range(args.boot_repeat)
            ]
            b = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            print(
                f"{n:6} {b['first']:8.1f}s {b['median']:7.1f}s {b['last']:7.1f}s "
                f"{b['guest']:12.1f}s",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

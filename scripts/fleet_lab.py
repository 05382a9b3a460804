#!/usr/bin/env python3
"""Boot guests as fleet hosts, write their inventory, run a command, and always take the
guests down again (scripts/fleet-demo.sh uses it; see kvmksm/virt/lab.py).

  fleet_lab.py --guest IMAGE:KERNEL:INITRD [--guest ...] --key KEY --inventory FILE
               [--memory MIB] [--no-localhost] -- COMMAND [ARG...]

Each guest is an overlay of IMAGE booted with KERNEL and INITRD under TCG, SSH forwarded
from a free port on 127.0.0.1. The inventory has the group `guests` and, unless
--no-localhost, `bare` with this host. The exit status is COMMAND's (2 for bad arguments,
1 when a guest does not come up). Run it under the real-KSM lock (fleet-demo.sh does).
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
from pathlib import Path

from kvmksm.errors import UserError
from kvmksm.host import paths
from kvmksm.virt.conn import open_connection, resolve_uri
from kvmksm.virt.lab import GuestSpec, Lab, inventory


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--guest", action="append", required=True, metavar="IMAGE:KERNEL:INITRD")
    ap.add_argument("--key", type=Path, required=True, help="SSH private key the images accept")
    ap.add_argument("--inventory", type=Path, required=True)
    ap.add_argument("--memory", type=int, default=1024, help="MiB per guest (default 1024)")
    ap.add_argument("--no-localhost", action="store_true")
    ap.add_argument("--timeout", type=float, default=600, help="seconds for each guest's SSH")
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("no COMMAND after --")
    specs = []
    for g in args.guest:
        parts = g.split(":")
        if len(parts) != 3 or not all(Path(p).is_file() for p in parts):
            ap.error(f"--guest {g}: expected IMAGE:KERNEL:INITRD, three existing files")
        specs.append(GuestSpec(*(Path(p).resolve() for p in parts)))

    def say(text: str) -> None:
        print(f"[fleet-lab] {text}", file=sys.stderr, flush=True)

    conn = open_connection(resolve_uri())
    # SIGTERM unwinds like Ctrl-C, so the guests always come down.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        with Lab(conn, paths.data_dir() / "lab", args.key, memory_mib=args.memory) as lab:
            try:
                guests = lab.boot(specs, timeout=args.timeout, progress=say)
            except UserError as e:
                say(str(e))
                return 1
            args.inventory.parent.mkdir(parents=True, exist_ok=True)
            args.inventory.write_text(inventory(guests, args.key, not args.no_localhost))
            say(f"inventory: {args.inventory}")
            child = subprocess.Popen(command)
            # Ctrl-C reaches the command from the terminal (same process group): it stops
            # every host's run itself. A SIGTERM sent to this script alone is passed on.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, lambda *_: child.send_signal(signal.SIGTERM))
            code = child.wait()
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            say("taking the guests down")
            return code
    finally:
        conn.close()


if __name__ == "__main__":
    sys.exit(main())

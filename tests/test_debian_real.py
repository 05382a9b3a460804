"""Real Debian guests under qemu:///system (TCG) and real KSM: the image kvmksm builds, clones
booted by their guest agent, work inside them through it, and runs of the Debian scenarios.

The image is built once per machine (the session fixture ``debian``, about 1.5 min on a
fresh one: Debian packages through the host's apt sources) and found up to date afterwards.
Guests are KSM users, so every test here holds the real-KSM lock (``real_ksm``).

The bench runs use two guests and pages_to_scan=1000 (50,000 pages a second) instead of the
kernel's default 100 (5,000): debian3 at the default rate takes 4-5 min from boot to unmerge,
too long for CI; with two guests and the faster rate the same run (the same base, agent boot,
guest_run, KSM on until steady, unmerge, checks) takes about a minute. ``test_debian3_small``
says which fields it changes.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import libvirt
import pandas as pd
import pytest
import yaml

from kvmksm.host.ksm import Ksm
from kvmksm.host.paths import ssh_dir
from kvmksm.scenario.load import resolve_path
from kvmksm.scenario.model import VmsWorkload
from kvmksm.virt.agent import Agent
from kvmksm.virt.base_image import BuiltImage
from kvmksm.virt.cleanup import find_leftovers
from kvmksm.virt.clones import Clones
from kvmksm.virt.debian_image import manifest_of, ssh_forward

pytestmark = [pytest.mark.libvirt, pytest.mark.realksm]

FAST = {"pages_to_scan": 1000, "sleep_millisecs": 20}  # 50,000 pages/s


def _scenario(name: str, **workload: Any) -> dict[str, Any]:
    """A bundled scenario, made test-sized: 2 clones, the fast rate, short waits."""
    data = yaml.safe_load(resolve_path(name).read_text())
    data["knobs"] = {**data.get("knobs", {}), **FAST}
    w = data["workload"]
    w.update(clones=2, settle="2s", plateau="3s", sharing=False)
    w["steady"] = {**w.get("steady", {}), "timeout": "5m"}
    w.update(workload)
    return data


def _bench(tmp_path: Path, data: dict[str, Any]) -> tuple[int, str, dict[str, Any], Path]:
    sc = tmp_path / f"{data['name']}.yaml"
    sc.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "kvmksm", "bench", str(sc), "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    (run_json,) = out.glob(f"{data['name']}/*/run.json")
    return proc.returncode, proc.stdout + proc.stderr, json.loads(run_json.read_text()), run_json


def _gone(conn: libvirt.virConnect, meta: dict[str, Any]) -> None:
    """Every guest of the run and every volume it made are gone."""
    names = [g["name"] for g in meta["guests"]]
    assert names
    run = re.match(r"kvmksm-([0-9a-f]{8})-", names[0]).group(1)  # type: ignore[union-attr]
    left = find_leftovers(conn, run)
    assert left.empty(), left.describe()
    existing = {d.name() for d in conn.listAllDomains(0)}
    assert not existing & set(names)


def _metric(meta: dict[str, Any], key: str) -> float:
    return float(meta["metrics"][key]["value"])


def test_debian_clones_boot_by_agent(
    conn: libvirt.virConnect, debian: BuiltImage, real_ksm: Ksm, tmp_path: Path
) -> None:
    """Two clones come up by their agent; inside: the image's kernel, python3, dbus, an
    x86-64-v2 CPU; files in and out through the agent; root logs in by SSH with kvmksm's key."""
    spec = VmsWorkload.model_validate(
        {
            "type": "vms",
            "domain_type": "qemu",
            "base": {"domain": debian.domain},
            "clones": 2,
            "boot": {"method": "agent", "timeout": "5m"},
        }
    )
    clones = Clones(conn, spec, record="pytest")
    release = manifest_of(debian.domain)["kernel_release"]
    try:
        clones.create()
        clones.start()
        times = clones.wait_up()
        assert all(0 < t < 300 for t in times.values()), times
        assert [g.boot_seconds for g in clones.guests] == [times[g.name] for g in clones.guests]
        agents = [Agent(conn.lookupByName(g.name)) for g in clones.guests]
        for a in agents:
            assert a.shell("uname -r", 60).stdout.decode().strip() == release
            hw = a.shell("/lib64/ld-linux-x86-64.so.2 --help", 60).stdout.decode()
            assert "x86-64-v2 (supported, searched)" in hw, hw
            py = a.run(["python3", "-c", "import sys; print(sys.version_info[0])"], 120)
            assert py.ok and py.stdout == b"3\n", py
            data = bytes(range(256)) * 1000  # more than one agent write chunk
            a.write_file("/run/kvmksm-test.bin", data)
            assert a.read_file("/run/kvmksm-test.bin") == data
            digest = a.shell("sha256sum /run/kvmksm-test.bin", 60).stdout.split()[0].decode()
            assert digest == hashlib.sha256(data).hexdigest()
            failed = a.shell("echo out; echo err >&2; exit 3", 60)
            assert (failed.exitcode, failed.stdout, failed.stderr) == (3, b"out\n", b"err\n")
        # dbus runs (agent shutdown needs it); wait for boot to end first
        st = agents[0].shell("systemctl is-system-running --wait; systemctl is-active dbus", 300)
        assert st.stdout.decode().split()[-1] == "active", st
        _ssh_login(conn.lookupByName(clones.guests[0].name), release)
    finally:
        problems = clones.teardown()
    assert problems == []
    assert find_leftovers(conn, clones.run).empty()
    assert not conn.lookupByName(debian.domain).isActive()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ssh_login(dom: libvirt.virDomain, release: str) -> None:
    port = _free_port()
    cmd = ssh_forward(dom, port).split() + ["-o", "BatchMode=yes", "-o", "ConnectTimeout=10"]
    assert str(ssh_dir() / "id_ed25519") in cmd
    deadline = time.monotonic() + 120  # sshd may start after the agent
    while True:
        p = subprocess.run([*cmd, "uname -r"], capture_output=True, text=True, timeout=60)
        if p.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert p.returncode == 0 and p.stdout.strip() == release, p.stderr


def test_guest_run_output_recorded_and_failure_fails_the_run(
    conn: libvirt.virConnect, debian: BuiltImage, real_ksm: Ksm, tmp_path: Path
) -> None:
    """The first command's output lands in run.json; the second fails the run with its
    output in one line, before KSM ever goes on; nothing is left."""
    data = _scenario(
        "debian3",
        clones=1,
        guest_run=["echo hello from $(uname -n)", "echo something broke >&2; exit 3"],
    )
    data["name"] = "debian-guest-run-fails"
    code, out, meta, _ = _bench(tmp_path, data)
    assert code == 1, out
    assert meta["status"] == "failed"
    err = meta["error"]
    assert "\n" not in err
    assert "echo something broke >&2; exit 3" in err and "(exit 3): something broke" in err
    ok, bad = meta["guest_run"]
    assert ok["status"] == "exit 0" and ok["stdout"] == f"hello from {debian.domain}\n"
    assert bad["exitcode"] == 3 and bad["stderr"] == "something broke\n"
    kinds = [e["kind"] for e in meta["events"]]
    assert "ksm_on" not in kinds and kinds.count("guest_run") == 2
    assert meta["guests"][0]["boot_seconds"] > 0
    assert meta["knobs_after"] == meta["knobs_before"]
    _gone(conn, meta)


def test_debian3_small(
    conn: libvirt.virConnect, debian: BuiltImage, real_ksm: Ksm, tmp_path: Path
) -> None:
    """debian3 as bundled, with 2 clones, pages_to_scan=1000, settle 2s, plateau 3s, steady
    timeout 5m and no sharing step, and its expectation scaled to two guests: booted by agent
    (boot time per guest in the record), guest_run's output kept, KSM until steady, its checks
    pass, unmerged, nothing left."""
    data = _scenario("debian3")
    # Each guest past the first shares about 21,000 pages with the others here (kernel,
    # libraries, page cache); debian3 expects 30,000 of three, so (2 - 1) / (3 - 1) of it.
    (key,) = data["workload"]["expect"]
    data["workload"]["expect"] = {key: {"min": data["workload"]["expect"][key]["min"] // 2}}
    code, out, meta, run_json = _bench(tmp_path, data)
    assert code == 0, out
    assert meta["status"] == "passed"
    assert [c["passed"] for c in meta["checks"]] == [True]
    for g in meta["guests"]:
        assert 0 < g["boot_seconds"] < 600, g
    runs = meta["guest_run"]
    assert [r["stdout"] for r in runs] == ["running\n", "running\n"]
    kinds = [e["kind"] for e in meta["events"]]
    order = ["all_up", "guest_run", "settle_done", "ksm_on", "steady", "unmerge", "guest_removed"]
    assert [kinds.index(k) for k in order] == sorted(kinds.index(k) for k in order)
    # Two idle Debian guests share kernel text, libraries and page cache: tens of MiB.
    assert _metric(meta, "plateau_saved_mib") > 40
    assert meta["reconciliation"]["relative_difference"] <= 0.01
    assert "Inside the guests" in (run_json.parent / "report.html").read_text()
    _gone(conn, meta)


def test_churn_breaks_merged_pages_and_costs_savings(
    conn: libvirt.virConnect, debian: BuiltImage, real_ksm: Ksm, tmp_path: Path
) -> None:
    """The same run twice, 64 MiB per guest held still (rate 0) and then rewritten at
    8 MiB/s: with churn the host counts far more copy-on-write breaks of KSM pages, less is
    saved on the plateau, and the probe's writes with KSM on met merged pages."""
    results = {}
    for rate in ("0", "8MiB/s"):
        data = _scenario(
            "debian-churn",
            churn={"size": "64MiB", "rate": rate},
            probe={"latency": True, "size": "8MiB"},
            guest_run=[],
        )
        data["workload"]["steady"].update(threshold=0.05)
        data["name"] = f"debian-churn-{'held' if rate == '0' else 'churn'}"
        code, out, meta, run_json = _bench(tmp_path, data)
        assert code == 0, out
        _gone(conn, meta)
        results[rate] = meta, run_json
    held, churn = results["0"][0], results["8MiB/s"][0]

    def cow(meta: dict[str, Any]) -> tuple[int, int]:
        # (rise of cow_ksm from KSM on to plateau_done, rise during the probe with KSM on)
        s = pd.read_csv(Path(meta["_dir"]) / "samples.csv")
        ev = {e["kind"]: e["t"] for e in meta["events"]}
        on = s[s["t"] <= ev["ksm_on"]]["cow_ksm"].iloc[-1]
        end = s[s["t"] <= ev["plateau_done"]]["cow_ksm"].iloc[-1]
        return int(end - on), int(meta["guest_probe"]["phases"]["on"]["cow_ksm"])

    for rate, (meta, run_json) in results.items():
        meta["_dir"] = str(run_json.parent)
        final = meta["churn"]["guests"]
        assert len(final) == 2
        for g in final.values():
            if rate == "0":
                assert g["final"]["passes"] == 0
            else:  # every guest kept up: 8 MiB/s within 10 %
                assert g["final"]["achieved_rate"] >= 0.9 * (8 << 20), g
    cow_held, probe_held = cow(held)
    cow_churn, probe_churn = cow(churn)
    # 2 x 64 MiB rewritten every 8 s while ksmd merges what stays put: many breaks a second.
    assert cow_churn > cow_held + 2000, (cow_held, cow_churn)
    assert _metric(churn, "plateau_saved_mib") < _metric(held, "plateau_saved_mib") - 20
    # The probe's 2 x 2048 pages were merged by then: most writes broke a KSM page.
    assert probe_held >= 2048 and probe_churn >= 2048
    for meta in (held, churn):
        off, on = (meta["guest_probe"]["phases"][p]["summary"] for p in ("off", "on"))
        assert off["writes"] == on["writes"] == 2 * 2048
        assert on["p50_us"] > off["p50_us"], (off, on)

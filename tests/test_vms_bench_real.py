"""`kvmksm bench` of tiny guests, for real: qemu:///system, TCG, real KSM.

Tolerance of the per-VM reconciliation: 1%. Each KSM page mapped k times counts once in
pages_shared, k-1 times in pages_sharing and k times across the processes' ksm_merging_pages,
so with only the run's guests merging the sums are equal; the reads are a few milliseconds
apart, after the curve was found steady (less than 1% change over a whole scan), so they can
differ by at most what merges in those milliseconds, far below 1%.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import libvirt
import pandas as pd
import pytest
import yaml

from kvmksm.host.ksm import Ksm
from kvmksm.host.state import ActiveRun
from kvmksm.virt.cleanup import find_leftovers
from kvmksm.virt.tiny_image import TinyImage

from .test_runner import _wait_for_event

pytestmark = [pytest.mark.libvirt, pytest.mark.realksm]

SCENARIO = {
    "name": "tiny2",
    "knobs": {"pages_to_scan": 1000, "sleep_millisecs": 20},
    "workload": {
        "type": "vms",
        "connect": "qemu:///system",
        "domain_type": "qemu",
        "base": {"domain": "kvmksm-tiny"},
        "clones": 2,
        "memory": "136MiB",
        "guest_fill": {"size": "64MiB", "byte": "z"},
        "boot": {"timeout": "3m"},
        "settle": "2s",
        "steady": {"timeout": "3m"},
        "plateau": "3s",
        "expect": {"pages_sharing": {"min": 32640}},
    },
}


def _leftovers(conn: libvirt.virConnect) -> list[str]:
    return find_leftovers(conn).describe()


def _bench(tmp_path: Path, data: dict, base: str) -> subprocess.Popen[str]:
    data = json.loads(json.dumps(data))
    data["workload"]["base"] = {"domain": base}
    sc = tmp_path / "tiny2.yaml"
    sc.write_text(yaml.safe_dump(data))
    return subprocess.Popen(
        [sys.executable, "-m", "kvmksm", "bench", str(sc), "-o", str(tmp_path / "out")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_tiny_clones_merge_and_leave_nothing(
    conn: libvirt.virConnect, tiny: TinyImage, real_ksm: Ksm, tmp_path: Path
) -> None:
    assert _leftovers(conn) == []
    proc = _bench(tmp_path, SCENARIO, tiny.domain)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, out + err
    (run_json,) = (tmp_path / "out").glob("tiny2/*/run.json")
    meta = json.loads(run_json.read_text())
    assert meta["status"] == "passed"
    kinds = [e["kind"] for e in meta["events"]]
    for k in (
        "guest_defined",
        "guest_started",
        "guest_up",
        "all_up",
        "ksm_on",
        "steady",
        "reconciled",
        "unmerge",
        "guest_removed",
        "knobs_restored",
    ):
        assert k in kinds, k
    assert kinds.index("all_up") < kinds.index("ksm_on") < kinds.index("steady")
    # Two 64 MiB fills of 'z' alone: 32768 pages in chains of 256 -> 32640 sharers.
    (check,) = meta["checks"]
    assert check["passed"] and check["observed"] >= 32640
    rec = meta["reconciliation"]
    assert rec["pages_shared_plus_sharing"] > 32640
    assert rec["relative_difference"] <= 0.01, rec
    assert len(meta["guests"]) == 2 and all(g["pid"] for g in meta["guests"])
    vm = pd.read_csv(run_json.parent / "vm_samples.csv")
    assert set(vm["domain"]) == {g["name"] for g in meta["guests"]}
    assert vm.groupby("domain")["ksm_merging_pages"].max().min() > 16000
    assert meta["knobs_after"] == meta["knobs_before"]
    # libvirt's own view of KSM (virsh node-memory-tune), read while the run's knobs were set
    assert meta["host"]["libvirt_node_memory"]["shm_pages_to_scan"] == 1000
    assert meta["metrics"]["plateau_saved_mib"]["value"] > 127
    assert (run_json.parent / "report.html").exists()
    _assert_sharing(meta, (run_json.parent / "report.html").read_text())
    assert _leftovers(conn) == []
    assert ActiveRun.load() is None


GUEST_RAM = 136 << 20  # the scenario's memory: each QEMU's guest RAM mapping


def _assert_sharing(meta: dict, html: str) -> None:
    """Who shares with whom and the potential, taken after the plateau window: the matrix
    sums to the global counters (within 1%, as the reconciliation), the potential lies
    between the saving achieved and the guests' memory."""
    kinds = [e["kind"] for e in meta["events"]]
    assert kinds.index("plateau_done") < kinds.index("sharing_matrix")
    assert kinds.index("sharing_matrix") < kinds.index("sharing_potential") < kinds.index("unmerge")
    s, p = meta["sharing"], meta["potential"]
    names = [g["name"] for g in meta["guests"]]
    assert s["guests"] == names
    # Both guests map most 'z' frames and the pages their identical kernels hold alike.
    assert s["pairs"][0][1] == s["pairs"][1][0] > 0
    assert s["mappings"] - s["frames"] == s["saved"] >= 32640
    for g in s["per_guest"]:
        assert g["ram"]["size"] == GUEST_RAM and g["ram_mergeable"]
    checks = {c["name"]: c for c in s["checks"]}
    for g in names:  # each guest's mappings against its own ksm_merging_pages
        assert checks[f"{g}: KSM mappings = ksm_merging_pages"]["passed"], checks
    if s["only_these_guests"]:
        for name in ("KSM frames = pages_shared", "mappings - frames = pages_sharing"):
            assert checks[name]["passed"] and checks[name]["relative_difference"] <= 0.01, checks
    else:
        # Guests of other sessions merged too: each merged mapping of any process counts
        # once in pages_shared + pages_sharing and once in its ksm_merging_pages.
        c = s["counters_after"]
        total = s["mappings"] + s["other_ksm_users"]["merging_pages"]
        glob = c["pages_shared"] + c["pages_sharing"]
        assert abs(total - glob) <= 0.01 * glob, s
    pages = 2 * GUEST_RAM // 4096
    assert p["achieved"] <= p["potential"] <= pages
    assert p["potential_within_max_page_sharing"] <= p["potential"]
    assert abs(p["achieved"] - s["saved"]) <= 0.01 * s["saved"]  # two passes, one plateau
    assert p["bytes_read"] <= 2 * GUEST_RAM
    assert '<section id="sharing">' in html and 'id="chart-sharing"' in html


def test_sigint_while_ksm_on_leaves_host_clean(
    conn: libvirt.virConnect, tiny: TinyImage, real_ksm: Ksm, tmp_path: Path
) -> None:
    data = json.loads(json.dumps(SCENARIO))
    # A crawling ksmd, so KSM is surely still on when the signal comes.
    data["knobs"] = {"pages_to_scan": 10, "sleep_millisecs": 200}
    proc = _bench(tmp_path, data, tiny.domain)
    run_json = _wait_for_event(tmp_path / "out", "ksm_on", timeout=300)
    assert real_ksm.read("run") == 1
    assert len(_leftovers(conn)) >= 2  # the guests are up
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out + err
    meta = json.loads(run_json.read_text())
    assert meta["status"] == "interrupted"
    assert meta["knobs_after"] == meta["knobs_before"]
    assert "guest_removed" in [e["kind"] for e in meta["events"]]
    assert _leftovers(conn) == []
    assert ActiveRun.load() is None
    # real_ksm's teardown asserts every knob is back to its prior value.


def test_kvmksm_clean_after_sigkill(
    conn: libvirt.virConnect, tiny: TinyImage, real_ksm: Ksm, tmp_path: Path
) -> None:
    """SIGKILL leaves no chance to tidy up: `kvmksm clean` removes the guests and volumes
    and puts back the knobs the run saved."""
    before = real_ksm.read_knobs()
    data = json.loads(json.dumps(SCENARIO))
    data["knobs"] = {"pages_to_scan": 10, "sleep_millisecs": 200}
    proc = _bench(tmp_path, data, tiny.domain)
    _wait_for_event(tmp_path / "out", "ksm_on", timeout=300)
    proc.kill()
    proc.communicate(timeout=30)
    assert real_ksm.read("pages_to_scan") == 10  # the run's setting is still there
    assert len(_leftovers(conn)) >= 2
    assert ActiveRun.load() is not None
    clean = subprocess.run(
        [sys.executable, "-m", "kvmksm", "clean"], capture_output=True, text=True, timeout=300
    )
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "restore KSM knobs" in clean.stdout and "remove domain kvmksm-" in clean.stdout
    assert _leftovers(conn) == []
    assert real_ksm.read_knobs() == before
    assert ActiveRun.load() is None

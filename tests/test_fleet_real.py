"""kvmksm fleet for real: Ansible, this host's real KSM (localhost through Ansible's local
connection), an unreachable host, Ctrl-C, and the whole demo on Debian guests with two kernels
(scripts/fleet-demo.sh). Bundles are cached in kvmksm's own data folder, as a real fleet's."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvmksm.commands.fleet import fleet_run
from kvmksm.host.ksm import Ksm
from kvmksm.host.paths import DEFAULT_DATA_DIR
from kvmksm.results import fleet as fleet_folder
from kvmksm.results.collect import iter_records

REPO = Path(__file__).resolve().parent.parent
SMALL = """\
name: fleet-small
sample_interval: 0.5s
knobs: {max_page_sharing: 4096, pages_to_scan: 4096, sleep_millisecs: 0, smart_scan: 0}
optional: [smart_scan, ksm_zero_pages]
workload:
  type: processes
  count: 3
  size: 4MiB
  steps:
    - action: fill
      patterns: [c, a, a]
      expect: {pages_shared: 2, pages_sharing: 3070, pages_unshared: 0, ksm_zero_pages: 0}
    - action: unmerge
      expect: {pages_shared: 0, pages_sharing: 0}
"""


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens once it is closed


def inventory(tmp: Path, extra: str = "") -> Path:
    inv = tmp / "hosts.ini"
    inv.write_text(
        "[bare]\n"
        f"localhost ansible_connection=local ansible_python_interpreter={sys.executable} "
        f"kvmksm_root={tmp}/root kvmksm_workdir={tmp}/work\n" + extra
    )
    return inv


@pytest.mark.realksm
def test_unreachable_host_named_while_the_others_finish(tmp_path: Path, real_ksm: Ksm) -> None:
    port = closed_port()
    inv = inventory(
        tmp_path,
        f"\n[far]\ngone ansible_host=127.0.0.1 ansible_port={port} ansible_user=root "
        "ansible_ssh_common_args='-o StrictHostKeyChecking=no -o BatchMode=yes'\n",
    )
    (tmp_path / "small.yaml").write_text(SMALL)
    before = real_ksm.read_knobs()
    result = fleet_run(
        str(inv), str(tmp_path / "small.yaml"), tmp_path / "out", bundles=DEFAULT_DATA_DIR / "fleet"
    )
    hosts = {h["name"]: h for h in result.hosts}
    assert hosts["gone"]["status"] == "unreachable"
    assert str(port) in hosts["gone"]["error"] or "refused" in hosts["gone"]["error"].lower()
    local = hosts["localhost"]
    assert local["status"] == "passed", local
    assert local["restored"] is True and local["knobs_before"] == local["knobs_after"]
    assert real_ksm.read_knobs() == before
    assert result.status == "failed" and result.exit_code == 1
    index = fleet_folder.load_index(result.dir)
    assert index.host("gone").dir is None  # type: ignore[union-attr]
    (rec,) = [r for _, r in iter_records([result.dir])]
    assert rec.meta.status == "passed"
    observed = {c.name: c.observed for c in rec.checks}
    assert observed["step 1 fill c/a/a: pages_sharing"] == 3070
    # the same kvmksm is not installed twice: a second run finds it there
    again = fleet_run(
        str(inventory(tmp_path)),
        str(tmp_path / "small.yaml"),
        tmp_path / "out2",
        bundles=DEFAULT_DATA_DIR / "fleet",
    )
    assert again.hosts[0]["installed"] == "already there" and again.status == "passed"
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").iterdir())


SLOW = SMALL.replace("sleep_millisecs: 0", "sleep_millisecs: 2000").replace(
    "size: 4MiB", "size: 4MiB\n  full_scans: 50\n  scan_timeout: 30m"
)


@pytest.mark.realksm
def test_ctrl_c_stops_every_host_and_restores_it(tmp_path: Path, real_ksm: Ksm) -> None:
    inv = inventory(tmp_path)
    (tmp_path / "slow.yaml").write_text(SLOW)
    before = real_ksm.read_knobs()
    env = dict(os.environ, KVMKSM_DATA_DIR=str(DEFAULT_DATA_DIR))
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvmksm", "fleet", "run", str(inv), str(tmp_path / "slow.yaml"),
         "-o", str(tmp_path / "out"), "--no-report"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # until the bench is running on the host
        if list(tmp_path.glob("work/kvmksm-fleet-*/bench.pid")):
            break
        time.sleep(0.5)
    time.sleep(3)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out
    assert real_ksm.read_knobs() == before
    (fleet_dir,) = (tmp_path / "out" / "fleet-small").iterdir()
    index = json.loads((fleet_dir / "fleet.json").read_text())
    (host,) = index["hosts"]
    assert index["status"] == "interrupted" and host["status"] == "interrupted", host
    assert host["restored"] is True
    (rec,) = [r for _, r in iter_records([fleet_dir])]
    assert rec.meta.status == "interrupted"
    assert not any((tmp_path / "work").iterdir())


@pytest.mark.libvirt
@pytest.mark.realksm
def test_fleet_demo_two_kernels_and_this_host(tmp_path: Path, real_ksm: Ksm) -> None:
    """scripts/fleet-demo.sh end to end: two Debian guests (6.1 and 6.12) and this host run
    ltp-ksm03-small (3 repeats), the records come back, the kernels are compared."""
    env = dict(os.environ, KVMKSM_REALKSM_LOCK_HELD="1", KVMKSM_FLEET_DEMO_NO_SETUP="1")
    args = ["bash", str(REPO / "scripts/fleet-demo.sh"), "-o", str(tmp_path / "out")]
    for g in os.environ.get("KVMKSM_FLEET_DEMO_GUESTS", "").split():  # prebuilt images
        args += ["--guest", g]
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=2400, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "kernel comparison:" in proc.stderr
    (fleet_dir,) = (tmp_path / "out" / "ltp-ksm03-small").iterdir()
    index = fleet_folder.load_index(fleet_dir)
    assert len(index.hosts) == 3 and all(h.status == "passed" for h in index.hosts)
    assert all(h.restored is True for h in index.hosts)
    guests = [h for h in index.hosts if h.name != "localhost"]
    releases = {h.kernel_release for h in guests}
    assert len(releases) == 2, releases
    old = next(h for h in guests if (h.kernel_release or "").startswith("6.1."))
    assert {s["name"] for s in old.skipped} >= {"smart_scan"}  # a knob 6.1 lacks, recorded
    records = [r for _, r in iter_records([fleet_dir])]
    assert len(records) == 9
    for rec in records:
        observed = {c.name: c.observed for c in rec.checks}
        assert observed["step 1 fill c/a/a: pages_sharing"] == 12286
        assert observed["step 4 fill d/d+e/d: pages_unshared"] == 1
        assert all(c.passed for c in rec.checks)
    page = (fleet_dir / "kernels.html").read_text()
    assert "not comparable" in page and "qemu-tcg" in page


SPARSE = """\
name: sparse
sample_interval: 0.5s
knobs: {max_page_sharing: 4096, pages_to_scan: 4096, sleep_millisecs: 20, smart_scan: 0}
optional: [smart_scan]
workload:
  type: processes
  count: 1
  size: 8GiB
  touched: 4MiB
  full_scans: 3
  steps:
    - action: fill
      patterns: [a]
      expect: {pages_shared: 1, pages_sharing: 1023}
    - action: unmerge
      expect: {pages_shared: 0, pages_sharing: 0}
"""


@pytest.mark.realksm
def test_sparse_mapping_scan_cost(tmp_path: Path, real_ksm: Ksm) -> None:
    """8 GiB mapped (more than the memory left for it), 4 MiB touched: exact counts, and the
    cost of a full scan measured."""
    from kvmksm.commands.bench import bench
    from kvmksm.results.record import load_record
    from kvmksm.scenario import load as scenario

    result = bench(scenario.loads(SPARSE), tmp_path / "out")
    assert result.status == "passed", result.error
    rec = load_record(result.record_dir)
    cost = rec.meta.metrics["ksmd_cpu_per_full_scan_ms"]
    assert cost["value"] is not None and cost["value"] > 0, cost
    assert rec.meta.metrics["full_scan_s"]["value"] > 0
    assert "full scans from KSM on" in cost["note"]

"""kvmksm fleet and scenarios that travel across kernels: optional knobs and expectations, the
inventory through ansible-inventory, the knobs the playbook reads, the bundles' contents, the
fleet folder and index, and the kernel comparison built from records of three kernels."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvmksm.commands.bench import bench
from kvmksm.commands.compare import collect, compare
from kvmksm.commands.fleet import parse_knobs, safe_name
from kvmksm.commands.fleet_ansible import list_inventory
from kvmksm.commands.fleet_bundle import CONTROLLER_ONLY, Target, host_requirements
from kvmksm.commands.kernels import kernel_comparison
from kvmksm.errors import UserError
from kvmksm.host.fs import HostFS
from kvmksm.host.ksm import Ksm
from kvmksm.results import fleet as fleet_folder
from kvmksm.results.collect import iter_records
from kvmksm.results.record import load_record, write_record
from kvmksm.scenario import load as scenario
from kvmksm.scenario.portable import fit, summary
from kvmksm.virt.lab import GuestSpec, host_names
from kvmksm.workloads.base import RunContext, Workload

from .fakehost import make_tree, set_counter

TRAVELS = """\
name: travels
sample_interval: 0.1s
knobs: {pages_to_scan: 5000, sleep_millisecs: 0, smart_scan: 0}
optional: [smart_scan, ksm_zero_pages]
workload:
  type: processes
  count: 2
  size: 1MiB
  steps:
    - action: fill
      patterns: [a, a]
      expect: {pages_sharing: 255, ksm_zero_pages: 0}
"""


def test_fit_drops_only_what_this_kernel_lacks() -> None:
    sc = scenario.loads(TRAVELS)
    new = {"smart_scan", "ksm_zero_pages", "pages_sharing", "pages_to_scan", "sleep_millisecs"}
    same, skipped = fit(sc, new)
    assert same is sc and skipped == []
    old, skipped = fit(sc, {"pages_sharing", "pages_to_scan", "sleep_millisecs"}, "6.1.0")
    assert "smart_scan" not in old.knobs and old.knobs["pages_to_scan"] == 5000
    assert old.workload.steps[0].expect == {"pages_sharing": 255}
    assert [(s["name"], s["kind"]) for s in skipped] == [
        ("smart_scan", "knob"),
        ("ksm_zero_pages", "expect"),
    ]
    assert "this kernel (6.1.0) has no smart_scan: it appeared in Linux 6.7" in skipped[0]["reason"]
    assert summary(skipped) == "smart_scan (knob), ksm_zero_pages (expectation)"


def test_optional_must_name_ksm_files_and_not_an_axis() -> None:
    with pytest.raises(UserError, match=r"t.yaml:4: optional: unknown KSM knob or counter 'smrt'"):
        scenario.loads(TRAVELS.replace("optional: [smart_scan", "optional: [smrt"), "t.yaml")
    old = "knobs: {pages_to_scan: 5000, sleep_millisecs: 0, smart_scan: 0}"
    text = TRAVELS.replace(old, "knobs: {pages_to_scan: 5000}\nmatrix: {smart_scan: [0, 1]}")
    with pytest.raises(UserError, match="smart_scan is optional .* cannot be an axis"):
        scenario.loads(text, "t.yaml")


class Fill(Workload):
    """Stands in for the processes: ksmd on, the counters as ksm03's first round leaves them."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def run(self, ctx: RunContext) -> None:
        ctx.ksm.write("run", 1)
        set_counter(self.root, "pages_sharing", 255)
        set_counter(self.root, "pages_shared", 1)
        time.sleep(0.3)
        ctx.check("step 1 fill a/a", ctx.scenario.workload.steps[0].expect)
        ctx.ksm.write("run", 0)


def test_old_kernel_skips_optional_and_records_it(tmp_path: Path) -> None:
    """On a kernel without smart_scan and ksm_zero_pages (a 5.15-like tree): the knob is not
    set, the expectation not judged, both recorded; counters it lacks are absent, not 0."""
    root = make_tree(tmp_path / "root", old_kernel=True)
    sc = scenario.loads(TRAVELS)
    result = bench(sc, tmp_path / "out", fs=HostFS(root), workload=Fill(root))
    assert result.status == "passed", result.error
    rec = load_record(result.record_dir)
    assert [s["name"] for s in rec.meta.skipped] == ["smart_scan", "ksm_zero_pages"]
    assert [c.name for c in rec.checks] == ["step 1 fill a/a: pages_sharing"]
    assert any(e.kind == "skipped" for e in rec.events)
    assert "ksm_zero_pages" not in rec.samples.columns  # absent, never a column of zeros
    assert rec.meta.metrics["general_profit_mib"]["value"] is None or "general_profit" in (
        rec.samples.columns
    )


def test_old_kernel_still_refuses_a_knob_that_is_not_optional(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "root", old_kernel=True)
    sc = scenario.loads(TRAVELS.replace("optional: [smart_scan, ksm_zero_pages]", "optional: []"))
    before = Ksm(HostFS(root)).read_knobs()
    with pytest.raises(UserError, match="KSM knob 'smart_scan' is not available on this kernel"):
        bench(sc, tmp_path / "out", fs=HostFS(root), workload=Fill(root))
    assert Ksm(HostFS(root)).read_knobs() == before
    assert not (tmp_path / "out").exists()


def test_parse_knobs_keeps_knobs_only() -> None:
    text = (
        "/sys/kernel/mm/ksm/full_scans:12\n/sys/kernel/mm/ksm/run:0\n"
        "/sys/kernel/mm/ksm/advisor_mode:[none] scan-time\n/sys/kernel/mm/ksm/pages_to_scan:100\n"
    )
    assert parse_knobs(text) == {"run": 0, "advisor_mode": "none", "pages_to_scan": 100}


def test_safe_name() -> None:
    assert safe_name("db-1.example.com") == "db-1.example.com"
    assert safe_name("../evil host") == "_evil_host"


INI = """\
[guests]
g61 ansible_host=127.0.0.1 ansible_port=2201 kvmksm_note=old
g612 ansible_host=127.0.0.1 ansible_port=2202

[bare]
localhost ansible_connection=local

[lab:children]
guests
"""
YAML = """\
all:
  children:
    guests:
      hosts:
        g61: {ansible_host: 127.0.0.1, ansible_port: 2201}
      vars: {kvmksm_root: /srv/kvmksm}
    bare:
      hosts:
        localhost: {ansible_connection: local}
"""


def test_inventory_ini_and_yaml(tmp_path: Path) -> None:
    ini = tmp_path / "hosts.ini"
    ini.write_text(INI)
    hosts = {h.name: h for h in list_inventory(str(ini))}
    assert set(hosts) == {"g61", "g612", "localhost"}
    assert sorted(hosts["g61"].groups) == ["guests", "lab"]
    assert hosts["g61"].address == "127.0.0.1:2201"
    assert hosts["g61"].vars["kvmksm_note"] == "old"
    assert hosts["localhost"].address == "local"
    yml = tmp_path / "hosts.yml"
    yml.write_text(YAML)
    hosts = {h.name: h for h in list_inventory(str(yml), limit="guests")}
    assert set(hosts) == {"g61"} and hosts["g61"].vars["kvmksm_root"] == "/srv/kvmksm"


def test_inventory_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such inventory file"):
        list_inventory(str(tmp_path / "missing.ini"))
    empty = tmp_path / "empty.ini"
    empty.write_text("# nothing\n")
    with pytest.raises(UserError, match="no hosts in this inventory"):
        list_inventory(str(empty))


def test_bundle_targets() -> None:
    t = Target("3.11.2", "x86_64", ("glibc", "2.36"))
    tags = t.platforms()
    assert tags[0] == "manylinux_2_36_x86_64" and "manylinux_2_17_x86_64" in tags
    assert t.minor == "311"
    with pytest.raises(UserError, match="manylinux"):
        Target("3.12.1", "x86_64", ("musl", "1.2")).platforms()
    names = [r.split(">")[0].split("=")[0].lower() for r in host_requirements()]
    assert "pandas" in names and not set(names) & set(CONTROLLER_ONLY)


def test_bench_on_a_host_never_imports_what_only_the_controller_has() -> None:
    """A fleet host runs `kvmksm bench --no-report` without matplotlib, jinja2, statsmodels:
    bench, experiments and their terminal output must not import them."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {CONTROLLER_ONLY!r}:\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import kvmksm.cli as cli\n"
        "cli.build_parser()\n"
        "import kvmksm.commands.bench, kvmksm.commands.experiment, kvmksm.views.terminal\n"
        "import kvmksm.scenario.load, kvmksm.scenario.estimate, kvmksm.commands.overrides\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


# -- the fleet folder and the kernel comparison -----------------------------------------------
def _fleet(tmp_path: Path) -> Path:
    """A fleet folder as `fleet run` leaves it: three hosts, two of them TCG guests (6.1 with
    smart_scan skipped, 6.12) and a bare host, three repeats each; one host unreachable."""
    import pandas as pd

    d = tmp_path / "fleet"
    hosts = []
    machines = {
        "g61": ("6.1.0-56-amd64", "qemu-tcg", "QEMU TCG CPU version 2.5+", 1, 0.30),
        "g612": ("6.12.95+deb12-amd64", "qemu-tcg", "QEMU TCG CPU version 2.5+", 1, 0.20),
        "bare": ("6.18.4", "none", "AMD EPYC", 2, 0.05),
    }
    for name, (kernel, virt, cpu, cpus, t90) in machines.items():
        for r in range(3):
            t = [0.0, 0.5, 1.0, 1.5, 2.0]
            sharing = [0, 0, 6000, 12286, 12286]
            samples = pd.DataFrame(
                {"t": t, "pages_sharing": sharing, "pages_shared": [0, 0, 2, 2, 2],
                 "full_scans": [0, 0, 1, 3, 4], "ksmd_cpu": [None, 10.0, 50 + r, 40.0, 5.0]}
            )  # fmt: skip
            if kernel != "6.1.0-56-amd64":
                samples["ksm_zero_pages"] = 0
            skipped = (
                [{"name": "smart_scan", "kind": "knob", "where": "knobs", "reason": "6.7"}]
                if kernel.startswith("6.1.")
                else []
            )
            write_record(
                d / name / f"run{r}",
                {
                    "kind": "bench",
                    "status": "passed",
                    "scenario": {"name": "ltp", "workload": {"type": "processes", "count": 3,
                                 "size": 16 << 20}},
                    "host": {"kernel_release": kernel, "hostname": name, "cpu_model": cpu,
                             "cpus": cpus, "virtualization": virt},
                    "events": [
                        {"t": 0.4 + t90 / 10 * r, "kind": "ksm_on"},
                        {"t": 1.9, "kind": "round_filled", "step": 1},
                        {"t": 1.9, "kind": "scans_done", "step": 1},
                    ],
                    "checks": [{"name": "step 1 fill c/a/a: pages_sharing", "expected": 12286,
                                "observed": 12286, "passed": True, "step": 1}]
                    + ([] if kernel.startswith("6.1.") else [
                        {"name": "step 1 fill c/a/a: ksm_zero_pages", "expected": 0,
                         "observed": 0, "passed": True, "step": 1}]),
                    "skipped": skipped,
                },
                samples,
            )  # fmt: skip
        hosts.append({"name": name, "status": "passed", "dir": name, "kernel_release": kernel})
    hosts.append({"name": "gone", "status": "unreachable", "error": "ssh: Connection refused"})
    fleet_folder.save_index(d, {"name": "ltp", "status": "failed", "hosts": hosts})
    return d


def test_collect_reads_a_fleet_through_its_index(tmp_path: Path) -> None:
    d = _fleet(tmp_path)
    (d / "stray").mkdir()  # not in the index: not a host's record
    runs = list(iter_records([d]))
    assert len(runs) == 9
    index = fleet_folder.load_index(d)
    assert index.host("gone").status == "unreachable"  # type: ignore[union-attr]
    assert [h.name for h, _ in fleet_folder.host_dirs(d)] == ["g61", "g612", "bare"]


def test_kernel_comparison_of_a_fleet(tmp_path: Path) -> None:
    kc = kernel_comparison(compare(collect([_fleet(tmp_path)])))
    by_kernel = {k["kernel"]: k for k in kc.kernels}
    assert set(by_kernel) == {"6.1.0-56-amd64", "6.12.95+deb12-amd64", "6.18.4"}
    assert by_kernel["6.1.0-56-amd64"]["skipped"] == "smart_scan (knob)"
    # the two guests share a timing class, the bare host is alone in its own
    ids = {k["kernel"]: k["id"] for k in kc.kernels}
    assert kc.comparable(ids["6.1.0-56-amd64"], ids["6.12.95+deb12-amd64"])
    assert not kc.comparable(ids["6.1.0-56-amd64"], ids["6.18.4"])
    t90 = next(f for f in kc.figures if f["key"] == "time_to_90pct_s")
    assert t90["vs_base"][ids["6.18.4"]]["verdict"] == "not comparable"
    assert t90["vs_base"][ids["6.12.95+deb12-amd64"]]["verdict"] != "not comparable"
    saved = next(f for f in kc.figures if f["key"] == "plateau_saved_mib")
    assert saved["vs_base"][ids["6.18.4"]]["verdict"] == "same"  # counts compare anywhere
    zero = next(c for c in kc.counts if c["name"].endswith("ksm_zero_pages"))
    assert zero["groups"][ids["6.1.0-56-amd64"]]["absent"] is True  # absent, never 0
    assert zero["groups"][ids["6.12.95+deb12-amd64"]]["values"] == ["0"]
    assert any("Timings are comparable only within" in s for s in kc.statements)
    assert any(d["field"] == "skipped" for d in kc.cmp.differences)
    assert any("timings not comparable" in w for w in kc.cmp.warnings)


def test_kernel_page_says_what_is_not_comparable(tmp_path: Path) -> None:
    from kvmksm.views.kernels_page import write_kernels_page

    page = write_kernels_page([_fleet(tmp_path)], tmp_path / "kernels.html").read_text()
    assert "Timings are not comparable between every pair" in page
    assert "not comparable" in page and "absent" in page
    assert "6.12.95+deb12-amd64" in page and "<svg" in page


def test_compare_cli_on_a_fleet_writes_the_kernel_page(tmp_path: Path) -> None:
    d = _fleet(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "kvmksm", "compare", str(d), "--json"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert Path(doc["kernels_html"]) == d / "kernels.html" and (d / "kernels.html").exists()
    assert len(doc["groups"]) == 3


def test_fleet_table_names_every_host_and_why(tmp_path: Path) -> None:
    import io

    from rich.console import Console

    from kvmksm.commands.fleet import FleetResult
    from kvmksm.views.fleet import fleet_result

    index = {
        "name": "ltp",
        "timings": {"probe_s": 2.0, "run_playbook_s": 60.0},
        "hosts": [
            {"name": "g61", "status": "passed", "kernel_release": "6.1.0-56-amd64",
             "timings": {"install_s": 40.0, "run_s": 20.0, "gather_s": 3.0}, "restored": True,
             "installed": "installed", "error": None,
             "skipped": [{"name": "smart_scan", "kind": "knob"}]},
            {"name": "gone", "status": "unreachable", "timings": {}, "restored": None,
             "error": "ssh: connect to host 10.0.0.9 port 22: Connection refused",
             "skipped": []},
        ],
    }  # fmt: skip
    out = io.StringIO()
    fleet_result(FleetResult("failed", tmp_path, index), Console(file=out, width=80), [])
    lines = out.getvalue().splitlines()
    assert lines[0] == "kvmksm fleet ltp: FAILED"
    g61 = next(ln for ln in lines if ln.startswith("g61"))
    assert "passed" in g61 and "40s" in g61 and "skipped: smart_scan (knob)" in g61
    gone = next(ln for ln in lines if ln.startswith("gone"))
    assert "unreachable" in gone and "Connection refused" in gone  # whole, not cut
    assert f"fleet: {tmp_path}" in out.getvalue()


def test_lab_guests_of_one_kernel_get_names_of_their_own(tmp_path: Path) -> None:
    """Three guests of one kernel once made an inventory of one host (Ansible merges names)."""
    img, k61, k612 = (tmp_path / n for n in ("d.qcow2", "vmlinuz-6.1.0-56", "vmlinuz-6.12.95"))
    specs = [GuestSpec(img, k61, img), GuestSpec(img, k612, img), GuestSpec(img, k61, img)]
    names = host_names(specs)
    assert len(set(names)) == 3
    assert names[1] == host_names([specs[1]])[0]  # a kernel of its own keeps its plain label
    assert names[0].endswith("-1") and names[2].endswith("-2")

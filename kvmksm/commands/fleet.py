"""kvmksm fleet run: one scenario on every host of an Ansible inventory, through the playbooks
kvmksm ships (kvmksm/fleet/), into one folder (kvmksm.results.fleet).

1. probe (probe.yml, one raw task): each host's Python, C library, kernel, what kvmksm trees
   it already has. Unreachable hosts are named and left out of the rest.
2. bundles (fleet_bundle): the dependencies for each kind of host Python, kvmksm itself.
3. run (run.yml, hosts in parallel, each at its own pace): install what is missing, read the
   KSM knobs, `kvmksm bench` (one at a time per host: its own lock), pack and fetch the
   records, read the knobs again, remove the work folder.
4. gather: each host's record or experiment moved into the fleet folder; fleet.json says
   per host its status, kernel, what failed, the phases' times and whether the knobs are as
   they were. Interrupted (Ctrl-C, SIGTERM): stop.yml ends every host's bench with SIGTERM
   (which restores its host), brings back what it recorded and cleans up.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import socket
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmksm import __version__
from kvmksm.commands.bench import exit_code
from kvmksm.commands.fleet_ansible import (
    InventoryHost,
    PlaybookRun,
    TaskResult,
    ansible_version,
    list_inventory,
    require_ansible,
    run_playbook,
)
from kvmksm.commands.fleet_bundle import Bundle, Target, deps_bundle, fingerprint, kvmksm_bundle
from kvmksm.errors import Interrupted, UserError
from kvmksm.host.ksm import KNOWN_KNOBS, parse_value
from kvmksm.progress import Progress, Silent
from kvmksm.results import fleet as folder
from kvmksm.results.experiment import is_experiment
from kvmksm.results.experiment import load_index as load_experiment
from kvmksm.results.record import is_record, load_meta, utc_now
from kvmksm.scenario.load import load
from kvmksm.signals import signals_ignored, signals_raise

PROBE_MARK = "KVMKSM-PROBE "
WORK = "ansible"  # inside the fleet folder: playbook logs, variables, each host's bench log
INCOMING = ".incoming"


@dataclass
class FleetResult:
    status: str  # passed | failed | interrupted
    dir: Path
    index: dict[str, Any]

    @property
    def exit_code(self) -> int:
        return exit_code(self.status)

    @property
    def hosts(self) -> list[dict[str, Any]]:
        return list(self.index["hosts"])


def fleet_run(
    inventory: str,
    scenario_file: str,
    output: Path,
    limit: str | None = None,
    forks: int | None = None,
    progress: Progress | None = None,
    bundles: Path | None = None,
) -> FleetResult:
    progress = progress or Silent()
    require_ansible()
    sc = load(scenario_file)  # a bad scenario stops here: no host is touched (exit 2)
    hosts = list_inventory(inventory, limit)
    fleet_dir = folder.make_dir(Path(output), sc.name)
    work = fleet_dir / WORK
    run_id = secrets.token_hex(4)
    index = _new_index(sc, scenario_file, inventory, hosts, run_id)
    folder.save_index(fleet_dir, index)
    entries = {h["name"]: h for h in index["hosts"]}
    forks = forks or min(len(hosts), 50)
    base_vars = {"kvmksm_run_id": run_id, "kvmksm_incoming": str(fleet_dir / INCOMING)}
    status = "failed"
    t_start = time.monotonic()

    def note(r: TaskResult) -> None:
        if r.status != "skipped":
            progress.note(f"  {r.host}: {r.task.removeprefix('kvmksm: ')} {r.status} "
                          f"({r.seconds:.0f}s)")  # fmt: skip

    try:
        with signals_raise():
            progress.note(f"fleet {sc.name}: {len(hosts)} host(s) from {inventory} -> {fleet_dir}")
            with progress.phase("probing the hosts"):
                probe = run_playbook("probe", inventory, base_vars, work, [h.name for h in hosts],
                                     forks, note)  # fmt: skip
            index["timings"]["probe_s"] = round(probe.seconds, 2)
            if probe.interrupted:
                raise Interrupted("interrupted while probing the hosts")
            targets = _read_probe(probe, entries)
            t0 = time.monotonic()
            with progress.phase("building what the hosts need (dependency and kvmksm bundles)"):
                plan = _plan(targets, entries, bundles, Path(scenario_file), work)
            index["timings"]["bundles_s"] = round(time.monotonic() - t0, 2)
            folder.save_index(fleet_dir, index)
            ready = list(plan)
            if ready:
                extra = base_vars | {
                    "kvmksm_plan": plan,
                    "kvmksm_scenario": str(Path(scenario_file).resolve()),
                }
                with progress.phase(f"running {sc.name} on {len(ready)} host(s)"):
                    run = run_playbook("run", inventory, extra, work, ready, forks, note)
                index["timings"]["run_playbook_s"] = round(run.seconds, 2)
                _read_run(run, entries)
                if run.interrupted:
                    with signals_ignored(), progress.phase("stopping every host's run"):
                        stop = run_playbook("stop", inventory, extra, work, ready, forks, note)
                    index["timings"]["stop_s"] = round(stop.seconds, 2)
                    _read_run(stop, entries)
                    raise Interrupted("interrupted")
    except (KeyboardInterrupt, Interrupted):
        status = "interrupted"
        for e in entries.values():
            if e["status"] in ("not run", "running"):
                e["status"] = "interrupted"
    finally:
        with signals_ignored():
            t0 = time.monotonic()
            _gather(fleet_dir, entries)
            index["timings"]["gather_s"] = round(time.monotonic() - t0, 2)
            index["timings"]["total_s"] = round(time.monotonic() - t_start, 2)
            if status != "interrupted":
                ok = all(e["status"] == "passed" for e in entries.values())
                status = "passed" if ok else "failed"
            index.update(status=status, finished=utc_now())
            folder.save_index(fleet_dir, index)
    return FleetResult(status, fleet_dir, index)


def _new_index(
    sc: Any, scenario_file: str, inventory: str, hosts: list[InventoryHost], run_id: str
) -> dict[str, Any]:
    return {
        "format": folder.FORMAT,
        "kind": "fleet",
        "tool": {"name": "kvmksm", "version": __version__},
        "name": sc.name,
        "status": "running",
        "error": None,
        "scenario_file": scenario_file,
        "scenario": sc.model_dump(mode="json"),
        "inventory": str(inventory),
        "run_id": run_id,
        "started": utc_now(),
        "finished": None,
        "controller": {
            "hostname": socket.gethostname(),
            "kvmksm": __version__,
            "fingerprint": fingerprint()[:12],
            "ansible": ansible_version(),
        },
        "timings": {},
        "hosts": [
            {
                "name": h.name,
                "groups": h.groups,
                "address": h.address,
                "status": "not run",
                "error": None,
                "exit_status": None,
                "dir": None,
                "record_kind": None,
                "kernel_release": None,
                "python": None,
                "virtualization": None,
                "cpu_model": None,
                "installed": None,
                "timings": {},
                "knobs_before": {},
                "knobs_after": {},
                "restored": None,
                "skipped": [],
            }
            for h in hosts
        ],
    }


# -- step 1: the probe ------------------------------------------------------------------
def _read_probe(probe: PlaybookRun, entries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """{host: (Target, what it has)} for hosts that answered; the others get their status."""
    out: dict[str, Any] = {}
    for name, e in entries.items():
        results = [r for r in probe.for_host(name) if r.task == "kvmksm: probe"]
        if not results:
            e.update(status="error", error="the probe did not reach this host")
            continue
        r = results[-1]
        if r.status == "unreachable":
            e.update(status="unreachable", error=r.message)
            continue
        found = [ln for ln in r.stdout.splitlines() if ln.startswith(PROBE_MARK)]
        if r.status != "ok" or not found:
            e.update(status="error", error=f"probe failed: {r.message}")
            continue
        facts = json.loads(found[-1][len(PROBE_MARK) :])
        e.update(python=facts.get("python"), kernel_release=facts.get("kernel"))
        e["timings"]["probe_s"] = round(r.seconds, 2)
        if not facts.get("ksm"):
            e.update(status="error", error="no /sys/kernel/mm/ksm: this kernel has no KSM")
            continue
        if facts.get("implementation") != "cpython":
            e.update(status="error", error=f"Python is {facts.get('implementation')}: kvmksm "
                     "needs CPython 3.11 or later")  # fmt: skip
            continue
        if tuple(int(x) for x in str(facts["python"]).split(".")[:2]) < (3, 11):
            e.update(status="error", error=f"Python {facts['python']}: kvmksm needs 3.11 or later")
            continue
        libc = facts.get("libc") or ["", ""]
        out[name] = (Target(facts["python"], facts["machine"], (libc[0], libc[1])), facts["have"])
    return out


# -- step 2: what to install where ------------------------------------------------------------
def _plan(
    targets: dict[str, Any],
    entries: dict[str, dict[str, Any]],
    cache: Path | None,
    scenario_file: Path,
    work: Path,
) -> dict[str, dict[str, Any]]:
    """Per host the bundles it needs and whether to install each (skipped when the same
    version is already there), and the run's payload: the scenario, with kvmksm or without."""
    me = kvmksm_bundle(cache)
    payloads = {with_me: _payload(work, scenario_file, me if with_me else None)
                for with_me in (False, True)}  # fmt: skip
    deps: dict[Target, Bundle | str] = {}
    plan = {}
    for name, (target, have) in targets.items():
        if target not in deps:
            try:
                deps[target] = deps_bundle(target, cache)
            except UserError as e:
                deps[target] = str(e)
        d = deps[target]
        if isinstance(d, str):
            entries[name].update(status="install failed", error=d)
            continue
        install_deps = d.id not in have.get("deps", [])
        install_me = me.id not in have.get("kvmksm", [])
        entries[name]["installed"] = "installed" if install_deps or install_me else "already there"
        plan[name] = {
            "deps_id": d.id,
            "deps_bundle": str(d.path),
            "install_deps": install_deps,
            "kvmksm_id": me.id,
            "kvmksm_bundle": str(me.path),
            "install_kvmksm": install_me,
            "payload": str(payloads[install_me]),
        }
    return plan


def _payload(work: Path, scenario_file: Path, me: Bundle | None) -> Path:
    """payload[-kvmksm].tar.gz: the scenario file at the top, kvmksm's tree in kvmksm-tree/."""
    work.mkdir(parents=True, exist_ok=True)
    path = work / ("payload-kvmksm.tar.gz" if me else "payload.tar.gz")
    with tarfile.open(path, "w:gz") as tar:
        tar.add(scenario_file, arcname=scenario_file.name)
        if me is not None:
            with tarfile.open(me.path) as src:
                for member in src.getmembers():
                    data = src.extractfile(member) if member.isfile() else None
                    member.name = f"kvmksm-tree/{member.name}"
                    tar.addfile(member, data)
    return path


# -- step 3: what the run said --------------------------------------------------------------
PHASES = {
    "install": ("kvmksm: install",),
    "run": ("kvmksm: run",),
    "gather": ("kvmksm: gather",),
}


def _read_run(run: PlaybookRun, entries: dict[str, dict[str, Any]]) -> None:
    for name, e in entries.items():
        results = run.for_host(name)
        if not results:
            continue
        for phase, prefixes in PHASES.items():
            secs = sum(r.seconds for r in results if r.task.startswith(prefixes))
            if any(r.task.startswith(prefixes) and r.status != "skipped" for r in results):
                e["timings"][f"{phase}_s"] = round(e["timings"].get(f"{phase}_s", 0) + secs, 2)
        for r in results:
            if r.task == "kvmksm: knobs before" and r.status == "ok" and not e["knobs_before"]:
                e["knobs_before"] = parse_knobs(r.stdout)
            if r.task == "kvmksm: knobs after" and r.status == "ok":
                e["knobs_after"] = parse_knobs(r.stdout)
            if r.task == "kvmksm: run" and r.status == "ok":
                e["exit_status"] = r.data.get("rc")
        bad = next((r for r in results if r.status in ("failed", "unreachable")), None)
        if bad is not None and e["status"] in ("not run", "running"):
            if bad.status == "unreachable":
                e.update(status="unreachable", error=f"{bad.task}: {bad.message}")
            elif bad.task.startswith("kvmksm: install"):
                e.update(status="install failed", error=f"{bad.task}: {bad.message}")
            else:
                e.update(status="error", error=f"{bad.task}: {bad.message}")
        if e["knobs_before"] and e["knobs_after"]:
            e["restored"] = e["knobs_before"] == e["knobs_after"]
        if run.interrupted and e["status"] in ("not run", "running"):
            e["status"] = "interrupted"


def parse_knobs(text: str) -> dict[str, Any]:
    """`grep -H . /sys/kernel/mm/ksm/*` output to {knob: value} (counters left out: they move)."""
    out: dict[str, Any] = {}
    for line in text.splitlines():
        path, sep, value = line.partition(":")
        name = path.rsplit("/", 1)[-1]
        if sep and name in KNOWN_KNOBS:
            out[name] = parse_value(value)
    return out


# -- step 4: gather -------------------------------------------------------------------------
def safe_name(host: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", host).lstrip(".-") or "host"


def _gather(fleet_dir: Path, entries: dict[str, dict[str, Any]]) -> None:
    """Each fetched tarball unpacked, the host's record or experiment moved beside the index,
    and the host's entry filled in from it."""
    incoming = fleet_dir / INCOMING
    for name, e in entries.items():
        tgz = incoming / f"{name}.tgz"
        if not tgz.exists():
            continue
        unpacked = incoming / safe_name(name)
        try:
            with tarfile.open(tgz) as tar:
                tar.extractall(unpacked, filter="data")
        except (tarfile.TarError, OSError) as err:
            e.update(status="error", error=f"the records fetched from it cannot be read: {err}")
            continue
        log = unpacked / "bench.log"
        if log.exists():
            shutil.move(str(log), fleet_dir / WORK / f"{safe_name(name)}.bench.log")
        found = [d for d in (unpacked / "out").glob("*/*") if is_record(d) or is_experiment(d)]
        if not found:
            if e["status"] in ("not run", "running", "interrupted"):
                last = _last_line(fleet_dir / WORK / f"{safe_name(name)}.bench.log")
                e.update(status="error" if e["status"] != "interrupted" else e["status"],
                         error=f"no record (kvmksm bench: {last or 'no output'})")  # fmt: skip
            continue
        target = fleet_dir / safe_name(name)
        shutil.move(str(found[0]), target)
        e["dir"] = target.name
        _fill_from_record(e, target)
    shutil.rmtree(incoming, ignore_errors=True)


def _fill_from_record(e: dict[str, Any], d: Path) -> None:
    if is_experiment(d):
        exp = load_experiment(d)
        e["record_kind"] = "experiment"
        status, error, host = exp.status, exp.error, exp.host
        skipped: list[dict[str, Any]] = []
        for run in exp.runs:
            if run.dir and is_record(d / run.dir):
                meta = load_meta(d / run.dir)
                skipped = meta.skipped or skipped
                error = error or meta.error
    else:
        meta = load_meta(d)
        e["record_kind"] = "run"
        status, error, host, skipped = meta.status, meta.error, meta.host, meta.skipped
    if e["status"] in ("not run", "running", "interrupted") or e["status"] == "error":
        e["status"] = status if status in folder.HOST_STATUSES else "error"
    e["error"] = e["error"] or error
    e.update(
        kernel_release=host.kernel_release or e["kernel_release"],
        virtualization=host.virtualization,
        cpu_model=host.cpu_model,
        skipped=skipped,
    )
    e["python"] = host.extra("python") or e["python"]


def _last_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1].strip()[-300:] if lines else ""

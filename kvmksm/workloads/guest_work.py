"""Work inside the guests of a VM run, through their guest agents: the scenario's
``guest_run`` commands, the ``churn`` program, and the latency ``probe``.

The vms workload calls it at fixed points of the timeline::

    all guests up -> before_ksm(): guest_run commands (every guest, in order), churn and probe
                     started and ready (their memory filled)
    settled       -> probe("off"): timed writes while ksmd is off
    KSM on ... steady ... plateau_done
                  -> probe("on"): the same writes into memory ksmd has merged by now
    before unmerge -> finish(): each guest's churn status (the rate it achieved)

Guests are worked on in parallel (one thread each, at most ``WORKERS``); a guest's commands
run one after another. What each step did goes into run.json (``guest_run``, ``churn``,
``guest_probe``) before a failure is raised, so a failed run still shows every output. A
command that fails fails the run with one line: the command, the guest, its exit status and
its output.
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from kvmksm.errors import UserError, WorkloadFailed
from kvmksm.guest import source
from kvmksm.results.events import Kind
from kvmksm.scenario.model import VmsWorkload
from kvmksm.units import format_size
from kvmksm.virt.agent import Agent, AgentError, ExecResult, keep, one_line
from kvmksm.workloads.base import RunContext

WORKERS = 16
CHURN_PATH = "/run/kvmksm-churn.py"
CHURN_STATUS = "/run/kvmksm-churn.json"
PROBE_PATH = "/run/kvmksm-probe.py"
PROBE_DIR = "/run/kvmksm-probe"
READY_TIMEOUT = 300.0  # seconds for churn and probe to fill their memory (slow under TCG)
PROBE_TIMEOUT = 300.0  # seconds for one probe measurement
OUTPUT_KEPT = 4096  # bytes of each command's stdout and stderr kept in the record
AGENT_CHANNEL = "org.qemu.guest_agent.0"

T = TypeVar("T")


def needs_agent(spec: VmsWorkload) -> bool:
    return bool(spec.guest_run or spec.churn or spec.probe)


def require_agent(spec: VmsWorkload, base_xml: str) -> None:
    """guest_run, churn and probe go through the guest agent: the base needs its channel."""
    if needs_agent(spec) and AGENT_CHANNEL not in base_xml:
        what = [k for k in ("guest_run", "churn", "probe") if getattr(spec, k)]
        raise UserError(
            f"workload.{what[0]} runs through the QEMU guest agent, and the base has no "
            f"agent channel ({AGENT_CHANNEL}); the Debian image has one: kvmksm image build debian"
        )


class GuestWork:
    """The agents of one run's guests and what the scenario asks of them."""

    def __init__(
        self,
        agents: dict[str, Agent],
        spec: VmsWorkload,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.agents = agents
        self.spec = spec
        self.clock, self.sleep = clock, sleep
        self.churn_pids: dict[str, int] = {}
        self.probe_pids: dict[str, int] = {}

    @classmethod
    def of(cls, conn: Any, names: Iterable[str], spec: VmsWorkload) -> GuestWork | None:
        if not needs_agent(spec):
            return None
        return cls({n: Agent(conn.lookupByName(n)) for n in names}, spec)

    # -- before KSM goes on -----------------------------------------------------------------
    def before_ksm(self, ctx: RunContext) -> None:
        n = len(self.agents)
        with ctx.phase(f"waiting for the guest agents of {n} guests"):
            self._each(lambda a: a.wait(self.spec.boot.timeout))
        if self.spec.guest_run:
            self.run_commands(ctx)
        if self.spec.churn:
            self.start_churn(ctx)
        if self.spec.probe:
            self.start_probe(ctx)

    def run_commands(self, ctx: RunContext) -> None:
        """Every guest_run command in every guest; the first failure fails the run."""
        results: list[dict[str, Any]] = []
        ctx.record.update(guest_run=results)
        n = len(self.agents)
        for cmd in self.spec.guest_run:
            with ctx.phase(f"guest_run in {n} guests: {cmd.run}"):
                done = self._each(lambda a, c=cmd: a.shell(c.run, c.timeout), fail=False)
            failed: list[str] = []
            for name, res in done.items():
                entry: dict[str, Any] = {"guest": name, "command": cmd.run}
                if isinstance(res, AgentError):
                    entry.update(status="error", error=str(res))
                    failed.append(str(res))
                else:
                    entry.update(
                        status=res.status(),
                        exitcode=res.exitcode,
                        signal=res.signal,
                        seconds=res.seconds,
                        stdout=keep(res.stdout, OUTPUT_KEPT),
                        stderr=keep(res.stderr, OUTPUT_KEPT),
                        stdout_bytes=len(res.stdout),
                        stderr_bytes=len(res.stderr),
                        truncated_by_agent=res.truncated,
                    )
                    if not res.ok:
                        out = one_line(res.stderr) or one_line(res.stdout) or "no output"
                        failed.append(
                            f"guest_run {cmd.run!r} failed in {name} ({res.status()}): {out}"
                        )
                results.append(entry)
            ctx.record.update(guest_run=results)
            slowest = max((e.get("seconds") or 0 for e in results[-n:]), default=0)
            ctx.record.event(
                Kind.GUEST_RUN,
                f"{cmd.run!r} in {n} guests: "
                f"{n - len(failed)} ok, {len(failed)} failed, slowest {slowest:.1f}s",
            )
            if failed:
                more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
                raise WorkloadFailed(failed[0] + more)

    def start_churn(self, ctx: RunContext) -> None:
        churn = self.spec.churn
        assert churn is not None
        argv = [
            "python3",
            CHURN_PATH,
            f"--size={churn.size}",
            f"--rate={churn.rate}",
            f"--status={CHURN_STATUS}",
        ]
        what = f"churn: {format_size(churn.size)} at {format_size(churn.rate)}/s"
        with ctx.phase(f"{what}: starting it in {len(self.agents)} guests"):
            self.churn_pids = self._each(lambda a: self._start(a, "churn", CHURN_PATH, argv))
            ready = self._each(lambda a: self._ready(a, CHURN_STATUS, self.churn_pids[a.name]))
        ctx.record.update(
            churn={
                "size": churn.size,
                "rate": churn.rate,
                "program": CHURN_PATH,
                "command": shlex.join(argv),
                "guests": {n: {"pid": self.churn_pids[n], "ready": r} for n, r in ready.items()},
            }
        )
        slowest = max(r.get("fill_seconds") or 0 for r in ready.values())
        ctx.record.event(Kind.CHURN_STARTED, f"{what} in {len(ready)} guests (fill {slowest}s)")

    def start_probe(self, ctx: RunContext) -> None:
        probe = self.spec.probe
        assert probe is not None
        argv = ["python3", PROBE_PATH, f"--size={probe.size}", f"--dir={PROBE_DIR}"]
        with ctx.phase(f"probe: starting it in {len(self.agents)} guests"):
            self.probe_pids = self._each(lambda a: self._start(a, "probe", PROBE_PATH, argv))
            self._each(lambda a: self._ready(a, f"{PROBE_DIR}/ready", self.probe_pids[a.name]))
        ctx.record.update(
            guest_probe={
                "size": probe.size,
                "program": PROBE_PATH,
                "command": shlex.join(argv),
                "phases": {},
            }
        )
        ctx.record.event(
            Kind.PROBE_STARTED, f"write-latency probe over {format_size(probe.size)} per guest"
        )

    # -- measurements -----------------------------------------------------------------------
    def probe(self, ctx: RunContext, phase: str, ksm: str) -> None:
        """One measurement in every guest at once; results and the host's cow_ksm rise."""
        if not self.spec.probe or not self.probe_pids:
            return
        before = ctx.fs.vmstat().get("cow_ksm")
        t = ctx.record.now()
        with ctx.phase(f"probe ({phase}, KSM {ksm}): timed writes in {len(self.agents)} guests"):
            res = self._each(lambda a: self._measure(a, phase))
        after = ctx.fs.vmstat().get("cow_ksm")
        data = ctx.record.data.get("guest_probe") or {}
        entry: dict[str, Any] = {
            "t": t,
            "ksm": ksm,
            "cow_ksm": after - before if before is not None and after is not None else None,
            "guests": res,
            "summary": summarize(res),
        }
        data.setdefault("phases", {})[phase] = entry
        ctx.record.update(guest_probe=data)
        s = entry["summary"]
        ctx.record.event(
            Kind.PROBE,
            f"{phase} (KSM {ksm}): write latency p50 {s['p50_us']} us, p99 {s['p99_us']} us, "
            f"p99.9 {s['p999_us']} us, max {s['max_us']} us; cow_ksm +{entry['cow_ksm']}",
            phase=phase,
        )

    def finish(self, ctx: RunContext) -> None:
        """Each guest's churn status (rate achieved, passes) into the record; a churn that
        died fails the run (its memory stopped changing, so the figures are not churn's)."""
        if not self.spec.churn or not self.churn_pids:
            return
        status = self._each(lambda a: self._churn_status(a), fail=False)
        data = ctx.record.data.get("churn") or {}
        dead = []
        for name, st in status.items():
            g = data.setdefault("guests", {}).setdefault(name, {})
            if isinstance(st, AgentError):
                g["error"] = str(st)
                dead.append(str(st))
            else:
                g["final"] = st
        rates = [
            g["final"].get("achieved_rate")
            for g in data.get("guests", {}).values()
            if isinstance(g.get("final"), dict)
        ]
        rates = [r for r in rates if isinstance(r, int | float)]
        data["achieved_rate_min"] = min(rates) if rates else None
        ctx.record.update(churn=data)
        low = f"{format_size(min(rates))}/s" if rates else "?"
        ctx.record.event(Kind.CHURN_STATUS, f"churn ran in {len(rates)} guests, slowest {low}")
        if dead:
            raise WorkloadFailed(dead[0])

    # -- one guest ----------------------------------------------------------------------------
    def _start(self, a: Agent, what: str, path: str, argv: list[str]) -> int:
        a.write_file(path, source(what))
        return a.spawn(argv, capture=True)

    def _ready(self, a: Agent, path: str, pid: int) -> dict[str, Any]:
        """Wait for a program's ready file; fail with its output if it exits first."""
        start = self.clock()
        while True:
            try:
                return json.loads(a.read_file(path))
            except (AgentError, ValueError):
                pass
            st = a.status(pid)
            if st is not None:
                res = _exec_result(st)
                raise AgentError(
                    f"guest {a.name}: {path} never appeared: the program ended "
                    f"({res}): {one_line(res.stderr) or one_line(res.stdout) or 'no output'}"
                )
            if self.clock() - start > READY_TIMEOUT:
                raise AgentError(f"guest {a.name}: no {path} after {READY_TIMEOUT:g}s")
            self.sleep(0.5)

    def _measure(self, a: Agent, phase: str) -> dict[str, Any]:
        res_path = f"{PROBE_DIR}/res-{phase}.json"
        a.write_file(f"{PROBE_DIR}/req-{phase}", b"")
        start = self.clock()
        while True:
            try:
                return json.loads(a.read_file(res_path))
            except (AgentError, ValueError):
                pass
            st = a.status(self.probe_pids[a.name])
            if st is not None:
                raise AgentError(f"guest {a.name}: the probe ended ({_exec_result(st)})")
            if self.clock() - start > PROBE_TIMEOUT:
                raise AgentError(f"guest {a.name}: no probe result after {PROBE_TIMEOUT:g}s")
            self.sleep(0.5)

    def _churn_status(self, a: Agent) -> dict[str, Any]:
        st = a.status(self.churn_pids[a.name])
        if st is not None:
            res = _exec_result(st)
            raise AgentError(
                f"guest {a.name}: churn stopped before the end of the run ({res}): "
                f"{one_line(res.stderr) or one_line(res.stdout) or 'no output'}"
            )
        return json.loads(a.read_file(CHURN_STATUS))

    def _each(self, fn: Callable[[Agent], T], fail: bool = True) -> dict[str, Any]:
        """``fn`` on every guest's agent in parallel; {guest: result}. An AgentError is
        raised (the first, by guest order) or, with ``fail=False``, returned as the result."""
        agents = list(self.agents.values())
        with ThreadPoolExecutor(max_workers=min(WORKERS, max(1, len(agents)))) as pool:
            futures = {a.name: pool.submit(fn, a) for a in agents}
        out: dict[str, Any] = {}
        for name, fut in futures.items():
            try:
                out[name] = fut.result()
            except AgentError as e:
                if fail:
                    raise
                out[name] = e
        return out


def _exec_result(st: dict[str, Any]) -> ExecResult:
    return ExecResult.from_status(st)


def summarize(per_guest: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Across guests: the median of each guest's percentiles, and the worst maximum."""
    keys = ("p50_us", "p90_us", "p99_us", "p999_us", "mean_us", "timer_us")
    out: dict[str, Any] = {}
    for k in keys:
        vals = sorted(g[k] for g in per_guest.values() if isinstance(g.get(k), int | float))
        out[k] = vals[len(vals) // 2] if vals else None
    maxes = [g["max_us"] for g in per_guest.values() if isinstance(g.get("max_us"), int | float)]
    out["max_us"] = max(maxes) if maxes else None
    out["writes"] = sum(int(g.get("writes") or 0) for g in per_guest.values())
    out["over_100us"] = sum(int(g.get("over_100us") or 0) for g in per_guest.values())
    return out

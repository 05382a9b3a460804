"""The processes workload: N host processes with MADV_MERGEABLE mappings filled with known
byte patterns round by round, as LTP's ksm tests do, with exact expectations per round."""

from __future__ import annotations

import json
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from kvmksm.errors import WorkloadFailed
from kvmksm.host.cgroup import MemoryCgroup
from kvmksm.host.fs import HostFS
from kvmksm.host.ksm import Ksm
from kvmksm.results.events import Kind
from kvmksm.scenario.model import FillStep, ProcessesWorkload, StopStep, UnmergeStep
from kvmksm.units import format_size
from kvmksm.workloads.base import RunContext, Workload, require_counters, require_fits

# The child's program (kvmksm.workloads.filler), run by path.
FILLER = Path(__file__).with_name("filler.py")


class ProcessesRun(Workload):
    def __init__(self, spec: ProcessesWorkload) -> None:
        self.spec = spec
        self.children: list[subprocess.Popen[str]] = []
        self.cgroup: MemoryCgroup | None = None

    def preflight(self, fs: HostFS, ksm: Ksm) -> None:
        each = self.spec.touched or self.spec.size  # a sparse mapping needs only what is touched
        require_fits(fs, self.spec.count, each, "processes")
        for i, step in enumerate(self.spec.steps):
            require_counters(fs, ksm, step.expect, f"workload.steps[{i}].expect")
        if self.spec.cgroup:
            # Constructing it checks that a memory controller exists; nothing is created yet.
            MemoryCgroup(fs, "kvmksm-preflight", self.spec.cgroup.memory_limit)

    def run(self, ctx: RunContext) -> None:
        spec = self.spec
        with ctx.phase(f"starting {spec.count} processes of {format_size(spec.size)}"):
            self._start(ctx)
        ctx.record.event(
            Kind.WORKLOAD_START,
            f"{spec.count} processes x {format_size(spec.size)}"
            + (f" ({format_size(spec.touched)} touched)" if spec.touched else "")
            + (f" in memory cgroup v{self.cgroup.version}" if self.cgroup else ""),
        )
        for i, step in enumerate(spec.steps, 1):
            ctx.check_halt()  # e.g. the record could not be written: no point going on
            if isinstance(step, FillStep):
                label = f"step {i} fill {'/'.join(p.describe() for p in step.patterns)}"
                self._fill(ctx, i, step)
                if ctx.ksm.read("run") != 1:
                    ctx.ksm.write("run", 1)
                    ctx.record.event(Kind.KSM_ON, "run=1", step=i)
                with ctx.phase(f"{label}: waiting for {spec.full_scans} full scans"):
                    try:
                        waited = ctx.ksm.wait_full_scans(spec.full_scans, spec.scan_timeout)
                    except TimeoutError as e:
                        raise WorkloadFailed(f"{label}: {e}") from None
                ctx.record.event(
                    Kind.SCANS_DONE, f"{spec.full_scans} full scans", step=i, seconds=waited
                )
            elif isinstance(step, UnmergeStep):
                label = f"step {i} unmerge"
                t = time.monotonic()
                ctx.ksm.write("run", 2)  # returns once every merged page is split again
                ctx.record.event(Kind.UNMERGE, "run=2", step=i, seconds=time.monotonic() - t)
            elif isinstance(step, StopStep):
                label = f"step {i} stop"
                ctx.ksm.write("run", 0)
                ctx.record.event(Kind.STOP, "run=0", step=i)
            verify = spec.verify and not isinstance(step, StopStep)
            if verify:  # the children read their memory while the counters are judged
                self._verify_start()
            ok = ctx.check(label, step.expect)
            ctx.record.event(Kind.ROUND_CHECKED, label + (" passed" if ok else " FAILED"), step=i)
            if verify:
                self._verify(ctx, i)

    # -- children -------------------------------------------------------------------
    def start_early(self, ctx: RunContext) -> None:
        """Start the children (a Python process each: most of 0.1 s) while the run sets its
        knobs and starts its sampler. They only map their memory until told to fill it."""
        spec = self.spec
        if spec.cgroup:
            name = f"kvmksm-{ctx.record.dir.name}"
            self.cgroup = MemoryCgroup(ctx.fs, name, spec.cgroup.memory_limit)
            self.cgroup.create()
            ctx.active.created("cgroup", path=self.cgroup.path)
        for i in range(spec.count):
            # A plain child process speaking JSON lines: no fork of this threaded process,
            # and nothing but the standard library in the child. Run by path with -S (no
            # site, no package lookup) and -E: it starts in 20 ms instead of 40.
            self.children.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-S",
                        "-E",
                        str(FILLER),
                        str(spec.size),
                        str(i),
                        str(spec.touched or spec.size),
                    ],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                    bufsize=1,
                )
            )

    def _start(self, ctx: RunContext) -> None:
        spec = self.spec
        if not self.children:
            self.start_early(ctx)
        for i in range(spec.count):
            pid = self._reply(i, "ready", timeout=60)
            if self.cgroup:
                self.cgroup.add(pid)
        ctx.record.update(
            processes=[{"index": i, "pid": p.pid} for i, p in enumerate(self.children)]
        )

    @staticmethod
    def _tell(proc: subprocess.Popen[str], cmd: str, arg: Any = None) -> None:
        """One command line to one child (filler.child_main reads them)."""
        assert proc.stdin is not None
        proc.stdin.write(json.dumps([cmd, arg]) + "\n")
        proc.stdin.flush()

    def _reply(self, index: int, want: str, timeout: float = 600) -> Any:
        proc = self.children[index]
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        if not ready:
            raise WorkloadFailed(f"process {index} did not answer within {timeout:g}s")
        line = proc.stdout.readline()
        if not line:
            proc.wait(1)
            raise WorkloadFailed(f"process {index} died ({_exit_reason(proc.returncode)})")
        kind, value = json.loads(line)
        if kind == "error":
            raise WorkloadFailed(f"process {index} failed: {value.strip().splitlines()[-1]}")
        if kind != want:
            raise WorkloadFailed(f"process {index}: expected {want!r}, got {kind!r}")
        return value

    def _fill(self, ctx: RunContext, step_no: int, step: FillStep) -> None:
        desc = "/".join(p.describe() for p in step.patterns)
        with ctx.phase(f"step {step_no}: filling {desc}"):
            for proc, pattern in zip(self.children, step.patterns, strict=True):
                self._tell(proc, "fill", [step_no, pattern.model_dump()])
            seconds = [self._reply(i, "filled") for i in range(len(self.children))]
        ctx.record.event(Kind.ROUND_FILLED, desc, step=step_no, seconds=round(max(seconds), 4))

    def _verify_start(self) -> None:
        for proc in self.children:
            self._tell(proc, "verify")

    def _verify(self, ctx: RunContext, step_no: int) -> None:
        """The children's answers to _verify_start (reading memory changes no counter)."""
        replies = [self._reply(i, "verified") for i in range(len(self.children))]
        bad = [(i, off) for i, (off, _) in enumerate(replies) if off is not None]
        if bad:
            i, off = bad[0]
            ctx.record.check(
                f"step {step_no}: memory intact",
                "unchanged",
                f"process {i} differs at {off}",
                False,
            )
            ctx.record.save()
            ctx.failed_checks += 1
            raise WorkloadFailed(
                f"step {step_no}: process {i}'s memory changed at offset {off}: KSM must "
                "never change data"
            )
        ctx.record.event(
            Kind.VERIFIED,
            f"{len(self.children)} processes intact",
            step=step_no,
            seconds=round(max(s for _, s in replies), 4),
        )

    def teardown(self, ctx: RunContext) -> list[str]:
        problems: list[str] = []
        for proc in self.children:
            try:
                if proc.poll() is None and proc.stdin is not None:
                    self._tell(proc, "exit")
                    proc.stdin.close()
            except OSError:
                pass
        deadline = time.monotonic() + 5
        for proc in self.children:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            if proc.stdout is not None:
                proc.stdout.close()
        self.children.clear()
        if self.cgroup:
            try:
                self.cgroup.remove()
                ctx.active.removed("cgroup", path=self.cgroup.path)
            except OSError as e:
                problems.append(f"cgroup {self.cgroup.path}: {e}")
            self.cgroup = None
        return problems


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "still running"
    if code == -9:
        return "killed by SIGKILL: out of memory in its cgroup?"
    if code < 0:
        return f"killed by signal {-code}"
    return f"exit status {code}"

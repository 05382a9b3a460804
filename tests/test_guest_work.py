"""Work inside guests, fast: the agent client against a stand-in agent that runs commands
here (tests/fakeagent.py), kvmksm's churn and probe programs run for real, GuestWork's
records and one-line failures, the scenario fields, and the figures the report shows."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvmksm.analysis.guest_work import churn_figures, probe_figures
from kvmksm.errors import WorkloadFailed
from kvmksm.guest import churn, probe, source
from kvmksm.host.fs import HostFS
from kvmksm.host.ksm import Ksm
from kvmksm.host.state import ActiveRun
from kvmksm.results.record import RunRecord, load_record
from kvmksm.scenario.estimate import estimate
from kvmksm.scenario.load import loads
from kvmksm.scenario.model import VmsWorkload
from kvmksm.virt.agent import Agent, AgentError, keep, one_line
from kvmksm.workloads import guest_work
from kvmksm.workloads.base import RunContext
from kvmksm.workloads.guest_work import GuestWork, require_agent, summarize

from .fakeagent import FakeAgents, FakeDom


@pytest.fixture
def agents(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeAgents]:
    fa = FakeAgents(tmp_path / "guests").install(monkeypatch)
    yield fa
    fa.stop()


def agent(name: str = "g1") -> Agent:
    return Agent(FakeDom(name))  # type: ignore[arg-type]


# -- the agent client ------------------------------------------------------------------------
def test_run_collects_status_and_output(agents: FakeAgents) -> None:
    res = agent().shell("echo out; echo err >&2; sleep 0.3; exit 3", timeout=10)
    assert (res.exitcode, res.signal, res.stdout, res.stderr) == (3, None, b"out\n", b"err\n")
    assert not res.ok and res.status() == "exit 3" and res.seconds >= 0.3
    calls = agents.guest("g1").calls
    assert calls.count("guest-exec-status") >= 2  # polled while it ran, read once at the end


def test_killed_command_and_no_output(agents: FakeAgents) -> None:
    res = agent().shell("kill -9 $$", timeout=10)
    assert res.signal == 9 and res.status() == "killed by signal 9"
    assert agent().run(["true"], 10).stdout == b""


def test_timeout_is_one_line(agents: FakeAgents) -> None:
    with pytest.raises(AgentError) as e:
        agent("slow").shell("sleep 5", timeout=0.5)
    assert str(e.value) == "guest slow: 'sleep 5' still running after 0.5s (pid 100 in the guest)"


def test_agent_not_connected(agents: FakeAgents) -> None:
    agents.guest("g1").up = False
    a = agent()
    assert not a.ping()
    with pytest.raises(AgentError, match=r"^guest g1: guest-exec: Guest agent is not responding"):
        a.shell("true", 5)
    clock = iter([0.0, 0.5, 2.0, 4.0])
    a.clock, a.sleep = (lambda: next(clock)), (lambda _s: None)
    with pytest.raises(AgentError, match="did not answer in 3s"):
        a.wait(3)


def test_files_in_and_out(agents: FakeAgents) -> None:
    a = agent()
    data = bytes(range(256)) * 700  # several agent chunks
    a.write_file("/run/x.bin", data)
    assert (agents.guest("g1").root / "run/x.bin").read_bytes() == data
    assert a.read_file("/run/x.bin") == data
    a.write_file("/run/empty", b"")
    assert a.read_file("/run/empty") == b""
    with pytest.raises(AgentError, match="guest-file-open: .*No such file"):
        a.read_file("/run/missing")


def test_output_kept_and_one_line() -> None:
    assert keep(b"short") == "short"
    big = b"A" * 3000 + b"B" * 3000
    kept = keep(big, 4096)
    assert kept.startswith("A" * 1024) and kept.endswith("A" * 72 + "B" * 3000)
    assert "[... 1904 bytes left out ...]" in kept
    assert one_line(b"first\n\n second \nthird\n") == "first | second | third"
    assert one_line(b"x" * 500, 50) == "..." + "x" * 47


# -- the guest programs, run here ------------------------------------------------------------
def test_churn_pages_same_in_every_guest_and_new_each_pass() -> None:
    assert churn.pattern(5, 2) == churn.pattern(5, 2)
    assert len({churn.pattern(i, p) for i in range(4) for p in range(3)}) == 12
    assert len(churn.pattern(0, 0)) == churn.PAGE
    assert churn.pattern(1, 0) != probe.pattern(1)  # the two programs never share a page


def test_churn_keeps_its_rate(tmp_path: Path) -> None:
    status = tmp_path / "churn.json"
    p = subprocess.run(
        [sys.executable, "-c", source("churn").decode(), "--size", str(1 << 20),
         "--rate", str(1 << 20), "--status", str(status), "--duration", "2.5"],
        capture_output=True, timeout=60,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    st = json.loads(status.read_text())
    assert st["ready"] and st["pages"] == 256
    assert st["passes"] == 2 and st["written"] >= 2 * (1 << 20)
    assert abs(st["achieved_rate"] - (1 << 20)) < 0.1 * (1 << 20), st


def test_probe_once(tmp_path: Path) -> None:
    p = subprocess.run(
        [sys.executable, "-c", source("probe").decode(), "--size", str(1 << 20), "--once", "x"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    res = json.loads(p.stdout)
    assert res["writes"] == res["pages"] == 256 and res["name"] == "x"
    assert 0 < res["p50_us"] <= res["p90_us"] <= res["p99_us"] <= res["p999_us"] <= res["max_us"]


def test_percentile_nearest_rank() -> None:
    data = list(range(1, 1001))
    assert [probe.percentile(data, q) for q in (50, 99, 99.9)] == [500, 990, 999]
    assert probe.percentile([7], 99.9) == 7 and probe.percentile([], 50) is None
    page = probe.pattern(3)
    assert struct.unpack_from("<Q", page, 8)[0] == 3


# -- GuestWork ----------------------------------------------------------------------------------
def spec(**kw: Any) -> VmsWorkload:
    data: dict[str, Any] = {"type": "vms", "base": {"domain": "b"}, "clones": 2}
    data.update(kw)
    return VmsWorkload.model_validate(data)


@pytest.fixture
def ctx(tmp_path: Path, fake_fs: HostFS) -> RunContext:
    rec = RunRecord.create(tmp_path / "out", {"name": "t"}, None)
    return RunContext(fake_fs, Ksm(fake_fs), rec, ActiveRun(), None)  # type: ignore[arg-type]


def work(s: VmsWorkload, names: tuple[str, ...] = ("g1", "g2")) -> GuestWork:
    return GuestWork({n: agent(n) for n in names}, s)


def test_guest_run_records_every_output(agents: FakeAgents, ctx: RunContext) -> None:
    s = spec(guest_run=["echo hello", {"run": "echo to-err >&2", "timeout": "30s"}])
    work(s).before_ksm(ctx)
    rows = ctx.record.data["guest_run"]
    assert [(r["guest"], r["command"], r["status"]) for r in rows] == [
        ("g1", "echo hello", "exit 0"),
        ("g2", "echo hello", "exit 0"),
        ("g1", "echo to-err >&2", "exit 0"),
        ("g2", "echo to-err >&2", "exit 0"),
    ]
    assert rows[0]["stdout"] == "hello\n" and rows[2]["stderr"] == "to-err\n"
    kinds = [e["kind"] for e in ctx.record.data["events"]]
    assert kinds == ["guest_run", "guest_run"]


def test_failing_command_fails_with_one_line(agents: FakeAgents, ctx: RunContext) -> None:
    s = spec(guest_run=["echo fine", "echo line one; echo it broke >&2; exit 4", "echo never"])
    with pytest.raises(WorkloadFailed) as e:
        work(s).before_ksm(ctx)
    assert str(e.value) == (
        "guest_run 'echo line one; echo it broke >&2; exit 4' failed in g1 (exit 4): it broke"
        " (and 1 more)"
    )
    rows = ctx.record.data["guest_run"]
    assert len(rows) == 4 and rows[3]["stdout"] == "line one\n"  # kept; the third never ran


def test_command_timeout_fails_the_run(agents: FakeAgents, ctx: RunContext) -> None:
    s = spec(guest_run=[{"run": "sleep 5", "timeout": "0.3s"}])
    with pytest.raises(WorkloadFailed, match="'sleep 5' still running after 0.3s"):
        work(s, ("g1",)).before_ksm(ctx)
    assert ctx.record.data["guest_run"][0]["status"] == "error"


def test_churn_and_probe_for_real(
    agents: FakeAgents, ctx: RunContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = spec(churn={"size": "1MiB", "rate": "1MiB/s"}, probe={"size": "1MiB"})
    w = work(s)
    w.sleep = lambda _s: time.sleep(0.05)
    w.before_ksm(ctx)
    for g in ("g1", "g2"):
        root = agents.guest(g).root
        assert (root / "run/kvmksm-churn.py").read_bytes() == source("churn")
        assert (root / "run/kvmksm-probe/ready").exists()
    w.probe(ctx, "off", ksm="off")
    time.sleep(1.2)  # a status write of the churn
    w.probe(ctx, "on", ksm="on")
    w.finish(ctx)
    data = ctx.record.data
    assert set(data["churn"]["guests"]) == {"g1", "g2"}
    for g in data["churn"]["guests"].values():
        assert g["ready"]["ready"] and g["final"]["written"] > 0
    phases = data["guest_probe"]["phases"]
    assert set(phases) == {"off", "on"}
    assert phases["on"]["summary"]["writes"] == 2 * 256 and phases["on"]["cow_ksm"] == 0
    kinds = [e["kind"] for e in data["events"]]
    assert kinds == ["churn_started", "probe_started", "probe", "probe", "churn_status"]
    rec = load_record(ctx.record.dir)
    assert probe_figures(rec)["rows"][0]["phase"] == "off"  # type: ignore[index]
    assert churn_figures(rec)["achieved_rate_min"] > 0  # type: ignore[index]


def test_churn_that_dies_fails_the_run(
    agents: FakeAgents, ctx: RunContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = spec(churn={"size": "1MiB", "rate": "1MiB/s"})
    w = work(s, ("g1",))
    w.sleep = lambda _s: time.sleep(0.05)
    w.before_ksm(ctx)
    subprocess.run(["pkill", "-f", str(agents.guest("g1").root)], check=False)
    time.sleep(0.3)
    with pytest.raises(WorkloadFailed, match="^guest g1: churn stopped before the end of the run"):
        w.finish(ctx)


def test_program_that_cannot_start(
    agents: FakeAgents, ctx: RunContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(guest_work, "source", lambda _n: b"import sys; sys.exit('no memory')\n")
    w = work(spec(churn={"size": "1MiB", "rate": 0}), ("g1",))
    w.sleep = lambda _s: time.sleep(0.05)
    with pytest.raises(
        WorkloadFailed, match=r"never appeared: the program ended \(exit 1\): no memory"
    ):
        w.before_ksm(ctx)


def test_summary_across_guests() -> None:
    g = {
        f"g{i}": {"p50_us": i, "p99_us": 10 * i, "max_us": 100 * i, "writes": 5} for i in (1, 2, 3)
    }
    s = summarize(g)
    assert (s["p50_us"], s["p99_us"], s["max_us"], s["writes"]) == (2, 20, 300, 15)


# -- the scenario fields ------------------------------------------------------------------------
def test_scenario_fields_parse() -> None:
    s = spec(
        guest_run=["uname -r", {"run": "true", "timeout": "1m"}],
        churn={"size": "64MiB", "rate": "8MiB/s"},
        probe={"latency": True},
    )
    assert [(c.run, c.timeout) for c in s.guest_run] == [("uname -r", 300.0), ("true", 60.0)]
    assert (s.churn.size, s.churn.rate) == (64 << 20, 8 << 20)  # type: ignore[union-attr]
    assert s.probe.size == 16 << 20  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("field", "line"),
    [
        ("churn: {size: 64MiB, rate: fast}", "workload.churn.rate: expected a rate such as 8MiB/s"),
        ("churn: {size: 0, rate: 1MiB/s}", "workload.churn.size"),
        ("guest_run: [{run: ''}]", "workload.guest_run[0].run"),
        ("probe: {size: 4096}", "workload.probe.size"),
    ],
)
def test_bad_fields_are_one_line(field: str, line: str) -> None:
    text = f"workload:\n  type: vms\n  base: {{domain: b}}\n  clones: 1\n  {field}\n"
    with pytest.raises(Exception) as e:
        loads(text, "s.yaml")
    msg = str(e.value)
    assert msg.startswith("s.yaml:5: " + line), msg


def test_estimate_counts_guest_run() -> None:
    sc = loads(
        "workload:\n  type: vms\n  base: {domain: b}\n  clones: 1\n"
        "  guest_run: [{run: a, timeout: 2m}, b]\n",
        "s.yaml",
    )
    assert "guest_run up to 7m" in estimate(sc).parts


def test_agent_channel_required() -> None:
    with pytest.raises(Exception, match="no agent channel"):
        require_agent(spec(guest_run=["true"]), "<domain/>")
    require_agent(spec(), "<domain/>")  # nothing inside the guests: no agent needed
    require_agent(spec(probe={}), "<channel><target name='org.qemu.guest_agent.0'/></channel>")

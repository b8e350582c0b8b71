"""Prometheus metrics: scrape-time collector over a fake supervisor, the loopback endpoint, the stats sampler."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent_image.protocol.result import RunResult
from agent_image.protocol.status import ContainerSection, RunState, Status
from supervisor.metrics import DURATION_BUCKETS, StatsSampler, serve_metrics
from supervisor.runtime.base import SandboxFacts

EXPECTED = {
    "massgen_runs",
    "massgen_queue_length",
    "massgen_containers_cpu_percent",
    "massgen_containers_memory_bytes",
    "massgen_containers_pids",
    "massgen_runs_finished",
    "massgen_run_duration_seconds",
    "massgen_supervisor_resident_memory_bytes",
}


class FakeMat:
    """The materializer surface the metrics read and the sampler writes."""

    def __init__(self, state: RunState, container: ContainerSection | None = None) -> None:
        self.status = Status()
        self.status.run.state = state
        self.status.container = container
        self.dirty = 0

    def set_container(self, section: ContainerSection) -> None:
        self.status.container = section
        self.dirty += 1


@dataclass
class FakeExecution:
    mat: FakeMat | None


@dataclass
class FakeRecord:
    run_id: str
    execution: FakeExecution
    result: RunResult | None = None
    sandbox: str = "docker"
    depth: int = 0
    parent: Any = None
    children: list[Any] = field(default_factory=list)
    done: bool = False

    @property
    def live(self) -> bool:
        return not self.done and self.result is None


class FakeSupervisor:
    def __init__(self) -> None:
        self.records: dict[str, FakeRecord] = {}
        self._n = 0

    def add(
        self,
        state: RunState,
        *,
        container: ContainerSection | None = None,
        sandbox: str = "docker",
        mat: bool = True,
    ) -> FakeRecord:
        self._n += 1
        run_id = f"log_20260101_000000_{self._n:06d}_abcdef"
        rec = FakeRecord(run_id, FakeExecution(FakeMat(state, container) if mat else None), sandbox=sandbox)
        self.records[run_id] = rec
        return rec

    def finish(self, rec: FakeRecord, exit_code: int, reason: str, duration_s: float | None) -> None:
        assert rec.execution.mat is not None
        rec.execution.mat.status.run.state = RunState.FINISHED
        rec.result = RunResult(
            run_id=rec.run_id,
            exit_code=exit_code,
            reason=reason,
            status_file="/x/status.json",
            log_dir="/x",
            finished_at=time.time(),
            duration_s=duration_s,
        )


def running_container(cid: str, cpu: float | None = None, mem: int | None = None, pids: int | None = None) -> Any:
    return ContainerSection(id=cid, state="running", cpu_percent=cpu, memory_bytes=mem, pids=pids)


async def scrape(port: int) -> tuple[str, str]:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/metrics") as resp:
        assert resp.status == 200
        return resp.headers["Content-Type"], await resp.text()


def samples(text: str) -> dict[str, list[Any]]:
    """Family name -> its samples, parsed by prometheus_client's own parser."""
    return {fam.name: fam.samples for fam in text_string_to_metric_families(text)}


def value(text: str, name: str, **labels: str) -> float:
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    raise AssertionError(f"no sample {name}{labels} in:\n{text}")


def populated() -> FakeSupervisor:
    sup = FakeSupervisor()
    sup.add(RunState.QUEUED)
    sup.add(RunState.QUEUED)
    sup.add(RunState.STARTING, mat=False)
    sup.add(RunState.RUNNING, container=running_container("c1", cpu=12.5, mem=100, pids=3))
    sup.add(RunState.RUNNING, container=running_container("c2", cpu=7.5, mem=50, pids=2))
    done = sup.add(RunState.RUNNING, container=running_container("c3", cpu=99.0, mem=1 << 30, pids=9))
    sup.finish(done, 0, "completed", 3.2)
    failed = sup.add(RunState.RUNNING)
    sup.finish(failed, 3, "timeout", 700.0)
    early = sup.add(RunState.STARTING)
    sup.finish(early, 1, "config_invalid", None)
    return sup


def test_scrape_parses_and_reports_states_queue_containers_and_memory() -> None:
    """The exposition parses; run states, queue, summed live-container cpu/mem/pids and RSS are right."""

    async def go() -> tuple[str, str]:
        server = await serve_metrics(populated(), 0)
        try:
            assert server.port > 0
            return await scrape(server.port)
        finally:
            await server.cleanup()

    ctype, text = asyncio.run(go())
    assert ctype.startswith("text/plain")
    fams = samples(text)
    assert set(fams) >= EXPECTED
    assert {s.labels["state"]: s.value for s in fams["massgen_runs"]} == {
        "queued": 2,
        "starting": 1,
        "running": 2,
        "finished": 3,
    }
    assert value(text, "massgen_queue_length") == 2
    # the finished run's last sample (99%, 1 GiB) is not counted: only live sandboxes
    assert value(text, "massgen_containers_cpu_percent") == 20.0
    assert value(text, "massgen_containers_memory_bytes") == 150
    assert value(text, "massgen_containers_pids") == 5
    assert value(text, "massgen_supervisor_resident_memory_bytes") > 10 << 20


def test_finished_counter_and_duration_histogram() -> None:
    """Counter by reason/exit_code for every finished run; histogram only of runs with a duration."""

    async def go() -> str:
        server = await serve_metrics(populated(), 0)
        try:
            return (await scrape(server.port))[1]
        finally:
            await server.cleanup()

    text = asyncio.run(go())
    fams = samples(text)
    finished = {(s.labels["reason"], s.labels["exit_code"]): s.value for s in fams["massgen_runs_finished"]}
    assert finished == {("completed", "0"): 1, ("timeout", "3"): 1, ("config_invalid", "1"): 1}
    assert all(s.name == "massgen_runs_finished_total" for s in fams["massgen_runs_finished"])
    assert value(text, "massgen_run_duration_seconds_count") == 2
    assert value(text, "massgen_run_duration_seconds_sum") == pytest.approx(703.2)
    assert value(text, "massgen_run_duration_seconds_bucket", le="5.0") == 1
    assert value(text, "massgen_run_duration_seconds_bucket", le="600.0") == 1
    assert value(text, "massgen_run_duration_seconds_bucket", le="1800.0") == 2
    assert value(text, "massgen_run_duration_seconds_bucket", le="+Inf") == 2
    les = [s.labels["le"] for s in fams["massgen_run_duration_seconds"] if s.name.endswith("_bucket")]
    assert les[0] == "1.0" and les[-2] == "3600.0" and len(les) == len(DURATION_BUCKETS) + 1


def test_each_finished_run_counts_once_across_scrapes() -> None:
    """Scraping again does not re-count a run; a run finishing between scrapes adds exactly one."""
    sup = FakeSupervisor()
    a = sup.add(RunState.RUNNING)
    sup.finish(a, 0, "completed", 1.5)
    b = sup.add(RunState.RUNNING)

    async def go() -> list[str]:
        server = await serve_metrics(sup, 0)
        try:
            texts = [(await scrape(server.port))[1], (await scrape(server.port))[1]]
            sup.finish(b, 0, "completed", 2.5)
            texts += [(await scrape(server.port))[1], (await scrape(server.port))[1]]
            return texts
        finally:
            await server.cleanup()

    t1, t2, t3, t4 = asyncio.run(go())
    for t, n in ((t1, 1), (t2, 1), (t3, 2), (t4, 2)):
        assert value(t, "massgen_runs_finished_total", reason="completed", exit_code="0") == n
        assert value(t, "massgen_run_duration_seconds_count") == n


def test_no_run_id_in_any_label() -> None:
    """Label values never carry run ids or container ids (unbounded cardinality)."""

    async def go() -> str:
        server = await serve_metrics(populated(), 0)
        try:
            return (await scrape(server.port))[1]
        finally:
            await server.cleanup()

    text = asyncio.run(go())
    allowed = {"state", "reason", "exit_code", "le"}
    for fam in text_string_to_metric_families(text):
        assert fam.name.startswith("massgen_")
        for s in fam.samples:
            assert set(s.labels) <= allowed, s
            for v in s.labels.values():
                assert not v.startswith("log_") and v not in {"c1", "c2", "c3"}, s


def test_empty_supervisor_exports_zeroes() -> None:
    """With no runs, every family is still there, at zero."""

    async def go() -> str:
        server = await serve_metrics(FakeSupervisor(), 0)
        try:
            return (await scrape(server.port))[1]
        finally:
            await server.cleanup()

    text = asyncio.run(go())
    assert set(samples(text)) >= EXPECTED
    assert value(text, "massgen_runs", state="running") == 0
    assert value(text, "massgen_run_duration_seconds_count") == 0


def test_metrics_listen_on_loopback_only() -> None:
    """A non-loopback host is refused; the bound socket is 127.0.0.1; cleanup closes it."""

    async def go() -> None:
        with pytest.raises(ValueError, match="loopback"):
            await serve_metrics(FakeSupervisor(), 0, host="0.0.0.0")
        server = await serve_metrics(FakeSupervisor(), 0)
        assert server.host == "127.0.0.1"
        assert all(addr[0] == "127.0.0.1" for addr in server.runner.addresses)
        port = server.port
        await server.cleanup()
        with pytest.raises(aiohttp.ClientConnectionError):
            await scrape(port)

    asyncio.run(go())


class FakeRuntime:
    """`facts(handle, stats=True)` that blocks a little and records its peak concurrency."""

    def __init__(self, delay: float = 0.05, state: str = "running") -> None:
        self.delay = delay
        self.state = state
        self.calls: list[tuple[str, bool]] = []
        self.active = 0
        self.peak = 0
        self.threads: set[int] = set()
        self._lock = threading.Lock()

    def facts(self, handle: Any, *, stats: bool = False) -> SandboxFacts:
        with self._lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
            self.calls.append((handle.id, stats))
            self.threads.add(threading.get_ident())
        time.sleep(self.delay)
        with self._lock:
            self.active -= 1
        n = int(handle.id[1:])
        return SandboxFacts(
            id=handle.id,
            image="i",
            runtime="runc",
            state=self.state,
            cpu_percent=float(n),
            memory_bytes=n * 1000,
            pids=n,
        )


def test_sampler_updates_live_docker_runs_in_threads_with_bounded_concurrency() -> None:
    """One round samples only live Docker runs with a running container, off the loop, at most 2 at once."""
    sup = FakeSupervisor()
    live = [sup.add(RunState.RUNNING, container=running_container(f"c{i}")) for i in range(1, 6)]
    local = sup.add(RunState.RUNNING, container=running_container("c7"), sandbox="none")
    exited = sup.add(RunState.RUNNING, container=ContainerSection(id="c8", state="exited"))
    no_container = sup.add(RunState.STARTING)
    finished = sup.add(RunState.RUNNING, container=running_container("c9", cpu=1.0))
    sup.finish(finished, 0, "completed", 1.0)
    runtime = FakeRuntime()
    loop_thread = threading.get_ident()

    async def go() -> int:
        return await StatsSampler(sup, runtime, interval=60, concurrency=2).sample_once()

    assert asyncio.run(go()) == 5
    assert sorted(cid for cid, _ in runtime.calls) == ["c1", "c2", "c3", "c4", "c5"]
    assert all(stats for _, stats in runtime.calls)
    assert runtime.peak == 2
    assert loop_thread not in runtime.threads
    for i, rec in enumerate(live, start=1):
        assert rec.execution.mat is not None
        c = rec.execution.mat.status.container
        assert c is not None and (c.cpu_percent, c.memory_bytes, c.pids) == (float(i), i * 1000, i)
        assert rec.execution.mat.dirty == 1
    for rec in (local, exited, no_container):
        assert rec.execution.mat is not None and rec.execution.mat.dirty == 0
    assert finished.execution.mat is not None and finished.execution.mat.status.container is not None
    assert finished.execution.mat.status.container.cpu_percent == 1.0


def test_sampler_keeps_final_facts_of_a_run_that_ended_while_sampling() -> None:
    """A sample that returns after its run finished is dropped, so it cannot overwrite the final facts."""
    sup = FakeSupervisor()
    rec = sup.add(RunState.RUNNING, container=running_container("c4", cpu=None))
    runtime = FakeRuntime(delay=0.3)

    async def go() -> int:
        sampler = StatsSampler(sup, runtime, interval=60)
        task = asyncio.ensure_future(sampler.sample_once())
        await asyncio.sleep(0.1)
        rec.done = True
        return await task

    assert asyncio.run(go()) == 0
    assert rec.execution.mat is not None and rec.execution.mat.status.container is not None
    assert rec.execution.mat.status.container.cpu_percent is None


def test_sampler_runs_every_interval_survives_errors_and_stops() -> None:
    """start() samples repeatedly; an engine error is logged, not fatal; stop() ends the task promptly."""
    sup = FakeSupervisor()
    rec = sup.add(RunState.RUNNING, container=running_container("c3"))

    class Flaky(FakeRuntime):
        def facts(self, handle: Any, *, stats: bool = False) -> SandboxFacts:
            if len(self.calls) % 2 == 0:
                self.calls.append((handle.id, stats))
                raise OSError("engine hiccup")
            return super().facts(handle, stats=stats)

    runtime = Flaky(delay=0.0)

    async def go() -> int:
        sampler = StatsSampler(sup, runtime, interval=0.02)
        sampler.start()
        async with asyncio.timeout(5):
            while sampler.rounds < 6:
                await asyncio.sleep(0.01)
        t0 = time.monotonic()
        await sampler.stop()
        assert time.monotonic() - t0 < 1
        rounds = sampler.rounds
        await asyncio.sleep(0.1)
        assert sampler.rounds == rounds
        return rounds

    assert asyncio.run(go()) >= 6
    assert rec.execution.mat is not None and rec.execution.mat.status.container is not None
    assert rec.execution.mat.status.container.cpu_percent == 3.0

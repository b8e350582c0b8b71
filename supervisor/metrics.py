"""Prometheus metrics for the daemon: a scrape-time collector over `Supervisor.records`, and a stats sampler.

Nothing here runs on a run's hot path: the collector reads the in-memory status models only
when `/metrics` is scraped, and container CPU/memory come from a background `StatsSampler`
that polls the engine through `asyncio.to_thread` behind a semaphore. Run ids never become
label values (one time series per run would grow without bound).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections import Counter
from collections.abc import Iterator
from typing import Any

import psutil
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["DURATION_BUCKETS", "MetricsServer", "RunsCollector", "StatsSampler", "serve_metrics"]

log = logging.getLogger(__name__)

STATES = ("queued", "starting", "running", "finished")
DURATION_BUCKETS = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


def _state_of(rec: Any) -> str:
    """The same answer `Supervisor.info` gives: a result means finished, else the status model's state."""
    if rec.result is not None:
        return "finished"
    mat = rec.execution.mat
    return str(mat.status.run.state.value) if mat is not None else "starting"


def _container(rec: Any) -> Any:
    mat = rec.execution.mat
    return mat.status.container if mat is not None else None


class RunsCollector(Collector):
    """Reads `sup.records` at scrape time; finished runs feed the histogram and counter exactly once."""

    def __init__(self, sup: Any) -> None:
        self.sup = sup
        self._process = psutil.Process()
        self._observed: set[str] = set()
        self._finished: Counter[tuple[str, str]] = Counter()
        self._bucket_counts = [0] * len(DURATION_BUCKETS)
        self._duration_count = 0
        self._duration_sum = 0.0

    def _observe_finished(self, records: list[Any]) -> None:
        for rec in records:
            res = rec.result
            if res is None or res.run_id in self._observed:
                continue
            self._observed.add(res.run_id)
            self._finished[(str(res.reason), str(res.exit_code))] += 1
            if res.duration_s is None:  # ended before it started (config errors): no duration to observe
                continue
            d = max(0.0, float(res.duration_s))
            self._duration_count += 1
            self._duration_sum += d
            for i, bound in enumerate(DURATION_BUCKETS):
                if d <= bound:
                    self._bucket_counts[i] += 1

    def _histogram(self) -> HistogramMetricFamily:
        buckets = [(repr(b), n) for b, n in zip(DURATION_BUCKETS, self._bucket_counts, strict=True)]
        buckets.append(("+Inf", self._duration_count))
        return HistogramMetricFamily(
            "massgen_run_duration_seconds",
            "Duration of finished runs, from admission to verdict.",
            buckets=buckets,
            sum_value=self._duration_sum,
        )

    def _counter(self) -> CounterMetricFamily:
        fam = CounterMetricFamily(
            "massgen_runs_finished", "Runs finished, by reason and exit code.", labels=["reason", "exit_code"]
        )
        for (reason, code), n in sorted(self._finished.items()):
            fam.add_metric([reason, code], n)
        return fam

    def collect(self) -> Iterator[Metric]:
        records = list(self.sup.records.values())
        self._observe_finished(records)
        runs = GaugeMetricFamily("massgen_runs", "Runs known to this supervisor, by state.", labels=["state"])
        counts = dict.fromkeys(STATES, 0)
        cpu = 0.0
        mem = 0
        pids = 0
        for rec in records:
            state = _state_of(rec)
            counts[state] = counts.get(state, 0) + 1
            c = _container(rec)
            if rec.live and c is not None:
                cpu += c.cpu_percent or 0.0
                mem += c.memory_bytes or 0
                pids += c.pids or 0
        for state, n in counts.items():
            runs.add_metric([state], n)
        yield runs
        yield GaugeMetricFamily("massgen_queue_length", "Runs waiting for a concurrency slot.", value=counts["queued"])
        yield GaugeMetricFamily(
            "massgen_containers_cpu_percent",
            "CPU use of live sandboxes, summed (100 = one core), as last sampled.",
            value=cpu,
        )
        yield GaugeMetricFamily(
            "massgen_containers_memory_bytes", "Memory use of live sandboxes, summed, as last sampled.", value=mem
        )
        yield GaugeMetricFamily(
            "massgen_containers_pids", "Processes in live sandboxes, summed, as last sampled.", value=pids
        )
        yield self._counter()
        yield self._histogram()
        try:
            rss = self._process.memory_info().rss
        except psutil.Error:
            rss = 0
        yield GaugeMetricFamily(
            "massgen_supervisor_resident_memory_bytes", "Resident memory of the supervisor process.", value=rss
        )


class MetricsServer:
    """The `/metrics` HTTP endpoint; `port` is the bound port (useful when asked for port 0)."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, registry: CollectorRegistry) -> None:
        self.runner = runner
        self.host = host
        self.port = port
        self.registry = registry

    async def cleanup(self) -> None:
        await self.runner.cleanup()


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def serve_metrics(sup: Any, port: int, host: str = "127.0.0.1") -> MetricsServer:
    """Serve Prometheus text exposition for `sup` at http://HOST:PORT/metrics (loopback only).

    Raises:
        ValueError: `host` is not a loopback address (metrics name no secrets, but they are an
            operator's view and the daemon has no authentication on TCP).
        OSError: the port cannot be bound.
    """
    if not _loopback(host):
        raise ValueError(f"metrics host={host} is not a loopback address")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RunsCollector(sup))

    async def metrics(_request: web.Request) -> web.Response:
        # On the loop thread on purpose: the records are mutated there, so this read is consistent.
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = next((addr[1] for addr in runner.addresses if isinstance(addr, tuple)), port)
    log.info("metrics on http://%s:%d/metrics", host, bound)
    return MetricsServer(runner, host, bound, registry)


class StatsSampler:
    """Every `interval` seconds, samples CPU/memory/pids of live Docker sandboxes into their status.

    The engine's one-shot stats call blocks for about a second per container, so samples run
    in threads, at most `concurrency` at a time, and a round never overlaps the next.
    """

    def __init__(self, sup: Any, runtime: Any, interval: float = 5.0, concurrency: int = 2) -> None:
        self.sup = sup
        self.runtime = runtime
        self.interval = interval
        self._sem = asyncio.Semaphore(concurrency)
        self._task: asyncio.Task[None] | None = None
        self.rounds = 0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="stats-sampler")

    async def stop(self, timeout: float = 5.0) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(task, timeout)

    async def _loop(self) -> None:
        while True:
            try:
                await self.sample_once()
            except Exception as exc:  # noqa: BLE001 - a failed round must not end sampling
                log.warning("stats sampling failed: %s", exc)
            self.rounds += 1
            await asyncio.sleep(self.interval)

    def _targets(self) -> list[tuple[Any, str]]:
        out = []
        for rec in list(self.sup.records.values()):
            c = _container(rec)
            if not rec.live or rec.sandbox != "docker" or c is None or not c.id or c.state != "running":
                continue
            out.append((rec, c.id))
        return out

    async def sample_once(self) -> int:
        """One round over the live Docker runs; returns how many were updated."""
        targets = self._targets()
        if not targets:
            return 0
        results = await asyncio.gather(*(self._sample(rec, cid) for rec, cid in targets))
        return sum(results)

    async def _sample(self, rec: Any, container_id: str) -> bool:
        from .runtime.docker import DockerHandle

        async with self._sem:
            if not rec.live:
                return False
            try:
                facts = await asyncio.to_thread(self.runtime.facts, DockerHandle(container_id), stats=True)
            except Exception as exc:  # noqa: BLE001 - one container's failure must not stop the round
                log.debug("run_id=%s stats failed: %s", rec.run_id, exc)
                return False
        mat = rec.execution.mat
        c = mat.status.container if mat is not None else None
        # The run may have ended while we sampled: its final facts are already written; keep them.
        if not rec.live or c is None or c.id != container_id or facts.state != "running":
            return False
        c.cpu_percent = facts.cpu_percent
        c.memory_bytes = facts.memory_bytes
        c.pids = facts.pids
        mat.set_container(c)  # marks status dirty: the next coalesced write carries the sample
        return True

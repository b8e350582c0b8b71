"""Per-run services: each run's own socket (runs API for its children, and in Docker the model
gateway), admission to the supervisor's concurrency limit, and budget meters.

Nothing here imports aiohttp at module level: the socket server comes up in a task that overlaps
the sandbox's start (importing and binding it takes about as long as creating the container),
importing in a worker thread so the event loop goes on to start the container meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

from agent_image.protocol.config import RunConfig
from agent_image.protocol.events import ModelCall
from agent_image.protocol.result import Reason
from agent_image.protocol.status import RunState

from .core import RunRecord, Supervisor
from .lifecycle import SANDBOX_UID, InterruptedWhileQueued, RunExecution, RunHooks
from .runtime.base import Mount
from .sockets import SOCKET_IN_SANDBOX_DIR, SOCKET_NAME, ensure_private_dir, short_socket_dir
from .verdict import Verdict

if TYPE_CHECKING:
    from .api import UnixServer
    from .gateway import Gateway

log = logging.getLogger(__name__)


class SocketServices(RunHooks):
    """Per-run socket: the runs API for children and, in Docker, the model gateway."""

    def __init__(self, sup: Supervisor, record: RunRecord) -> None:
        self.sup = sup
        self.record = record
        self.server: UnixServer | None = None
        self.gateway: Gateway | None = None
        self._serving: asyncio.Task[None] | None = None
        self.socket_dir: Path | None = None

    def _gateway(self, execution: RunExecution, config: RunConfig) -> Gateway:
        from .gateway import (
            BudgetMeter,
            CallRecord,
            ChainMeter,
            Gateway,
            agent_upstream,
            seed_from_telemetry,
            upstreams_from_env,
        )
        from .pricing import Pricing

        mat = execution.mat
        assert mat is not None
        budget = config.sandbox.budget
        run_id = self.record.run_id
        root = self.sup.budget_root

        def on_record(call: CallRecord) -> None:
            ev = ModelCall(
                seq=0,
                ts=mat.clock(),
                agent=call.agent[:40],
                provider=call.provider,
                model=call.model[:200],
                prompt_tokens=call.prompt_tokens,
                completion_tokens=call.completion_tokens,
                cached_tokens=call.cached_tokens,
                latency_s=call.latency_s,
                ttft_s=call.ttft_s,
                cost_usd=call.cost_usd,
                ok=call.ok,
            )
            mat.record_model_call(ev)
            # Nested runs spend their ancestors' budgets too (their telemetry stays their own).
            for anc in self.record.ancestors():
                if anc.meter is not None:
                    anc.meter.own.total.add(call)
            if root is not None:
                root.own.total.add(call)

        def on_exceeded(message: str) -> None:
            mat.log(f"budget exceeded: {message}", "error")
            self.record.control.verdict = Verdict(Reason.BUDGET_EXCEEDED, message)
            self.record.control.interrupt_reason = Reason.BUDGET_EXCEEDED.value
            self.record.control.interrupt.set()

        meter = ChainMeter(
            BudgetMeter(
                budget.max_tokens, budget.max_cost_usd, budget.max_calls, on_record=on_record, on_exceeded=on_exceeded
            ),
            [*(anc.meter for anc in self.record.ancestors()), *([root] if root is not None else [])],
        )
        # A re-adopted run keeps what it already spent.
        seed_from_telemetry(meter.own, self.record.paths.log_dir / "telemetry.jsonl")
        upstreams = upstreams_from_env()
        allowed: dict[str, set[str]] = {}
        per_agent = {}
        moved: set[str] = set()
        for agent in config.agents:
            if agent.backend.type in ("openai", "gemini", "claude") and agent.backend.model:
                allowed.setdefault(agent.backend.type, set()).add(agent.backend.model)
            if agent.backend.type == "openai":
                # Each OpenAI-compatible agent has its own upstream, with the key its host takes.
                up, _names = agent_upstream(agent.backend.provider, agent.backend.base_url)
                if up is not None:
                    per_agent[agent.id] = up
                plain = agent.backend.provider in (None, "openai")
                if plain and agent.backend.base_url and "openai" in upstreams and "openai" not in moved:
                    # The shared route (/openai/v1) keeps going where the run's first plain
                    # `type: openai` agent points, as before per-agent routes.
                    moved.add("openai")
                    base = upstreams["openai"]
                    upstreams["openai"] = type(base)(base.provider, agent.backend.base_url.rstrip("/"), base.api_key)
            elif (
                agent.backend.type in ("gemini", "claude")
                and agent.backend.base_url
                and agent.backend.type in upstreams
            ):
                kind = agent.backend.type
                up = upstreams[kind]
                upstreams[kind] = type(up)(up.provider, agent.backend.base_url.rstrip("/"), up.api_key)
        log.info(
            "run_id=%s gateway upstreams=%s agents=%s",
            run_id,
            {k: v.base_url for k, v in upstreams.items()},
            {k: v.base_url for k, v in per_agent.items()},
        )
        self.record.meter = meter
        return Gateway(
            upstreams,
            meter=meter,
            pricing=Pricing.load(),
            allowed_models=allowed,
            agent_upstreams=per_agent,
            run_id=run_id,
            limiter=self.sup.upstream_limiter,
        )

    async def start_services(
        self, execution: RunExecution, config: RunConfig, deadline: float
    ) -> tuple[list[Mount], dict[str, str]]:
        self.socket_dir = short_socket_dir(self.record.run_id)
        ensure_private_dir(self.socket_dir.parent)  # other host users cannot reach any run's socket
        self.socket_dir.mkdir(mode=0o755, exist_ok=True)
        os.chmod(self.socket_dir, 0o755)  # noqa: S103 - the sandbox's user must enter its mounted socket dir
        path = self.socket_dir / SOCKET_NAME
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a stale socket from a supervisor that died
        docker = execution.req.sandbox == "docker"
        # The server comes up while the sandbox starts; `services_ready` waits for it before the
        # run is followed (clients in the sandbox also retry connecting while it is not there yet).
        self._serving = asyncio.create_task(self._serve(execution, config, path, docker), name="run-socket")
        if docker:
            sock = f"{SOCKET_IN_SANDBOX_DIR}/{SOCKET_NAME}"
            return [Mount(self.socket_dir, SOCKET_IN_SANDBOX_DIR, read_only=True)], {
                "MASSGEN_SUPERVISOR_SOCKET": sock,
                "MASSGEN_MODEL_SOCKET": sock,
            }
        return [], {"MASSGEN_SUPERVISOR_SOCKET": str(path)}

    async def _serve(self, execution: RunExecution, config: RunConfig, path: Path, docker: bool) -> None:
        # The first run of a process imports aiohttp and the gateway (50-100 ms of CPU): on the
        # event loop that would hold up the container's create and start, which this overlaps.
        if f"{__package__}.api" not in sys.modules or (docker and f"{__package__}.gateway" not in sys.modules):
            await asyncio.to_thread(_import_server, docker)
        from .api import RunsApi, UnixServer, make_app

        routes = RunsApi(self.sup, self.record).routes()
        if docker:
            self.gateway = self._gateway(execution, config)
            routes += self.gateway.routes()
        self.server = UnixServer(make_app(routes), path, mode=0o600)
        await self.server.start()
        if docker and os.getuid() == 0:
            # Only the sandbox's user (and root) may connect: the socket carries the run's identity.
            os.chown(path, SANDBOX_UID, SANDBOX_UID)
        self.record.server = self.server

    async def services_ready(self, execution: RunExecution) -> None:
        if self._serving is not None:
            await self._serving

    def admission(self) -> contextlib.AbstractAsyncContextManager[None]:
        if self.record.parent is not None or self.sup.slots is None:
            return contextlib.nullcontext()
        return _admitted(self.sup.slots, self.record)

    async def stop_services(self, execution: RunExecution) -> None:
        if self._serving is not None and not self._serving.done():
            self._serving.cancel()
            with contextlib.suppress(BaseException):
                await self._serving
        if self.server is not None:
            await self.server.close()
        if self.gateway is not None:
            with contextlib.suppress(Exception):
                await self.gateway.aclose()
        if self.socket_dir is not None and not execution.control.detach.is_set():
            # On detach the running sandbox keeps this directory mounted: a restarted supervisor
            # re-binds the socket inside the same directory, so it must not be replaced.
            shutil.rmtree(self.socket_dir, ignore_errors=True)


def _import_server(gateway: bool) -> None:
    importlib.import_module(".api", __package__)
    if gateway:
        importlib.import_module(".gateway", __package__)
        importlib.import_module(".pricing", __package__)


@contextlib.asynccontextmanager
async def _admitted(slots: asyncio.Semaphore, record: RunRecord) -> AsyncIterator[None]:
    mat = record.execution.mat
    if slots.locked() and mat is not None:
        mat.set_run(state=RunState.QUEUED)
        mat.log("queued: the supervisor's concurrency limit is reached")
        mat.write_status(force=True)
    acquire = asyncio.ensure_future(slots.acquire())
    interrupted = asyncio.ensure_future(record.control.interrupt.wait())
    try:
        await asyncio.wait([acquire, interrupted], return_when=asyncio.FIRST_COMPLETED)
    finally:
        interrupted.cancel()
        if not acquire.done():
            acquire.cancel()
    if acquire.cancelled() or not acquire.done():
        raise InterruptedWhileQueued()
    try:
        if mat is not None:
            mat.set_run(state=RunState.STARTING)
        yield
    finally:
        slots.release()

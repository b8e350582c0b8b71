"""HTTP over unix sockets: each run's own socket (its children + the model gateway) and the daemon's.

On a run's socket the connection *is* the identity: handlers see only that run and its
descendants, and paths in answers are valid inside that run's sandbox. On the daemon socket
(caller None) every run is visible and paths are host paths.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from agent_image.protocol.api import ErrorBody, SubmitRun
from agent_image.protocol.config import RunConfig
from agent_image.protocol.events import ModelCall
from agent_image.protocol.result import Reason, exit_code_for
from agent_image.protocol.status import RunState

from .core import SOCKET_IN_SANDBOX_DIR, SOCKET_NAME, RunRecord, Supervisor, ensure_private_dir, short_socket_dir
from .lifecycle import SANDBOX_UID, InterruptedWhileQueued, PolicyError, RunExecution, RunHooks, RunRequest
from .logdir import RUN_ID_RE, atomic_write
from .runtime.base import Mount

log = logging.getLogger(__name__)

MAX_BODY = 2 << 20
MAX_WAIT_S = 60.0
MAX_SUBMISSIONS_PER_RUN = 64
# `@examples/NAME` names a file under configs/: no absolute paths, no `..`, no glob characters.
EXAMPLE_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*$")


def _unusable_field(body: SubmitRun) -> str | None:
    """A field no file system call could take, or an example name that would leave configs/."""
    for name in ("config_path", "logs_root"):
        value = getattr(body, name)
        if value is not None and "\x00" in value:
            return f"{name}: contains a NUL byte"
    if body.example is not None and not EXAMPLE_RE.match(body.example):
        return "example: must be a name from configs/, such as quickstart or meta/self_analysis"
    return None


def _error(status: int, error: str, detail: str = "") -> web.Response:
    return web.json_response(ErrorBody(error=error, detail=detail).model_dump(), status=status)


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status >= 400 and not (exc.text or "").startswith("{"):
            return _error(exc.status, exc.reason, exc.text or "")
        raise
    except Exception as exc:  # noqa: BLE001 - never a bare 500 page; log it and answer JSON
        log.exception("api error path=%s", request.path)
        return _error(500, "internal_error", type(exc).__name__)


class RunsApi:
    """The runs API, scoped to `caller` (None: the daemon's full view)."""

    def __init__(self, sup: Supervisor, caller: RunRecord | None, *, logs_root: Path | None = None) -> None:
        self.sup = sup
        self.caller = caller
        self.logs_root = logs_root

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/v1/runs", self.submit),
            web.get("/v1/runs", self.list),
            web.get("/v1/runs/{run_id}", self.get),
            web.get("/v1/runs/{run_id}/status", self.status),
            web.get("/v1/runs/{run_id}/result", self.result),
            web.post("/v1/runs/{run_id}/stop", self.stop),
        ]

    def _find(self, request: web.Request) -> RunRecord:
        run_id = request.match_info["run_id"]
        if not RUN_ID_RE.match(run_id):
            raise web.HTTPBadRequest(text=f"not a run id: {run_id[:80]!r}")
        rec = self.sup.lookup(self.caller, run_id)
        if rec is None:
            raise web.HTTPNotFound(text=f"no run {run_id} visible here")
        return rec

    async def submit(self, request: web.Request) -> web.Response:
        try:
            body = SubmitRun.model_validate_json(await request.read())
        except ValidationError as exc:
            first = exc.errors()[0]
            return _error(400, "invalid_body", f"{'.'.join(map(str, first['loc']))}: {first['msg']}")
        problem = _unusable_field(body)
        if problem is not None:
            return _error(400, "invalid_body", problem)
        caller = self.caller
        if caller is not None and len(caller.children) >= MAX_SUBMISSIONS_PER_RUN:
            # Refused children still get a log dir; this bounds what one run can make us create.
            return _error(429, "too_many_children", f"a run may submit at most {MAX_SUBMISSIONS_PER_RUN} nested runs")
        if caller is not None:
            if body.config_path is not None or body.logs_root is not None:
                return _error(400, "invalid_body", "config_path and logs_root are not accepted here; send config_text")
            if caller.execution.deadline is None:
                return _error(409, "not_running", "the run is not running yet")
        sources = [
            x for x in (body.config_text, body.example, body.config_path, body.config_unreadable) if x is not None
        ]
        if len(sources) != 1:
            return _error(
                400, "invalid_body", "give exactly one of config_text, example, config_path, config_unreadable"
            )
        if body.example is not None:
            source = f"@examples/{body.example}"
        elif body.config_path is not None:
            source = body.config_path
        else:
            source = body.config_name
        if caller is None:
            assert self.logs_root is not None
            logs_root = self.logs_root
            if body.logs_root is not None:
                if not os.path.isabs(body.logs_root) or ".." in Path(body.logs_root).parts:
                    return _error(400, "invalid_body", "logs_root must be an absolute path without '..'")
                logs_root = Path(body.logs_root)
                self.sup.note_logs_root(logs_root)
            req = RunRequest(
                question=body.question,
                config_source=source,
                config_text=body.config_text,
                config_error=body.config_unreadable,
                logs_root=logs_root,
                sandbox=self.sup.default_sandbox,
                image=self.sup.image,
                supervisor_id=self.sup.supervisor_id,
            )
            try:
                rec = await self.sup.submit(req)
            except OSError as exc:  # the run's directories could not be created under logs_root
                return _error(400, "logs_root_unusable", f"logs_root: {logs_root}: {exc.strerror or exc}")
        else:
            preq = caller.execution.req
            req = RunRequest(
                question=body.question,
                config_source=source,
                config_text=body.config_text,
                config_error=body.config_unreadable,
                logs_root=caller.paths.children,
                workspaces_root=caller.paths.workspace.parent,
                sandbox=preq.sandbox,
                image=preq.image,
                supervisor_id=preq.supervisor_id,
                parent_run_id=caller.run_id,
                depth=caller.depth + 1,
                deadline_cap=caller.execution.deadline,
                limits_cap=caller.execution.limits,
            )
            rec = await self.sup.submit(req, parent=caller)
        return web.json_response(self.sup.info(rec, caller).model_dump(), status=201)

    async def list(self, request: web.Request) -> web.Response:
        infos = [self.sup.info(r, self.caller).model_dump() for r in self.sup.visible_to(self.caller)]
        return web.json_response(infos)

    async def get(self, request: web.Request) -> web.Response:
        return web.json_response(self.sup.info(self._find(request), self.caller).model_dump())

    async def status(self, request: web.Request) -> web.Response:
        rec = self._find(request)
        mat = rec.execution.mat
        if mat is None:
            return _error(409, "not_ready", "no status yet")
        doc = mat.status.model_dump(mode="json")
        if self.caller is not None:
            # Paths as the caller's sandbox sees them, never the host's.
            doc["meta"]["log_dir"] = self.sup.view_path(self.caller, doc["meta"]["log_dir"])
            doc["results"]["answer_file"] = self.sup.view_path(self.caller, doc["results"]["answer_file"])
        return web.json_response(doc)

    async def result(self, request: web.Request) -> web.Response:
        rec = self._find(request)
        try:
            wait = min(MAX_WAIT_S, max(0.0, float(request.query.get("wait", "0"))))
        except ValueError:
            return _error(400, "invalid_query", "wait must be a number of seconds")
        res = await self.sup.wait(rec, wait)
        if res is None:
            return web.json_response(self.sup.info(rec, self.caller).model_dump(), status=202)
        data = res.model_dump()
        for key in ("answer_file", "status_file", "log_dir"):
            data[key] = self.sup.view_path(self.caller, data[key])
        return web.json_response(data)

    async def stop(self, request: web.Request) -> web.Response:
        rec = self._find(request)
        await self.sup.stop(rec, "interrupted via the API")
        return web.json_response(self.sup.info(rec, self.caller).model_dump(), status=202)


class UnixServer:
    """An aiohttp app on a unix socket, connectable by the sandbox's (non-root) user."""

    def __init__(self, app: web.Application, path: Path, mode: int = 0o666) -> None:
        self.app = app
        self.path = path
        self.mode = mode
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        # A short shutdown: a nested client's long-poll must not hold up its parent's end.
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.UnixSite(self._runner, str(self.path))
        await site.start()
        os.chmod(self.path, self.mode)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def make_app(routes: list[web.RouteDef]) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY, middlewares=[_errors])
    app.add_routes(routes)
    return app


class SocketServices(RunHooks):
    """Per-run socket: the runs API for children and, in Docker, the model gateway."""

    def __init__(self, sup: Supervisor, record: RunRecord) -> None:
        self.sup = sup
        self.record = record
        self.server: UnixServer | None = None
        self.gateway: Any = None
        self.socket_dir: Path | None = None

    def _gateway(self, execution: RunExecution, config: RunConfig) -> Any:
        from .gateway import BudgetMeter, CallRecord, Gateway, seed_from_telemetry, upstreams_from_env
        from .pricing import Pricing

        mat = execution.mat
        assert mat is not None
        budget = config.sandbox.budget
        run_id = self.record.run_id

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
                anc_meter = getattr(anc.server, "meter", None)
                if anc_meter is not None:
                    anc_meter.own.total.add(call)

        def on_exceeded(message: str) -> None:
            mat.log(f"budget exceeded: {message}", "error")
            self.record.control.verdict = (exit_code_for(Reason.BUDGET_EXCEEDED), Reason.BUDGET_EXCEEDED.value, message)
            self.record.control.interrupt_reason = Reason.BUDGET_EXCEEDED.value
            self.record.control.interrupt.set()

        meter = ChainMeter(
            BudgetMeter(
                budget.max_tokens, budget.max_cost_usd, budget.max_calls, on_record=on_record, on_exceeded=on_exceeded
            ),
            [getattr(anc.server, "meter", None) for anc in self.record.ancestors()],
        )
        # A re-adopted run keeps what it already spent.
        seed_from_telemetry(meter.own, self.record.paths.log_dir / "telemetry.jsonl")
        upstreams = upstreams_from_env()
        allowed: dict[str, set[str]] = {}
        for agent in config.agents:
            if agent.backend.type in ("openai", "gemini") and agent.backend.model:
                allowed.setdefault(agent.backend.type, set()).add(agent.backend.model)
                if agent.backend.base_url and agent.backend.type in upstreams:
                    up = upstreams[agent.backend.type]
                    upstreams[agent.backend.type] = type(up)(
                        up.provider, agent.backend.base_url.rstrip("/"), up.api_key
                    )
        log.info("run_id=%s gateway upstreams=%s", run_id, {k: v.base_url for k, v in upstreams.items()})
        self.meter = meter
        return Gateway(upstreams, meter=meter, pricing=Pricing.load(), allowed_models=allowed)

    async def start_services(
        self, execution: RunExecution, config: RunConfig, deadline: float
    ) -> tuple[list[Mount], dict[str, str]]:
        self.socket_dir = short_socket_dir(self.record.run_id)
        ensure_private_dir(self.socket_dir.parent)  # other host users cannot reach any run's socket
        self.socket_dir.mkdir(mode=0o755, exist_ok=True)
        os.chmod(self.socket_dir, 0o755)  # the sandbox's user must enter its mounted socket dir
        path = self.socket_dir / SOCKET_NAME
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a stale socket from a supervisor that died
        routes = RunsApi(self.sup, self.record).routes()
        docker = execution.req.sandbox == "docker"
        if docker:
            self.gateway = self._gateway(execution, config)
            routes += self.gateway.routes()
        self.server = UnixServer(make_app(routes), path, mode=0o600)
        await self.server.start()
        if docker and os.getuid() == 0:
            # Only the sandbox's user (and root) may connect: the socket carries the run's identity.
            os.chown(path, SANDBOX_UID, SANDBOX_UID)
        self.server.meter = getattr(self, "meter", None)  # type: ignore[attr-defined]
        self.record.server = self.server
        if docker:
            sock = f"{SOCKET_IN_SANDBOX_DIR}/{SOCKET_NAME}"
            return [Mount(self.socket_dir, SOCKET_IN_SANDBOX_DIR, read_only=True)], {
                "MASSGEN_SUPERVISOR_SOCKET": sock,
                "MASSGEN_MODEL_SOCKET": sock,
            }
        return [], {"MASSGEN_SUPERVISOR_SOCKET": str(path)}

    def admission(self) -> contextlib.AbstractAsyncContextManager[None]:
        if self.record.parent is not None or self.sup.slots is None:
            return contextlib.nullcontext()
        return _admitted(self.sup.slots, self.record)

    async def stop_services(self, execution: RunExecution) -> None:
        if self.server is not None:
            await self.server.close()
        if self.gateway is not None:
            with contextlib.suppress(Exception):
                await self.gateway.aclose()
        if self.socket_dir is not None and not execution.control.detach.is_set():
            # On detach the running sandbox keeps this directory mounted: a restarted supervisor
            # re-binds the socket inside the same directory, so it must not be replaced.
            shutil.rmtree(self.socket_dir, ignore_errors=True)


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


class ChainMeter:
    """A run's budget meter that also respects every ancestor's budget."""

    def __init__(self, own: Any, ancestors: list[Any]) -> None:
        self.own = own
        self.ancestors = [a for a in ancestors if a is not None]

    def record(self, call: Any) -> None:
        self.own.record(call)

    def budget_error(self) -> str | None:
        for m in (self.own, *(a.own for a in self.ancestors)):
            err = m.budget_error()
            if err:
                return err
        return None

    def on_budget_exceeded(self, message: str) -> None:
        self.own.on_budget_exceeded(message)


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2))


__all__ = ["RunsApi", "SocketServices", "UnixServer", "make_app", "PolicyError"]

"""HTTP over unix sockets: each run's own socket (its children + the model gateway) and the daemon's.

On a run's socket the connection *is* the identity: handlers see only that run and its
descendants, and paths in answers are valid inside that run's sandbox. On the daemon socket
(caller None) every run is visible and paths are host paths.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler
from pydantic import ValidationError

from agent_image.protocol.api import ErrorBody, SubmitRun

from .core import RunRecord, Supervisor
from .errors import PolicyError
from .lifecycle import RunRequest
from .logdir import RUN_ID_RE, atomic_write

log = logging.getLogger(__name__)

MAX_BODY = 2 << 20
MAX_WAIT_S = 60.0
MAX_SUBMISSIONS_PER_RUN = 64
# `@examples/NAME` names a file under configs/: no absolute paths, no `..`, no glob characters.
EXAMPLE_RE = re.compile(r"\A[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*\Z")


def _unusable_field(body: SubmitRun) -> str | None:
    """A field no file system call could take, or an example name that would leave configs/."""
    for name in ("config_path", "logs_root"):
        value = getattr(body, name)
        if value is not None and "\x00" in value:
            return f"{name}: contains a NUL byte"
    if body.example is not None and not EXAMPLE_RE.fullmatch(body.example):
        return "example: must be a name from configs/, such as quickstart or meta/self_analysis"
    return None


def _error(status: int, error: str, detail: str = "") -> web.Response:
    return web.json_response(ErrorBody(error=error, detail=detail).model_dump(), status=status)


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status >= 400 and not (exc.text or "").startswith("{"):
            return _error(exc.status, exc.reason, exc.text or "")
        raise
    except Exception as exc:
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
        if not RUN_ID_RE.fullmatch(run_id):
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
        await self.sup.deliver(self.caller, rec)
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


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2))


__all__ = ["PolicyError", "RunsApi", "UnixServer", "make_app"]

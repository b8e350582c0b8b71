"""The dashboard's aiohttp app: pages, server-sent events, the Stop action, and who may use them.

Safe by default: it binds loopback unless told otherwise; every request needs the access
token (in the URL once, then an HttpOnly SameSite=Strict cookie, or `Authorization: Bearer`);
requests must name this server in `Host` (a DNS-rebinding page cannot); state-changing
requests are POST with a CSRF token and, for browsers, an `Origin` equal to ours (cookies
are shared across ports on one host, origins are not); every response carries a strict
Content-Security-Policy and never an environment variable or key.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import secrets
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from ..runrows import RunRow
from ._control import Control, StopRefused
from ._data import Redactor, load_detail
from ._live import Hub
from ._render import esc, page, run_page_body, runs_page_body, static_text

log = logging.getLogger(__name__)

__all__ = ["CSP", "Dashboard"]

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cache-Control": "no-store",
}
HEARTBEAT_S = 15.0
RETRY_MS = 5000
STATIC = {
    "dashboard.css": "text/css",
    "dashboard.js": "text/javascript",
    "favicon.svg": "image/svg+xml",
}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _plain(status: int, title: str, text: str) -> web.Response:
    body = page(
        title,
        f'<header class="top"><span class="logo">&#9670;</span> massgen dashboard</header>'
        f'<main><div class="card"><h1>{esc(title)}</h1><p>{esc(text)}</p></div></main>',
        script=False,
    )
    return web.Response(status=status, text=body, content_type="text/html")


def _json_error(status: int, error: str, detail: str) -> web.Response:
    return web.json_response({"error": error, "detail": detail}, status=status)


class Dashboard:
    """The dashboard over some logs roots, on HOST:PORT; `control` decides what Stop does."""

    def __init__(
        self,
        roots: Callable[[], Iterable[Path]],
        *,
        control: Control | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        environ: dict[str, str] | None = None,
        fallback_s: float | None = None,
        heartbeat_s: float = HEARTBEAT_S,
    ) -> None:
        self.host = host
        self.heartbeat_s = heartbeat_s
        self.port = port
        self.token = token or secrets.token_urlsafe(32)
        self.csrf = hmac.new(self.token.encode(), b"massgen-dashboard-csrf", hashlib.sha256).hexdigest()
        self.control = control
        self.redact = Redactor(environ)
        kw: dict[str, Any] = {} if fallback_s is None else {"fallback_s": fallback_s}
        self.hub = Hub(roots, self.redact, can_stop=self._can_stop, **kw)
        self._runner: web.AppRunner | None = None
        self.allowed_hosts: set[str] = set()
        self.cookie = "massgen_dashboard"

    # -- lifecycle -----------------------------------------------------------------------------

    def _can_stop(self, row: RunRow) -> bool:
        return self.control is not None and self.control.can_stop(row)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard], client_max_size=64 << 10)
        app.add_routes(
            [
                web.get("/", self.runs_page),
                web.get("/run/{run_id}", self.run_page),
                web.get("/run/{run_id}/result.json", self.result_json),
                web.get("/run/{run_id}/report.html", self.report),
                web.post("/run/{run_id}/stop", self.stop),
                web.get("/events", self.events),
                web.get("/api/runs", self.api_runs),
                web.get("/static/{name}", self.static),
            ]
        )
        return app

    async def start(self) -> str:
        """Serve; returns the URL with the token (the only time it is shown)."""
        await self.hub.start()
        # A short shutdown: open event streams end when the hub closes them.
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False, shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = getattr(site, "_server", None)
        sockets = getattr(server, "sockets", None) or []
        if sockets:
            self.port = sockets[0].getsockname()[1]
        host = f"[{self.host}]" if ":" in self.host else self.host
        names = {host, f"{host}:{self.port}"}
        if is_loopback(self.host):
            names |= {"localhost", f"localhost:{self.port}", "127.0.0.1", f"127.0.0.1:{self.port}"}
        # Bound to every address, any name may reach it: then only the token (and, for actions,
        # the same-origin check) stand guard, which the warning at start says.
        self.allowed_hosts = set() if self.host in ("0.0.0.0", "::", "") else names  # noqa: S104 - a check, not a bind
        # Cookies ignore ports: one name per port keeps two dashboards on one host apart.
        self.cookie = f"massgen_dashboard_{self.port}"
        return self.url

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.host in ("0.0.0.0", "::"):  # noqa: S104 - a check, not a bind
            host = "127.0.0.1"
        return f"http://{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.base_url}/?token={self.token}"

    async def close(self) -> None:
        await self.hub.stop()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- the guard -----------------------------------------------------------------------------

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            resp = await self._checked(request, handler)
        except web.HTTPException as exc:
            for k, v in SECURITY_HEADERS.items():
                exc.headers.setdefault(k, v)
            raise
        for k, v in SECURITY_HEADERS.items():
            resp.headers.setdefault(k, v)
        return resp

    async def _checked(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self.allowed_hosts and request.host not in self.allowed_hosts:
            return _plain(403, "Wrong host", "This dashboard answers only to the address it printed.")
        if request.path.startswith("/static/") and request.method == "GET":
            return await handler(request)  # our own CSS/JS/SVG: public, so the 401 page is styled too
        given = request.query.get("token")
        if given is not None:
            if not hmac.compare_digest(given.encode(), self.token.encode()):
                return _plain(403, "Wrong token", "The access token in the URL is not this dashboard's.")
            # The token leaves the URL at once (history, referrers); the cookie carries it on.
            query = {k: v for k, v in request.query.items() if k != "token"}
            target = request.rel_url.with_query(query) if query else request.rel_url.with_query(None)
            resp = web.Response(status=303, headers={"Location": str(target)})
            resp.set_cookie(self.cookie, self.token, httponly=True, samesite="Strict", path="/")
            return resp
        bearer = request.headers.get("Authorization", "")
        presented = bearer[7:] if bearer.startswith("Bearer ") else request.cookies.get(self.cookie)
        if not presented:
            if request.path.startswith(("/api/", "/events")) or request.method != "GET":
                return _json_error(401, "unauthorized", "open the URL with the token that the dashboard printed")
            return _plain(401, "Access token needed", "Open the URL (with ?token=...) that the dashboard printed.")
        if not hmac.compare_digest(presented.encode(), self.token.encode()):
            return _json_error(403, "forbidden", "wrong access token")
        if request.method not in ("GET", "HEAD"):
            origin = request.headers.get("Origin")
            if bearer.startswith("Bearer ") and origin is None:
                pass  # not a browser: no ambient credentials to abuse
            elif origin != f"http://{request.host}":
                return _json_error(403, "forbidden", f"cross-origin request refused (Origin {str(origin)[:80]!r})")
            else:
                form_token = ""
                if request.content_type == "application/x-www-form-urlencoded":
                    form_token = str((await request.post()).get("csrf", ""))
                csrf = request.headers.get("X-CSRF-Token", "") or form_token
                if not hmac.compare_digest(csrf.encode(), self.csrf.encode()):
                    return _json_error(403, "forbidden", "missing or wrong CSRF token")
        return await handler(request)

    # -- pages ---------------------------------------------------------------------------------

    def _meta(self) -> dict[str, str]:
        return {"csrf-token": self.csrf}

    async def runs_page(self, request: web.Request) -> web.Response:
        t0 = time.perf_counter()
        index = self.hub.index
        rows = index.ordered()
        pairs = [(r, index.root_of(r).run_id) for r in rows]
        gen, now = self.hub.gen, time.time()
        batches = sorted(self.hub.batches.values(), key=lambda b: str(b.batch_dir))
        body = await asyncio.to_thread(runs_page_body, pairs, gen, now, batches)
        text = page("massgen runs", body, meta=self._meta())
        dt = time.perf_counter() - t0
        # Server-Timing: what the server spent, visible in the browser's devtools and to bench/.
        return web.Response(
            text=text, content_type="text/html", headers={"Server-Timing": f"render;dur={dt * 1000:.1f}"}
        )

    def _row(self, request: web.Request) -> RunRow:
        run_id = request.match_info["run_id"]
        row = self.hub.index.get(run_id)
        if row is None:
            raise web.HTTPNotFound(text=f"no run {run_id[:80]} under the logs roots")
        return row

    async def run_page(self, request: web.Request) -> web.Response:
        try:
            row = self._row(request)
        except web.HTTPNotFound as exc:
            return _plain(404, "No such run", exc.text or "")
        can_stop = self._can_stop(row)
        index, redact = self.hub.index, self.redact

        def build() -> tuple[str, str]:
            d = load_detail(row, index, redact)
            return d.row.run_id, run_page_body(d, can_stop=can_stop)

        run_id, body = await asyncio.to_thread(build)
        return web.Response(text=page(f"{run_id} · massgen", body, meta=self._meta()), content_type="text/html")

    async def result_json(self, request: web.Request) -> web.Response:
        from ..logdir import read_json
        from ._data import MAX_RESULT_BYTES

        row = self._row(request)
        doc = await asyncio.to_thread(read_json, row.log_dir / "result.json", MAX_RESULT_BYTES)
        if doc is None:
            return _json_error(404, "not_ready", "result.json is not written yet")
        return web.json_response(doc)

    async def report(self, request: web.Request) -> web.Response:
        from ._report import render_report

        row = self._row(request)
        text = await asyncio.to_thread(render_report, row.log_dir, self.redact)
        return web.Response(
            text=text,
            content_type="text/html",
            headers={"Content-Disposition": f'attachment; filename="{row.run_id}.html"'},
        )

    async def api_runs(self, request: web.Request) -> web.Response:
        rows = self.hub.index.ordered()
        out = []
        for r in rows:
            out.append(
                {
                    "run_id": r.run_id,
                    "state": r.state,
                    "phase": r.phase,
                    "exit_code": r.exit_code,
                    "reason": r.reason,
                    "depth": r.depth,
                    "parent_run_id": r.parent_run_id,
                    "winner": r.winner,
                    "tokens": r.tokens,
                    "cost_usd": r.cost_usd,
                }
            )
        return web.json_response(out)

    async def static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        ctype = STATIC.get(name)
        if ctype is None:
            raise web.HTTPNotFound()
        return web.Response(text=static_text(name), content_type=ctype, headers={"Cache-Control": "no-cache"})

    # -- actions -------------------------------------------------------------------------------

    async def stop(self, request: web.Request) -> web.Response:
        row = self._row(request)
        if self.control is None:
            return _json_error(405, "not_available", "this dashboard is read-only")
        try:
            done = await self.control.stop(row)
        except StopRefused as exc:
            return _json_error(exc.status, "refused", exc.detail)
        log.info("dashboard: stop run_id=%s: %s", row.run_id, done)
        return web.json_response({"run_id": row.run_id, "detail": done}, status=202)

    # -- live ----------------------------------------------------------------------------------

    async def events(self, request: web.Request) -> web.StreamResponse:
        run_id = request.query.get("run")
        row = None
        if run_id is not None:
            row = self.hub.index.get(run_id)
            if row is None:
                return _json_error(404, "not_found", "no such run")
        try:
            since = int(request.query.get("since", "-1"))
            log_offset = max(0, int(request.query.get("log", "0")))
        except ValueError:
            return _json_error(400, "invalid_query", "since and log are integers")
        sub = self.hub.subscribe(row.log_dir if row else None, log_offset)
        if sub is None:
            return _json_error(503, "busy", "too many open dashboard pages")
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        )
        for k, v in SECURITY_HEADERS.items():
            resp.headers.setdefault(k, v)
        try:
            await resp.prepare(request)
            await resp.write(f"retry: {RETRY_MS}\n: hello\n\n".encode())
            if row is None:
                if since >= 0:
                    self.hub.replay(sub, since)
            else:
                await self.hub.push_run(row.log_dir)
                await self.hub.push_log(row.log_dir, only=sub)
            while True:
                try:
                    msg = await asyncio.wait_for(sub.queue.get(), self.heartbeat_s)
                except TimeoutError:
                    # Also how a vanished client is noticed: the write fails.
                    await resp.write(b": ping\n\n")
                    continue
                if msg is None:
                    break
                event, data = msg
                await resp.write(f"event: {event}\ndata: {data}\n\n".encode())
        except (ConnectionResetError, ConnectionError):
            pass
        finally:
            self.hub.unsubscribe(sub)
        return resp

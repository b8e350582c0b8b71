"""The proxy: serves the model routes on a run's socket and forwards each call upstream.

Per call (`Gateway._forward`): the allow-list and budget are checked, the sandbox's credentials
dropped and the host key added, the upstream called with retries (`_send`), and the answer
relayed redacted, streams included (`_relay_body`, `_relay_stream`; an abandoned stream is
drained for its usage). `_finish` prices the call and hands it to the run's `Meter`. Every log
line carries the run id.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import os
import random
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from ..pricing import Pricing
from .limiter import UpstreamLimiter
from .metering import CallRecord, Meter
from .redact import Redactor, SseRelay
from .upstreams import Upstream, missing_key_message
from .wire import auth_headers, claude_stream_usage, error_body, error_message, estimate_usage, usage_from, usage_marker

log = logging.getLogger(__name__)

AGENT_HEADER = "X-Massgen-Agent"
MAX_REQUEST_BYTES = 32 << 20
MAX_RESPONSE_BYTES = 64 << 20
RETRY_BASE_S = 0.5
MAX_RETRY_WAIT_S = 4.0
GEMINI_ACTIONS = frozenset({"generateContent", "streamGenerateContent"})
DRAIN_TIMEOUT_S = 30.0
DRAIN_MAX_BYTES = 8 << 20

_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "trailers"}
    | {"transfer-encoding", "upgrade"}
)
# Credentials the sandbox sent (placeholders) and what the client library sets itself.
_DROP_REQUEST = _HOP_BY_HOP | {
    "host",
    "content-length",
    "authorization",
    "x-goog-api-key",
    "api-key",
    "x-api-key",
    "cookie",
    "accept-encoding",
    "expect",
    AGENT_HEADER.lower(),
}
# The body is re-framed (and decompressed) here; aiohttp sets its own Date and Server.
_DROP_RESPONSE = _HOP_BY_HOP | {"content-length", "content-encoding", "set-cookie", "date", "server"}
_AGENT_CHARS = re.compile(r"[^A-Za-z0-9_.:@/\-]")
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]*")


def retry_after_s(headers: Mapping[str, str]) -> float | None:
    """Seconds the upstream asked us to wait (``retry-after-ms``, ``Retry-After`` secs or date)."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_tz(value)
        return None if parsed is None else max(0.0, email.utils.mktime_tz(parsed) - time.time())


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}"


async def _read_limited(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body, or its first `limit` + 1 bytes when it is longer (the caller checks)."""
    parts: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_any():
        parts.append(chunk)
        size += len(chunk)
        if size > limit:
            break
    return b"".join(parts)


async def _write(out: web.StreamResponse, data: bytes) -> bool:
    """False when the sandbox has gone (aiohttp raises a ConnectionResetError subclass)."""
    try:
        await out.write(data)
    except ConnectionError:
        return False
    return True


@dataclass
class _Call:
    """What one request accumulates on its way through."""

    agent: str
    provider: str
    model: str
    t0: float = field(default_factory=time.monotonic)
    ttft_s: float | None = None
    status: int = 0
    usage: tuple[int, int, int] | None = None
    error: str | None = None
    attempts: int = 0
    body: bytes = field(default=b"", repr=False)
    streamed_bytes: int = 0  # read from an upstream SSE stream (relayed or drained)
    stream_open: bool = False  # an SSE stream was started and its end not read


class Gateway:
    """Serves the model routes and forwards them with one shared aiohttp client session."""

    def __init__(
        self,
        upstreams: Mapping[str, Upstream],
        *,
        meter: Meter,
        pricing: Pricing,
        allowed_models: Mapping[str, set[str]] | None = None,
        agent_upstreams: Mapping[str, Upstream] | None = None,
        timeout_s: float = 120,
        max_retries: int = 3,
        connect_timeout_s: float = 5,
        retry_base_s: float = RETRY_BASE_S,
        max_retry_wait_s: float = MAX_RETRY_WAIT_S,
        drain_timeout_s: float = DRAIN_TIMEOUT_S,
        drain_max_bytes: int = DRAIN_MAX_BYTES,
        run_id: str = "-",
        limiter: UpstreamLimiter | None = None,
    ) -> None:
        """Set up; the client session is made on first use, inside the serving loop.

        Args:
            upstreams: per provider, where its calls go and the host key they carry.
            meter: where each call is reported and the budget asked (the run's `ChainMeter`).
            pricing: prices calls from their usage.
            allowed_models: per provider, the only models a sandbox may call; a provider left out
                allows none. None: any model of any provider.
            agent_upstreams: per agent id, its own OpenAI-compatible upstream (and key), served
                under ``/openai/agents/{agent}/v1/...``; an agent not listed there gets a 404.
            timeout_s: the longest wait for the upstream's next byte (not for the whole answer:
                long generations stream for minutes).
            max_retries: retries after a connect error, timeout, 408, 429 or 5xx.
            connect_timeout_s: the longest wait for a TCP connection to the upstream.
            retry_base_s: first backoff; doubles per retry, capped at `max_retry_wait_s`.
            max_retry_wait_s: the longest single wait, also for a server's ``Retry-After``.
            drain_timeout_s: how long to keep reading a stream the sandbox left, for its usage.
            drain_max_bytes: how much of such a stream to read at most.
            run_id: the run this gateway serves, named on every log line.
            limiter: per-upstream pauses shared with other runs' gateways (a 429 holds them all).
        """
        self.run_id = run_id
        self._limiter = limiter
        self._upstreams = dict(upstreams)
        self._agent_upstreams = dict(agent_upstreams or {})
        self._meter = meter
        self._pricing = pricing
        self._allowed: dict[str, set[str]] | None = None
        if allowed_models is not None:
            self._allowed = {p: {m.removeprefix("models/") for m in ms} for p, ms in allowed_models.items()}
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=timeout_s, sock_connect=connect_timeout_s, sock_read=timeout_s
        )
        self._max_retries = max(0, int(max_retries))
        self._retry_base = retry_base_s
        self._max_wait = max_retry_wait_s
        keys = [u.api_key for u in (*self._upstreams.values(), *self._agent_upstreams.values()) if u.api_key]
        self._redact = Redactor(keys)
        self._session: aiohttp.ClientSession | None = None
        self._drain_timeout = drain_timeout_s
        self._drain_max_bytes = drain_max_bytes
        self._drains: set[asyncio.Task[None]] = set()
        self._closing = False

    # -- wiring --------------------------------------------------------------------------------

    def routes(self) -> list[web.RouteDef]:
        """The model routes, for an application of the caller's (the run's socket)."""
        return [
            web.post("/openai/v1/chat/completions", self._openai),
            web.post("/openai/v1/responses", self._openai),
            web.get("/openai/v1/models", self._openai_models),
            # Per-agent upstreams (OpenAI-compatible services with their own host and key).
            web.post("/openai/agents/{agent}/v1/chat/completions", self._openai),
            web.post("/openai/agents/{agent}/v1/responses", self._openai),
            web.get("/openai/agents/{agent}/v1/models", self._openai_models),
            # One segment holds "{model}:{action}"; split by hand (a model has no colon).
            web.post(r"/gemini/{version:v1[a-z0-9]*}/models/{target}", self._gemini),
            # Anthropic Messages API (the SDK's base URL is http://massgen-gateway/claude).
            web.post("/claude/v1/messages", self._claude),
        ]

    def make_app(self) -> web.Application:
        """An application serving `routes()` that closes the client session on cleanup."""
        app = web.Application()
        app.add_routes(self.routes())

        async def _close(_app: web.Application) -> None:
            await self.aclose()

        app.on_cleanup.append(_close)
        return app

    async def serve_unix(self, path: str, *, mode: int | None = None) -> web.AppRunner:
        """Start serving on a unix socket; the caller owns the runner (``await runner.cleanup()``)."""
        runner = web.AppRunner(self.make_app(), access_log=None, handle_signals=False)
        await runner.setup()
        try:
            await web.UnixSite(runner, path).start()
            if mode is not None:
                os.chmod(path, mode)
        except BaseException:
            await runner.cleanup()
            raise
        return runner

    async def aclose(self) -> None:
        """Cancel pending drains (each records its call, estimated if need be), close the session."""
        self._closing = True
        drains = list(self._drains)
        for task in drains:
            task.cancel()
        if drains:
            await asyncio.gather(*drains, return_exceptions=True)
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=self._timeout,
                trust_env=True,
                auto_decompress=True,
                connector=aiohttp.TCPConnector(limit=256, ttl_dns_cache=300),
            )
        return self._session

    # -- handlers ------------------------------------------------------------------------------

    async def _openai(self, request: web.Request) -> web.StreamResponse:
        body = await self._read_body(request, "openai")
        if isinstance(body, web.Response):
            return body
        try:
            obj = json.loads(body)
        except ValueError:
            obj = None
        if not isinstance(obj, dict) or not isinstance(obj.get("model"), str) or not obj["model"]:
            return self._refuse("openai", 400, "request body must be a JSON object with a 'model'", "invalid_request")
        route_agent = request.match_info.get("agent")
        endpoint = "/" + request.path.split("/v1/", 1)[1]
        if obj.get("stream") is True and endpoint == "/chat/completions":
            opts = obj.get("stream_options")
            if not (isinstance(opts, dict) and opts.get("include_usage") is True):
                obj["stream_options"] = {**(opts if isinstance(opts, dict) else {}), "include_usage": True}
                body = json.dumps(obj).encode()
        return await self._forward(request, "openai", obj["model"], endpoint, {}, body, route_agent)

    async def _claude(self, request: web.Request) -> web.StreamResponse:
        body = await self._read_body(request, "claude")
        if isinstance(body, web.Response):
            return body
        try:
            obj = json.loads(body)
        except ValueError:
            obj = None
        if not isinstance(obj, dict) or not isinstance(obj.get("model"), str) or not obj["model"]:
            return self._refuse("claude", 400, "request body must be a JSON object with a 'model'", "invalid_request")
        return await self._forward(request, "claude", obj["model"], "/v1/messages", {}, body)

    async def _openai_models(self, request: web.Request) -> web.Response:
        models = sorted((self._allowed or {}).get("openai", ()))
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "massgen-gateway"} for m in models]
        return web.json_response({"object": "list", "data": data})

    async def _gemini(self, request: web.Request) -> web.StreamResponse:
        version = request.match_info["version"]
        model, _, action = request.match_info["target"].rpartition(":")
        if action not in GEMINI_ACTIONS or not _MODEL_NAME.fullmatch(model):
            return self._refuse("gemini", 404, f"no such method: {request.path}", "not_found")
        body = await self._read_body(request, "gemini")
        if isinstance(body, web.Response):
            return body
        query = {k: v for k, v in request.query.items() if k.lower() != "key"}
        return await self._forward(request, "gemini", model, f"/{version}/models/{model}:{action}", query, body)

    async def _read_body(self, request: web.Request, provider: str) -> bytes | web.Response:
        # Read by hand: request.read() stops at the app's client_max_size (1 MiB by default),
        # and prompts with images or long histories are larger.
        parts: list[bytes] = []
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
            if size > MAX_REQUEST_BYTES:
                return self._refuse(provider, 413, f"request body over {MAX_REQUEST_BYTES} bytes", "too_large")
            parts.append(chunk)
        return b"".join(parts)

    def _refuse(self, provider: str, status: int, message: str, code: str) -> web.Response:
        return web.json_response(
            error_body(provider, status, message, code), status=status, headers={"x-should-retry": "false"}
        )

    # -- forwarding ----------------------------------------------------------------------------

    async def _forward(
        self,
        request: web.Request,
        provider: str,
        model: str,
        path: str,
        query: dict[str, str],
        body: bytes,
        route_agent: str | None = None,
    ) -> web.StreamResponse:
        raw_agent = _AGENT_CHARS.sub("", request.headers.get(AGENT_HEADER, ""))[:64]
        call = _Call(raw_agent or "unknown", provider, model.removeprefix("models/"), body=body)
        if self._allowed is not None:
            allowed = self._allowed.get(provider)
            if allowed is None:
                msg = (
                    f"model_not_allowed: model={call.model} is not allowed: "
                    f"this run's config does not use provider={provider}"
                )
                return self._local_refusal(call, 403, msg, "model_not_allowed")
            if call.model not in allowed:
                names = ", ".join(sorted(allowed)) or "none"
                msg = f"model_not_allowed: model={call.model} is not allowed for provider={provider} (allowed: {names})"
                return self._local_refusal(call, 403, msg, "model_not_allowed")
        if route_agent is not None:
            upstream = self._agent_upstreams.get(route_agent)
            if upstream is None:
                msg = f"no upstream for agent={_AGENT_CHARS.sub('', route_agent)[:64]} in this run's config"
                return self._local_refusal(call, 404, msg, "not_found")
        else:
            upstream = self._upstreams.get(provider)
        if upstream is None:
            return self._local_refusal(call, 401, missing_key_message(provider), "no_api_key")
        budget = self._meter.budget_error()
        if budget is not None:
            self._meter.on_budget_exceeded(budget)
            return self._local_refusal(call, 403, budget, "budget_exceeded")

        headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP_REQUEST}
        headers.update(auth_headers(provider, upstream.api_key))
        url = upstream.base_url.rstrip("/") + path
        handed_off = False  # to a drain task, which then releases `resp` and records the call
        try:
            resp = await self._send(call, upstream, url, query, headers, body)
            if resp is None:
                msg = f"upstream {upstream.host} failed after {call.attempts} attempts: {call.error}"
                call.error = msg
                return self._refuse(provider, 502, msg, "upstream_failed")
            try:
                call.status = resp.status
                if resp.status < 400 and resp.content_type == "text/event-stream":
                    out, relay = await self._relay_stream(request, resp, call, upstream)
                    if relay is not None and not self._closing:
                        self._start_drain(resp, relay, call)
                        handed_off = True
                    return out
                return await self._relay_body(resp, call, upstream)
            finally:
                if not handed_off:
                    resp.release()  # closes the upstream connection when its stream was not read to the end
        finally:
            if not handed_off:
                self._finish(call)

    async def _send(
        self,
        call: _Call,
        upstream: Upstream,
        url: str,
        query: dict[str, str],
        headers: dict[str, str],
        body: bytes,
    ) -> aiohttp.ClientResponse | None:
        """The first answer that is not worth retrying, or None (with `call.error` set) when none came."""
        session = self._client()
        while True:
            call.attempts += 1
            delay = min(self._max_wait, self._retry_base * 2 ** (call.attempts - 1)) * random.uniform(0.8, 1.0)  # noqa: S311 - jitter
            if self._limiter is not None:
                await self._limiter.wait(upstream.host)
            try:
                resp = await session.post(url, params=query, data=body, headers=headers, allow_redirects=False)
            except (aiohttp.ClientError, TimeoutError) as exc:
                call.status = 502
                call.error = self._redact.text(f"cannot reach {upstream.host}: {_describe(exc)}")
            else:
                if resp.status not in (408, 429) and resp.status < 500:
                    call.error = None
                    return resp
                try:
                    detail = error_message(self._redact.truncated(await _read_limited(resp, 64 << 10)))
                except (aiohttp.ClientError, TimeoutError) as exc:
                    detail = _describe(exc)
                finally:
                    resp.release()
                call.status = resp.status
                call.error = f"HTTP {resp.status} from {upstream.host}: {self._redact.clip(detail, 300)}"
                asked = retry_after_s(resp.headers)
                if asked is not None:
                    delay = min(self._max_wait, asked)
                if resp.status == 429 and self._limiter is not None:
                    self._limiter.pause(upstream.host, delay)
            if call.attempts > self._max_retries:
                call.status = 502
                return None
            log.info(
                "model_call_retry run_id=%s agent=%s provider=%s model=%s attempt=%d wait_s=%.2f error=%s",
                self.run_id,
                call.agent,
                call.provider,
                call.model,
                call.attempts,
                delay,
                call.error,
            )
            await asyncio.sleep(delay)

    def _response_headers(self, resp: aiohttp.ClientResponse) -> dict[str, str]:
        return {k: self._redact.text(v) for k, v in resp.headers.items() if k.lower() not in _DROP_RESPONSE}

    async def _relay_body(self, resp: aiohttp.ClientResponse, call: _Call, upstream: Upstream) -> web.Response:
        call.ttft_s = time.monotonic() - call.t0
        try:
            data = await _read_limited(resp, MAX_RESPONSE_BYTES)
        except (aiohttp.ClientError, TimeoutError) as exc:
            call.status = 502
            call.error = self._redact.text(f"upstream {upstream.host} broke off its answer: {_describe(exc)}")
            return self._refuse(call.provider, 502, call.error, "upstream_failed")
        if len(data) > MAX_RESPONSE_BYTES:
            call.status = 502
            call.error = f"upstream {upstream.host} answered over {MAX_RESPONSE_BYTES} bytes"
            return self._refuse(call.provider, 502, call.error, "upstream_failed")
        data = self._redact.data(data)
        if resp.status < 400:
            try:
                call.usage = usage_from(call.provider, json.loads(data))
            except ValueError:
                call.usage = None
        else:
            call.error = f"HTTP {resp.status} from {upstream.host}: {self._redact.clip(error_message(data), 300)}"
        return web.Response(body=data, status=resp.status, headers=self._response_headers(resp))

    async def _relay_stream(
        self, request: web.Request, resp: aiohttp.ClientResponse, call: _Call, upstream: Upstream
    ) -> tuple[web.StreamResponse, SseRelay | None]:
        """Relay an SSE answer; the relay comes back too when the sandbox left before its end (to drain)."""
        out = web.StreamResponse(status=resp.status, headers=self._response_headers(resp))
        call.stream_open = True
        await out.prepare(request)
        relay = SseRelay(usage_marker(call.provider), self._redact)
        sandbox_gone = left_early = False
        try:
            async for chunk in resp.content.iter_any():
                if call.ttft_s is None:
                    call.ttft_s = time.monotonic() - call.t0
                call.streamed_bytes += len(chunk)
                data = relay.feed(chunk)
                if data and not await _write(out, data):
                    sandbox_gone = left_early = True
                    break
            else:
                call.stream_open = False
                tail = relay.flush()
                sandbox_gone = bool(tail) and not await _write(out, tail)
        except (aiohttp.ClientError, TimeoutError) as exc:
            # Status and headers are sent: report in-band; both SDKs raise on a `data: {"error": ...}` event.
            call.status = 502
            call.error = self._redact.text(f"upstream {upstream.host} broke off its stream: {_describe(exc)}")
            event = error_body(call.provider, 502, call.error, "upstream_failed")
            # The leading newline ends an event the upstream left open, so this one parses alone.
            sandbox_gone = not await _write(out, b"\ndata: " + json.dumps(event).encode() + b"\n\n")
        finally:
            self._take_usage(call, relay)
        if not sandbox_gone:
            try:
                await out.write_eof()
            except ConnectionError:
                sandbox_gone = True
        if sandbox_gone:
            call.error = call.error or "sandbox closed the stream"
        return out, relay if left_early else None

    @staticmethod
    def _take_usage(call: _Call, relay: SseRelay) -> None:
        if call.provider == "claude" and relay.usage_line is not None:
            try:
                first = json.loads(relay.first_usage_line) if relay.first_usage_line else None
                call.usage = claude_stream_usage(first, json.loads(relay.usage_line))
            except ValueError:
                call.usage = None
            return
        if relay.usage_line is not None:
            try:
                call.usage = usage_from(call.provider, json.loads(relay.usage_line))
            except ValueError:
                call.usage = None

    def _start_drain(self, resp: aiohttp.ClientResponse, relay: SseRelay, call: _Call) -> None:
        task = asyncio.get_running_loop().create_task(
            self._drain(resp, relay, call), name=f"gateway-drain-{call.agent}"
        )
        self._drains.add(task)
        task.add_done_callback(self._drains.discard)

    async def _drain(self, resp: aiohttp.ClientResponse, relay: SseRelay, call: _Call) -> None:
        """Read the rest of a stream the sandbox left, for its usage; bounded; then record the call."""
        drained = 0
        try:
            async with asyncio.timeout(self._drain_timeout):
                async for chunk in resp.content.iter_any():
                    drained += len(chunk)
                    call.streamed_bytes += len(chunk)
                    relay.feed(chunk)
                    if drained > self._drain_max_bytes:
                        break
                else:
                    relay.flush()
                    call.stream_open = False
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.info(
                "model_call_drain_stopped run_id=%s agent=%s model=%s reason=%s",
                self.run_id,
                call.agent,
                call.model,
                _describe(exc),
            )
        finally:
            if call.stream_open:
                resp.close()
            else:
                resp.release()
            self._take_usage(call, relay)
            self._finish(call)

    def _local_refusal(self, call: _Call, status: int, message: str, code: str) -> web.Response:
        log.warning(
            "model_call_refused run_id=%s agent=%s provider=%s model=%s status=%d reason=%s",
            self.run_id,
            call.agent,
            call.provider,
            call.model,
            status,
            message,
        )
        return self._refuse(call.provider, status, message, code)

    def _finish(self, call: _Call) -> None:
        if call.usage is None and call.stream_open:
            # A cut stream whose usage never came: charge an estimate rather than nothing.
            call.usage, basis = estimate_usage(call.provider, call.body, call.streamed_bytes)
            call.error = f"{call.error or 'stream cut'}; usage never arrived, charged an estimate: {basis}"
        prompt, completion, cached = call.usage or (0, 0, 0)
        cost = self._pricing.cost(call.provider, call.model, prompt, completion, cached) if call.usage else 0.0
        ok = call.error is None and 0 < call.status < 400
        record = CallRecord(
            agent=call.agent,
            provider=call.provider,
            model=call.model,
            prompt_tokens=prompt,
            completion_tokens=completion,
            cached_tokens=cached,
            latency_s=time.monotonic() - call.t0,
            ttft_s=call.ttft_s,
            cost_usd=cost,
            status=call.status,
            ok=ok,
            error=call.error,
        )
        log.log(
            logging.INFO if ok else logging.WARNING,
            "model_call run_id=%s agent=%s provider=%s model=%s status=%d prompt_tokens=%d completion_tokens=%d "
            "cached_tokens=%d cost_usd=%.6f latency_s=%.3f ttft_s=%s attempts=%d error=%s",
            self.run_id,
            record.agent,
            record.provider,
            record.model,
            record.status,
            prompt,
            completion,
            cached,
            cost,
            record.latency_s,
            "-" if record.ttft_s is None else f"{record.ttft_s:.3f}",
            call.attempts,
            record.error or "-",
        )
        try:
            self._meter.record(record)
        except Exception:  # a broken meter must not turn a served answer into a 500
            log.exception(
                "meter.record failed run_id=%s agent=%s provider=%s model=%s",
                self.run_id,
                call.agent,
                call.provider,
                call.model,
            )

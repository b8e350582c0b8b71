"""The model gateway: sandboxes call models over a per-run unix socket; the host adds the key and meters.

Routes (all under the socket's ``http://massgen-gateway`` origin):

- ``POST /openai/v1/chat/completions`` and ``POST /openai/v1/responses``: forwarded to the
  OpenAI(-compatible) upstream. Streaming chat requests get ``stream_options.include_usage``
  forced on so every call is metered.
- ``GET /openai/v1/models``: this run's allowed models only, never the key holder's list.
- ``POST /gemini/{v1,v1beta,...}/models/{model}:generateContent`` and ``:streamGenerateContent``
  (google-genai 3.x calls ``v1`` by default; ``v1beta`` when asked).

The sandbox's own credentials (``Authorization``, ``x-goog-api-key``, ``?key=``) are dropped and
the real key added (``Authorization: Bearer`` for OpenAI, ``x-goog-api-key`` for Gemini). Keys
never reach the sandbox: every upstream body, streamed chunk and header sent back has them
replaced by ``[redacted]``, and request headers are never echoed or logged. ``X-Massgen-Agent``
(untrusted) only labels telemetry.

With ``allowed_models`` given, a sandbox may call only the models listed for each provider, and
no model of a provider the mapping leaves out (403 ``model_not_allowed``).

A stream the sandbox abandons is still metered: the gateway keeps reading (draining) it in the
background, bounded by ``drain_timeout_s`` and ``drain_max_bytes``, for the usage the upstream
sends last. When none arrives, the call is charged an estimate (see `estimate_usage`) and its
record's ``error`` says so. ``aclose()`` cancels pending drains (recording their estimates).

Upstream connect errors, timeouts, 408, 429 and 5xx are retried ``max_retries`` times with
exponential backoff capped at 4 s, honouring ``Retry-After`` (capped too); then the sandbox gets
a 502 in the provider's error format naming the upstream host. Errors the gateway makes carry
``x-should-retry: false`` (the OpenAI SDK honours it) so retries do not multiply.

Environment (``upstreams_from_env``): ``OPENAI_API_KEY``, ``OPENAI_BASE_URL`` (default
``https://api.openai.com/v1``); ``GOOGLE_API_KEY`` or ``GEMINI_API_KEY`` (google-genai's order:
``GOOGLE_API_KEY`` wins), ``GOOGLE_GEMINI_BASE_URL`` (the variable google-genai itself reads;
default ``https://generativelanguage.googleapis.com``); ``MASSGEN_KEYS_FILE``: a JSON (or
JSON-compatible YAML) mapping ``provider -> {api_key, base_url?}`` whose entries win over the
variables. HTTP(S)_PROXY / NO_PROXY are honoured for upstream connections.
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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, urlsplit

import aiohttp
from aiohttp import web

from .pricing import DataFileError, Pricing, read_data_file

log = logging.getLogger(__name__)

PROVIDERS = ("openai", "gemini")
DEFAULT_OPENAI_BASE_URL = "https://api.openai.com/v1"
DEFAULT_GEMINI_BASE_URL = "https://generativelanguage.googleapis.com"
AGENT_HEADER = "X-Massgen-Agent"
MAX_REQUEST_BYTES = 32 << 20
MAX_RESPONSE_BYTES = 64 << 20
REDACTED = "[redacted]"
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
_GEMINI_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    413: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    502: "UNAVAILABLE",
}


# -- upstreams and keys -----------------------------------------------------------------------


@dataclass(frozen=True)
class Upstream:
    """Where one provider's calls go, and the key they carry (never in repr)."""

    provider: str
    base_url: str
    api_key: str = field(repr=False)

    @property
    def host(self) -> str:
        """host[:port] for messages; never the URL's userinfo, which may hold a credential."""
        parts = urlsplit(self.base_url)
        if not parts.hostname:
            return "(bad base_url)"
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        return f"{host}:{parts.port}" if parts.port else host


def _env_base_url(provider: str, env: Mapping[str, str]) -> str:
    if provider == "openai":
        return (env.get("OPENAI_BASE_URL") or "").strip() or DEFAULT_OPENAI_BASE_URL
    return (env.get("GOOGLE_GEMINI_BASE_URL") or "").strip() or DEFAULT_GEMINI_BASE_URL


def upstreams_from_env(env: Mapping[str, str] = os.environ) -> dict[str, Upstream]:
    """The upstreams the host has keys for; a provider without a key is absent.

    Raises:
        DataFileError: ``MASSGEN_KEYS_FILE`` is unreadable or malformed (the message never
            carries a key).
    """
    out: dict[str, Upstream] = {}
    openai_key = (env.get("OPENAI_API_KEY") or "").strip()
    if openai_key:
        out["openai"] = Upstream("openai", _env_base_url("openai", env), openai_key)
    gemini_key = (env.get("GOOGLE_API_KEY") or "").strip() or (env.get("GEMINI_API_KEY") or "").strip()
    if gemini_key:
        out["gemini"] = Upstream("gemini", _env_base_url("gemini", env), gemini_key)
    keys_file = (env.get("MASSGEN_KEYS_FILE") or "").strip()
    if keys_file:
        data = read_data_file(keys_file)
        if not isinstance(data, dict):
            raise DataFileError(keys_file, "want a mapping provider -> {api_key, base_url}")
        for provider, entry in data.items():
            if provider not in PROVIDERS:
                raise DataFileError(keys_file, f"key={provider}: unknown provider (want one of {', '.join(PROVIDERS)})")
            if not isinstance(entry, dict) or not isinstance(entry.get("api_key"), str) or not entry["api_key"].strip():
                raise DataFileError(keys_file, f"key={provider}: want {{api_key: str, base_url: str (optional)}}")
            unknown = entry.keys() - {"api_key", "base_url"}
            if unknown:
                raise DataFileError(keys_file, f"key={provider}: unknown key {sorted(unknown)[0]}")
            base = entry.get("base_url") or _env_base_url(provider, env)
            if not isinstance(base, str) or not base.startswith(("http://", "https://")):
                raise DataFileError(keys_file, f"key={provider}.base_url: want an http(s) URL")
            out[provider] = Upstream(provider, base, entry["api_key"].strip())
    return out


def missing_key_message(provider: str) -> str:
    """Why a provider cannot be called, naming the host variables that would fix it."""
    names = "GEMINI_API_KEY or GOOGLE_API_KEY" if provider == "gemini" else "OPENAI_API_KEY"
    if provider not in PROVIDERS:
        return f"unknown provider={provider}: the model gateway serves {', '.join(PROVIDERS)}"
    return f"no API key for provider={provider} on the host: set {names} (or a '{provider}' entry in MASSGEN_KEYS_FILE)"


# -- metering ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CallRecord:
    """One model call as the host saw it (retries included in its latency)."""

    agent: str
    provider: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    latency_s: float
    ttft_s: float | None
    cost_usd: float
    status: int
    ok: bool
    error: str | None


class SpentCall(Protocol):
    """What totals are made of: a `CallRecord`, or a past call read back (e.g. a telemetry line)."""

    @property
    def agent(self) -> str: ...

    @property
    def provider(self) -> str: ...

    @property
    def model(self) -> str: ...

    @property
    def prompt_tokens(self) -> int: ...

    @property
    def completion_tokens(self) -> int: ...

    @property
    def cached_tokens(self) -> int: ...

    @property
    def cost_usd(self) -> float: ...

    @property
    def ok(self) -> bool: ...


class Meter(Protocol):
    """Where the gateway reports calls and asks whether the budget still allows one."""

    def record(self, call: CallRecord) -> None: ...

    def budget_error(self) -> str | None: ...

    def on_budget_exceeded(self, message: str) -> None: ...


@dataclass
class Totals:
    """Sums over calls. `tokens` = prompt + completion (cached tokens are part of the prompt)."""

    calls: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cost_usd: float = 0.0

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, call: SpentCall) -> None:
        self.calls += 1
        self.failed += 0 if call.ok else 1
        self.prompt_tokens += call.prompt_tokens
        self.completion_tokens += call.completion_tokens
        self.cached_tokens += call.cached_tokens
        self.cost_usd += call.cost_usd


class BudgetMeter:
    """In-memory totals (overall, per agent, per provider/model) and limits.

    A call is allowed while every total is below its limit, so a run spends at most the limit
    plus one call per agent calling concurrently. `on_exceeded` fires once, on the first refusal.
    """

    def __init__(
        self,
        max_tokens: int | None = None,
        max_cost_usd: float | None = None,
        max_calls: int | None = None,
        on_record: Callable[[CallRecord], None] | None = None,
        on_exceeded: Callable[[str], None] | None = None,
    ) -> None:
        self.max_tokens = max_tokens
        self.max_cost_usd = max_cost_usd
        self.max_calls = max_calls
        self._on_record = on_record
        self._on_exceeded = on_exceeded
        self.total = Totals()
        self.by_agent: dict[str, Totals] = {}
        self.by_model: dict[tuple[str, str], Totals] = {}
        self.exceeded: str | None = None

    def record(self, call: CallRecord) -> None:
        self.total.add(call)
        self.by_agent.setdefault(call.agent, Totals()).add(call)
        self.by_model.setdefault((call.provider, call.model), Totals()).add(call)
        if self._on_record is not None:
            self._on_record(call)

    def seed(self, calls: Iterable[SpentCall]) -> int:
        """Count calls spent before (by an earlier supervisor) into the totals; returns how many.

        Unlike `record`, `on_record` does not fire: the calls are already in the run's telemetry.
        Limits apply to the seeded totals from the next `budget_error` on.
        """
        n = 0
        for call in calls:
            self.total.add(call)
            self.by_agent.setdefault(call.agent, Totals()).add(call)
            self.by_model.setdefault((call.provider, call.model), Totals()).add(call)
            n += 1
        return n

    def budget_error(self) -> str | None:
        t = self.total
        if self.max_tokens is not None and t.tokens >= self.max_tokens:
            return f"budget_exceeded: tokens={t.tokens} reached max_tokens={self.max_tokens}"
        if self.max_cost_usd is not None and t.cost_usd >= self.max_cost_usd:
            return f"budget_exceeded: cost_usd={t.cost_usd:.6f} reached max_cost_usd={self.max_cost_usd:g}"
        if self.max_calls is not None and t.calls >= self.max_calls:
            return f"budget_exceeded: calls={t.calls} reached max_calls={self.max_calls}"
        return None

    def on_budget_exceeded(self, message: str) -> None:
        if self.exceeded is not None:
            return
        self.exceeded = message
        if self._on_exceeded is not None:
            self._on_exceeded(message)


@dataclass(frozen=True)
class SeededCall:
    """A past call read back from telemetry (a `SpentCall`)."""

    agent: str
    provider: str
    model: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cost_usd: float = 0.0
    ok: bool = True


def _count(obj: dict[str, Any], name: str) -> int | None:
    value = obj.get(name, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def _seeded_call(line: bytes) -> SeededCall | None:
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    if not isinstance(obj, dict) or obj.get("type", "model_call") != "model_call":
        return None
    agent, provider, model = obj.get("agent"), obj.get("provider"), obj.get("model")
    if not (isinstance(agent, str) and isinstance(provider, str) and isinstance(model, str)):
        return None
    tokens = [_count(obj, k) for k in ("prompt_tokens", "completion_tokens", "cached_tokens")]
    cost, ok = obj.get("cost_usd", 0.0), obj.get("ok", True)
    if isinstance(cost, bool) or not isinstance(cost, int | float) or not 0 <= cost < float("inf"):
        return None
    if not isinstance(ok, bool) or any(t is None for t in tokens):
        return None
    prompt, completion, cached = (t or 0 for t in tokens)
    return SeededCall(agent, provider, model, prompt, completion, cached, float(cost), ok)


def seed_from_telemetry(meter: BudgetMeter, path: Path) -> int:
    """Seed `meter` with the calls in a run's telemetry.jsonl (``ModelCall`` JSON lines).

    Lines that are not such a call (bad JSON, another event type, negative counts) are skipped;
    a missing file seeds nothing. Returns the number of calls seeded.
    """
    try:
        with open(path, "rb") as fh:
            calls = [c for c in map(_seeded_call, fh) if c is not None]
    except FileNotFoundError:
        return 0
    return meter.seed(calls)


# -- wire helpers -----------------------------------------------------------------------------


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def usage_from(provider: str, obj: Any) -> tuple[int, int, int] | None:
    """(prompt, completion, cached) from a response body or one SSE event, if it has usage.

    OpenAI Chat (``usage.prompt_tokens``...), Responses (``usage.input_tokens`` or, in events,
    ``response.usage``) and Gemini (``usageMetadata``; thinking and tool-use prompt tokens are
    billed, so they count as completion and prompt tokens).
    """
    if isinstance(obj, list):  # Gemini streamGenerateContent without alt=sse: a JSON array
        found = [u for u in (usage_from(provider, o) for o in obj) if u is not None]
        return found[-1] if found else None
    if not isinstance(obj, dict):
        return None
    if provider == "gemini":
        u = obj.get("usageMetadata")
        if not isinstance(u, dict):
            return None
        prompt = _int(u.get("promptTokenCount")) + _int(u.get("toolUsePromptTokenCount"))
        completion = _int(u.get("candidatesTokenCount")) + _int(u.get("thoughtsTokenCount"))
        return prompt, completion, _int(u.get("cachedContentTokenCount"))
    u = obj.get("usage")
    if not isinstance(u, dict) and isinstance(obj.get("response"), dict):
        u = obj["response"].get("usage")
    if not isinstance(u, dict):
        return None
    if "input_tokens" in u or "output_tokens" in u:
        details = u.get("input_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, dict) else 0
        return _int(u.get("input_tokens")), _int(u.get("output_tokens")), _int(cached)
    details = u.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else 0
    return _int(u.get("prompt_tokens")), _int(u.get("completion_tokens")), _int(cached)


def max_output_tokens(provider: str, body: bytes) -> int | None:
    """The request's own cap on generated tokens, if it sets one.

    OpenAI: ``max_completion_tokens``, ``max_tokens`` (Chat) or ``max_output_tokens`` (Responses);
    Gemini: ``generationConfig.maxOutputTokens``.
    """
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    if provider == "gemini":
        cfg = obj.get("generationConfig", obj.get("generation_config"))
        values = [cfg.get("maxOutputTokens"), cfg.get("max_output_tokens")] if isinstance(cfg, dict) else []
    else:
        values = [obj.get(k) for k in ("max_completion_tokens", "max_tokens", "max_output_tokens")]
    caps = [_int(v) for v in values if _int(v)]
    return max(caps) if caps else None


def estimate_usage(provider: str, body: bytes, streamed_bytes: int) -> tuple[tuple[int, int, int], str]:
    """(prompt, completion, cached) to charge for a cut stream whose usage never arrived, and how.

    Prompt: request bytes / 4. Completion: the request's output cap (`max_output_tokens`) when it
    sets one, else the bytes streamed from the upstream / 4 (SSE framing included: an overestimate).
    """
    prompt = len(body) // 4
    cap = max_output_tokens(provider, body)
    if cap is not None:
        return (prompt, cap, 0), f"prompt=request_bytes/4={prompt} completion=request max output tokens={cap}"
    completion = streamed_bytes // 4
    return (prompt, completion, 0), f"prompt=request_bytes/4={prompt} completion=streamed_bytes/4={completion}"


def error_body(provider: str, status: int, message: str, code: str) -> dict[str, Any]:
    """An error in the provider's own JSON shape, so the sandbox's SDK raises its usual error."""
    if provider == "gemini":
        return {"error": {"code": status, "message": message, "status": _GEMINI_STATUS.get(status, "UNKNOWN")}}
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _error_message(body: bytes) -> str:
    try:
        obj = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace")
    err = obj.get("error") if isinstance(obj, dict) else None
    if isinstance(err, dict) and isinstance(err.get("message"), str):
        return err["message"]
    return body.decode("utf-8", "replace")


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


class _Redactor:
    """Replaces every known key (raw and URL-quoted) in text and bytes."""

    def __init__(self, secrets: list[str]) -> None:
        forms = {s for k in secrets if len(k) >= 4 for s in (k, quote(k, safe=""))}
        self._text = sorted(forms, key=len, reverse=True)
        self._bytes = [s.encode() for s in self._text]

    def text(self, value: str) -> str:
        for s in self._text:
            if s in value:
                value = value.replace(s, REDACTED)
        return value

    def data(self, value: bytes) -> bytes:
        for s in self._bytes:
            if s in value:
                value = value.replace(s, REDACTED.encode())
        return value


class _SseRelay:
    """Cuts a byte stream at line ends (a key never straddles two writes) and keeps the last usage event."""

    def __init__(self, marker: bytes, redact: _Redactor) -> None:
        self._marker = marker
        self._redact = redact
        self._pending = b""
        self.usage_line: bytes | None = None

    def feed(self, chunk: bytes) -> bytes:
        end = chunk.rfind(b"\n")
        if end < 0:
            self._pending += chunk
            return b""
        out = self._pending + chunk[: end + 1] if self._pending else chunk[: end + 1]
        self._pending = chunk[end + 1 :]
        self._scan(out)
        return self._redact.data(out)

    def flush(self) -> bytes:
        out, self._pending = self._pending, b""
        self._scan(out)
        return self._redact.data(out)

    def _scan(self, data: bytes) -> None:
        if self._marker not in data:
            return
        for line in reversed(data.split(b"\n")):
            if line.startswith(b"data:") and self._marker in line:
                self.usage_line = line[5:]
                return


# -- the gateway ------------------------------------------------------------------------------


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
        timeout_s: float = 120,
        max_retries: int = 3,
        connect_timeout_s: float = 5,
        retry_base_s: float = RETRY_BASE_S,
        max_retry_wait_s: float = MAX_RETRY_WAIT_S,
        drain_timeout_s: float = DRAIN_TIMEOUT_S,
        drain_max_bytes: int = DRAIN_MAX_BYTES,
    ) -> None:
        """Set up; the client session is made on first use, inside the serving loop.

        Args:
            allowed_models: per provider, the only models a sandbox may call; a provider left out
                allows none. None: any model of any provider.
            timeout_s: the longest wait for the upstream's next byte (not for the whole answer:
                long generations stream for minutes).
            max_retries: retries after a connect error, timeout, 408, 429 or 5xx.
            connect_timeout_s: the longest wait for a TCP connection to the upstream.
            retry_base_s: first backoff; doubles per retry, capped at `max_retry_wait_s`.
            max_retry_wait_s: the longest single wait, also for a server's ``Retry-After``.
            drain_timeout_s: how long to keep reading a stream the sandbox left, for its usage.
            drain_max_bytes: how much of such a stream to read at most.
        """
        self._upstreams = dict(upstreams)
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
        self._redact = _Redactor([u.api_key for u in self._upstreams.values()])
        self._session: aiohttp.ClientSession | None = None
        self._drain_timeout = drain_timeout_s
        self._drain_max_bytes = drain_max_bytes
        self._drains: set[asyncio.Task[None]] = set()
        self._closing = False

    # -- wiring --------------------------------------------------------------------------------

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/openai/v1/chat/completions", self._openai),
            web.post("/openai/v1/responses", self._openai),
            web.get("/openai/v1/models", self._openai_models),
            # One segment holds "{model}:{action}"; split by hand (a model has no colon).
            web.post(r"/gemini/{version:v1[a-z0-9]*}/models/{target}", self._gemini),
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
        endpoint = request.path.removeprefix("/openai/v1")
        if obj.get("stream") is True and endpoint == "/chat/completions":
            opts = obj.get("stream_options")
            if not (isinstance(opts, dict) and opts.get("include_usage") is True):
                obj["stream_options"] = {**(opts if isinstance(opts, dict) else {}), "include_usage": True}
                body = json.dumps(obj).encode()
        return await self._forward(request, "openai", obj["model"], endpoint, {}, body)

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
        self, request: web.Request, provider: str, model: str, path: str, query: dict[str, str], body: bytes
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
        upstream = self._upstreams.get(provider)
        if upstream is None:
            return self._local_refusal(call, 401, missing_key_message(provider), "no_api_key")
        budget = self._meter.budget_error()
        if budget is not None:
            self._meter.on_budget_exceeded(budget)
            return self._local_refusal(call, 403, budget, "budget_exceeded")

        headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP_REQUEST}
        if provider == "openai":
            headers["Authorization"] = f"Bearer {upstream.api_key}"
        else:
            headers["x-goog-api-key"] = upstream.api_key
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
            delay = min(self._max_wait, self._retry_base * 2 ** (call.attempts - 1)) * random.uniform(0.8, 1.0)
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
                    detail = _error_message(await _read_limited(resp, 64 << 10))
                except (aiohttp.ClientError, TimeoutError) as exc:
                    detail = _describe(exc)
                finally:
                    resp.release()
                call.status = resp.status
                call.error = self._redact.text(f"HTTP {resp.status} from {upstream.host}: {_one_line(detail)}")
                asked = retry_after_s(resp.headers)
                if asked is not None:
                    delay = min(self._max_wait, asked)
            if call.attempts > self._max_retries:
                call.status = 502
                return None
            log.info(
                "model_call_retry agent=%s provider=%s model=%s attempt=%d wait_s=%.2f error=%s",
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
            detail = _one_line(_error_message(data))
            call.error = self._redact.text(f"HTTP {resp.status} from {upstream.host}: {detail}")
        return web.Response(body=data, status=resp.status, headers=self._response_headers(resp))

    async def _relay_stream(
        self, request: web.Request, resp: aiohttp.ClientResponse, call: _Call, upstream: Upstream
    ) -> tuple[web.StreamResponse, _SseRelay | None]:
        """Relay an SSE answer; the relay comes back too when the sandbox left before its end (to drain)."""
        out = web.StreamResponse(status=resp.status, headers=self._response_headers(resp))
        call.stream_open = True
        await out.prepare(request)
        marker = b'"usageMetadata"' if call.provider == "gemini" else b'"usage"'
        relay = _SseRelay(marker, self._redact)
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
    def _take_usage(call: _Call, relay: _SseRelay) -> None:
        if relay.usage_line is not None:
            try:
                call.usage = usage_from(call.provider, json.loads(relay.usage_line))
            except ValueError:
                call.usage = None

    def _start_drain(self, resp: aiohttp.ClientResponse, relay: _SseRelay, call: _Call) -> None:
        task = asyncio.get_running_loop().create_task(
            self._drain(resp, relay, call), name=f"gateway-drain-{call.agent}"
        )
        self._drains.add(task)
        task.add_done_callback(self._drains.discard)

    async def _drain(self, resp: aiohttp.ClientResponse, relay: _SseRelay, call: _Call) -> None:
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
            log.info("model_call_drain_stopped agent=%s model=%s reason=%s", call.agent, call.model, _describe(exc))
        finally:
            if call.stream_open:
                resp.close()
            else:
                resp.release()
            self._take_usage(call, relay)
            self._finish(call)

    def _local_refusal(self, call: _Call, status: int, message: str, code: str) -> web.Response:
        log.warning(
            "model_call_refused agent=%s provider=%s model=%s status=%d reason=%s",
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
            "model_call agent=%s provider=%s model=%s status=%d prompt_tokens=%d completion_tokens=%d "
            "cached_tokens=%d cost_usd=%.6f latency_s=%.3f ttft_s=%s attempts=%d error=%s",
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
        except Exception:  # noqa: BLE001  # a broken meter must not turn a served answer into a 500
            log.exception("meter.record failed agent=%s provider=%s model=%s", call.agent, call.provider, call.model)

"""Gemini backend over google-genai's async generate_content(_stream), with function declarations.

Environment (read when a backend is built):

- ``GOOGLE_API_KEY`` or ``GEMINI_API_KEY``: the key, unless one is passed to the constructor
  (the same order as the SDK: ``GOOGLE_API_KEY`` wins when both are set).
- ``GOOGLE_GEMINI_BASE_URL``: upstream, when neither ``backend.base_url`` nor the constructor
  gives one. The SDK reads this variable too; we resolve it ourselves so errors can name the host.
  Default ``https://generativelanguage.googleapis.com/``; the SDK appends its API version.
- ``MASSGEN_MODEL_SOCKET``: path of the model gateway's unix socket. When set, every request goes
  to ``http://massgen-gateway/gemini`` over that socket with the placeholder key ``sandbox``;
  the host gateway adds the real key and picks the upstream; ``X-Massgen-Agent`` names the agent
  for the gateway's per-agent telemetry.
- ``MASSGEN_MODEL_TIMEOUT``: seconds one HTTP attempt may wait for the next byte (default 120).
- ``MASSGEN_MODEL_MAX_RETRIES``: retries after 408/429/5xx or a dropped connection (default 3).
  Waits honour ``Retry-After`` or the error's ``RetryInfo``; a wait above 60 s fails at once.
  An answer carrying ``x-should-retry: false`` (the gateway's own errors, after its retries) is
  not retried.

The SDK's own retries are off (its backoff ignores ``Retry-After``); this module retries.
``google.genai`` is imported only when a backend is built: importing this module is cheap.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import hashlib
import json
import logging
import os
import random
import time
from collections import OrderedDict
from typing import Any

from ..protocol.config import BackendConfig
from ._http import AGENT_HEADER, env_number, gateway_transport, redact, upstream_label
from .base import BackendError, Completion, Message, ToolCall, ToolSpec, Usage

log = logging.getLogger(__name__)

PROVIDER = "gemini"
GATEWAY_BASE_URL = "http://massgen-gateway/gemini"
GATEWAY_KEY = "sandbox"
DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com/"
DEFAULT_TIMEOUT_S = 120.0
DEFAULT_MAX_RETRIES = 3
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
SYNTHETIC_ID_PREFIX = "gcall_"
# Gemini 3 rejects a history whose function calls lack their thought signature. For calls this
# backend never produced (foreign or rebuilt history) Google documents this value as "skip
# validation"; it is base64url text, so the bytes below encode back to exactly that string.
SKIP_SIGNATURE = base64.urlsafe_b64decode("skip_thought_signature_validator")
_SIGNATURE_CACHE_SIZE = 4096


def synthetic_id(position: int, index: int, name: str, args: dict[str, Any]) -> str:
    """A stable id for a call Gemini gave none: same conversation position and call, same id."""
    key = f"{position}:{index}:{name}:{json.dumps(args, sort_keys=True, default=str)}"
    return SYNTHETIC_ID_PREFIX + hashlib.sha1(key.encode(), usedforsecurity=False).hexdigest()[:16]


def retry_after_s(exc: Any) -> float | None:
    """Seconds the server asked us to wait: the Retry-After header, else the RetryInfo detail."""
    headers = getattr(getattr(exc, "response", None), "headers", None)
    value = headers.get("retry-after") if headers is not None else None
    if value:
        try:
            return max(0.0, float(value))
        except ValueError:
            parsed = email.utils.parsedate_tz(value)
            if parsed is not None:
                return max(0.0, email.utils.mktime_tz(parsed) - time.time())
    body = getattr(exc, "details", None)
    error = body.get("error", body) if isinstance(body, dict) else None
    entries = error.get("details") if isinstance(error, dict) else None
    for d in entries if isinstance(entries, list) else []:
        delay = d.get("retryDelay") if isinstance(d, dict) else None
        if isinstance(delay, str) and delay.endswith("s"):
            try:
                return max(0.0, float(delay[:-1]))
            except ValueError:
                continue
    return None


def _told_not_to_retry(exc: Any) -> bool:
    """The server said ``x-should-retry: false`` (the model gateway, which has retried already)."""
    headers = getattr(getattr(exc, "response", None), "headers", None)
    return headers is not None and str(headers.get("x-should-retry", "")).lower() == "false"


class GeminiBackend:
    """A `Backend` over the Gemini API (Developer API routes) with function calling."""

    provider = PROVIDER

    def __init__(
        self,
        cfg: BackendConfig,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        http_client: Any = None,
        timeout: float | None = None,
        max_retries: int | None = None,
        retry_base_delay: float = 1.0,
        max_retry_wait: float = 60.0,
        agent_id: str | None = None,
    ) -> None:
        """Build the SDK client (importing the SDK).

        Args:
            http_client: an ``httpx2.AsyncClient`` to send through (tests, custom transports).
            timeout: seconds per HTTP attempt; default ``MASSGEN_MODEL_TIMEOUT`` or 120.
            max_retries: retries after a retryable failure; default
                ``MASSGEN_MODEL_MAX_RETRIES`` or 3.
            retry_base_delay: first backoff when the server names no wait; doubles, jittered.
            max_retry_wait: the longest single wait; a server asking for more fails the call.
            agent_id: sent to the model gateway so its telemetry is per agent.

        Raises:
            BackendError: no API key, or the SDK refused the settings.
        """
        import httpx2
        from google import genai
        from google.genai import types

        if not cfg.model:
            raise BackendError(PROVIDER, "backend.model is required")
        self.model = cfg.model
        self._cfg = cfg
        self._types = types
        if timeout is None:
            timeout = env_number("MASSGEN_MODEL_TIMEOUT", DEFAULT_TIMEOUT_S)
        self._timeout = timeout
        if max_retries is None:
            max_retries = int(env_number("MASSGEN_MODEL_MAX_RETRIES", DEFAULT_MAX_RETRIES))
        self._max_retries = max_retries
        self._retry_base = retry_base_delay
        self._max_wait = max_retry_wait
        self._socket = os.environ.get("MASSGEN_MODEL_SOCKET") or None
        # A caller's http client stays the caller's to close.
        self._owns_http = http_client is None
        env_keys = (os.environ.get("GOOGLE_API_KEY"), os.environ.get("GEMINI_API_KEY"))
        headers: dict[str, str] | None = None
        if self._socket:
            headers = {AGENT_HEADER: agent_id} if agent_id else None
            url = GATEWAY_BASE_URL
            key: str | None = api_key or GATEWAY_KEY
            transport = gateway_transport(self._socket)
        else:
            url = cfg.base_url or base_url or os.environ.get("GOOGLE_GEMINI_BASE_URL") or DEFAULT_BASE_URL
            key = api_key or env_keys[0] or env_keys[1]
            transport = None
        self._secrets = (api_key, *env_keys)
        self.base_url = url
        self._upstream = upstream_label(url, self._socket)
        if not key:
            raise BackendError(PROVIDER, "no API key: set GEMINI_API_KEY or GOOGLE_API_KEY")
        if http_client is None:
            # Always our own httpx client: otherwise the SDK may pick aiohttp, whose connection
            # errors it retries by itself for up to ten seconds.
            http_client = httpx2.AsyncClient(transport=transport)
        self._http = http_client
        options = types.HttpOptions(
            base_url=url,
            headers=headers,
            timeout=max(1, int(self._timeout * 1000)),
            httpx_async_client=http_client,
        )
        try:
            self._client = genai.Client(api_key=key, vertexai=False, http_options=options)
        except (ValueError, TypeError) as exc:
            msg = f"cannot set up client for {self._upstream}: {exc}"
            raise BackendError(PROVIDER, self._safe(msg)) from exc
        # call id -> thought signature (None: the model gave none), for replaying history.
        self._signatures: OrderedDict[str, bytes | None] = OrderedDict()

    def _safe(self, text: str) -> str:
        return redact(text, *self._secrets)

    async def aclose(self) -> None:
        await self._client.aio.aclose()
        self._client.close()
        if self._owns_http:
            await self._http.aclose()

    # -- translation -------------------------------------------------------------------------

    def _remember(self, call_id: str, signature: bytes | None) -> None:
        self._signatures[call_id] = signature
        self._signatures.move_to_end(call_id)
        while len(self._signatures) > _SIGNATURE_CACHE_SIZE:
            self._signatures.popitem(last=False)

    def _contents(self, messages: list[Message]) -> tuple[list[Any], str | None]:
        """Neutral messages as Gemini contents plus the system instruction.

        Leading system messages become the system instruction; a later one becomes a user turn
        (Gemini has no system role mid-conversation). Adjacent turns of one role are merged,
        since Gemini wants user and model turns to alternate.
        """
        types = self._types
        system: list[str] = []
        contents: list[Any] = []
        names: dict[str, str] = {}
        leading = True
        for m in messages:
            if m.role == "system" and leading:
                if m.content:
                    system.append(m.content)
                continue
            leading = False
            parts: list[Any] = []
            if m.role == "assistant":
                role = "model"
                if m.content:
                    parts.append(types.Part(text=m.content))
                for j, tc in enumerate(m.tool_calls):
                    names[tc.id] = tc.name
                    synthetic = tc.id.startswith(SYNTHETIC_ID_PREFIX)
                    call = types.FunctionCall(name=tc.name, args=dict(tc.arguments), id=None if synthetic else tc.id)
                    if tc.id in self._signatures:
                        signature = self._signatures[tc.id]
                    else:
                        signature = SKIP_SIGNATURE if j == 0 else None
                    parts.append(types.Part(function_call=call, thought_signature=signature))
            elif m.role == "tool":
                role = "user"
                call_id = m.tool_call_id or ""
                name = m.name or names.get(call_id) or "unknown"
                key = "error" if m.content.startswith("ERROR") else "output"
                response = types.FunctionResponse(
                    name=name,
                    id=call_id if call_id and not call_id.startswith(SYNTHETIC_ID_PREFIX) else None,
                    response={key: m.content},
                )
                parts.append(types.Part(function_response=response))
            else:  # user, or a system message after the conversation started
                role = "user"
                if m.content:
                    parts.append(types.Part(text=m.content))
            if not parts:
                continue
            if contents and contents[-1].role == role:
                contents[-1].parts.extend(parts)
            else:
                contents.append(types.Content(role=role, parts=parts))
        return contents, "\n\n".join(system) or None

    def _config(self, tools: list[ToolSpec], system: str | None) -> Any:
        types = self._types
        declared = None
        if tools:
            decls = [
                types.FunctionDeclaration(name=t.name, description=t.description, parameters_json_schema=t.parameters)
                for t in tools
            ]
            declared = [types.Tool(function_declarations=decls)]
        if self._cfg.enable_web_search:
            # Provider-side search: Google runs it, so the sandbox needs no network.
            declared = [*(declared or []), types.Tool(google_search=types.GoogleSearch())]
        return types.GenerateContentConfig(
            system_instruction=system,
            tools=declared,
            automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True),
            temperature=self._cfg.temperature,
            top_p=self._cfg.top_p,
            top_k=self._cfg.top_k,
            max_output_tokens=self._cfg.max_tokens,
        )

    # -- the call ----------------------------------------------------------------------------

    async def complete(self, messages: list[Message], tools: list[ToolSpec]) -> Completion:
        """Run one generate_content call, retrying 408/429/5xx and dropped connections.

        Raises:
            BackendError: the upstream failed after bounded retries, or answered garbage.
        """
        t0 = time.monotonic()
        contents, system = self._contents(messages)
        config = self._config(tools, system)
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self._call(contents, config, t0, len(messages))
            except BackendError:
                raise
            except Exception as exc:  # every SDK/transport failure is translated here
                wait = self._retry_wait(exc, attempt)
                if wait is None:
                    raise self._translate(exc, attempt) from exc
                log.info(
                    "gemini retry upstream=%s attempt=%d wait_s=%.2f error=%s",
                    self._upstream,
                    attempt,
                    wait,
                    self._safe(f"{type(exc).__name__}: {exc}"),
                )
                await asyncio.sleep(wait)

    async def _call(self, contents: list[Any], config: Any, t0: float, position: int) -> Completion:
        models = self._client.aio.models
        state = _Reply()
        if self._cfg.stream:
            stream = await models.generate_content_stream(model=self.model, contents=contents, config=config)
            async for chunk in stream:
                state.add(chunk, t0)
        else:
            state.add(
                await models.generate_content(model=self.model, contents=contents, config=config),
                t0,
            )
        calls: list[ToolCall] = []
        for i, (fc, signature) in enumerate(state.calls):
            args = dict(fc.args or {})
            name = fc.name or ""
            call_id = fc.id or synthetic_id(position, i, name, args)
            self._remember(call_id, signature)
            calls.append(ToolCall(call_id, name, args))
        text = "".join(state.text)
        if not text and not calls:
            log.warning(
                "gemini empty reply upstream=%s finish=%s blocked=%s",
                self._upstream,
                state.finish,
                state.blocked,
            )
        return Completion(
            message=Message(role="assistant", content=text, tool_calls=tuple(calls)),
            usage=state.usage(),
            model=state.model or self.model,
            latency_s=time.monotonic() - t0,
            ttft_s=state.ttft if self._cfg.stream else None,
        )

    def _retry_wait(self, exc: Exception, attempt: int) -> float | None:
        """Seconds to wait before the next attempt, or None to give up now."""
        import httpx2
        from google.genai import errors

        if attempt > self._max_retries:
            return None
        if isinstance(exc, errors.APIError):
            if exc.code not in RETRY_STATUSES or _told_not_to_retry(exc):
                return None
            asked = retry_after_s(exc)
            if asked is not None:
                return asked if asked <= self._max_wait else None
        elif not isinstance(exc, httpx2.ReadError | httpx2.RemoteProtocolError):
            # Refused connections and timeouts fail at once: retrying them rarely helps and
            # keeps a dead upstream from holding the run.
            return None
        backoff = self._retry_base * (2 ** (attempt - 1))
        wait: float = min(self._max_wait, backoff * (0.75 + 0.25 * random.random()))  # noqa: S311 - jitter, not a secret
        return wait

    def _translate(self, exc: Exception, attempt: int) -> BackendError:
        import httpx2
        from google.genai import errors

        tries = f" after {attempt} attempts" if attempt > 1 else ""
        if isinstance(exc, errors.APIError):
            detail = exc.message or exc.status or str(exc)
            msg = f"HTTP {exc.code} from {self._upstream}{tries}: {detail}"
            return BackendError(PROVIDER, self._safe(msg), status=exc.code or None)
        if isinstance(exc, httpx2.TimeoutException):
            msg = f"timed out after {self._timeout:g}s waiting for {self._upstream}{tries}"
            return BackendError(PROVIDER, self._safe(msg))
        if isinstance(exc, httpx2.TransportError):
            msg = f"cannot reach {self._upstream}{tries}: {type(exc).__name__}: {exc}"
            return BackendError(PROVIDER, self._safe(msg))
        msg = f"bad answer from {self._upstream}: {type(exc).__name__}: {exc}"
        return BackendError(PROVIDER, self._safe(msg))


class _Reply:
    """A reply being assembled from one response or many stream chunks."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.calls: list[tuple[Any, bytes | None]] = []
        self.meta: Any = None
        self.model = ""
        self.finish: str | None = None
        self.blocked: str | None = None
        self.ttft: float | None = None

    def add(self, resp: Any, t0: float) -> None:
        # Every chunk repeats the running usage; the last one holds the totals.
        if resp.usage_metadata is not None:
            self.meta = resp.usage_metadata
        self.model = resp.model_version or self.model
        feedback = resp.prompt_feedback
        if feedback is not None and feedback.block_reason is not None:
            self.blocked = str(feedback.block_reason)
        if not resp.candidates:
            return
        cand = resp.candidates[0]
        if cand.finish_reason is not None:
            self.finish = str(cand.finish_reason)
        parts = cand.content.parts if cand.content is not None else None
        for part in parts or []:
            if part.thought:
                continue
            got = False
            if part.text:
                self.text.append(part.text)
                got = True
            if part.function_call is not None:
                self.calls.append((part.function_call, part.thought_signature))
                got = True
            if got and self.ttft is None:
                self.ttft = time.monotonic() - t0

    def usage(self) -> Usage:
        m = self.meta
        if m is None:
            return Usage()
        # Thinking tokens are billed as output, so they count as completion tokens here.
        return Usage(
            prompt_tokens=int(m.prompt_token_count or 0),
            completion_tokens=int(m.candidates_token_count or 0) + int(m.thoughts_token_count or 0),
            cached_tokens=int(m.cached_content_token_count or 0),
        )

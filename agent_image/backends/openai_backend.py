"""OpenAI Chat Completions backend (also any OpenAI-compatible server), streaming by default.

Environment (read when a backend is built):

- ``OPENAI_API_KEY``: the key, unless one is passed to the constructor (the SDK reads it).
- ``OPENAI_BASE_URL``: upstream, when neither ``backend.base_url`` nor the constructor gives one
  (the SDK reads it; default ``https://api.openai.com/v1``).
- ``MASSGEN_MODEL_SOCKET``: path of the model gateway's unix socket. When set, every request goes
  to ``http://massgen-gateway/openai/v1`` over that socket with the placeholder key ``sandbox``;
  the host gateway adds the real key and picks the upstream; ``X-Massgen-Agent`` names the agent
  for the gateway's per-agent telemetry.
- ``MASSGEN_MODEL_TIMEOUT``: seconds one HTTP attempt may wait for the next byte (default 120).
- ``MASSGEN_MODEL_MAX_RETRIES``: retries after 408/409/429/5xx/connection errors (default 3);
  the SDK backs off exponentially and honours ``Retry-After`` up to 120 s.

The ``openai`` package is imported only when a backend is built: importing this module is cheap.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from typing import Any

from ..protocol.config import BackendConfig
from ._http import AGENT_HEADER, env_number, gateway_transport, redact, upstream_label
from .base import BackendError, Completion, Message, ToolCall, ToolSpec, Usage

PROVIDER = "openai"
GATEWAY_ROOT = "http://massgen-gateway/openai"
GATEWAY_BASE_URL = f"{GATEWAY_ROOT}/v1"
GATEWAY_KEY = "sandbox"
DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_TIMEOUT_S = 120.0
DEFAULT_MAX_RETRIES = 3


def arguments_from_json(text: str) -> dict[str, Any]:
    """Tool-call arguments as a dict; anything but a JSON object becomes ``{"__raw__": text}``."""
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {"__raw__": text}
    return value if isinstance(value, dict) else {"__raw__": text}


def new_call_id() -> str:
    """An id for a tool call the server gave none (some OpenAI-compatible servers)."""
    return f"call_{uuid.uuid4().hex[:24]}"


def to_wire_messages(messages: list[Message]) -> list[dict[str, Any]]:
    """Neutral messages as Chat Completions message params."""
    out: list[dict[str, Any]] = []
    for m in messages:
        if m.role == "assistant":
            msg: dict[str, Any] = {"role": "assistant", "content": m.content or None}
            if m.tool_calls:
                msg["tool_calls"] = [
                    {
                        "id": tc.id,
                        "type": "function",
                        # Raw (unparseable) arguments go back inside their wrapper, still valid
                        # JSON: OpenAI-compatible servers that parse history would reject them.
                        "function": {"name": tc.name, "arguments": json.dumps(tc.arguments)},
                    }
                    for tc in m.tool_calls
                ]
            elif not m.content:
                msg["content"] = ""
            out.append(msg)
        elif m.role == "tool":
            out.append({"role": "tool", "tool_call_id": m.tool_call_id or "", "content": m.content})
        else:
            out.append({"role": m.role, "content": m.content})
    return out


def to_wire_tools(tools: list[ToolSpec]) -> list[dict[str, Any]]:
    return [
        {
            "type": "function",
            "function": {"name": t.name, "description": t.description, "parameters": t.parameters},
        }
        for t in tools
    ]


def usage_from(u: Any) -> Usage:
    if u is None:
        return Usage()
    details = getattr(u, "prompt_tokens_details", None)
    cached = getattr(details, "cached_tokens", None) if details is not None else None
    return Usage(
        prompt_tokens=int(getattr(u, "prompt_tokens", 0) or 0),
        completion_tokens=int(getattr(u, "completion_tokens", 0) or 0),
        cached_tokens=int(cached or 0),
    )


class _ToolCallAcc:
    """One tool call being assembled from stream deltas."""

    __slots__ = ("args", "id", "name")

    def __init__(self) -> None:
        self.id = ""
        self.name = ""
        self.args: list[str] = []


class OpenAIBackend:
    """A `Backend` over the OpenAI Chat Completions API with function tools."""

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
        agent_id: str | None = None,
    ) -> None:
        """Build the SDK client (importing the SDK).

        Args:
            http_client: an ``httpx2.AsyncClient`` to send through (tests, custom transports).
            timeout: seconds per HTTP attempt; default ``MASSGEN_MODEL_TIMEOUT`` or 120.
            max_retries: SDK retries; default ``MASSGEN_MODEL_MAX_RETRIES`` or 3.
            agent_id: sent to the model gateway so its telemetry is per agent.

        Raises:
            BackendError: no API key, or the SDK refused the settings.
        """
        import httpx2
        import openai

        if not cfg.model:
            raise BackendError(PROVIDER, "backend.model is required")
        self.model = cfg.model
        self._cfg = cfg
        if timeout is None:
            timeout = env_number("MASSGEN_MODEL_TIMEOUT", DEFAULT_TIMEOUT_S)
        self._timeout = timeout
        retries = max_retries
        if retries is None:
            retries = int(env_number("MASSGEN_MODEL_MAX_RETRIES", DEFAULT_MAX_RETRIES))
        self._socket = os.environ.get("MASSGEN_MODEL_SOCKET") or None
        # A caller's http client stays the caller's to close.
        self._owns_http = http_client is None
        headers: dict[str, str] | None = None
        if self._socket:
            headers = {AGENT_HEADER: agent_id} if agent_id else None
            # Each agent's own route: the gateway knows its upstream (and the key for that host).
            url: str | None = f"{GATEWAY_ROOT}/agents/{agent_id}/v1" if agent_id else GATEWAY_BASE_URL
            key: str | None = api_key or GATEWAY_KEY
            if http_client is None:
                transport = gateway_transport(self._socket)
                http_client = httpx2.AsyncClient(transport=transport)
        else:
            url = cfg.base_url or base_url or os.environ.get("OPENAI_BASE_URL") or None
            from ..protocol.providers import key_from_env, key_vars

            # The key the upstream's host takes (MassGen's table); a keyless local server gets a
            # placeholder, since the SDK insists on one.
            key = api_key or key_from_env(cfg.provider, url, os.environ)
            names = key_vars(cfg.provider, url)
            if key is None and not names:
                key = "none"
            elif key is None:
                host = upstream_label(url or DEFAULT_BASE_URL, None)
                raise BackendError(PROVIDER, f"cannot set up client for {host}: no API key: set {' or '.join(names)}")
        self._secrets = (api_key, os.environ.get("OPENAI_API_KEY"), key if key != "none" else None)
        self.base_url = url or DEFAULT_BASE_URL
        self._upstream = upstream_label(self.base_url, self._socket)
        try:
            self._client = openai.AsyncOpenAI(
                api_key=key,
                base_url=url,
                timeout=httpx2.Timeout(self._timeout, connect=min(self._timeout, 10.0)),
                max_retries=retries,
                http_client=http_client,
                default_headers=headers,
            )
        except openai.OpenAIError as exc:
            msg = f"cannot set up client for {self._upstream}: {exc}"
            raise BackendError(PROVIDER, self._safe(msg)) from exc
        # Reasoning models on api.openai.com refuse `max_tokens`; compatible servers (vLLM,
        # Ollama, ...) have long accepted only `max_tokens`. Behind the gateway the configured
        # base_url still says which kind of upstream it forwards to.
        configured = cfg.base_url if self._socket else url
        openai_proper = configured is None or "api.openai.com" in upstream_label(configured, None)
        self._max_tokens_field = "max_completion_tokens" if openai_proper else "max_tokens"

    def _safe(self, text: str) -> str:
        return redact(text, *self._secrets)

    async def aclose(self) -> None:
        if self._owns_http:
            await self._client.close()

    def _params(self, messages: list[Message], tools: list[ToolSpec], stream: bool) -> dict[str, Any]:
        params: dict[str, Any] = {"model": self.model, "messages": to_wire_messages(messages)}
        if tools:
            params["tools"] = to_wire_tools(tools)
        if self._cfg.temperature is not None:
            params["temperature"] = self._cfg.temperature
        if self._cfg.max_tokens is not None:
            params[self._max_tokens_field] = self._cfg.max_tokens
        # MassGen's text.verbosity / reasoning.effort arrive here as their Chat Completions names.
        for name in ("top_p", "verbosity", "reasoning_effort"):
            value = getattr(self._cfg, name)
            if value is not None:
                params[name] = value
        if self._cfg.extra_body:
            params["extra_body"] = dict(self._cfg.extra_body)
        if stream:
            params["stream"] = True
            params["stream_options"] = {"include_usage": True}
        return params

    async def complete(self, messages: list[Message], tools: list[ToolSpec]) -> Completion:
        """Run one chat completion.

        Raises:
            BackendError: the upstream failed after the SDK's retries, or answered garbage.
        """
        import openai

        t0 = time.monotonic()
        try:
            if self._cfg.stream:
                return await self._stream(messages, tools, t0)
            return await self._once(messages, tools, t0)
        except openai.APIStatusError as exc:
            raise BackendError(PROVIDER, self._status_message(exc), status=exc.status_code) from exc
        except openai.APITimeoutError as exc:
            msg = f"timed out after {self._timeout:g}s waiting for {self._upstream}"
            raise BackendError(PROVIDER, self._safe(msg)) from exc
        except openai.APIConnectionError as exc:
            cause = exc.__cause__ or exc
            msg = f"cannot reach {self._upstream}: {type(cause).__name__}: {cause}"
            raise BackendError(PROVIDER, self._safe(msg)) from exc
        except openai.OpenAIError as exc:
            # Errors streamed inside a 200 response, and SDK-side failures.
            msg = f"{self._upstream} failed: {type(exc).__name__}: {exc}"
            raise BackendError(PROVIDER, self._safe(msg)) from exc
        except BackendError:
            raise
        except Exception as exc:  # garbage on the wire must not escape untranslated
            msg = f"bad answer from {self._upstream}: {type(exc).__name__}: {exc}"
            raise BackendError(PROVIDER, self._safe(msg)) from exc

    def _status_message(self, exc: Any) -> str:
        body = exc.body
        detail = body.get("message") if isinstance(body, dict) else None
        if not isinstance(detail, str) or not detail:
            detail = exc.message
        return self._safe(f"HTTP {exc.status_code} from {self._upstream}: {detail}")

    async def _once(self, messages: list[Message], tools: list[ToolSpec], t0: float) -> Completion:
        resp = await self._client.chat.completions.create(**self._params(messages, tools, stream=False))
        if not resp.choices:
            raise BackendError(PROVIDER, f"{self._upstream} answered without choices")
        msg = resp.choices[0].message
        calls: list[ToolCall] = []
        for tc in msg.tool_calls or []:
            fn = getattr(tc, "function", None)
            if fn is None:  # a custom (non-function) tool call: we offer none
                continue
            args = arguments_from_json(fn.arguments or "")
            calls.append(ToolCall(tc.id or new_call_id(), fn.name or "", args))
        text = msg.content or getattr(msg, "refusal", None) or ""
        return Completion(
            message=Message(role="assistant", content=text, tool_calls=tuple(calls)),
            usage=usage_from(resp.usage),
            model=resp.model or self.model,
            latency_s=time.monotonic() - t0,
            ttft_s=None,
        )

    async def _stream(self, messages: list[Message], tools: list[ToolSpec], t0: float) -> Completion:
        stream = await self._client.chat.completions.create(**self._params(messages, tools, stream=True))
        text: list[str] = []
        refusal: list[str] = []
        accs: dict[int, _ToolCallAcc] = {}
        usage = Usage()
        model = ""
        ttft: float | None = None
        async with stream:
            async for chunk in stream:
                model = chunk.model or model
                if chunk.usage is not None:
                    usage = usage_from(chunk.usage)
                if not chunk.choices:
                    continue
                delta = chunk.choices[0].delta
                if delta is None:
                    continue
                got = False
                if delta.content:
                    text.append(delta.content)
                    got = True
                if getattr(delta, "refusal", None):
                    refusal.append(delta.refusal)
                    got = True
                for tcd in delta.tool_calls or []:
                    got = True
                    self._merge(accs, tcd)
                if got and ttft is None:
                    ttft = time.monotonic() - t0
        calls = tuple(
            ToolCall(acc.id or new_call_id(), acc.name, arguments_from_json("".join(acc.args)))
            for _, acc in sorted(accs.items())
        )
        content = "".join(text) or "".join(refusal)
        return Completion(
            message=Message(role="assistant", content=content, tool_calls=calls),
            usage=usage,
            model=model or self.model,
            latency_s=time.monotonic() - t0,
            ttft_s=ttft,
        )

    @staticmethod
    def _merge(accs: dict[int, _ToolCallAcc], tcd: Any) -> None:
        index = tcd.index
        if index is None:
            # Some compatible servers omit the index: a new id opens a call, else continue the last.
            index = len(accs) if tcd.id or not accs else max(accs)
        acc = accs.setdefault(index, _ToolCallAcc())
        if tcd.id and not acc.id:
            acc.id = tcd.id
        fn = tcd.function
        if fn is not None:
            if fn.name and not acc.name:
                # Set once: some servers repeat the name on every delta.
                acc.name = fn.name
            if fn.arguments:
                acc.args.append(fn.arguments)

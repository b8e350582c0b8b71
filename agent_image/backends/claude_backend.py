"""Anthropic Messages API backend (Claude), on the real `anthropic` SDK, streaming by default.

Environment (read when a backend is built):

- ``ANTHROPIC_API_KEY``: the key, unless one is passed to the constructor (``--sandbox none`` only).
- ``ANTHROPIC_BASE_URL``: upstream, when neither ``backend.base_url`` nor the constructor gives one
  (default ``https://api.anthropic.com``).
- ``MASSGEN_MODEL_SOCKET``: the model gateway's unix socket. When set, every request goes to
  ``http://massgen-gateway/claude`` over it with the placeholder key ``sandbox``; the host gateway
  adds ``ANTHROPIC_API_KEY`` and meters usage from ``message_start`` / ``message_delta``.
- ``MASSGEN_MODEL_TIMEOUT``, ``MASSGEN_MODEL_MAX_RETRIES``: as for the other backends.

Usage: Anthropic reports ``input_tokens`` without cache reads and writes; here the prompt is
their sum and ``cached_tokens`` the cache reads, as for OpenAI and Gemini.

The ``anthropic`` package is imported only when a backend is built.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from ..protocol.config import BackendConfig
from ._http import AGENT_HEADER, env_number, gateway_transport, redact, upstream_label
from .base import BackendError, Completion, Message, ToolCall, ToolSpec, Usage

PROVIDER = "claude"
GATEWAY_BASE_URL = "http://massgen-gateway/claude"
GATEWAY_KEY = "sandbox"
DEFAULT_BASE_URL = "https://api.anthropic.com"
DEFAULT_TIMEOUT_S = 120.0
DEFAULT_MAX_RETRIES = 3
DEFAULT_MAX_TOKENS = 8192  # the Messages API requires max_tokens


def to_wire(messages: list[Message]) -> tuple[str | None, list[dict[str, Any]]]:
    """Neutral messages as (system, Messages API messages): tool results go in user turns as
    ``tool_result`` blocks, and consecutive turns of one role are merged (the API alternates)."""
    system: list[str] = []
    out: list[dict[str, Any]] = []

    def add(role: str, blocks: list[dict[str, Any]]) -> None:
        if not blocks:
            return
        if out and out[-1]["role"] == role:
            out[-1]["content"].extend(blocks)
        else:
            out.append({"role": role, "content": blocks})

    for m in messages:
        if m.role == "system":
            if m.content:
                system.append(m.content)
        elif m.role == "user":
            add("user", [{"type": "text", "text": m.content or "(empty)"}])
        elif m.role == "assistant":
            blocks: list[dict[str, Any]] = []
            if m.content:
                blocks.append({"type": "text", "text": m.content})
            for tc in m.tool_calls:
                blocks.append({"type": "tool_use", "id": tc.id, "name": tc.name, "input": tc.arguments})
            add("assistant", blocks or [{"type": "text", "text": "(no reply)"}])
        elif m.role == "tool":
            add("user", [{"type": "tool_result", "tool_use_id": m.tool_call_id or "", "content": m.content}])
    return ("\n\n".join(system) or None), out


def to_wire_tools(tools: list[ToolSpec]) -> list[dict[str, Any]]:
    return [{"name": t.name, "description": t.description, "input_schema": t.parameters} for t in tools]


def usage_from(u: Any) -> Usage:
    if u is None:
        return Usage()
    fresh = getattr(u, "input_tokens", 0) or 0
    read = getattr(u, "cache_read_input_tokens", 0) or 0
    written = getattr(u, "cache_creation_input_tokens", 0) or 0
    return Usage(
        prompt_tokens=fresh + read + written, completion_tokens=getattr(u, "output_tokens", 0) or 0, cached_tokens=read
    )


class ClaudeBackend:
    """A `Backend` over the Anthropic Messages API with tool use."""

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

        Raises:
            BackendError: no API key, or the SDK refused the settings.
        """
        import anthropic
        import httpx2

        if not cfg.model:
            raise BackendError(PROVIDER, "backend.model is required")
        self.model = cfg.model
        self._cfg = cfg
        self._timeout = env_number("MASSGEN_MODEL_TIMEOUT", DEFAULT_TIMEOUT_S) if timeout is None else timeout
        retries = (
            int(env_number("MASSGEN_MODEL_MAX_RETRIES", DEFAULT_MAX_RETRIES)) if max_retries is None else max_retries
        )
        self._socket = os.environ.get("MASSGEN_MODEL_SOCKET") or None
        self._owns_http = http_client is None
        headers: dict[str, str] | None = None
        if self._socket:
            headers = {AGENT_HEADER: agent_id} if agent_id else None
            url = GATEWAY_BASE_URL
            key: str | None = api_key or GATEWAY_KEY
            if http_client is None:
                http_client = httpx2.AsyncClient(transport=gateway_transport(self._socket))
        else:
            url = cfg.base_url or base_url or os.environ.get("ANTHROPIC_BASE_URL") or DEFAULT_BASE_URL
            key = api_key or os.environ.get("ANTHROPIC_API_KEY") or None
        self._secrets = (api_key, os.environ.get("ANTHROPIC_API_KEY"))
        self.base_url = url
        self._upstream = upstream_label(url, self._socket)
        if not key:
            raise BackendError(
                PROVIDER, f"cannot set up client for {self._upstream}: no API key: set ANTHROPIC_API_KEY"
            )
        try:
            self._client = anthropic.AsyncAnthropic(
                api_key=key,
                base_url=url,
                timeout=httpx2.Timeout(self._timeout, connect=min(self._timeout, 10.0)),
                max_retries=retries,
                http_client=http_client,
                default_headers=headers,
            )
        except anthropic.AnthropicError as exc:
            raise BackendError(PROVIDER, self._safe(f"cannot set up client for {self._upstream}: {exc}")) from exc

    def _safe(self, text: str) -> str:
        return redact(text, *self._secrets)

    async def aclose(self) -> None:
        if self._owns_http:
            await self._client.close()

    def _params(self, messages: list[Message], tools: list[ToolSpec]) -> dict[str, Any]:
        system, wire = to_wire(messages)
        params: dict[str, Any] = {
            "model": self.model,
            "max_tokens": self._cfg.max_tokens or DEFAULT_MAX_TOKENS,
            "messages": wire,
        }
        if system:
            params["system"] = system
        if tools:
            params["tools"] = to_wire_tools(tools)
        for name in ("temperature", "top_p", "top_k"):
            value = getattr(self._cfg, name)
            if value is not None:
                params[name] = value
        return params

    async def complete(self, messages: list[Message], tools: list[ToolSpec]) -> Completion:
        """Run one Messages API call.

        Raises:
            BackendError: the upstream failed after the SDK's retries, or answered garbage.
        """
        import anthropic

        t0 = time.monotonic()
        try:
            if self._cfg.stream:
                return await self._stream(messages, tools, t0)
            return await self._once(messages, tools, t0)
        except anthropic.APIStatusError as exc:
            body = exc.body
            err = body.get("error") if isinstance(body, dict) else None
            detail = err.get("message") if isinstance(err, dict) else None
            msg = f"HTTP {exc.status_code} from {self._upstream}: {detail or exc.message}"
            raise BackendError(PROVIDER, self._safe(msg), status=exc.status_code) from exc
        except anthropic.APITimeoutError as exc:
            raise BackendError(
                PROVIDER, self._safe(f"timed out after {self._timeout:g}s waiting for {self._upstream}")
            ) from exc
        except anthropic.APIConnectionError as exc:
            cause = exc.__cause__ or exc
            msg = f"cannot reach {self._upstream}: {type(cause).__name__}: {cause}"
            raise BackendError(PROVIDER, self._safe(msg)) from exc
        except anthropic.AnthropicError as exc:
            raise BackendError(PROVIDER, self._safe(f"{self._upstream} failed: {type(exc).__name__}: {exc}")) from exc
        except BackendError:
            raise
        except Exception as exc:  # garbage on the wire must not escape untranslated
            raise BackendError(
                PROVIDER, self._safe(f"bad answer from {self._upstream}: {type(exc).__name__}: {exc}")
            ) from exc

    def _completion(self, msg: Any, t0: float, ttft: float | None) -> Completion:
        text: list[str] = []
        calls: list[ToolCall] = []
        for block in msg.content or []:
            kind = getattr(block, "type", "")
            if kind == "text":
                text.append(block.text or "")
            elif kind == "tool_use":
                args = block.input if isinstance(block.input, dict) else {"__raw__": json.dumps(block.input)}
                calls.append(ToolCall(block.id, block.name, args))
        return Completion(
            message=Message(role="assistant", content="".join(text), tool_calls=tuple(calls)),
            usage=usage_from(msg.usage),
            model=msg.model or self.model,
            latency_s=time.monotonic() - t0,
            ttft_s=ttft,
        )

    async def _once(self, messages: list[Message], tools: list[ToolSpec], t0: float) -> Completion:
        msg = await self._client.messages.create(**self._params(messages, tools))
        return self._completion(msg, t0, None)

    async def _stream(self, messages: list[Message], tools: list[ToolSpec], t0: float) -> Completion:
        ttft: float | None = None
        async with self._client.messages.stream(**self._params(messages, tools)) as stream:
            async for event in stream:
                if ttft is None and getattr(event, "type", "") == "content_block_delta":
                    ttft = time.monotonic() - t0
            msg = await stream.get_final_message()
        return self._completion(msg, t0, ttft)

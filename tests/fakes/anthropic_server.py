"""A fake Anthropic Messages API upstream on loopback, speaking the real JSON and SSE event formats."""

from __future__ import annotations

import json
import uuid
from typing import Any

from ._common import FakeRequest, FakeServer, Fault, Reply, _Handler, estimate_tokens, split

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    529: "overloaded_error",
}


def _texts(content: Any) -> list[str]:
    if isinstance(content, str):
        return [content]
    out: list[str] = []
    for block in content if isinstance(content, list) else []:
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text":
            out.append(str(block.get("text", "")))
        elif kind == "tool_use":
            out.append(f"{block.get('name', '')}({json.dumps(block.get('input', {}))})")
        elif kind == "tool_result":
            out.extend(_texts(block.get("content", "")))
    return out


def _prompt_text(body: dict[str, Any]) -> str:
    out = _texts(body.get("system") or "")
    for m in body.get("messages") or []:
        if isinstance(m, dict):
            out.extend(_texts(m.get("content")))
    return "\n".join(out)


class FakeAnthropic(FakeServer):
    """`POST /v1/messages` (JSON, or SSE with `stream: true`), scripted by a policy.

    Usage is reported as the real API does: `input_tokens` excludes cache reads
    (`cache_read_input_tokens`); in a stream, `message_start` carries the input side and
    `message_delta` the final `output_tokens`. `usage` sums prompt = input + cache reads.
    """

    @property
    def base_url(self) -> str:
        return self.root_url  # the SDK appends /v1/messages

    def handle(
        self,
        h: _Handler,
        method: str,
        path: str,
        query: dict[str, str],
        headers: dict[str, str],
        body: dict[str, Any],
    ) -> None:
        if method != "POST" or not path.endswith("/v1/messages"):
            self._error(h, Fault(404, f"Not found ({method} {path})"))
            return
        tools = [t.get("name", "") for t in body.get("tools") or [] if isinstance(t, dict)]
        req = FakeRequest(
            body,
            method=method,
            path=path,
            query=query,
            headers=headers,
            prompt_text=_prompt_text(body),
            tool_names=tools,
            stream=bool(body.get("stream")),
        )
        self._record(req)
        auth = headers.get("authorization", "")
        given = headers.get("x-api-key") or (auth[7:] if auth.lower().startswith("bearer ") else auth)
        if self.api_key is not None and given != self.api_key:
            # The real service does not echo keys; echo it whole to prove the gateway redacts.
            self._error(h, Fault(401, f"invalid x-api-key: {given}"))
            return
        if not isinstance(body.get("max_tokens"), int):
            self._error(h, Fault(400, "max_tokens: Field required"))
            return
        decision = self._decide(req)
        self._wait(decision.delay_s)
        if isinstance(decision, Fault):
            self._error(h, decision)
            return
        model = str(body.get("model") or "claude-fake")
        prompt = decision.prompt_tokens if decision.prompt_tokens is not None else estimate_tokens(req.prompt_text)
        out = decision.text + "".join(tc.arguments_json() for tc in decision.tool_calls)
        completion = decision.completion_tokens if decision.completion_tokens is not None else estimate_tokens(out)
        cached = min(decision.cached_tokens, prompt)
        usage = {
            "input_tokens": prompt - cached,
            "cache_read_input_tokens": cached,
            "cache_creation_input_tokens": 0,
            "output_tokens": completion,
        }
        blocks = self._blocks(decision)
        stop = "tool_use" if decision.tool_calls else "end_turn"
        msg_id = f"msg_{uuid.uuid4().hex[:24]}"
        if req.stream:
            self._stream(h, decision, msg_id, model, blocks, stop, usage)
        else:
            h.send_json(
                200,
                {
                    "id": msg_id,
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": blocks,
                    "stop_reason": stop,
                    "stop_sequence": None,
                    "usage": usage,
                },
            )
        self._count(prompt, completion, cached)

    def _error(self, h: _Handler, fault: Fault) -> None:
        err = {"type": _ERROR_TYPES.get(fault.status, "api_error"), "message": fault.message}
        h.send_json(fault.status, {"type": "error", "error": err}, self._fault_headers(fault))

    @staticmethod
    def _blocks(reply: Reply) -> list[dict[str, Any]]:
        blocks: list[dict[str, Any]] = []
        if reply.text:
            blocks.append({"type": "text", "text": reply.text})
        for i, tc in enumerate(reply.tool_calls):
            args = tc.arguments if isinstance(tc.arguments, dict) else {}
            blocks.append(
                {"type": "tool_use", "id": tc.id or f"toolu_{uuid.uuid4().hex[:20]}{i}", "name": tc.name, "input": args}
            )
        return blocks

    @staticmethod
    def _event(h: _Handler, kind: str, data: dict[str, Any]) -> None:
        payload = f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode()
        h.wfile.write(f"{len(payload):x}\r\n".encode() + payload + b"\r\n")
        h.wfile.flush()

    def _stream(
        self,
        h: _Handler,
        reply: Reply,
        msg_id: str,
        model: str,
        blocks: list[dict[str, Any]],
        stop: str,
        usage: dict[str, Any],
    ) -> None:
        h.start_sse()
        start_usage = {**usage, "output_tokens": 1}
        message: dict[str, Any] = {
            "id": msg_id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": start_usage,
        }
        self._event(h, "message_start", {"message": message})
        self._event(h, "ping", {})
        for i, block in enumerate(blocks):
            if block["type"] == "text":
                self._event(h, "content_block_start", {"index": i, "content_block": {"type": "text", "text": ""}})
                for piece in split(block["text"], reply.chunk_size, at_least=2):
                    self._event(h, "content_block_delta", {"index": i, "delta": {"type": "text_delta", "text": piece}})
            else:
                start = {"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}
                self._event(h, "content_block_start", {"index": i, "content_block": start})
                for piece in split(json.dumps(block["input"]), reply.chunk_size, at_least=2):
                    delta: dict[str, Any] = {"type": "input_json_delta", "partial_json": piece}
                    self._event(h, "content_block_delta", {"index": i, "delta": delta})
            self._event(h, "content_block_stop", {"index": i})
        delta = {
            "delta": {"stop_reason": stop, "stop_sequence": None},
            "usage": {"output_tokens": usage["output_tokens"]},
        }
        self._event(h, "message_delta", delta)
        self._event(h, "message_stop", {})
        h.end_sse()

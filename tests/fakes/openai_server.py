"""A fake OpenAI Chat Completions upstream on loopback, speaking the real JSON and SSE formats."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from ._common import (
    FakeRequest,
    FakeServer,
    Fault,
    Reply,
    _Handler,
    estimate_tokens,
    split,
)

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    429: "rate_limit_exceeded",
}


def _prompt_text(body: dict[str, Any]) -> str:
    out: list[str] = []
    for m in body.get("messages") or []:
        content = m.get("content")
        if isinstance(content, str):
            out.append(content)
        elif isinstance(content, list):
            out.extend(p.get("text", "") for p in content if isinstance(p, dict))
        for tc in m.get("tool_calls") or []:
            fn = tc.get("function") or {}
            out.append(f"{fn.get('name', '')}({fn.get('arguments', '')})")
    return "\n".join(out)


class FakeOpenAI(FakeServer):
    """`POST /v1/chat/completions` (JSON or SSE) and `GET /v1/models`, scripted by a policy.

    Paths may carry a prefix (``/openai/v1/...``, the gateway's route); `.path` records it.
    """

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v1"

    def handle(
        self,
        h: _Handler,
        method: str,
        path: str,
        query: dict[str, str],
        headers: dict[str, str],
        body: dict[str, Any],
    ) -> None:
        # Any prefix is accepted, as a gateway route (/openai/v1/...) maps onto /v1/...
        if method == "GET" and path.endswith("/v1/models"):
            self._record(FakeRequest({}, method=method, path=path, query=query, headers=headers))
            if not self._authorized(h, headers):
                return
            models = [{"id": "fake-model", "object": "model", "created": 0, "owned_by": "fake"}]
            h.send_json(200, {"object": "list", "data": models})
            return
        if method != "POST" or not path.endswith("/v1/chat/completions"):
            self._error(h, Fault(404, f"Invalid URL ({method} {path})"))
            return
        tools = [t.get("function", {}).get("name", "") for t in body.get("tools") or []]
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
        if not self._authorized(h, headers):
            return
        decision = self._decide(req)
        if isinstance(decision, Fault):
            self._wait(decision.delay_s)
            self._error(h, decision)
            return
        self._wait(decision.delay_s)
        model = str(body.get("model") or "fake-model")
        usage = self._usage(decision, req)
        if req.stream:
            include = bool((body.get("stream_options") or {}).get("include_usage"))
            self._stream(h, decision, model, usage if include else None)
            if include:
                self._report(usage)
        else:
            h.send_json(200, self._completion(decision, model, usage))
            self._report(usage)

    # -- pieces ------------------------------------------------------------------------------

    def _authorized(self, h: _Handler, headers: dict[str, str]) -> bool:
        if self.api_key is None:
            return True
        auth = headers.get("authorization", "")
        given = auth[7:] if auth.lower().startswith("bearer ") else auth
        if given == self.api_key:
            return True
        # The real service echoes (a masked form of) the key it was given; echo it whole.
        self._error(h, Fault(401, f"Incorrect API key provided: {given}."))
        return False

    def _error(self, h: _Handler, fault: Fault) -> None:
        err = {
            "message": fault.message,
            "type": _ERROR_TYPES.get(fault.status, "server_error"),
            "param": None,
            "code": None,
        }
        h.send_json(fault.status, {"error": err}, self._fault_headers(fault))

    @staticmethod
    def _usage(reply: Reply, req: FakeRequest) -> dict[str, Any]:
        prompt = reply.prompt_tokens
        if prompt is None:
            prompt = estimate_tokens(req.prompt_text)
        completion = reply.completion_tokens
        if completion is None:
            out = reply.text + "".join(tc.arguments_json() for tc in reply.tool_calls)
            completion = estimate_tokens(out)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": reply.cached_tokens, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
        }

    def _report(self, usage: dict[str, Any]) -> None:
        self._count(
            usage["prompt_tokens"],
            usage["completion_tokens"],
            usage["prompt_tokens_details"]["cached_tokens"],
        )

    @staticmethod
    def _tool_id(i: int, given: str | None) -> str:
        return given or f"call_{uuid.uuid4().hex[:20]}_{i}"

    def _completion(self, reply: Reply, model: str, usage: dict[str, Any]) -> dict[str, Any]:
        message: dict[str, Any] = {
            "role": "assistant",
            "content": reply.text or None,
            "refusal": None,
        }
        if reply.tool_calls:
            message["tool_calls"] = [
                {
                    "id": self._tool_id(i, tc.id),
                    "type": "function",
                    "function": {"name": tc.name, "arguments": tc.arguments_json()},
                }
                for i, tc in enumerate(reply.tool_calls)
            ]
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": "tool_calls" if reply.tool_calls else "stop",
                }
            ],
            "usage": usage,
            "system_fingerprint": "fp_fake",
        }

    def _stream(self, h: _Handler, reply: Reply, model: str, usage: dict[str, Any] | None) -> None:
        cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())

        def chunk(delta: dict[str, Any] | None, finish: str | None = None) -> None:
            obj: dict[str, Any] = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": "fp_fake",
                "choices": [],
            }
            if delta is not None:
                obj["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
            if usage is not None:
                obj["usage"] = None  # as the real service: null on every chunk but the last
            h.sse(json.dumps(obj))

        h.start_sse()
        chunk({"role": "assistant", "content": "", "refusal": None})
        for piece in split(reply.text, reply.chunk_size):
            chunk({"content": piece})
        for i, tc in enumerate(reply.tool_calls):
            head = {
                "index": i,
                "id": self._tool_id(i, tc.id),
                "type": "function",
                "function": {"name": tc.name, "arguments": ""},
            }
            chunk({"tool_calls": [head]})
            for piece in split(tc.arguments_json(), reply.chunk_size, at_least=2):
                chunk({"tool_calls": [{"index": i, "function": {"arguments": piece}}]})
        chunk({}, "tool_calls" if reply.tool_calls else "stop")
        if usage is not None:
            last = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": "fp_fake",
                "choices": [],
                "usage": usage,
            }
            h.sse(json.dumps(last))
        h.sse("[DONE]")
        h.end_sse()

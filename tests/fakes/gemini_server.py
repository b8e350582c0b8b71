"""A fake Gemini REST upstream on loopback: generateContent and streamGenerateContent?alt=sse."""

from __future__ import annotations

import json
import re
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

# The SDK picks the API version (v1 or v1beta); the fake answers on any, under any prefix
# (the gateway's route is /gemini/v1/...).
_ROUTE = re.compile(r"/(v1[a-z0-9]*)/models/([^/:]+):(generateContent|streamGenerateContent)$")

_STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def _prompt_text(body: dict[str, Any]) -> str:
    out: list[str] = []
    system = body.get("systemInstruction") or {}
    out.extend(p.get("text", "") for p in system.get("parts") or [] if "text" in p)
    for content in body.get("contents") or []:
        for p in content.get("parts") or []:
            if "text" in p:
                out.append(p["text"])
            if "functionCall" in p:
                fc = p["functionCall"]
                out.append(f"{fc.get('name', '')}({json.dumps(fc.get('args') or {})})")
            if "functionResponse" in p:
                out.append(json.dumps(p["functionResponse"].get("response") or {}))
    return "\n".join(out)


def _tool_names(body: dict[str, Any]) -> list[str]:
    return [d.get("name", "") for tool in body.get("tools") or [] for d in tool.get("functionDeclarations") or []]


class FakeGemini(FakeServer):
    """`POST /{v1,v1beta}/models/{model}:generateContent` and `:streamGenerateContent?alt=sse`."""

    @property
    def base_url(self) -> str:
        return self.root_url

    def handle(
        self,
        h: _Handler,
        method: str,
        path: str,
        query: dict[str, str],
        headers: dict[str, str],
        body: dict[str, Any],
    ) -> None:
        m = _ROUTE.search(path)
        if method != "POST" or m is None:
            self._error(h, Fault(404, f"Method not found: {method} {path}"))
            return
        stream = m.group(3) == "streamGenerateContent"
        req = FakeRequest(
            body,
            method=method,
            path=path,
            query=query,
            headers=headers,
            prompt_text=_prompt_text(body),
            tool_names=_tool_names(body),
            stream=stream,
        )
        self._record(req)
        if self.api_key is not None:
            given = headers.get("x-goog-api-key") or query.get("key", "")
            if given != self.api_key:
                self._error(h, Fault(400, f"API key not valid: {given}. Please pass a valid API key."))
                return
        decision = self._decide(req)
        if isinstance(decision, Fault):
            self._wait(decision.delay_s)
            self._error(h, decision)
            return
        if any(not isinstance(tc.arguments, dict) for tc in decision.tool_calls):
            raise TypeError("Gemini function calls carry args as an object; give a dict")
        self._wait(decision.delay_s)
        model = m.group(2)
        usage = self._usage(decision, req)
        if stream and query.get("alt") == "sse":
            self._stream(h, decision, model, usage)
        else:
            h.send_json(200, self._response(self._parts(decision), model, usage, finish=True))
        self._count(
            usage["promptTokenCount"],
            usage["candidatesTokenCount"] + usage.get("thoughtsTokenCount", 0),
            usage.get("cachedContentTokenCount", 0),
        )

    # -- pieces ------------------------------------------------------------------------------

    def _error(self, h: _Handler, fault: Fault) -> None:
        err: dict[str, Any] = {
            "code": fault.status,
            "message": fault.message,
            "status": _STATUS_NAMES.get(fault.status, "UNKNOWN"),
        }
        if fault.retry_after is not None:
            err["details"] = [
                {
                    "@type": "type.googleapis.com/google.rpc.RetryInfo",
                    "retryDelay": f"{fault.retry_after}s",
                }
            ]
        h.send_json(fault.status, {"error": err}, self._fault_headers(fault))

    @staticmethod
    def _usage(reply: Reply, req: FakeRequest) -> dict[str, int]:
        prompt = reply.prompt_tokens
        if prompt is None:
            prompt = estimate_tokens(req.prompt_text)
        completion = reply.completion_tokens
        if completion is None:
            out = reply.text + "".join(tc.arguments_json() for tc in reply.tool_calls)
            completion = estimate_tokens(out)
        usage = {
            "promptTokenCount": prompt,
            "candidatesTokenCount": completion,
            "totalTokenCount": prompt + completion + reply.thoughts_tokens,
        }
        if reply.thoughts_tokens:
            usage["thoughtsTokenCount"] = reply.thoughts_tokens
        if reply.cached_tokens:
            usage["cachedContentTokenCount"] = reply.cached_tokens
        return usage

    @staticmethod
    def _call_parts(reply: Reply) -> list[dict[str, Any]]:
        parts: list[dict[str, Any]] = []
        for i, tc in enumerate(reply.tool_calls):
            fc: dict[str, Any] = {"name": tc.name, "args": tc.arguments}
            if tc.id:
                fc["id"] = tc.id
            part: dict[str, Any] = {"functionCall": fc}
            if i == 0 and reply.signature:
                part["thoughtSignature"] = reply.signature
            parts.append(part)
        return parts

    def _parts(self, reply: Reply) -> list[dict[str, Any]]:
        text = [{"text": reply.text}] if reply.text else []
        return text + self._call_parts(reply)

    @staticmethod
    def _response(
        parts: list[dict[str, Any]],
        model: str,
        usage: dict[str, int],
        *,
        finish: bool,
        rid: str = "",
    ) -> dict[str, Any]:
        cand: dict[str, Any] = {"content": {"parts": parts, "role": "model"}, "index": 0}
        if finish:
            cand["finishReason"] = "STOP"
        return {
            "candidates": [cand],
            "usageMetadata": usage,
            "modelVersion": model,
            "responseId": rid or uuid.uuid4().hex[:22],
        }

    def _stream(self, h: _Handler, reply: Reply, model: str, usage: dict[str, int]) -> None:
        rid = uuid.uuid4().hex[:22]
        h.start_sse()
        sent = 0
        for piece in split(reply.text, reply.chunk_size):
            # Interim chunks carry running counts, as the real service does: summing them is wrong.
            sent = min(usage["candidatesTokenCount"], sent + 1)
            interim = {
                "promptTokenCount": usage["promptTokenCount"],
                "candidatesTokenCount": sent,
                "totalTokenCount": usage["promptTokenCount"] + sent,
            }
            h.sse(json.dumps(self._response([{"text": piece}], model, interim, finish=False, rid=rid)))
        calls = self._call_parts(reply)
        if calls:
            h.sse(json.dumps(self._response(calls, model, usage, finish=False, rid=rid)))
        h.sse(json.dumps(self._response([{"text": ""}], model, usage, finish=True, rid=rid)))
        h.end_sse()

"""Provider wire formats: usage, output caps and error bodies as each provider's JSON spells them.

Adding a provider: its branch in `usage_from`, `max_output_tokens`, `error_body`, `auth_headers`
and `usage_marker`, then its routes in `proxy.py` and its upstream in `upstreams.py`.
"""

from __future__ import annotations

import json
from typing import Any

_GEMINI_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    413: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    502: "UNAVAILABLE",
}


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
    if provider == "claude":
        # A message (non-streamed), or the stream's message_start (input side) / message_delta
        # (final output_tokens); `claude_stream_usage` combines the two.
        u = obj.get("usage")
        if not isinstance(u, dict) and isinstance(obj.get("message"), dict):
            u = obj["message"].get("usage")
        if not isinstance(u, dict):
            return None
        read = _int(u.get("cache_read_input_tokens"))
        prompt = _int(u.get("input_tokens")) + read + _int(u.get("cache_creation_input_tokens"))
        return prompt, _int(u.get("output_tokens")), read
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


def claude_stream_usage(first: Any, last: Any) -> tuple[int, int, int] | None:
    """Usage of a Messages API stream, from its first and its last usage event.

    The input side comes from ``message_start``, the output tokens from the last
    ``message_delta`` (which may repeat the input counts; the larger wins).
    """
    start = usage_from("claude", first) if first is not None else None
    end = usage_from("claude", last) if last is not None else None
    if start is None or end is None:
        return end or start
    return max(start[0], end[0]), end[1], max(start[2], end[2])


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
    if provider == "claude":
        kinds = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 429: "rate_limit_error"}
        return {"type": "error", "error": {"type": kinds.get(status, "api_error"), "message": message}}
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def error_message(body: bytes) -> str:
    """The ``error.message`` of an error body (both providers use it), else the body as text."""
    try:
        obj = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace")
    err = obj.get("error") if isinstance(obj, dict) else None
    message = err.get("message") if isinstance(err, dict) else None
    return message if isinstance(message, str) else body.decode("utf-8", "replace")


def auth_headers(provider: str, api_key: str) -> dict[str, str]:
    """The headers that carry the host's key to the upstream (none for a keyless local server)."""
    if not api_key:
        return {}
    if provider == "gemini":
        return {"x-goog-api-key": api_key}
    # claude: Bearer, as the anthropic SDK (2.x) itself sends an API key.
    return {"Authorization": f"Bearer {api_key}"}


def usage_marker(provider: str) -> bytes:
    """Bytes every SSE event carrying usage contains (a cheap filter before parsing)."""
    return b'"usageMetadata"' if provider == "gemini" else b'"usage"'

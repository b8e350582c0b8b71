"""The model gateway: sandboxes call models over a per-run unix socket; the host adds the key and meters.

Routes (all under the socket's ``http://massgen-gateway`` origin):

- ``POST /openai/v1/chat/completions`` and ``POST /openai/v1/responses``: forwarded to the
  OpenAI(-compatible) upstream. Streaming chat requests get ``stream_options.include_usage``
  forced on so every call is metered.
- ``GET /openai/v1/models``: this run's allowed models only, never the key holder's list.
- ``POST /gemini/{v1,v1beta,...}/models/{model}:generateContent`` and ``:streamGenerateContent``
  (google-genai 3.x calls ``v1`` by default; ``v1beta`` when asked).
- ``POST /openai/agents/{agent}/v1/...``: the same OpenAI routes for one agent's own upstream
  (OpenAI-compatible services; the key its host takes, see `agent_upstream`).
- ``POST /claude/v1/messages``: the Anthropic Messages API (JSON or SSE); usage is metered from
  ``message_start`` (input, cache reads) and the last ``message_delta`` (output tokens).

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
default ``https://generativelanguage.googleapis.com``); ``ANTHROPIC_API_KEY``,
``ANTHROPIC_BASE_URL`` (default ``https://api.anthropic.com``); ``MASSGEN_KEYS_FILE``: a JSON (or
JSON-compatible YAML) mapping ``provider -> {api_key, base_url?}`` whose entries win over the
variables. HTTP(S)_PROXY / NO_PROXY are honoured for upstream connections.

The package, one seam per module:

- ``upstreams.py``: where each provider's calls go and the host key they carry (`Upstream`,
  `upstreams_from_env`).
- ``metering.py``: call records, totals and budgets (`CallRecord`, `BudgetMeter`, `ChainMeter`,
  `seed_from_telemetry`); the gateway reports to a `Meter` and knows nothing of runs.
- ``wire.py``: provider wire formats (usage, output caps, error bodies, auth headers).
- ``redact.py``: keys replaced in everything sent back (`Redactor`, `SseRelay`).
- ``proxy.py``: the aiohttp routes and the forwarding (`Gateway`).
- ``limiter.py``: per-upstream pauses after a 429, shared by all runs of a supervisor (`UpstreamLimiter`).

Names are re-exported here; `Gateway` (and the proxy's constants) load aiohttp on first use only,
so importing the metering side stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .limiter import UpstreamLimiter
from .metering import BudgetMeter, CallRecord, ChainMeter, Meter, SeededCall, SpentCall, Totals, seed_from_telemetry
from .redact import REDACTED
from .upstreams import (
    DEFAULT_GEMINI_BASE_URL,
    DEFAULT_OPENAI_BASE_URL,
    PROVIDERS,
    Upstream,
    agent_upstream,
    missing_key_message,
    upstreams_from_env,
    url_keys,
)
from .wire import error_body, estimate_usage, max_output_tokens, usage_from

if TYPE_CHECKING:
    from .proxy import (
        AGENT_HEADER,
        DRAIN_MAX_BYTES,
        DRAIN_TIMEOUT_S,
        MAX_REQUEST_BYTES,
        MAX_RESPONSE_BYTES,
        MAX_RETRY_WAIT_S,
        RETRY_BASE_S,
        Gateway,
        retry_after_s,
    )

_PROXY_NAMES = frozenset(
    {
        "AGENT_HEADER",
        "DRAIN_MAX_BYTES",
        "DRAIN_TIMEOUT_S",
        "MAX_REQUEST_BYTES",
        "MAX_RESPONSE_BYTES",
        "MAX_RETRY_WAIT_S",
        "RETRY_BASE_S",
        "Gateway",
        "retry_after_s",
    }
)

__all__ = [
    "AGENT_HEADER",
    "DEFAULT_GEMINI_BASE_URL",
    "DEFAULT_OPENAI_BASE_URL",
    "DRAIN_MAX_BYTES",
    "DRAIN_TIMEOUT_S",
    "MAX_REQUEST_BYTES",
    "MAX_RESPONSE_BYTES",
    "MAX_RETRY_WAIT_S",
    "PROVIDERS",
    "REDACTED",
    "RETRY_BASE_S",
    "BudgetMeter",
    "CallRecord",
    "ChainMeter",
    "Gateway",
    "Meter",
    "SeededCall",
    "SpentCall",
    "Totals",
    "Upstream",
    "UpstreamLimiter",
    "agent_upstream",
    "error_body",
    "estimate_usage",
    "max_output_tokens",
    "missing_key_message",
    "retry_after_s",
    "seed_from_telemetry",
    "upstreams_from_env",
    "url_keys",
    "usage_from",
]


def __getattr__(name: str) -> Any:
    # PEP 562: the proxy (and aiohttp with it) is imported when one of its names is first used.
    if name in _PROXY_NAMES:
        from . import proxy

        return getattr(proxy, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Helpers shared by the HTTP model backends: key redaction, environment knobs, upstream naming."""

from __future__ import annotations

import logging
import os
import re
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

MAX_DETAIL = 300
# Labels a call with its agent in the gateway's telemetry (the gateway treats it as untrusted).
AGENT_HEADER = "X-Massgen-Agent"

# OpenAI keys (also masked ones like sk-ab***yz), Google API keys, and ?key= query values.
_KEY_PATTERNS = re.compile(
    r"\bsk-[A-Za-z0-9_\-*.]{6,}"
    r"|\bAIza[0-9A-Za-z_\-]{10,}"
    r"|(?<=key=)[^&\s\"']+"
)


def redact(text: str, *secrets: str | None) -> str:
    """`text` on one line, at most MAX_DETAIL chars, without `secrets` or key-shaped strings."""
    for s in secrets:
        if s and len(s) >= 4:
            text = text.replace(s, "[redacted]")
    text = _KEY_PATTERNS.sub("[redacted]", text)
    text = " ".join(text.split())
    return text if len(text) <= MAX_DETAIL else text[: MAX_DETAIL - 3] + "..."


def env_number(name: str, default: float, *, minimum: float = 0.0) -> float:
    """A number >= `minimum` from the environment; a bad value is logged and the default used."""
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value >= minimum:  # also rejects nan
        log.warning("ignoring %s=%r: want a number >= %s", name, raw, minimum)
        return default
    return value


def upstream_label(base_url: str, socket_path: str | None) -> str:
    """How error messages name the upstream: its host[:port], or the gateway socket."""
    if socket_path:
        return f"model gateway (socket {socket_path})"
    return urlsplit(base_url).netloc or base_url


def gateway_transport(socket_path: str) -> Any:
    """An ``httpx2.AsyncHTTPTransport`` to the model gateway's unix socket.

    The gateway speaks plain HTTP on a socket only this sandbox can reach, so no TLS context
    is built: the default one loads the CA bundle, 20-50 ms of CPU per agent in every sandbox.
    """
    import httpx2

    return httpx2.AsyncHTTPTransport(uds=socket_path, verify=False)

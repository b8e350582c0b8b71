"""OpenAI-compatible providers: which host variable holds the key for an upstream.

Shared by the host gateway (which adds the key) and `--sandbox none` runs (which call directly).
The table follows MassGen's chat-completions backend: the key is chosen by the upstream's host,
so an agent pointed at Cerebras sends `CEREBRAS_API_KEY` there and nothing else.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from urllib.parse import urlsplit

DEFAULT_OPENAI_BASE_URL = "https://api.openai.com/v1"

# host suffix -> the host variables that may hold its key, first wins.
HOST_KEYS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("api.openai.com", ("OPENAI_API_KEY",)),
    ("cerebras.ai", ("CEREBRAS_API_KEY",)),
    ("together.xyz", ("TOGETHER_API_KEY",)),
    ("together.ai", ("TOGETHER_API_KEY",)),
    ("fireworks.ai", ("FIREWORKS_API_KEY",)),
    ("groq.com", ("GROQ_API_KEY",)),
    ("nebius.com", ("NEBIUS_API_KEY",)),
    ("nebius.ai", ("NEBIUS_API_KEY",)),
    ("openrouter.ai", ("OPENROUTER_API_KEY",)),
    ("moonshot.ai", ("MOONSHOT_API_KEY", "KIMI_API_KEY")),
    ("moonshot.cn", ("MOONSHOT_API_KEY", "KIMI_API_KEY")),
    ("aliyuncs.com", ("QWEN_API_KEY", "DASHSCOPE_API_KEY")),
    ("z.ai", ("ZAI_API_KEY",)),
    ("bigmodel.cn", ("ZAI_API_KEY",)),
    ("x.ai", ("XAI_API_KEY",)),
    ("poe.com", ("POE_API_KEY",)),
)

# MassGen backend types that are the OpenAI-compatible backend with a default upstream.
ALIASES: dict[str, str | None] = {
    "chatcompletion": None,  # base_url required
    "grok": "https://api.x.ai/v1",
    "zai": "https://api.z.ai/api/paas/v4/",
    "openrouter": "https://openrouter.ai/api/v1",
    "lmstudio": "http://localhost:1234/v1",
    "vllm": "http://localhost:8000/v1",
    "sglang": "http://localhost:30000/v1",
}


def _host(base_url: str) -> str:
    return (urlsplit(base_url).hostname or "").lower().rstrip(".")


def is_local(base_url: str) -> bool:
    """A server on this machine (LM Studio, vLLM, SGLang, a test fake): it takes no key by default."""
    host = _host(base_url)
    if host in ("localhost", "host.docker.internal") or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def key_vars(provider: str | None, base_url: str | None) -> tuple[str, ...]:
    """The host variables for an OpenAI-compatible upstream's key, in order; () when it takes none.

    The host decides (MassGen's table). Otherwise `type: openai` keeps sending OPENAI_API_KEY to
    whatever `base_url` says (the user pointed it there); an alias (`chatcompletion`, `lmstudio`,
    ...) at an unknown or local host sends no key.
    """
    url = base_url or DEFAULT_OPENAI_BASE_URL
    host = _host(url)
    for suffix, names in HOST_KEYS:
        if host == suffix or host.endswith("." + suffix):
            return names
    if provider in (None, "openai"):
        return ("OPENAI_API_KEY",)
    return ()


def key_from_env(provider: str | None, base_url: str | None, env: Mapping[str, str]) -> str | None:
    for name in key_vars(provider, base_url):
        value = (env.get(name) or "").strip()
        if value:
            return value
    return None

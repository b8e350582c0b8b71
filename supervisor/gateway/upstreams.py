"""Upstreams and keys: where each provider's calls go and the host key they carry.

Adding a provider starts here: its name in `PROVIDERS`, its key and base-URL variables in
`upstreams_from_env`, and the hint in `missing_key_message`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from ..errors import DataFileError
from ..pricing import read_data_file

PROVIDERS = ("openai", "gemini", "claude")
DEFAULT_OPENAI_BASE_URL = "https://api.openai.com/v1"
DEFAULT_GEMINI_BASE_URL = "https://generativelanguage.googleapis.com"
DEFAULT_CLAUDE_BASE_URL = "https://api.anthropic.com"


@dataclass(frozen=True)
class Upstream:
    """Where one provider's calls go, and the key they carry (never in repr)."""

    provider: str
    base_url: str
    api_key: str = field(repr=False)

    @property
    def host(self) -> str:
        """host[:port] for messages; never the URL's userinfo, which may hold a credential."""
        parts = urlsplit(self.base_url)
        if not parts.hostname:
            return "(bad base_url)"
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        return f"{host}:{parts.port}" if parts.port else host


def _env_base_url(provider: str, env: Mapping[str, str]) -> str:
    if provider == "openai":
        return (env.get("OPENAI_BASE_URL") or "").strip() or DEFAULT_OPENAI_BASE_URL
    if provider == "claude":
        return (env.get("ANTHROPIC_BASE_URL") or "").strip() or DEFAULT_CLAUDE_BASE_URL
    return (env.get("GOOGLE_GEMINI_BASE_URL") or "").strip() or DEFAULT_GEMINI_BASE_URL


def upstreams_from_env(env: Mapping[str, str] = os.environ) -> dict[str, Upstream]:
    """The upstreams the host has keys for; a provider without a key is absent.

    Raises:
        DataFileError: ``MASSGEN_KEYS_FILE`` is unreadable or malformed (the message never
            carries a key).
    """
    out: dict[str, Upstream] = {}
    openai_key = (env.get("OPENAI_API_KEY") or "").strip()
    if openai_key:
        out["openai"] = Upstream("openai", _env_base_url("openai", env), openai_key)
    gemini_key = (env.get("GOOGLE_API_KEY") or "").strip() or (env.get("GEMINI_API_KEY") or "").strip()
    if gemini_key:
        out["gemini"] = Upstream("gemini", _env_base_url("gemini", env), gemini_key)
    claude_key = (env.get("ANTHROPIC_API_KEY") or "").strip()
    if claude_key:
        out["claude"] = Upstream("claude", _env_base_url("claude", env), claude_key)
    keys_file = (env.get("MASSGEN_KEYS_FILE") or "").strip()
    if keys_file:
        data = read_data_file(keys_file)
        if not isinstance(data, dict):
            raise DataFileError(keys_file, "want a mapping provider -> {api_key, base_url}")
        for provider, entry in data.items():
            if isinstance(provider, str) and provider.startswith(("http://", "https://")):
                continue  # a key for one upstream URL (see `url_keys`)
            if provider not in PROVIDERS:
                raise DataFileError(keys_file, f"key={provider}: unknown provider (want one of {', '.join(PROVIDERS)})")
            if not isinstance(entry, dict) or not isinstance(entry.get("api_key"), str) or not entry["api_key"].strip():
                raise DataFileError(keys_file, f"key={provider}: want {{api_key: str, base_url: str (optional)}}")
            unknown = entry.keys() - {"api_key", "base_url"}
            if unknown:
                raise DataFileError(keys_file, f"key={provider}: unknown key {sorted(unknown)[0]}")
            base = entry.get("base_url") or _env_base_url(provider, env)
            if not isinstance(base, str) or not base.startswith(("http://", "https://")):
                raise DataFileError(keys_file, f"key={provider}.base_url: want an http(s) URL")
            out[provider] = Upstream(provider, base, entry["api_key"].strip())
    return out


def missing_key_message(provider: str) -> str:
    """Why a provider cannot be called, naming the host variables that would fix it."""
    names = {"gemini": "GEMINI_API_KEY or GOOGLE_API_KEY", "claude": "ANTHROPIC_API_KEY"}.get(
        provider, "OPENAI_API_KEY"
    )
    if provider not in PROVIDERS:
        return f"unknown provider={provider}: the model gateway serves {', '.join(PROVIDERS)}"
    return f"no API key for provider={provider} on the host: set {names} (or a '{provider}' entry in MASSGEN_KEYS_FILE)"


def url_keys(env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Keys for single upstream URLs from ``MASSGEN_KEYS_FILE`` (entries keyed by an http(s) URL).

    For OpenAI-compatible servers the host table does not know (a self-hosted vLLM with a key, two
    servers on one host): ``{"https://llm.example/v1": {"api_key": "..."}}``.

    Raises:
        DataFileError: the file is unreadable or an entry is malformed.
    """
    keys_file = (env.get("MASSGEN_KEYS_FILE") or "").strip()
    if not keys_file:
        return {}
    data = read_data_file(keys_file)
    if not isinstance(data, dict):
        raise DataFileError(keys_file, "want a mapping provider -> {api_key, base_url}")
    out: dict[str, str] = {}
    for url, entry in data.items():
        if not (isinstance(url, str) and url.startswith(("http://", "https://"))):
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("api_key"), str) or not entry["api_key"].strip():
            raise DataFileError(keys_file, f"key={url}: want {{api_key: str}}")
        if entry.keys() - {"api_key"}:
            raise DataFileError(keys_file, f"key={url}: unknown key {sorted(entry.keys() - {'api_key'})[0]}")
        out[url.rstrip("/")] = entry["api_key"].strip()
    return out


def agent_upstream(
    provider: str | None, base_url: str | None, env: Mapping[str, str] = os.environ
) -> tuple[Upstream | None, tuple[str, ...]]:
    """One OpenAI-compatible agent's upstream with the key its host takes, and the variables tried.

    The key: a ``MASSGEN_KEYS_FILE`` entry for exactly this URL; else the host's variable from
    MassGen's table (agent_image/protocol/providers.py); `type: openai` falls back to
    OPENAI_API_KEY (and the file's ``openai`` entry) as before. A local server or an alias at an
    unknown host takes no key (an Upstream with an empty key). None: a key is needed and missing.

    Raises:
        DataFileError: ``MASSGEN_KEYS_FILE`` is unreadable or malformed.
    """
    from agent_image.protocol.providers import key_from_env, key_vars

    url = (base_url or _env_base_url("openai", env)).rstrip("/")
    names = key_vars(provider, url)
    by_url = url_keys(env)
    if url in by_url:
        return Upstream("openai", url, by_url[url]), names
    key = key_from_env(provider, url, env)
    if key is None and names == ("OPENAI_API_KEY",):
        entry = upstreams_from_env(env).get("openai")
        key = entry.api_key if entry is not None else None
    if key is None:
        return (Upstream("openai", url, "") if not names else None), names
    return Upstream("openai", url, key), names

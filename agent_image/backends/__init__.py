"""Model backends behind one protocol; SDK-backed ones are imported only when used."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..protocol.config import AgentConfig
from .base import Backend, BackendError, Completion, Message, ToolCall, ToolSpec, Usage


def make_backend(
    agent: AgentConfig, *, view: Callable[[], Any], sleep: Callable[[float], Any], workspace: str
) -> Backend:
    cfg = agent.backend
    if cfg.type == "scripted":
        from .scripted import ScriptedBackend

        return ScriptedBackend(cfg, view, sleep, workspace)
    if cfg.type == "openai":
        from .openai_backend import OpenAIBackend

        return OpenAIBackend(cfg, agent_id=agent.id)
    if cfg.type == "gemini":
        from .gemini_backend import GeminiBackend

        return GeminiBackend(cfg, agent_id=agent.id)
    if cfg.type == "claude":
        from .claude_backend import ClaudeBackend

        return ClaudeBackend(cfg, agent_id=agent.id)
    raise ValueError(f"unknown backend type {cfg.type!r}")


__all__ = ["Backend", "BackendError", "Completion", "Message", "ToolCall", "ToolSpec", "Usage", "make_backend"]

"""The model backend seam: one completion call over a provider-neutral conversation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class Message:
    """A provider-neutral chat message; backends translate it to their wire format."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None  # role == "tool": which call this answers
    name: str | None = None  # role == "tool": the tool's name (Gemini needs it)


@dataclass(frozen=True)
class ToolSpec:
    """A function tool offered to the model; `parameters` is a JSON Schema object."""

    name: str
    description: str
    parameters: dict[str, Any]


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


@dataclass(frozen=True)
class Completion:
    """One model reply: text and/or tool calls, with what it cost."""

    message: Message
    usage: Usage = field(default_factory=Usage)
    model: str = ""
    latency_s: float = 0.0
    ttft_s: float | None = None


class BackendError(Exception):
    """A model call failed after the backend's own retries; `message` is safe to show and log."""

    def __init__(self, provider: str, message: str, *, status: int | None = None) -> None:
        self.provider = provider
        self.status = status
        super().__init__(f"{provider}: {message}")


class Backend(Protocol):
    """One agent's model. Implementations are stateless about the conversation: the agent
    loop owns the history and passes it whole on every call."""

    provider: str

    async def complete(self, messages: list[Message], tools: list[ToolSpec]) -> Completion:
        """Run one model call.

        Raises:
            BackendError: the provider failed (after bounded retries) or answered garbage.
        """
        ...

    async def aclose(self) -> None: ...

"""Versioned events: what the engine appends to the outbox, the single source of truth of a run."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

EVENT_VERSION = 1
MAX_EVENT_BYTES = 1 << 20  # one line in events.jsonl; larger lines are rejected by the materializer


class _Event(BaseModel):
    # NaN/Infinity would reach status.json as non-standard JSON that strict readers reject
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    v: Literal[1] = 1  # EVENT_VERSION
    seq: int = Field(ge=0)
    ts: float = Field(ge=0, le=1e11)  # bounded so sums and dates stay finite (year ~5000)


class AgentInfo(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    anon: str  # stable anonymous id, agent<N> in config order, used in every prompt/status/log
    backend: str
    model: str | None = None


class RunStarted(_Event):
    type: Literal["run_started"] = "run_started"
    run_id: str
    question: str
    agents: list[AgentInfo]
    timeout_seconds: float
    max_new_answers_per_agent: int | None = None
    sandbox: str = "none"


class TurnStarted(_Event):
    type: Literal["turn_started"] = "turn_started"
    agent: str
    turn: int


class ToolCalled(_Event):
    type: Literal["tool_called"] = "tool_called"
    agent: str
    tool: str = Field(max_length=200)
    summary: str = Field(max_length=500)
    ok: bool = True
    duration_s: float = Field(default=0.0, ge=0, le=1e7)
    kind: Literal["builtin", "custom", "mcp"] = "builtin"  # the toolbox's, a custom tool, an MCP server's


class AnswerSubmitted(_Event):
    type: Literal["answer"] = "answer"
    agent: str
    label: str  # agent<N>.<k>
    content: str


class VoteCast(_Event):
    type: Literal["vote"] = "vote"
    agent: str
    target: str  # real agent id
    reason: str = Field(max_length=4000)


class ErrorKind(StrEnum):
    INVALID_CALL = "invalid_call"
    BACKEND = "backend_error"
    TIMEOUT = "timeout"
    TOOL = "tool_error"


class AgentError(_Event):
    type: Literal["agent_error"] = "agent_error"
    agent: str
    kind: ErrorKind
    message: str = Field(max_length=4000)
    attempt: int = 1


class AgentFailed(_Event):
    type: Literal["agent_failed"] = "agent_failed"
    agent: str
    reason: str
    message: str = Field(max_length=4000)


class ModelCall(_Event):
    type: Literal["model_call"] = "model_call"
    agent: str
    provider: str
    model: str
    prompt_tokens: int = Field(default=0, ge=0, le=10**12)
    completion_tokens: int = Field(default=0, ge=0, le=10**12)
    cached_tokens: int = Field(default=0, ge=0, le=10**12)
    latency_s: float = Field(default=0.0, ge=0, le=1e7)
    ttft_s: float | None = Field(default=None, ge=0, le=1e7)
    cost_usd: float = Field(default=0.0, ge=0, le=1e9)
    ok: bool = True


class WinnerSelected(_Event):
    type: Literal["winner"] = "winner"
    winner: str
    votes: dict[str, int]  # real agent id -> standing votes
    tie: bool = False


class FinalAnswer(_Event):
    type: Literal["final_answer"] = "final_answer"
    agent: str
    content: str


class LogLine(_Event):
    type: Literal["log"] = "log"
    level: Literal["debug", "info", "warning", "error"] = "info"
    message: str = Field(max_length=8000)


class RunFinished(_Event):
    type: Literal["run_finished"] = "run_finished"
    exit_code: int = Field(ge=0, le=4)
    reason: str
    detail: str = ""


Event = Annotated[
    RunStarted
    | TurnStarted
    | ToolCalled
    | AnswerSubmitted
    | VoteCast
    | AgentError
    | AgentFailed
    | ModelCall
    | WinnerSelected
    | FinalAnswer
    | LogLine
    | RunFinished,
    Field(discriminator="type"),
]

EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)


def parse_event(line: str | bytes) -> Event:
    """Validate one JSON line.

    Raises:
        pydantic.ValidationError: the line is not a valid event.
    """
    return EVENT_ADAPTER.validate_json(line)


def dump_event(event: Event) -> str:
    return event.model_dump_json(exclude_none=False)

"""Run configuration: the YAML a user writes, validated strictly, MassGen keys where they mean the same."""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from .tools_config import (
    CustomToolEntry,
    CustomToolSpec,
    McpServerConfig,
    check_tool_keys,
    excluded_custom_tool,
    normalize_mcp_servers,
)

# Dots are allowed after the first letter (MassGen ids such as `gemini2.5flash`); the leading
# letter keeps `.` and `..` out, since ids are path components (final/<id>/, agents/<id>/).
_ID_RE = re.compile(r"\A[A-Za-z][A-Za-z0-9_.-]{0,39}\Z")
MIN_DISK_BYTES = 16 << 20
MIN_DISK_INODES = 256
MAX_CONTEXT_PATHS = 32
_SIZE_RE = re.compile(r"\A\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*\Z", re.IGNORECASE)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Permission(StrEnum):
    READ = "read"
    WRITE = "write"


class ContextPath(_Strict):
    """A host path the agents may read (never write during coordination)."""

    path: str
    permission: Permission = Permission.READ
    # MassGen: sub-paths that stay read-only under a `write` path.
    protected_paths: list[str] = Field(default_factory=list)


# --- scripted backend steps -------------------------------------------------------------


class ShellStep(_Strict):
    shell: str
    timeout: float = Field(default=60.0, gt=0, le=3600)
    save_as: str | None = None


class WriteFileStep(_Strict):
    write_file: str
    content: str = ""


class ReadFileStep(_Strict):
    read_file: str
    save_as: str | None = None


class SleepStep(_Strict):
    sleep: float = Field(ge=0, le=86400)


class AnswerStep(_Strict):
    answer: str


class VoteStep(_Strict):
    vote: str  # a real agent id, an anonymous id (agentN), or "auto"
    reason: str = "scripted vote"


class RawStep(_Strict):
    """Emit arbitrary tool calls (or none) verbatim: for testing the protocol's corrections."""

    raw_tool_calls: list[dict[str, Any]] = Field(default_factory=list)
    text: str = ""


_STEP_KINDS: dict[str, type[_Strict]] = {
    "shell": ShellStep,
    "write_file": WriteFileStep,
    "read_file": ReadFileStep,
    "sleep": SleepStep,
    "answer": AnswerStep,
    "vote": VoteStep,
    "raw_tool_calls": RawStep,
    "text": RawStep,
}


def _step_kind(value: Any) -> str | None:
    # Pick the member by its key so a bad step reports one error against the kind the user
    # meant, not one per union member; tags are class names, which the loader strips from locs.
    if isinstance(value, dict):
        return next((cls.__name__ for key, cls in _STEP_KINDS.items() if key in value), None)
    return type(value).__name__ if isinstance(value, tuple(_STEP_KINDS.values())) else None


ScriptStep = Annotated[
    Annotated[ShellStep, Tag("ShellStep")]
    | Annotated[WriteFileStep, Tag("WriteFileStep")]
    | Annotated[ReadFileStep, Tag("ReadFileStep")]
    | Annotated[SleepStep, Tag("SleepStep")]
    | Annotated[AnswerStep, Tag("AnswerStep")]
    | Annotated[VoteStep, Tag("VoteStep")]
    | Annotated[RawStep, Tag("RawStep")],
    Discriminator(
        _step_kind,
        custom_error_type="unknown_step",
        custom_error_message="unknown step kind; expected one of: shell, write_file, read_file, "
        "sleep, answer, vote, raw_tool_calls",
    ),
]


class BackendConfig(_Strict):
    type: Literal["scripted", "openai", "gemini", "claude"]
    model: str | None = None
    base_url: str | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    max_tokens: int | None = Field(default=None, gt=0)
    # openai: which OpenAI-compatible service (MassGen's type name: chatcompletion, grok, zai,
    # lmstudio, ...); with base_url it chooses the host variable holding the key.
    provider: str | None = None
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=1)  # gemini, claude (openai-compatible: via extra_body)
    verbosity: Literal["low", "medium", "high"] | None = None  # openai (MassGen: text.verbosity)
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = None  # openai (reasoning.effort)
    extra_body: dict[str, Any] | None = None  # openai: merged into the request body
    enable_web_search: bool = False  # gemini: the provider-side google_search tool
    # The shell tool refuses a command unless it matches an allowed pattern (when any are
    # given) and matches no blocked one; patterns use re.match on the whole command (MassGen).
    command_line_allowed_commands: list[str] = Field(default_factory=list)
    command_line_blocked_commands: list[str] = Field(default_factory=list)
    steps: list[ScriptStep] = Field(default_factory=list)
    final: str | None = None  # scripted: final presentation template (default: own latest answer)
    stream: bool = True
    # Tools run inside the sandbox (agent_image/tools/custom.py, mcp_servers.py); MassGen's keys.
    custom_tools: list[CustomToolEntry] = Field(default_factory=list, max_length=64)
    mcp_servers: list[McpServerConfig] = Field(default_factory=list)
    exclude_tools: list[str] = Field(default_factory=list)  # merged with each server's own
    auto_discover_custom_tools: bool = False
    # MassGen's names of tool files/folders to leave out (`excluded_custom_tool`).
    exclude_custom_tools: list[str] = Field(default_factory=list)

    @field_validator("mcp_servers", mode="before")
    @classmethod
    def _servers_mapping(cls, v: Any) -> Any:
        return normalize_mcp_servers(v)

    @field_validator("auto_discover_custom_tools")
    @classmethod
    def _no_discovery(cls, v: bool) -> bool:
        if v:
            raise ValueError(
                "auto_discover_custom_tools loads tools from the host's MassGen installation (its massgen/tool/ "
                "folder) and adds MassGen's registry MCP servers (context7; brave_search and exa_search when "
                "their host API keys are set), downloaded or reached over the network; none of that is in the sandbox. "
                "List the tools you want under custom_tools (their files in a context path), and run MCP "
                "servers from sandbox.image as stdio servers"
            )
        return v

    def custom_tool_specs(self) -> list[tuple[int, CustomToolSpec]]:
        """Every configured custom tool `exclude_custom_tools` leaves, with its `custom_tools` index."""
        return [
            (j, spec)
            for j, entry in enumerate(self.custom_tools)
            for spec in entry.specs()
            if not excluded_custom_tool(spec, self.exclude_custom_tools)
        ]

    @field_validator("command_line_allowed_commands", "command_line_blocked_commands")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        for pattern in v:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"not a regular expression: {pattern!r} ({exc})") from exc
        return v

    @model_validator(mode="after")
    def _check(self) -> BackendConfig:
        check_tool_keys(self.custom_tools, self.mcp_servers)
        if self.type == "scripted":
            if self.model is not None or self.base_url is not None:
                raise ValueError("scripted backend takes no model or base_url")
        else:
            if not self.model:
                raise ValueError(f"backend type {self.type!r} needs a model")
            if self.steps or self.final is not None:
                raise ValueError("steps/final are only for the scripted backend")
        only = {
            "verbosity": "openai",
            "reasoning_effort": "openai",
            "extra_body": "openai",
            "top_k": ("gemini", "claude"),
            "enable_web_search": "gemini",
            "provider": "openai",
        }
        for name, kinds in only.items():
            kinds = (kinds,) if isinstance(kinds, str) else kinds
            if getattr(self, name) not in (None, False) and self.type not in kinds:
                raise ValueError(f"{name} is only for the {' and '.join(kinds)} backend")
        return self


class AgentConfig(_Strict):
    id: str
    backend: BackendConfig
    system_message: str | None = None

    @field_validator("id")
    @classmethod
    def _valid_id(cls, v: str) -> str:
        if not _ID_RE.fullmatch(v):
            raise ValueError("agent id must start with a letter; letters, digits, _ and -, 1-40 chars")
        return v


class OrchestratorConfig(_Strict):
    context_paths: list[ContextPath] = Field(default_factory=list, max_length=MAX_CONTEXT_PATHS)
    max_new_answers_per_agent: int | None = Field(default=None, ge=1)
    max_invalid_turns: int = Field(default=3, ge=1, le=20)
    max_tool_calls_per_turn: int = Field(default=50, ge=1, le=1000)
    # MassGen's wording of the vote prompt: a sentence in the voting prompt.
    voting_sensitivity: Literal["lenient", "balanced", "strict"] | None = None
    # MassGen's agent_temporary_workspace: after each answer, a snapshot of the answering agent's
    # workspace is given to the others to read (/workspace/.peers/<agentN>/).
    share_workspaces: bool = False


class TimeoutSettings(_Strict):
    orchestrator_timeout_seconds: float = Field(default=1800, gt=0)
    agent_timeout_seconds: float = Field(default=600, gt=0)  # one agent turn


class Budget(_Strict):
    max_tokens: int | None = Field(default=None, ge=1)
    max_cost_usd: float | None = Field(default=None, gt=0)
    max_calls: int | None = Field(default=None, ge=1)


def parse_size(value: str | int) -> int:
    """Parse '512m', '2g', '1GiB' or a byte count into bytes."""
    if isinstance(value, int):
        return value
    m = _SIZE_RE.fullmatch(value)
    if not m:
        raise ValueError(f"not a size: {value!r} (try 512m or 2g)")
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


class SandboxConfig(_Strict):
    image: str | None = None
    runtime: Literal["runc", "runsc"] = "runc"
    network: Literal["none"] = "none"
    memory: Annotated[str | int, Field()] = "1g"
    cpus: float = Field(default=1.0, gt=0, le=64)
    pids: int = Field(default=256, ge=16, le=65536)
    timeout_seconds: float | None = Field(default=None, gt=0)
    stop_grace_seconds: float = Field(default=5.0, ge=0, le=120)
    # Per call, for the shell and every custom or MCP tool (the model may ask the shell for more).
    tool_timeout_seconds: float = Field(default=60.0, gt=0, le=3600)
    budget: Budget = Field(default_factory=Budget)
    max_depth: int = Field(default=2, ge=0, le=8)
    max_children: int = Field(default=4, ge=0, le=64)
    # The run's disk budget on the host: workspace, outbox, log dir and snapshots (see
    # docs/architecture.md, "Trust boundaries"); past it writes fail with ENOSPC and the run
    # ends with disk_quota_exceeded.
    disk: Annotated[str | int, Field()] = "1g"
    disk_inodes: int | None = Field(default=None, ge=MIN_DISK_INODES, le=1 << 26)  # default: one per 8 KiB

    @field_validator("memory")
    @classmethod
    def _memory(cls, v: str | int) -> str | int:
        if parse_size(v) < 32 << 20:
            raise ValueError("memory must be at least 32m")
        return v

    @field_validator("disk")
    @classmethod
    def _disk(cls, v: str | int) -> str | int:
        if parse_size(v) < MIN_DISK_BYTES:
            raise ValueError(f"disk must be at least {MIN_DISK_BYTES >> 20}m")
        if parse_size(v) > 1 << 50:
            raise ValueError("disk must be at most 1024t")
        return v

    @model_validator(mode="after")
    def _inodes_fit(self) -> SandboxConfig:
        # ext4 needs at least 1 KiB per inode; more inodes than that cannot be made.
        if self.disk_inodes is not None and self.disk_inodes > self.disk_bytes // 1024:
            most = self.disk_bytes // 1024
            raise ValueError(f"disk_inodes: at most one inode per KiB of disk ({most} for this disk)")
        return self

    @property
    def memory_bytes(self) -> int:
        return parse_size(self.memory)

    @property
    def disk_bytes(self) -> int:
        return parse_size(self.disk)

    @property
    def disk_inode_count(self) -> int:
        return self.disk_inodes if self.disk_inodes is not None else max(MIN_DISK_INODES, self.disk_bytes // 8192)


class UiConfig(_Strict):
    """MassGen's ui section; accepted for compatibility, the CLI flags decide the display."""

    display_type: str | None = None
    logging_enabled: bool | None = None


class RunConfig(_Strict):
    agents: list[AgentConfig] = Field(min_length=1, max_length=16)
    orchestrator: OrchestratorConfig = Field(default_factory=OrchestratorConfig)
    timeout_settings: TimeoutSettings = Field(default_factory=TimeoutSettings)
    sandbox: SandboxConfig = Field(default_factory=SandboxConfig)
    ui: UiConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _single_agent(cls, data: Any) -> Any:
        # MassGen accepts `agent:` (one dict) as well as `agents:` (a list).
        if isinstance(data, dict) and "agent" in data:
            if "agents" in data:
                raise ValueError("give either 'agent' or 'agents', not both")
            data = dict(data)
            data["agents"] = [data.pop("agent")]
        return data

    @model_validator(mode="after")
    def _unique_ids(self) -> RunConfig:
        seen: set[str] = set()
        for i, a in enumerate(self.agents):
            if a.id in seen:
                # A ValidationError keeps its location, so the error points at the duplicate id.
                raise ValidationError.from_exception_data(
                    "RunConfig",
                    [
                        InitErrorDetails(
                            type=PydanticCustomError("duplicate_id", "duplicate agent id '{id}'", {"id": a.id}),
                            loc=("agents", i, "id"),
                            input=a.id,
                        )
                    ],
                )
            seen.add(a.id)
        # The gateway routes OpenAI-compatible calls per agent; Gemini's and Claude's upstream is
        # one per run.
        urls: dict[str, str | None] = {}
        for i, a in enumerate(self.agents):
            if a.backend.type not in ("gemini", "claude"):
                continue
            if urls.setdefault(a.backend.type, a.backend.base_url) != a.backend.base_url:
                raise ValidationError.from_exception_data(
                    "RunConfig",
                    [
                        InitErrorDetails(
                            type=PydanticCustomError(
                                "mixed_base_url",
                                "all {kind} agents of a run must use the same base_url",
                                {"kind": a.backend.type},
                            ),
                            loc=("agents", i, "backend", "base_url"),
                            input=a.backend.base_url,
                        )
                    ],
                )
        return self

    @property
    def agent_ids(self) -> list[str]:
        return [a.id for a in self.agents]

    def effective_timeout(self) -> float:
        """Whole-run deadline in seconds: the sandbox one wins when it is shorter."""
        t = self.timeout_settings.orchestrator_timeout_seconds
        if self.sandbox.timeout_seconds is not None:
            t = min(t, self.sandbox.timeout_seconds)
        return t

    def needs_models(self) -> set[str]:
        return {a.backend.type for a in self.agents if a.backend.type != "scripted"}

"""The status.json document: the seed's sections plus run, container, telemetry and children."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

STATUS_SCHEMA_VERSION = 1


class _M(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RunState(StrEnum):
    QUEUED = "queued"
    STARTING = "starting"
    RUNNING = "running"
    FINISHED = "finished"


class Phase(StrEnum):
    STARTING = "starting"
    INITIAL_ANSWER = "initial_answer"
    VOTING = "voting"
    PRESENTATION = "presentation"
    DONE = "done"
    FAILED = "failed"


class AgentStatus(StrEnum):
    WAITING = "waiting"
    WORKING = "working"
    ANSWERED = "answered"
    VOTED = "voted"
    PRESENTING = "presenting"
    DONE = "done"
    FAILED = "failed"


class ConfigNote(_M):
    """A config warning (or info note) found when the run's config was loaded."""

    severity: str
    key: str = ""
    line: int | None = None
    message: str
    file: str = ""


class Meta(_M):
    run_id: str = ""
    session_id: str = ""  # same as run_id; MassGen's name for it
    log_dir: str = ""
    question: str = ""
    start_time: float | None = None
    last_updated: float | None = None
    elapsed_seconds: float = 0.0
    config_warnings: list[ConfigNote] = Field(default_factory=list)


class RunSection(_M):
    state: RunState = RunState.STARTING
    exit_code: int | None = None
    reason: str | None = None
    detail: str | None = None
    deadline: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    parent_run_id: str | None = None
    depth: int = 0
    sandbox: str = "none"
    supervisor_id: str | None = None
    supervisor_pid: int | None = None


class Coordination(_M):
    phase: Phase = Phase.STARTING
    active_agents: list[str] = Field(default_factory=list)
    active_agent: str | None = None  # MassGen's field: the first of active_agents, or null
    completion_percentage: int = Field(default=0, ge=0, le=100)
    is_final_presentation: bool = False
    total_answers: int = 0
    standing_votes: int = 0


class VoteInfo(_M):
    voted_for_agent: str
    voted_for_anon: str
    voted_for_label: str | None = None
    reason_preview: str = ""


class AgentErrorInfo(_M):
    type: str
    message: str
    timestamp: float


class ToolUsage(_M):
    kind: str = "builtin"
    calls: int = 0
    failures: int = 0
    execution_time_ms: float = 0.0


class ToolStats(_M):
    """MassGen's `tools` section: calls, failures and time, in total and by tool."""

    total_calls: int = 0
    total_failures: int = 0
    total_execution_time_ms: float = 0.0
    by_tool: dict[str, ToolUsage] = Field(default_factory=dict)


class AgentEntry(_M):
    anon: str
    backend: str = ""
    model: str | None = None
    status: AgentStatus = AgentStatus.WAITING
    answer_count: int = 0
    latest_answer_label: str | None = None
    vote_cast: VoteInfo | None = None
    turns: int = 0
    times_restarted: int = 0  # MassGen's field: turns after the first (each new look at the answers)
    errors: int = 0
    last_activity: float | None = None
    error: AgentErrorInfo | None = None
    tools: ToolStats = Field(default_factory=ToolStats)


class Results(_M):
    votes: dict[str, int] = Field(default_factory=dict)  # answer label -> standing votes
    winner: str | None = None
    final_answer_preview: str | None = None
    answer_file: str | None = None


class ContainerSection(_M):
    id: str | None = None
    image: str | None = None
    runtime: str | None = None
    state: str | None = None
    exit_code: int | None = None
    oom_killed: bool = False
    cpu_percent: float | None = None
    memory_bytes: int | None = None
    pids: int | None = None


class DiskSection(_M):
    """The run's disk budget and what it uses (its filesystem, log dir, snapshots, children)."""

    mode: str = "mount"  # mount: a filesystem of its own (ENOSPC past it) | poll: measured, may slip
    detail: str | None = None  # why the budget is polled rather than mounted
    budget_bytes: int = 0
    budget_inodes: int = 0
    used_bytes: int = 0
    used_inodes: int = 0


class Usage(_M):
    calls: int = 0
    failed_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    total_tokens: int = 0
    cost_usd: float = 0.0
    latency_s: float = 0.0


class Telemetry(_M):
    totals: Usage = Field(default_factory=Usage)
    by_model: dict[str, Usage] = Field(default_factory=dict)
    by_agent: dict[str, Usage] = Field(default_factory=dict)


class ChildEntry(_M):
    run_id: str
    state: RunState = RunState.STARTING
    exit_code: int | None = None
    reason: str | None = None
    log_dir: str | None = None


class Costs(_M):
    """MassGen's `costs` section: the same numbers as telemetry.totals."""

    total_estimated_cost: float = 0.0
    total_input_tokens: int = 0
    total_output_tokens: int = 0


class Status(_M):
    schema_version: int = STATUS_SCHEMA_VERSION
    # MassGen's top-level fields (v0.1.38+): is_complete is run.state == finished; finish_reason
    # is in_progress, completed (exit 0), timeout (exit 3) or error (any other exit);
    # finish_reason_details is "<reason>: <detail>" once finished.
    is_complete: bool = False
    finish_reason: str = "in_progress"
    finish_reason_details: str | None = None
    meta: Meta = Field(default_factory=Meta)
    run: RunSection = Field(default_factory=RunSection)
    coordination: Coordination = Field(default_factory=Coordination)
    agents: dict[str, AgentEntry] = Field(default_factory=dict)
    results: Results = Field(default_factory=Results)
    container: ContainerSection | None = None
    disk: DiskSection | None = None
    telemetry: Telemetry = Field(default_factory=Telemetry)
    costs: Costs = Field(default_factory=Costs)
    tools: ToolStats = Field(default_factory=ToolStats)  # every agent's, summed
    children: list[ChildEntry] = Field(default_factory=list)

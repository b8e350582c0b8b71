"""Exit codes, reasons and the result.json document, identical for top-level and nested runs."""

from __future__ import annotations

from enum import IntEnum, StrEnum

from pydantic import BaseModel, ConfigDict, Field

from .status import ConfigNote

RESULT_SCHEMA_VERSION = 1


class ExitCode(IntEnum):
    OK = 0
    CONFIG = 1
    EXECUTION = 2
    TIMEOUT = 3
    INTERRUPTED = 4


class Reason(StrEnum):
    COMPLETED = "completed"
    CONFIG_INVALID = "config_invalid"
    CONFIG_MISSING = "config_missing"
    PATH_MISSING = "path_missing"
    IMAGE_MISSING = "image_missing"
    KEY_MISSING = "key_missing"
    PRICE_MISSING = "price_missing"
    AGENT_FAILED = "agent_failed"
    BACKEND_ERROR = "backend_error"
    CONTAINER_CRASHED = "container_crashed"
    OOM = "oom"
    BUDGET_EXCEEDED = "budget_exceeded"
    NO_ANSWER = "no_answer"
    SUPERVISOR_LOST = "supervisor_lost"
    LIMIT_EXCEEDED = "limit_exceeded"
    DISK_QUOTA_EXCEEDED = "disk_quota_exceeded"
    MAX_DEPTH_EXCEEDED = "max_depth_exceeded"
    MAX_CHILDREN_EXCEEDED = "max_children_exceeded"
    MAX_TOTAL_CHILDREN_EXCEEDED = "max_total_children_exceeded"
    PATH_NOT_ALLOWED = "path_not_allowed"
    WRITE_NOT_ALLOWED = "write_not_allowed"
    GATEWAY_UNAVAILABLE = "gateway_unavailable"
    BASE_URL_NOT_ALLOWED = "base_url_not_allowed"
    SUPERVISOR_ERROR = "supervisor_error"
    ENGINE_UNAVAILABLE = "engine_unavailable"
    # The sandbox never got running: a pod unschedulable or its image unpullable past the start
    # timeout, or a linked sandbox whose channel never came up (the detail says which).
    START_FAILED = "start_failed"
    TOOL_UNAVAILABLE = "tool_unavailable"  # a custom tool or MCP server cannot be offered
    IMAGE_INVALID = "image_invalid"  # sandbox.image does not carry the engine
    TIMEOUT = "timeout"
    INTERRUPTED = "interrupted"


REASON_EXIT: dict[Reason, ExitCode] = {
    Reason.COMPLETED: ExitCode.OK,
    Reason.CONFIG_INVALID: ExitCode.CONFIG,
    Reason.CONFIG_MISSING: ExitCode.CONFIG,
    Reason.PATH_MISSING: ExitCode.CONFIG,
    Reason.IMAGE_MISSING: ExitCode.CONFIG,
    Reason.KEY_MISSING: ExitCode.CONFIG,
    Reason.PRICE_MISSING: ExitCode.CONFIG,
    Reason.AGENT_FAILED: ExitCode.EXECUTION,
    Reason.BACKEND_ERROR: ExitCode.EXECUTION,
    Reason.CONTAINER_CRASHED: ExitCode.EXECUTION,
    Reason.OOM: ExitCode.EXECUTION,
    Reason.BUDGET_EXCEEDED: ExitCode.EXECUTION,
    Reason.NO_ANSWER: ExitCode.EXECUTION,
    Reason.SUPERVISOR_LOST: ExitCode.EXECUTION,
    Reason.LIMIT_EXCEEDED: ExitCode.EXECUTION,
    Reason.DISK_QUOTA_EXCEEDED: ExitCode.EXECUTION,
    Reason.MAX_DEPTH_EXCEEDED: ExitCode.EXECUTION,
    Reason.MAX_CHILDREN_EXCEEDED: ExitCode.EXECUTION,
    Reason.MAX_TOTAL_CHILDREN_EXCEEDED: ExitCode.EXECUTION,
    Reason.PATH_NOT_ALLOWED: ExitCode.EXECUTION,
    Reason.WRITE_NOT_ALLOWED: ExitCode.EXECUTION,
    Reason.GATEWAY_UNAVAILABLE: ExitCode.EXECUTION,
    Reason.BASE_URL_NOT_ALLOWED: ExitCode.EXECUTION,
    Reason.SUPERVISOR_ERROR: ExitCode.EXECUTION,
    Reason.ENGINE_UNAVAILABLE: ExitCode.CONFIG,
    Reason.START_FAILED: ExitCode.EXECUTION,
    Reason.TOOL_UNAVAILABLE: ExitCode.CONFIG,
    Reason.IMAGE_INVALID: ExitCode.CONFIG,
    Reason.TIMEOUT: ExitCode.TIMEOUT,
    Reason.INTERRUPTED: ExitCode.INTERRUPTED,
}


def exit_code_for(reason: str) -> int:
    try:
        return int(REASON_EXIT[Reason(reason)])
    except ValueError:
        return int(ExitCode.EXECUTION)


class RunResult(BaseModel):
    """result.json: written once, on every exit path."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = RESULT_SCHEMA_VERSION
    run_id: str
    exit_code: int
    reason: str
    detail: str = ""
    winner: str | None = None
    answer_file: str | None = None
    status_file: str
    log_dir: str
    started_at: float | None = None
    finished_at: float
    duration_s: float | None = None
    container_exit_code: int | None = None
    container_id: str | None = None
    config_warnings: list[ConfigNote] = Field(default_factory=list)

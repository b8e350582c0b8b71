"""Bodies of the supervisor's HTTP API (the daemon socket and each run's own socket)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

MAX_CONFIG_TEXT = 1 << 20


class _M(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SubmitRun(_M):
    """Start a run: a config as YAML text (read by the client) or a bundled example name."""

    question: str = Field(min_length=1, max_length=100_000)
    config_text: str | None = Field(default=None, max_length=MAX_CONFIG_TEXT)
    config_name: str = Field(default="<submitted>", max_length=4096)  # for error messages only
    example: str | None = Field(default=None, max_length=200)
    config_path: str | None = Field(default=None, max_length=4096)  # daemon socket only: a host path
    logs_root: str | None = Field(default=None, max_length=4096)  # daemon socket only: an absolute host path
    config_unreadable: str | None = Field(default=None, max_length=1000)  # the client could not read the file


class RunInfo(_M):
    """A run as the caller sees it: paths are valid in the caller's own view of the filesystem."""

    run_id: str
    parent_run_id: str | None = None
    depth: int = 0
    state: str
    phase: str | None = None
    exit_code: int | None = None
    reason: str | None = None
    detail: str | None = None
    log_dir: str
    status_file: str
    agents: list[str] | None = None
    question: str = ""
    elapsed_s: float | None = None


class ErrorBody(_M):
    error: str
    detail: str = ""

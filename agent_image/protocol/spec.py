"""The run spec: what the supervisor hands the engine (spec.json in the sandbox's outbox)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class RunSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    run_id: str
    question: str
    config: dict[str, Any]  # the raw config mapping; the engine validates it again
    outbox: str  # paths as the engine sees them (inside the sandbox, or host paths for --sandbox none)
    workspace: str
    context_paths: list[str] = []
    write_context_paths: list[str] = []  # of context_paths: writable by the final presenter
    sandbox: str = "none"
    deadline: float | None = None  # unix time; the engine times itself out just before it
    parent_run_id: str | None = None
    depth: int = 0


# Every image that can run the engine carries this label (agent_image/Dockerfile sets it, and
# images built FROM the agent image inherit it); the value changes with the engine's protocol.
ENGINE_LABEL = "io.massgen.engine"
ENGINE_PROTOCOL = "1"

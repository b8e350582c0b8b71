"""The engine behind a conformance `Runtime`, for what a test checks beside the CLI's own output."""

from __future__ import annotations

from typing import Any

from supervisor.runtime.base import LABEL_RUN
from supervisor.runtime.docker import DockerRuntime, RemoteDockerRuntime
from tests.conformance.conftest import Runtime


def engine_of(rt: Runtime) -> DockerRuntime:
    """A runtime object on the engine `rt` runs its sandboxes on (the remote one by its env)."""
    if rt.name == "remote-docker":
        return RemoteDockerRuntime(environment=rt.env, timeout=30)
    return DockerRuntime(timeout=30)


def inspect(rt: Runtime, container_id: str) -> dict[str, Any]:
    """The engine's `inspect` of a sandbox (Config.Env, Mounts, ...)."""
    return dict(engine_of(rt)._api.inspect_container(container_id))


def no_container_for(rt: Runtime, run_id: str) -> bool:
    """Whether the run's sandbox is gone from its engine (found by label)."""
    return engine_of(rt).list_owned({LABEL_RUN: run_id}) == []

"""The engine behind a conformance `Runtime`, for what a test checks beside the CLI's own output."""

from __future__ import annotations

from typing import Any

from supervisor.runtime.base import LABEL_RUN
from supervisor.runtime.docker import DockerRuntime, RemoteDockerRuntime
from supervisor.runtime.kubernetes.runtime import KubernetesRuntime
from tests.conformance.conftest import Runtime


def engine_of(rt: Runtime) -> Any:
    """A runtime object on the engine `rt` runs its sandboxes on (the remote one, the fake
    cluster, by its env)."""
    if rt.name == "kubernetes":
        return KubernetesRuntime(env=rt.env)
    if rt.name == "remote-docker":
        return RemoteDockerRuntime(environment=rt.env, timeout=30)
    return DockerRuntime(timeout=30)


def inspect(rt: Runtime, container_id: str) -> dict[str, Any]:
    """The engine's `inspect` of a sandbox (Config.Env, Mounts, ...); on kubernetes the cluster's
    view instead: `Config` is the run's Job and `Pods` its pods, as the API server serves them."""
    if rt.name == "kubernetes":
        kube = engine_of(rt)
        return {"Config": kube._job(container_id), "Pods": kube._pods(container_id)[0]}
    return dict(engine_of(rt)._api.inspect_container(container_id))


def no_container_for(rt: Runtime, run_id: str) -> bool:
    """Whether the run's sandbox is gone from its engine (found by label)."""
    found: list[Any] = engine_of(rt).list_owned({LABEL_RUN: run_id})
    return found == []

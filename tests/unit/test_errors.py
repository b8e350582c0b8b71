"""One error root, and Docker SDK failures mapped to it by DockerRuntime (a fake client, no engine)."""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

import docker.errors
import pytest
import requests.exceptions

from supervisor import errors
from supervisor.errors import (
    ContainerRuntimeError,
    ImageBuildFailed,
    ImageMissing,
    RuntimeCallFailed,
    RuntimeUnavailable,
    SandboxStartFailed,
    SupervisorError,
)
from supervisor.runtime.base import SandboxSpec
from supervisor.runtime.docker import DockerHandle, DockerRuntime


def test_every_error_in_the_tree_is_a_supervisor_error_and_drawn_in_the_docstring() -> None:
    """Each class in supervisor.errors subclasses SupervisorError and appears in the module's tree."""
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass) if c.__module__ == errors.__name__]
    assert len(classes) >= 10
    doc = errors.__doc__ or ""
    for cls in classes:
        assert issubclass(cls, SupervisorError), cls
        assert re.search(rf"^\s*(│|├──|└──|\s)*{cls.__name__}\b", doc, re.M), cls
    assert issubclass(errors.DataFileError, ValueError)
    for cls in (RuntimeUnavailable, RuntimeCallFailed, ImageMissing, ImageBuildFailed, SandboxStartFailed):
        assert issubclass(cls, ContainerRuntimeError)


class _Api:
    def __init__(self, raises: BaseException) -> None:
        self.raises = raises

    def __getattr__(self, name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            raise self.raises

        return call


class _Containers:
    def __init__(self, raises: BaseException) -> None:
        self.raises = raises

    def create(self, **kwargs: Any) -> Any:
        raise self.raises


class _Client:
    def __init__(self, raises: BaseException) -> None:
        self.api = _Api(raises)
        self.containers = _Containers(raises)


def _runtime(raises: BaseException) -> DockerRuntime:
    return DockerRuntime(client=_Client(raises))  # type: ignore[arg-type]


def _spec() -> SandboxSpec:
    return SandboxSpec(
        run_id="log_x", image="massgen-sandbox/agent:none", command=("true",), mounts=(), env={}, labels={}
    )


def _api_error(status: int, cls: type[docker.errors.APIError] = docker.errors.APIError) -> docker.errors.APIError:
    resp = requests.models.Response()
    resp.status_code = status
    return cls("refused", response=resp, explanation="the engine said no")


def test_create_failures_map_to_image_missing_start_failed_or_unavailable() -> None:
    """containers.create: ImageNotFound -> ImageMissing, APIError -> SandboxStartFailed, no engine -> RuntimeUnavailable."""
    with pytest.raises(ImageMissing) as missing:
        _runtime(_api_error(404, docker.errors.ImageNotFound)).start(_spec())
    assert isinstance(missing.value.__cause__, docker.errors.ImageNotFound)
    with pytest.raises(SandboxStartFailed, match="create: the engine said no"):
        _runtime(_api_error(500)).start(_spec())
    with pytest.raises(RuntimeUnavailable, match="op=create"):
        _runtime(requests.exceptions.ConnectionError("no socket")).start(_spec())


def test_wait_maps_read_timeout_to_still_running_and_vanished_to_unknown_exit() -> None:
    """wait(): a read timeout means still running (None); NotFound means vanished (exit -1)."""
    assert _runtime(requests.exceptions.ReadTimeout("read timed out")).wait(DockerHandle("c1"), 0.1) is None
    gone = _runtime(_api_error(404, docker.errors.NotFound)).wait(DockerHandle("c1"), 0.1)
    assert gone is not None and gone.exit_code == -1 and gone.error
    with pytest.raises(RuntimeCallFailed, match="op=wait target=c1"):
        _runtime(_api_error(500)).wait(DockerHandle("c1"), 0.1)
    with pytest.raises(RuntimeUnavailable, match="op=wait"):
        _runtime(requests.exceptions.ConnectionError("refused")).wait(DockerHandle("c1"), 0.1)


def test_image_calls_map_refusals_to_image_build_failed(tmp_path: Path) -> None:
    """build and import: an engine refusal is ImageBuildFailed (cause kept); a lost engine RuntimeUnavailable."""
    with pytest.raises(ImageBuildFailed, match="the engine said no") as built:
        _runtime(_api_error(500)).build_image(tmp_path, "t:1")
    assert isinstance(built.value.__cause__, docker.errors.APIError)
    with pytest.raises(ImageBuildFailed, match="import"):
        _runtime(_api_error(500)).import_rootfs(tmp_path / "r.tar", "t:1")
    with pytest.raises(RuntimeUnavailable, match="op=build"):
        _runtime(requests.exceptions.ConnectionError("refused")).build_image(tmp_path, "t:1")


def test_a_missing_engine_is_runtime_unavailable_on_first_use(monkeypatch: pytest.MonkeyPatch) -> None:
    """Constructing needs no engine; the first call without one raises RuntimeUnavailable, never an SDK error."""
    runtime = DockerRuntime(environment={"DOCKER_HOST": "unix:///nonexistent/docker.sock"}, timeout=2)
    with pytest.raises(RuntimeUnavailable):
        runtime.ping()

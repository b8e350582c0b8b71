"""Fixtures for tests against a real Docker engine: the runtime, the agent image, label cleanup."""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest

from supervisor.errors import ContainerRuntimeError
from supervisor.images import ensure_images
from supervisor.runtime.base import (
    LABEL_RUN,
    ExitInfo,
    SandboxHandle,
    SandboxSpec,
)
from supervisor.runtime.docker import DockerHandle, DockerRuntime

LABEL_TEST = "io.massgen.test-id"


def _unreachable(message: str) -> None:
    if os.environ.get("MASSGEN_REQUIRE_DOCKER") == "1":
        pytest.fail(f"{message} (MASSGEN_REQUIRE_DOCKER=1: docker tests must not skip)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def runtime() -> DockerRuntime:
    """A DockerRuntime on an engine that answers (fail or skip otherwise)."""
    rt = DockerRuntime.from_env(timeout=60)
    try:
        rt.ping()
    except ContainerRuntimeError as exc:
        _unreachable(f"no Docker engine answers ({exc}); start one with `bash .ci/docker-up.sh`")
    return rt


@pytest.fixture(scope="session")
def agent_image(runtime: DockerRuntime) -> str:
    """The agent image tag, built first if missing (about a minute from a cold cache)."""

    def progress(line: str) -> None:
        print(f"image: {line}", file=sys.stderr, flush=True)

    return ensure_images(runtime, progress=progress)


class Sandboxes:
    """Starts test sandboxes under one unique test label and removes all of them afterwards."""

    def __init__(self, runtime: DockerRuntime, image: str) -> None:
        self.runtime = runtime
        self.image = image
        self.test_id = uuid.uuid4().hex[:12]
        self._count = 0

    def spec(self, *command: str, **overrides: Any) -> SandboxSpec:
        self._count += 1
        run_id = f"test_{self.test_id}_{self._count}"
        base = SandboxSpec(
            run_id=run_id,
            image=self.image,
            command=command,
            mounts=(),
            env={},
            labels={LABEL_TEST: self.test_id, LABEL_RUN: run_id},
            memory_bytes=256 << 20,
            pids_limit=128,
            tmpfs_bytes=64 << 20,
        )
        return replace(base, **overrides)

    def start(self, *command: str, **overrides: Any) -> DockerHandle:
        return self.runtime.start(self.spec(*command, **overrides))

    def wait_exit(self, handle: SandboxHandle, timeout: float = 60.0) -> ExitInfo:
        info = self.runtime.wait(handle, timeout=timeout)
        assert info is not None, f"sandbox {handle.id[:12]} still running after {timeout}s"
        return info

    def run(self, *command: str, **overrides: Any) -> tuple[ExitInfo, str]:
        """Start, wait for the exit, return (exit info, combined output)."""
        handle = self.start(*command, **overrides)
        info = self.wait_exit(handle)
        return info, self.runtime.logs(handle).decode(errors="replace")

    def wait_for_output(self, handle: SandboxHandle, text: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.runtime.logs(handle).decode(errors="replace"):
            assert time.monotonic() < deadline, f"{text!r} not in output after {timeout}s"
            time.sleep(0.05)

    def cleanup(self) -> None:
        for facts in self.runtime.list_owned({LABEL_TEST: self.test_id}):
            handle = DockerHandle(facts.id)
            self.runtime.kill(handle)
            self.runtime.remove(handle)


@pytest.fixture
def sandboxes(runtime: DockerRuntime, agent_image: str) -> Iterator[Sandboxes]:
    """A per-test sandbox factory; every container it labelled is removed in teardown."""
    box = Sandboxes(runtime, agent_image)
    yield box
    box.cleanup()
    assert runtime.list_owned({LABEL_TEST: box.test_id}) == []


@pytest.fixture
def until() -> Callable[..., None]:
    """Poll a condition until it holds or a deadline passes."""

    def poll(condition: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
            time.sleep(0.05)

    return poll

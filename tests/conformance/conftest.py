"""The runtime conformance suite's parameter: every case runs on each runtime listed in RUNTIMES.

`docker` is the local engine; `remote-docker` the engine of tests/remote/engine.py, reached
only over TLS and linked through the run channel; `kubernetes-fake` later.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from tests.remote.fixtures import remote_agent_image, remote_engine

__all__ = ["Runtime", "remote_agent_image", "remote_engine", "runtime_under_test"]

RUNTIMES = ["docker", "remote-docker"]


@dataclass(frozen=True)
class Runtime:
    """How the real CLI is pointed at one runtime: extra arguments and environment."""

    name: str
    args: tuple[str, ...] = ("--sandbox", "docker")
    env: dict[str, str] = field(default_factory=dict)


@pytest.fixture(params=RUNTIMES)
def runtime_under_test(request: pytest.FixtureRequest) -> Runtime:
    """One runtime per parameter (a missing engine fails under MASSGEN_REQUIRE_DOCKER=1)."""
    name = str(request.param)
    if name == "docker":
        return Runtime(name)
    env = dict(request.getfixturevalue("remote_engine"))
    request.getfixturevalue("remote_agent_image")
    return Runtime(name, ("--sandbox", "docker", "--runtime", name), env)

"""pytest fixtures for the remote engine (import them into a conftest: tests/remote, tests/conformance)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from supervisor.images import agent_image_tag
from tests.remote import engine


@pytest.fixture(scope="session")
def remote_engine() -> Iterator[dict[str, str]]:
    """DOCKER_HOST, DOCKER_TLS_VERIFY and DOCKER_CERT_PATH of the remote engine.

    Uses the engine `.ci/run` brought up; otherwise starts it (and stops it at the end of the
    session). When it cannot be had: a failure under MASSGEN_REQUIRE_DOCKER=1, else a skip.
    """
    started = False
    if not engine.answers():
        try:
            engine.up(say=False)
            started = True
        except (engine.EngineError, OSError) as exc:
            message = f"remote engine unavailable: {exc}"
            if os.environ.get("MASSGEN_REQUIRE_DOCKER") == "1":
                pytest.fail(f"{message} (MASSGEN_REQUIRE_DOCKER=1: must not skip)")
            pytest.skip(message)
    yield engine.engine_env()
    if started:
        engine.down(say=False)


@pytest.fixture(scope="session")
def remote_agent_image(remote_engine: dict[str, str]) -> str:
    """The agent image tag, present on the remote engine (pushed when missing)."""
    tag = agent_image_tag()
    engine.push_image(tag, remote_engine, say=False)
    return tag

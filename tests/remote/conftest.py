"""Fixtures for tests against the remote engine (a second dockerd in its own network namespace)."""

from tests.remote.fixtures import remote_agent_image, remote_engine

__all__ = ["remote_agent_image", "remote_engine"]

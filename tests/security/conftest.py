"""The security suite: attacks from inside real sandboxes, each asserting what must hold.

Every test here is marked `security` (and `docker`: it needs a real engine). The fixtures come
from `tests/docker/conftest.py`; a future runtime (remote Docker, Kubernetes) runs this same
suite by providing its own `runtime` and `agent_image` fixtures.
"""

from __future__ import annotations

import pytest

from tests.docker.conftest import agent_image, runtime, sandboxes, until

__all__ = ["agent_image", "runtime", "sandboxes", "until"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/security/" in str(item.fspath):
            item.add_marker(pytest.mark.security)
            item.add_marker(pytest.mark.docker)

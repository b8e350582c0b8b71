"""pytest fixtures for the fake Kubernetes API (tests/fakes/kube_api.py): import them into a conftest."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes.kube_api import FakeKubeAPI


@pytest.fixture(scope="session")
def fake_kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeKubeAPI]:
    """The fake API server of the session, its pods backed by the local Docker engine.

    A missing engine fails under MASSGEN_REQUIRE_DOCKER=1, else skips (as every docker test).
    """
    try:
        api = FakeKubeAPI().start()
    except Exception as exc:  # noqa: BLE001 - no engine: say so the way the docker tests do
        message = f"the fake Kubernetes API needs the local Docker engine: {exc}"
        if os.environ.get("MASSGEN_REQUIRE_DOCKER") == "1":
            pytest.fail(f"{message} (MASSGEN_REQUIRE_DOCKER=1: must not skip)")
        pytest.skip(message)
    try:
        yield api
        # Every run of the session deleted its Job: nothing is left in the cluster (zombie pods
        # and Jobs are what users of other Kubernetes sandboxes complain about).
        end = time.monotonic() + 30
        left = api.call(api.cluster.left)
        while any(left.values()) and time.monotonic() < end:
            time.sleep(0.5)
            left = api.call(api.cluster.left)
        assert not any(left.values()), f"left in the fake cluster after the session: {left}"
    finally:
        api.close()


@pytest.fixture(scope="session")
def fake_kubeconfig(fake_kube: FakeKubeAPI, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A kubeconfig pointing at the fake (namespace massgen)."""
    return fake_kube.kubeconfig(tmp_path_factory.mktemp("kube") / "config")

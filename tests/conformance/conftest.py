"""The runtime conformance suite's parameter: every case runs on each runtime listed in RUNTIMES.

`docker` is the local engine; `remote-docker` the engine of tests/remote/engine.py, reached
only over TLS and linked through the run channel; `kubernetes` the fake API server of
tests/fakes/kube_api.py (pods backed by containers on the local engine, linked over pods/exec);
`kubernetes-real` a real cluster, only when MASSGEN_K8S_KUBECONFIG names one (its nodes must be
able to pull the agent image's tag, e.g. `kind load docker-image`; tests/k8s/test_real_cluster.py
says when it did not run).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pytest

from tests.fakes.kube_fixtures import fake_kube, fake_kubeconfig
from tests.remote.fixtures import remote_agent_image, remote_engine

__all__ = ["Runtime", "fake_kube", "fake_kubeconfig", "remote_agent_image", "remote_engine", "runtime_under_test"]

RUNTIMES = ["docker", "remote-docker", "kubernetes"]
REAL_KUBECONFIG = os.environ.get("MASSGEN_K8S_KUBECONFIG", "")
if REAL_KUBECONFIG:
    RUNTIMES.append("kubernetes-real")


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
    if name == "kubernetes":
        config = request.getfixturevalue("fake_kubeconfig")
        return Runtime(name, ("--sandbox", "docker", "--runtime", name), {"MASSGEN_K8S_KUBECONFIG": str(config)})
    if name == "kubernetes-real":
        env = {"MASSGEN_K8S_KUBECONFIG": REAL_KUBECONFIG}
        if os.environ.get("MASSGEN_K8S_NAMESPACE"):
            env["MASSGEN_K8S_NAMESPACE"] = os.environ["MASSGEN_K8S_NAMESPACE"]
        return Runtime("kubernetes", ("--sandbox", "docker", "--runtime", "kubernetes"), env)
    env = dict(request.getfixturevalue("remote_engine"))
    request.getfixturevalue("remote_agent_image")
    return Runtime(name, ("--sandbox", "docker", "--runtime", name), env)

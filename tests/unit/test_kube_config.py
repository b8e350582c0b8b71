"""Where KubernetesRuntime finds its cluster and namespace (no cluster contacted: config only)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from supervisor.errors import RuntimeUnavailable
from supervisor.runtime.kubernetes.runtime import KubernetesRuntime
from supervisor.runtime.select import RUNTIMES, make_runtime


def _kubeconfig(path: Path, server: str, namespace: str | None) -> Path:
    context: dict[str, str] = {"cluster": "c", "user": "u"}
    if namespace:
        context["namespace"] = namespace
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": server}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "c", "context": context}],
                "current-context": "c",
            }
        )
    )
    return path


def test_kubeconfig_precedence_and_namespace(tmp_path: Path) -> None:
    """MASSGEN_K8S_KUBECONFIG before KUBECONFIG; MASSGEN_K8S_NAMESPACE before the context's, else massgen."""
    ours = _kubeconfig(tmp_path / "ours", "http://127.0.0.1:1", "team-a")
    theirs = _kubeconfig(tmp_path / "theirs", "http://127.0.0.1:2", None)
    rt = KubernetesRuntime(env={"MASSGEN_K8S_KUBECONFIG": str(ours), "KUBECONFIG": str(theirs)})
    assert (rt.namespace, rt.endpoint) == ("team-a", f"http://127.0.0.1:1 (from {ours})")
    rt = KubernetesRuntime(env={"KUBECONFIG": f"{theirs}:{ours}"})
    assert (rt.namespace, rt.endpoint) == ("massgen", f"http://127.0.0.1:2 (from {theirs})")
    rt = KubernetesRuntime(env={"MASSGEN_K8S_KUBECONFIG": str(ours), "MASSGEN_K8S_NAMESPACE": "runs"})
    assert rt.namespace == "runs"
    env = {
        "MASSGEN_K8S_KUBECONFIG": str(ours),
        "MASSGEN_K8S_RUNTIME_CLASS": "kata",
        "MASSGEN_K8S_PULL_POLICY": "Always",
    }
    settings = KubernetesRuntime(env=env).settings
    assert (settings.runtime_class_gvisor, settings.image_pull_policy) == ("kata", "Always")


def test_no_configuration_is_a_clear_error(tmp_path: Path) -> None:
    """Neither a kubeconfig nor a service account: RuntimeUnavailable saying where it looked."""
    with pytest.raises(RuntimeUnavailable, match="in-cluster service account"):
        KubernetesRuntime(env={"HOME": str(tmp_path), "KUBERNETES_SERVICE_HOST": "10.0.0.1"}).ping()
    bad = tmp_path / "bad"
    bad.write_text("not: [a kubeconfig")
    with pytest.raises(RuntimeUnavailable, match=str(bad)):
        KubernetesRuntime(env={"MASSGEN_K8S_KUBECONFIG": str(bad)}).ping()


def test_the_runtime_is_selectable_and_constructing_it_contacts_nothing() -> None:
    """`--runtime kubernetes` is known, and make_runtime builds it without a cluster."""
    assert "kubernetes" in RUNTIMES
    rt = make_runtime("kubernetes", {"MASSGEN_K8S_KUBECONFIG": "/nonexistent"})
    assert (rt.name, rt.linked) == ("kubernetes", True)
    assert KubernetesRuntime(env={"MASSGEN_K8S_START_TIMEOUT": "7.5"})._start_timeout == 7.5


def test_the_lifecycle_gives_an_adopted_pending_pod_the_operators_start_timeout() -> None:
    """A re-adopted run whose pod is still Pending (an image pull) gets MASSGEN_K8S_START_TIMEOUT,
    not the generic 120 s, before it ends start_failed; runtimes without a setting keep the generic one."""
    from supervisor.lifecycle import _start_timeout
    from supervisor.runtime.base import START_TIMEOUT_S

    assert _start_timeout(KubernetesRuntime(env={"MASSGEN_K8S_START_TIMEOUT": "300"})) == 300.0
    assert _start_timeout(KubernetesRuntime(env={})) == START_TIMEOUT_S
    assert _start_timeout(object()) == START_TIMEOUT_S


@pytest.mark.parametrize("raw", ["abc", "-5", "0", "nan", "inf"])
def test_a_start_timeout_that_is_not_a_positive_number_is_refused_naming_the_variable(raw: str) -> None:
    with pytest.raises(ValueError, match=r"MASSGEN_K8S_START_TIMEOUT=.*positive number of seconds"):
        KubernetesRuntime(env={"MASSGEN_K8S_START_TIMEOUT": raw})

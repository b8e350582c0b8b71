"""deploy/kubernetes/: the supervisor's manifests, checked against the real schemas and against the code.

Strict validation (`kubernetes-validate`, unknown fields refused) for every version it ships from
1.29 on, then what the schemas cannot say: the Role is exactly what the runtime needs, the
NetworkPolicy selects the label the runtime's Jobs really carry, and the Deployment's arguments
parse with the daemon's own parser.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from supervisor import daemon
from supervisor.runtime.base import LABEL_OWNER
from supervisor.runtime.kubernetes.manifests import KubeSettings, job_manifest, kube_labels, valid_name
from tests.unit.test_kube_manifests import NOW, VERSIONS, spec

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
NAMESPACE = "massgen"
_VAR_RE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def _kustomization() -> dict[str, Any]:
    loaded = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    assert isinstance(loaded, dict)
    return loaded


def _docs() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for name in _kustomization()["resources"]:
        for doc in yaml.safe_load_all((DEPLOY / name).read_text()):
            assert isinstance(doc, dict), name
            docs.append(doc)
    return docs


def _one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in _docs() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def _pod_spec() -> dict[str, Any]:
    pod: dict[str, Any] = _one("Deployment")["spec"]["template"]["spec"]
    return pod


def _container() -> dict[str, Any]:
    containers = _pod_spec()["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def test_kustomization_lists_every_manifest() -> None:
    listed = set(_kustomization()["resources"])
    present = {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_is_valid_in_strict_mode(version: str) -> None:
    docs = _docs()
    assert {d["kind"] for d in docs} >= {
        "Namespace", "ServiceAccount", "Role", "RoleBinding", "NetworkPolicy", "PersistentVolumeClaim",
        "ConfigMap", "Service", "Deployment",
    }  # fmt: skip
    for doc in docs:
        assert kubernetes_validate.validate(doc, version, strict=True) == version, doc["metadata"]["name"]


def test_everything_is_in_one_namespace_with_valid_names() -> None:
    for doc in _docs():
        meta = doc["metadata"]
        assert valid_name(meta["name"]), meta["name"]
        if doc["kind"] == "Namespace":
            assert meta["name"] == NAMESPACE
        else:
            assert meta["namespace"] == NAMESPACE, (doc["kind"], meta["name"])
    assert not [d for d in _docs() if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]


def test_the_role_grants_exactly_what_the_runtime_calls() -> None:
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in _one("Role")["rules"]:
        assert "*" not in rule["apiGroups"] + rule["resources"] + rule["verbs"], rule
        assert "resourceNames" not in rule and "nonResourceURLs" not in rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    assert granted == {
        ("batch", "jobs"): {"create", "get", "list", "watch", "delete"},
        ("", "pods"): {"get", "list", "watch", "delete"},
        ("", "pods/exec"): {"create", "get"},
        ("", "pods/log"): {"get"},
        ("", "events"): {"get", "list", "watch"},
    }


def test_the_binding_gives_the_role_to_the_deployments_account() -> None:
    binding = _one("RoleBinding")
    account = _one("ServiceAccount")["metadata"]["name"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "massgen-supervisor"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}]
    assert _pod_spec()["serviceAccountName"] == account


def test_run_pods_are_denied_all_traffic_by_the_label_their_jobs_carry() -> None:
    policy = _one("NetworkPolicy", "massgen-runs-deny-all")["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    assert "ingress" not in policy and "egress" not in policy  # no rule: nothing allowed
    wanted = policy["podSelector"]["matchLabels"]
    assert wanted == kube_labels({LABEL_OWNER: "1"})
    for runtime in ("runc", "runsc"):
        pod_labels = job_manifest(spec(runtime=runtime), KubeSettings(namespace=NAMESPACE), now=NOW)["spec"]["template"]
        assert wanted.items() <= pod_labels["metadata"]["labels"].items()
    # ... and the supervisor is not a run pod: its own policy leaves its egress open.
    assert not wanted.items() <= _one("Deployment")["spec"]["template"]["metadata"]["labels"].items()


def test_the_supervisor_pod_is_hardened() -> None:
    deployment = _one("Deployment")["spec"]
    assert deployment["replicas"] == 1 and deployment["strategy"] == {"type": "Recreate"}
    pod = _pod_spec()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = _container()["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["privileged"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
    assert not [v for v in pod["volumes"] if "hostPath" in v]


def _env() -> dict[str, str]:
    """The container's environment as the kubelet resolves it (ConfigMap keys looked up)."""
    config = _one("ConfigMap", "massgen-supervisor")["data"]
    claims = {v["name"]: v for v in _pod_spec()["volumes"]}
    assert claims["logs"]["persistentVolumeClaim"]["claimName"] == _one("PersistentVolumeClaim")["metadata"]["name"]
    env: dict[str, str] = {}
    for item in _container()["env"]:
        if "value" in item:
            env[item["name"]] = item["value"]
            continue
        ref = item["valueFrom"]
        if "configMapKeyRef" in ref:
            assert ref["configMapKeyRef"]["name"] == "massgen-supervisor"
            env[item["name"]] = config[ref["configMapKeyRef"]["key"]]  # a missing key fails here
        else:
            assert ref == {"fieldRef": {"fieldPath": "metadata.namespace"}}
            env[item["name"]] = NAMESPACE
    return env


def test_the_arguments_parse_with_the_daemons_own_parser() -> None:
    env = _env()
    args = []
    for arg in _container()["args"]:
        for var in _VAR_RE.findall(arg):
            assert var in env, f"$({var}) is not defined in the container's env"
        args.append(_VAR_RE.sub(lambda m: env[m.group(1)], arg))
    parsed = daemon._parser().parse_args(args)
    assert parsed.image == env["MASSGEN_AGENT_IMAGE"]
    assert parsed.max_concurrent == 8
    assert parsed.web == ("0.0.0.0", 8080)
    mounts = {m["mountPath"] for m in _container()["volumeMounts"]}
    for path in (parsed.socket, parsed.logs_root, Path(env["MASSGEN_SOCKET_DIR"])):
        assert any(str(path).startswith(m + "/") for m in mounts), f"{path} is on the read-only root"
    assert env["MASSGEN_RUNTIME"] == "kubernetes"
    assert env["MASSGEN_K8S_NAMESPACE"] == NAMESPACE


def test_probes_and_the_service_reach_what_the_daemon_serves() -> None:
    container = _container()
    sock = (
        daemon._parser().parse_args([a for a in container["args"] if not _VAR_RE.search(a)][:4]).socket
    )  # --socket and --logs-root come first
    for probe in ("readinessProbe", "livenessProbe"):
        code = container[probe]["exec"]["command"][-1]
        assert f"'{sock}'" in code and "/v1/health" in code
    assert "/v1/health" in daemon.OPENAPI["paths"]
    service = _one("Service")["spec"]
    assert service["selector"].items() <= _one("Deployment")["spec"]["template"]["metadata"]["labels"].items()
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert all(p["targetPort"] in port_names for p in service["ports"])
    assert port_names["http"] == 8080


def test_provider_keys_come_only_from_a_secret() -> None:
    container = _container()
    assert container["envFrom"] == [{"secretRef": {"name": "massgen-provider-keys", "optional": True}}]
    assert not [e for e in container["env"] if e["name"].endswith("_API_KEY")]

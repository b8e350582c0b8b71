"""supervisor/runtime/kubernetes/manifests.py: the Job of a run, checked against the real schemas.

Strict validation (`kubernetes-validate`, unknown fields refused) for every Kubernetes version
it ships from 1.29 on, and our own checks for what the schemas do not say.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import kubernetes_validate
import pytest
from kubernetes_validate import utils as kv_utils

from supervisor.runtime.base import (
    LABEL_DEADLINE,
    LABEL_LOG_DIR,
    LABEL_OWNER,
    LABEL_PARENT,
    LABEL_RUN,
    LABEL_SUPERVISOR,
    LABEL_WORKSPACE,
    Mount,
    SandboxSpec,
    Tmpfs,
)
from supervisor.runtime.kubernetes.manifests import (
    ANNOTATION_LABELS,
    KubeSettings,
    check_job,
    job_manifest,
    job_name,
    label_value,
    selector,
    valid_label_key,
    valid_label_value,
    valid_name,
)

RUN_ID = "log_20261202_092435_123456_abcdef"
NOW = 1_800_000_000.0


def _versions() -> list[str]:
    found = sorted(
        {kv_utils.major_minor(v) for v in kv_utils.all_versions()}, key=lambda s: tuple(map(int, s.split(".")))
    )
    return [v for v in found if tuple(map(int, v.split("."))) >= (1, 29)]


VERSIONS = _versions()


def spec(**over: Any) -> SandboxSpec:
    labels = {
        LABEL_OWNER: "1",
        LABEL_SUPERVISOR: "embedded",
        LABEL_RUN: RUN_ID,
        LABEL_PARENT: "",
        LABEL_DEADLINE: f"{NOW + 600:.3f}",
        LABEL_LOG_DIR: "/var/lib/massgen/logs/" + "deep/" * 20 + RUN_ID,
        LABEL_WORKSPACE: "/var/lib/massgen/ws/" + RUN_ID,
    }
    fields: dict[str, Any] = {
        "run_id": RUN_ID,
        "image": "registry.example/massgen-agent:1",
        "command": ("python3", "-m", "agent_image.channel.hub", "--", "python3", "-m", "agent_image"),
        "mounts": (),
        "env": {"MASSGEN_RUN_ID": RUN_ID, "A": "b"},
        "labels": labels,
        "memory_bytes": 2 << 30,
        "nano_cpus": 1_500_000_000,
        "tmpfs_bytes": 64 << 20,
        "tmpfs_mounts": (Tmpfs("/workspace", 256 << 20), Tmpfs("/run/massgen", 16 << 20, inodes=1000)),
        "start_timeout": 30.0,
    }
    fields.update(over)
    return SandboxSpec(**fields)


def job(**over: Any) -> dict[str, Any]:
    return job_manifest(spec(**over), KubeSettings(namespace="runs"), now=NOW)


def test_every_shipped_version_from_1_29_is_tested() -> None:
    assert VERSIONS[0] == "1.29"
    assert len(VERSIONS) >= 2
    assert VERSIONS[-1] == kv_utils.major_minor(kv_utils.latest_version())


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("runtime", ["runc", "runsc"])
def test_job_is_valid_in_strict_mode(version: str, runtime: str) -> None:
    body = job(runtime=runtime)
    assert kubernetes_validate.validate(body, version, strict=True) == version
    assert check_job(body) == []


@pytest.mark.parametrize("version", VERSIONS)
def test_strict_validation_refuses_an_unknown_field(version: str) -> None:
    """The validator does fail: a misspelt field is refused in strict mode."""
    body = job()
    body["spec"]["template"]["spec"]["containers"][0]["readOnlyRootFileSystem"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(body, version, strict=True)


def test_job_fields() -> None:
    body = job(runtime="runsc")
    js = body["spec"]
    pod = js["template"]["spec"]
    c = pod["containers"][0]
    assert js["backoffLimit"] == 0
    assert js["activeDeadlineSeconds"] == 600 + 30 + 60
    assert js["ttlSecondsAfterFinished"] == 3600
    assert js["podFailurePolicy"]["rules"][0] == {
        "action": "FailJob",
        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
    }
    assert all(r["action"] == "FailJob" for r in js["podFailurePolicy"]["rules"])
    assert pod["restartPolicy"] == "Never"
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False
    assert pod["hostNetwork"] is False
    assert pod["dnsPolicy"] == "None"
    assert pod["runtimeClassName"] == "gvisor"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert c["resources"]["limits"] == {"memory": str(2 << 30), "cpu": "1500m", "ephemeral-storage": str(1 << 30)}
    assert c["resources"]["requests"] == c["resources"]["limits"]
    assert c["env"] == [{"name": "A", "value": "b"}, {"name": "MASSGEN_RUN_ID", "value": RUN_ID}]
    vols = {v["name"]: v["emptyDir"] for v in pod["volumes"]}
    assert vols == {
        "tmp": {"medium": "Memory", "sizeLimit": str(64 << 20)},
        "t0": {"medium": "Memory", "sizeLimit": str(256 << 20)},
        "t1": {"medium": "Memory", "sizeLimit": str(16 << 20)},
    }
    assert {m["mountPath"] for m in c["volumeMounts"]} == {"/tmp", "/workspace", "/run/massgen"}
    assert "hostPath" not in str(body)


def test_runc_has_no_runtime_class_and_the_gvisor_name_is_configurable() -> None:
    assert "runtimeClassName" not in job()["spec"]["template"]["spec"]
    body = job_manifest(spec(runtime="runsc"), KubeSettings(runtime_class_gvisor="gvisor-ptrace"), now=NOW)
    assert body["spec"]["template"]["spec"]["runtimeClassName"] == "gvisor-ptrace"


def test_labels_are_mapped_and_paths_go_to_annotations() -> None:
    meta = job()["metadata"]
    assert meta["labels"] == {
        "massgen.io/sandbox": "1",
        "massgen.io/supervisor-id": "embedded",
        "massgen.io/run-id": RUN_ID,
        "massgen.io/parent-run-id": "",
        "massgen.io/deadline": f"{NOW + 600:.3f}",
    }
    assert meta["annotations"]["massgen.io/log-dir"].endswith(RUN_ID)
    assert '"io.massgen.log-dir"' in meta["annotations"][ANNOTATION_LABELS]


def test_label_values_that_are_not_valid_are_digested_stably() -> None:
    odd = "sup/with spaces and a very long name " * 3
    body = job(labels={**spec().labels, LABEL_SUPERVISOR: odd})
    value = body["metadata"]["labels"]["massgen.io/supervisor-id"]
    assert valid_label_value(value) and value == label_value(odd)
    assert check_job(body) == []
    assert f"massgen.io/supervisor-id={value}" in selector({LABEL_SUPERVISOR: odd})


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("", True),
        ("a", True),
        ("a" * 63, True),
        ("a" * 64, False),
        ("-a", False),
        ("a-", False),
        ("a_b.c-d", True),
        ("a/b", False),
        ("1764.5", True),
    ],
)
def test_label_value_rule(value: str, ok: bool) -> None:
    assert valid_label_value(value) is ok


@pytest.mark.parametrize(
    ("key", "ok"),
    [
        ("massgen.io/run-id", True),
        ("io.massgen.run-id", True),
        ("Massgen.io/x", False),
        ("a/" + "b" * 64, False),
        ("/x", False),
    ],
)
def test_label_key_rule(key: str, ok: bool) -> None:
    assert valid_label_key(key) is ok


@pytest.mark.parametrize("run_id", [RUN_ID, "x" * 200, "UPPER_and_under", "___", "a"])
def test_job_names_are_dns_labels_and_distinct(run_id: str) -> None:
    name = job_name(run_id)
    assert valid_name(name), name
    assert len(name) <= 63
    assert job_name(run_id + "1") != name


def test_check_job_finds_what_schemas_allow() -> None:
    """Each rule of check_job fires on a body the schema alone accepts."""
    base = job()
    cases: list[tuple[str, str]] = []

    def case(mutate: Any, expect: str) -> None:
        body = copy.deepcopy(base)
        mutate(body)
        kubernetes_validate.validate(body, VERSIONS[-1], strict=True)
        problems = check_job(body)
        assert any(expect in p for p in problems), (expect, problems)
        cases.append((expect, str(problems)))

    def pod(b: dict[str, Any]) -> dict[str, Any]:
        spec: dict[str, Any] = b["spec"]["template"]["spec"]
        return spec

    case(lambda b: b["metadata"].__setitem__("name", "x" * 64), "DNS-1123")
    case(lambda b: b["metadata"]["labels"].__setitem__("massgen.io/run-id", "bad value"), "valid label value")
    case(lambda b: b["metadata"]["labels"].__setitem__("massgen.io/run-id", "a" * 64), "valid label value")
    case(lambda b: pod(b).__setitem__("restartPolicy", "OnFailure"), "podFailurePolicy needs restartPolicy Never")
    case(lambda b: b["spec"].__setitem__("backoffLimit", 6), "backoffLimit")
    case(lambda b: pod(b).__setitem__("hostNetwork", True), "host namespaces")
    case(lambda b: pod(b)["volumes"].append({"name": "h", "hostPath": {"path": "/"}}), "hostPath")
    case(lambda b: pod(b).__setitem__("dnsConfig", {}), "nameservers")
    assert len(cases) == 8


def test_refuses_host_mounts_a_network_and_a_named_user() -> None:
    from pathlib import Path

    with pytest.raises(ValueError, match="host mounts"):
        job(mounts=(Mount(Path("/etc"), "/etc"),))
    with pytest.raises(ValueError, match="without network"):
        job(network="bridge")
    with pytest.raises(ValueError, match="numeric"):
        job(user="agent")


def test_deadline_from_now_and_without_a_label() -> None:
    later = job_manifest(spec(), KubeSettings(), now=NOW + 500)
    assert later["spec"]["activeDeadlineSeconds"] == 100 + 90
    past = job_manifest(spec(), KubeSettings(), now=NOW + 10_000)
    assert past["spec"]["activeDeadlineSeconds"] == 1 + 90
    labels = {k: v for k, v in spec().labels.items() if k != LABEL_DEADLINE}
    none = job_manifest(spec(labels=labels), KubeSettings(default_run_s=7200), now=time.time())
    assert none["spec"]["activeDeadlineSeconds"] == 7200 + 90

"""The Kubernetes objects of one run, as plain dicts (pure functions: no client, no cluster).

Each run is a `batch/v1` Job of one pod that never restarts and is never re-run
(docs/kubernetes.md says why each field is what it is). The dicts are the JSON bodies the
official client sends; tests/unit/test_kube_manifests.py validates them in strict mode against
the real schemas of every Kubernetes version `kubernetes-validate` ships from 1.29 on, plus
`check_job` for what the schemas do not say.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from supervisor.runtime.base import (
    LABEL_DEADLINE,
    LABEL_LOG_DIR,
    LABEL_OWNER,
    LABEL_PARENT,
    LABEL_RUN,
    LABEL_SUPERVISOR,
    LABEL_WORKSPACE,
    SandboxSpec,
)

# Our label keys (io.massgen.*, Docker style) as Kubernetes label keys under our own prefix.
KEY_MAP: dict[str, str] = {
    LABEL_OWNER: "massgen.io/sandbox",
    LABEL_SUPERVISOR: "massgen.io/supervisor-id",
    LABEL_RUN: "massgen.io/run-id",
    LABEL_PARENT: "massgen.io/parent-run-id",
    LABEL_DEADLINE: "massgen.io/deadline",
}
# Values that are paths (longer than 63, with '/'): annotations, never labels.
ANNOTATION_MAP: dict[str, str] = {
    LABEL_LOG_DIR: "massgen.io/log-dir",
    LABEL_WORKSPACE: "massgen.io/workspace",
}
# Every label we were given, exactly, so facts() can hand back the spec's labels unchanged.
ANNOTATION_LABELS = "massgen.io/labels"
CONTAINER = "sandbox"
SANDBOX_UID = 10001

_LABEL_VALUE_RE = re.compile(r"\A(?:[A-Za-z0-9](?:[A-Za-z0-9._-]{0,61}[A-Za-z0-9])?)?\Z")
_DNS_LABEL_RE = re.compile(r"\A[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")
_LABEL_NAME_RE = re.compile(r"\A[A-Za-z0-9](?:[A-Za-z0-9._-]{0,61}[A-Za-z0-9])?\Z")
_DNS_SUBDOMAIN_RE = re.compile(r"\A[a-z0-9](?:[a-z0-9.-]{0,251}[a-z0-9])?\Z")


@dataclass(frozen=True)
class KubeSettings:
    """What the operator chooses for every run's Job (docs/kubernetes.md)."""

    namespace: str = "massgen"
    image_pull_policy: str = "IfNotPresent"
    runtime_class_gvisor: str = "gvisor"
    grace_s: int = 30  # SIGTERM -> SIGKILL (terminationGracePeriodSeconds), also added to the deadline
    # Past the run's deadline + grace the in-sandbox hub kills the engine itself (+10 s); the Job's
    # activeDeadlineSeconds is the last backstop after that, so it comes later still.
    deadline_slack_s: int = 60
    default_run_s: int = 24 * 3600  # a spec without a deadline label (never from the lifecycle)
    ttl_after_finished_s: int = 3600
    ephemeral_storage_bytes: int = 1 << 30
    # emptyDir medium "Memory": a tmpfs, so sizeLimit is enforced by the kernel (ENOSPC) and counts
    # against the memory limit, as the Tmpfs contract of runtime/base.py says. Disk-backed
    # emptyDirs are only enforced by the kubelet evicting the whole pod.
    emptydir_medium: str = "Memory"


def valid_label_value(value: str) -> bool:
    """A Kubernetes label value: at most 63 chars of [A-Za-z0-9._-], alphanumeric at both ends (or empty)."""
    return bool(_LABEL_VALUE_RE.fullmatch(value))


def valid_label_key(key: str) -> bool:
    """A label key: an optional DNS subdomain prefix and '/', then a name of at most 63 chars."""
    prefix, slash, name = key.rpartition("/")
    if slash and not prefix:
        return False
    if prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN_RE.fullmatch(prefix)):
        return False
    return bool(_LABEL_NAME_RE.fullmatch(name))


def valid_name(name: str) -> bool:
    """A DNS-1123 label (Job, pod and volume names here): at most 63 chars of [a-z0-9-]."""
    return bool(_DNS_LABEL_RE.fullmatch(name))


def label_value(value: str) -> str:
    """`value` if it is a valid label value, else a stable digest of it (the original is annotated)."""
    if valid_label_value(value):
        return value
    return "h" + hashlib.sha256(value.encode("utf-8")).hexdigest()[:40]


def job_name(run_id: str) -> str:
    """The Job's name for a run: readable, at most 63 chars, distinct for distinct run ids."""
    base = re.sub(r"[^a-z0-9-]+", "-", run_id.lower()).strip("-")[:44].strip("-")
    digest = hashlib.sha256(run_id.encode("utf-8")).hexdigest()[:8]
    return f"mg-{base}-{digest}" if base else f"mg-{digest}"


def kube_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """Our labels (io.massgen.*) as Kubernetes labels; unknown keys and path values are left out."""
    return {KEY_MAP[k]: label_value(v) for k, v in sorted(labels.items()) if k in KEY_MAP}


def selector(labels: Mapping[str, str]) -> str:
    """A label selector matching objects that carry all of `labels` and the owner label."""
    wanted = {**kube_labels(labels), KEY_MAP[LABEL_OWNER]: "1"}
    return ",".join(f"{k}={v}" for k, v in sorted(wanted.items()))


def _uid_gid(user: str) -> tuple[int, int]:
    uid, _, gid = user.partition(":")
    if not uid.isdigit() or (gid and not gid.isdigit()):
        raise ValueError(f"the sandbox user must be numeric uid[:gid], not {user!r}")
    return int(uid), int(gid or uid)


def active_deadline_s(labels: Mapping[str, str], now: float, settings: KubeSettings) -> int:
    """The Job's activeDeadlineSeconds: the run's deadline from `now`, plus grace and slack."""
    raw = labels.get(LABEL_DEADLINE)
    left = float(raw) - now if raw else float(settings.default_run_s)
    return max(1, math.ceil(left)) + settings.grace_s + settings.deadline_slack_s


def job_manifest(spec: SandboxSpec, settings: KubeSettings, *, now: float) -> dict[str, Any]:
    """The batch/v1 Job for `spec`; `now` (unix seconds) turns the absolute deadline into seconds.

    Raises:
        ValueError: the spec asks for what this runtime never does (host mounts, a network).
    """
    if spec.mounts:
        raise ValueError("the kubernetes runtime takes no host mounts (tmpfs_mounts and the run channel instead)")
    if spec.network != "none":
        raise ValueError(f"the kubernetes runtime runs sandboxes without network, not {spec.network!r}")
    uid, gid = _uid_gid(spec.user)
    name = job_name(spec.run_id)
    given = dict(spec.labels)
    given.setdefault(LABEL_RUN, spec.run_id)
    given[LABEL_OWNER] = "1"
    labels = kube_labels(given)
    annotations = {ANNOTATION_MAP[k]: v for k, v in sorted(given.items()) if k in ANNOTATION_MAP}
    annotations[ANNOTATION_LABELS] = json.dumps(given, sort_keys=True, separators=(",", ":"))
    medium = {"medium": settings.emptydir_medium} if settings.emptydir_medium else {}
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {**medium, "sizeLimit": str(spec.tmpfs_bytes)}}]
    mounts: list[dict[str, Any]] = [{"name": "tmp", "mountPath": "/tmp"}]  # noqa: S108 - the sandbox's own tmp
    for i, t in enumerate(spec.tmpfs_mounts):
        volumes.append({"name": f"t{i}", "emptyDir": {**medium, "sizeLimit": str(t.size_bytes)}})
        mounts.append({"name": f"t{i}", "mountPath": t.target})
    cpu = f"{max(1, spec.nano_cpus // 1_000_000)}m"
    resources = {
        "memory": str(spec.memory_bytes),
        "cpu": cpu,
        "ephemeral-storage": str(settings.ephemeral_storage_bytes),
    }
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": list(spec.command),
        "workingDir": spec.workdir,
        "env": [{"name": k, "value": v} for k, v in sorted(spec.env.items())],
        "volumeMounts": mounts,
        # Requests equal to limits: the Guaranteed QoS class, the last the kubelet evicts.
        "resources": {"limits": dict(resources), "requests": dict(resources)},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "runAsUser": uid,
            "runAsGroup": gid,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "hostNetwork": False,
        "hostPID": False,
        "hostIPC": False,
        # No DNS at all: the pod needs no network (the NetworkPolicy denies it all anyway);
        # dnsPolicy None needs one nameserver, and loopback has none listening.
        "dnsPolicy": "None",
        "dnsConfig": {"nameservers": ["127.0.0.1"]},
        "terminationGracePeriodSeconds": settings.grace_s,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": uid,
            "runAsGroup": gid,
            "fsGroup": gid,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    if spec.runtime == "runsc":
        pod_spec["runtimeClassName"] = settings.runtime_class_gvisor
    meta = {"name": name, "namespace": settings.namespace, "labels": labels, "annotations": annotations}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": meta,
        "spec": {
            "backoffLimit": 0,
            "completions": 1,
            "parallelism": 1,
            "activeDeadlineSeconds": active_deadline_s(given, now, settings),
            "ttlSecondsAfterFinished": settings.ttl_after_finished_s,
            # A disrupted pod (eviction, preemption, node drain) fails the Job instead of being
            # re-run (which would spend the run's tokens twice); so does any non-zero exit,
            # explicitly, beside backoffLimit 0.
            "podFailurePolicy": {
                "rules": [
                    {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
                    {
                        "action": "FailJob",
                        "onExitCodes": {"containerName": CONTAINER, "operator": "NotIn", "values": [0]},
                    },
                ]
            },
            "template": {"metadata": {"labels": dict(labels), "annotations": dict(annotations)}, "spec": pod_spec},
        },
    }


def check_job(job: Mapping[str, Any]) -> list[str]:
    """What the schemas do not say but the API server (or we) insist on; empty when all holds."""
    problems: list[str] = []
    meta = job.get("metadata") or {}
    spec = job.get("spec") or {}
    template = spec.get("template") or {}
    pod = template.get("spec") or {}
    if not valid_name(str(meta.get("name", ""))):
        problems.append(f"job name {meta.get('name')!r} is not a DNS-1123 label of at most 63 chars")
    for where, labels in (
        ("job", meta.get("labels") or {}),
        ("pod", (template.get("metadata") or {}).get("labels") or {}),
    ):
        for k, v in labels.items():
            if not valid_label_key(k):
                problems.append(f"{where} label key {k!r} is invalid")
            if not valid_label_value(str(v)):
                problems.append(f"{where} label {k}={v!r} is not a valid label value")
    if spec.get("podFailurePolicy") and pod.get("restartPolicy") != "Never":
        problems.append("podFailurePolicy needs restartPolicy Never")
    if pod.get("restartPolicy") not in ("Never", "OnFailure"):
        problems.append("a Job's pods must have restartPolicy Never or OnFailure")
    if spec.get("backoffLimit") != 0:
        problems.append("backoffLimit must be 0: a run is never re-run")
    if pod.get("hostNetwork") or pod.get("hostPID") or pod.get("hostIPC"):
        problems.append("host namespaces are never shared")
    if pod.get("dnsPolicy") == "None" and not (pod.get("dnsConfig") or {}).get("nameservers"):
        problems.append("dnsPolicy None needs dnsConfig.nameservers")
    for v in pod.get("volumes") or []:
        if not valid_name(str(v.get("name", ""))):
            problems.append(f"volume name {v.get('name')!r} is not a DNS-1123 label")
        if set(v) - {"name", "emptyDir"}:
            problems.append(f"volume {v.get('name')!r} is not an emptyDir (hostPath and others are never used)")
    for c in pod.get("containers") or []:
        sc = c.get("securityContext") or {}
        if sc.get("allowPrivilegeEscalation") is not False or sc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"container {c.get('name')!r} is not hardened")
    return problems

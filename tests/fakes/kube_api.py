"""A contract fake of the Kubernetes API: exactly the calls `KubernetesRuntime` makes, on loopback.

Jobs and pods are kept in memory; each pod is backed by a real container on the local Docker
engine (the Job's image, command, env, user and limits; no bind mount, no network; every
emptyDir a tmpfs of its sizeLimit), so the run channel goes end to end through the real
`kubernetes` client, its websocket exec and the real hub. What is emulated, and the
Kubernetes documentation each behaviour follows:

- Job creation: the job controller creates one pod named `<job>-<5 chars>` with the template's
  labels plus `batch.kubernetes.io/job-name`, `job-name` and `controller-uid`, an owner
  reference and the `batch.kubernetes.io/job-tracking` finalizer
  (https://kubernetes.io/docs/concepts/workloads/controllers/job/#job-tracking-with-finalizers),
  and a `SuccessfulCreate` event on the Job.
- Scheduling and the kubelet: `Scheduled` event, `PodScheduled` True; an image missing on the
  engine is `ErrImagePull`, then `ImagePullBackOff`, with `Failed`/`BackOff` Warning events and
  the pod Pending for good (https://kubernetes.io/docs/concepts/containers/images/
  #imagepullbackoff); else `Pulled`, `Created`, `Started` and phase Running.
- A container's end: `state.terminated` with `exitCode` and reason `OOMKilled` (the engine's
  OOMKilled), `Completed` (0) or `Error`; phase Succeeded or Failed (restartPolicy Never).
- The Job's end (https://kubernetes.io/docs/concepts/workloads/controllers/job/): since 1.31 a
  terminal condition is preceded by an interim one, `SuccessCriteriaMet` before `Complete` and
  `FailureTarget` before `Failed`, with the same reason; the podFailurePolicy's rules are
  checked in order (`onPodConditions`, `onExitCodes` with `In`/`NotIn`) and FailJob gives
  reason `PodFailurePolicy`; otherwise backoffLimit 0 gives `BackoffLimitExceeded`.
- `activeDeadlineSeconds` from the Job's `status.startTime`: `FailureTarget` with reason
  `DeadlineExceeded`, its pods deleted (with their grace), then `Failed`.
- Deletion (https://kubernetes.io/docs/concepts/architecture/garbage-collection/): a pod
  gets `deletionTimestamp`; the kubelet stops its container with SIGTERM, then SIGKILL after the
  grace (`gracePeriodSeconds`, else the pod's `terminationGracePeriodSeconds`), records the
  terminated state, and the pod is removed once its finalizers are gone (the DELETED watch
  event carries its last state). A Job deleted with `propagationPolicy: Foreground` gets the
  `foregroundDeletion` finalizer and stays until its pods are gone; `Background` deletes them
  after it; with no policy the Job's pods are orphaned (batch/v1's default for a Job through
  the API, https://kubernetes.io/docs/concepts/workloads/controllers/job/#job-termination-and-cleanup).
- Lists: `labelSelector` (equality terms), `fieldSelector` (`metadata.name`, and for events
  `involvedObject.kind`/`.name`); watches (`watch=true`) replay from `resourceVersion`, then
  stream `ADDED`/`MODIFIED`/`DELETED` one JSON a line, ending after `timeoutSeconds`
  (https://kubernetes.io/docs/reference/using-api/api-concepts/#efficient-detection-of-changes);
  a resourceVersion older than the history kept is `410 Gone` as an ERROR event.
- pods/log: the container's output (`tailLines`); `400` while the container waits to start.
- pods/exec (https://kubernetes.io/docs/reference/kubernetes-api/workload-resources/pod-v1/
  and KEP-4006 for v5): a websocket with subprotocol `v5.channel.k8s.io` or
  `v4.channel.k8s.io`; every message's first byte is the channel: 0 stdin, 1 stdout, 2 stderr,
  3 the exit status (a metav1.Status: Success, or Failure with reason NonZeroExitCode and the
  code in `details.causes[ExitCode]`), then the server closes; v5 adds channel 255, whose
  payload `[0]` half-closes stdin. An exec on a pod not running is refused before the upgrade
  (400), as the API server does.
- Errors are metav1.Status bodies with `reason` NotFound (404) / AlreadyExists (409) / BadRequest.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import random
import re
import socket
import string
import struct
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import docker
import docker.errors
import docker.types
from aiohttp import WSMsgType, web

V5 = "v5.channel.k8s.io"
V4 = "v4.channel.k8s.io"
HISTORY = 5000  # watch events kept for replay
OWNER_LABEL = "massgen.io/fake-kube"  # on the backing containers: the fake's own, to clean up


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _quantity(value: Any) -> int:
    """A resource quantity in bytes (plain, or with a binary/decimal suffix)."""
    text = str(value)
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti|k|M|G|T)?", text)
    if not m:
        raise ValueError(f"quantity {text!r} not understood by the fake")
    mult = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    return int(m.group(1)) * mult.get(m.group(2) or "", 1)


def _millicpu(value: Any) -> int:
    text = str(value)
    return int(text[:-1]) if text.endswith("m") else int(float(text) * 1000)


def status_body(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def _error(code: int, reason: str, message: str) -> web.Response:
    return web.json_response(status_body(code, reason, message), status=code)


def _match_labels(obj: dict[str, Any], selector: str | None) -> bool:
    if not selector:
        return True
    labels = (obj.get("metadata") or {}).get("labels") or {}
    for term in selector.split(","):
        key, sep, value = term.partition("=")
        key = key.rstrip("!")
        if not sep:
            if key not in labels:
                return False
        elif term.count("!=") == 1:
            if labels.get(key) == value:
                return False
        elif labels.get(key) != value.lstrip("="):
            return False
    return True


def _match_fields(obj: dict[str, Any], selector: str | None) -> bool:
    if not selector:
        return True
    for term in selector.split(","):
        key, _, value = term.partition("=")
        cur: Any = obj
        for part in key.split("."):
            cur = (cur or {}).get(part) if isinstance(cur, dict) else None
        if str(cur) != value.lstrip("="):
            return False
    return True


@dataclass
class _Watcher:
    kind: str
    namespace: str
    labels: str | None
    fields: str | None
    queue: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)


class FakeCluster:
    """The API server, job controller and kubelet of one fake node (state in memory)."""

    def __init__(self, client: docker.DockerClient | None = None, *, protocols: tuple[str, ...] = (V5, V4)) -> None:
        self.docker = client or docker.from_env()
        self.protocols = protocols
        self.jobs: dict[tuple[str, str], dict[str, Any]] = {}
        self.pods: dict[tuple[str, str], dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self.history: list[tuple[int, str, str, dict[str, Any]]] = []  # (rv, kind, type, obj)
        self.rv = 100
        self.watchers: list[_Watcher] = []
        self.containers: dict[tuple[str, str], str] = {}  # pod key -> container id
        self.calls: list[tuple[str, str, dict[str, str]]] = []  # (method, path, query) of every request
        self.cluster_id = uuid.uuid4().hex[:8]
        self.loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- state and watches ------------------------------------------------------------------

    def _bump(self, kind: str, kind_type: str, obj: dict[str, Any]) -> None:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        snap = copy.deepcopy(obj)
        self.history.append((self.rv, kind, kind_type, snap))
        del self.history[:-HISTORY]
        ns = obj["metadata"].get("namespace", "")
        for w in self.watchers:
            if w.kind == kind and w.namespace == ns and _match_labels(snap, w.labels) and _match_fields(snap, w.fields):
                w.queue.put_nowait({"type": kind_type, "object": snap})

    def event(self, obj: dict[str, Any], kind: str, typ: str, reason: str, message: str) -> None:
        """An events.k8s.io-style core/v1 Event about `obj`; a repeat bumps `count` (as the kubelet's do)."""
        meta = obj["metadata"]
        for e in self.events:
            io = e["involvedObject"]
            if io["name"] == meta["name"] and io["kind"] == kind and e["reason"] == reason and e["message"] == message:
                e["count"] += 1
                e["lastTimestamp"] = now_iso()
                return
        self.rv += 1
        self.events.append(
            {
                "apiVersion": "v1",
                "kind": "Event",
                "metadata": {
                    "name": f"{meta['name']}.{uuid.uuid4().hex[:12]}",
                    "namespace": meta["namespace"],
                    "resourceVersion": str(self.rv),
                },
                "involvedObject": {
                    "kind": kind,
                    "name": meta["name"],
                    "namespace": meta["namespace"],
                    "uid": meta.get("uid", ""),
                },
                "reason": reason,
                "message": message,
                "type": typ,
                "count": 1,
                "firstTimestamp": now_iso(),
                "lastTimestamp": now_iso(),
                "source": {"component": "kubelet" if kind == "Pod" else "job-controller"},
            }
        )

    def spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def blocking(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    # -- the job controller -----------------------------------------------------------------

    def create_job(self, ns: str, body: dict[str, Any]) -> dict[str, Any]:
        meta = body.setdefault("metadata", {})
        name = meta.get("name")
        if not name:
            raise _Refused(422, "Invalid", "Job.batch is invalid: metadata.name: Required value")
        if (ns, name) in self.jobs:
            raise _Refused(409, "AlreadyExists", f'jobs.batch "{name}" already exists')
        uid = str(uuid.uuid4())
        meta.update(namespace=ns, uid=uid, creationTimestamp=now_iso(), generation=1)
        labels = meta.setdefault("labels", {})
        labels.setdefault("batch.kubernetes.io/controller-uid", uid)
        template = body["spec"]["template"]
        tlabels = template.setdefault("metadata", {}).setdefault("labels", {})
        tlabels.update(
            {
                "batch.kubernetes.io/controller-uid": uid,
                "batch.kubernetes.io/job-name": name,
                "controller-uid": uid,
                "job-name": name,
            }
        )
        body["status"] = {"startTime": now_iso(), "active": 1}
        body["_start"] = time.time()
        self.jobs[(ns, name)] = body
        self._bump("Job", "ADDED", body)
        suffix = "".join(random.choices(string.ascii_lowercase + string.digits, k=5))  # noqa: S311 - a name, not a secret
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": f"{name}-{suffix}",
                "namespace": ns,
                "uid": str(uuid.uuid4()),
                "creationTimestamp": now_iso(),
                "labels": dict(tlabels),
                "annotations": dict(template["metadata"].get("annotations") or {}),
                "ownerReferences": [
                    {
                        "apiVersion": "batch/v1",
                        "kind": "Job",
                        "name": name,
                        "uid": uid,
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
                "finalizers": ["batch.kubernetes.io/job-tracking"],
            },
            "spec": copy.deepcopy(template["spec"]),
            "status": {"phase": "Pending", "qosClass": "Guaranteed", "conditions": []},
        }
        self.pods[(ns, pod["metadata"]["name"])] = pod
        self._bump("Pod", "ADDED", pod)
        self.event(body, "Job", "Normal", "SuccessfulCreate", f"Created pod: {pod['metadata']['name']}")
        self.spawn(self._kubelet(ns, pod["metadata"]["name"]))
        deadline = body["spec"].get("activeDeadlineSeconds")
        if deadline:
            self.spawn(self._deadline(ns, name, float(deadline)))
        return body

    def _job_of(self, pod: dict[str, Any]) -> dict[str, Any] | None:
        ns = pod["metadata"]["namespace"]
        name = pod["metadata"]["labels"].get("batch.kubernetes.io/job-name", "")
        return self.jobs.get((ns, name))

    def _set_conditions(self, job: dict[str, Any], interim: str, final: str, reason: str, message: str) -> None:
        # 1.31+: the interim condition first (its own update), the terminal one once pods are done.
        status = job["status"]
        conds = status.setdefault("conditions", [])
        if not any(c["type"] == interim for c in conds):
            conds.append(
                {
                    "type": interim,
                    "status": "True",
                    "reason": reason,
                    "message": message,
                    "lastTransitionTime": now_iso(),
                }
            )
            self._bump("Job", "MODIFIED", job)
        if not any(c["type"] == final for c in conds) and not self._active_pods(job):
            conds.append(
                {"type": final, "status": "True", "reason": reason, "message": message, "lastTransitionTime": now_iso()}
            )
            status["completionTime" if final == "Complete" else "failedTime"] = now_iso()
            status.pop("active", None)
            self._bump("Job", "MODIFIED", job)

    def _active_pods(self, job: dict[str, Any]) -> list[dict[str, Any]]:
        name = job["metadata"]["name"]
        ns = job["metadata"]["namespace"]
        return [
            p
            for (pns, _), p in self.pods.items()
            if pns == ns
            and p["metadata"]["labels"].get("batch.kubernetes.io/job-name") == name
            and p["status"].get("phase") not in ("Succeeded", "Failed")
        ]

    def _pod_ended(self, pod: dict[str, Any]) -> None:
        """The job controller sees a terminal pod: the Job's conditions, then the tracking finalizer goes."""
        job = self._job_of(pod)
        if job is not None:
            conds = job["status"].get("conditions") or []
            pending = next((c for c in conds if c["type"] in ("FailureTarget", "SuccessCriteriaMet")), None)
            if pending is not None:
                final = "Failed" if pending["type"] == "FailureTarget" else "Complete"
                self._set_conditions(job, pending["type"], final, pending["reason"], pending["message"])
            elif pod["status"]["phase"] == "Succeeded":
                job["status"]["succeeded"] = 1
                self._set_conditions(
                    job,
                    "SuccessCriteriaMet",
                    "Complete",
                    "CompletionsReached",
                    "Reached expected number of succeeded pods",
                )
                self.event(job, "Job", "Normal", "Completed", "Job completed")
            else:
                job["status"]["failed"] = 1
                reason, message = self._failure(job, pod)
                self._set_conditions(job, "FailureTarget", "Failed", reason, message)
                self.event(job, "Job", "Warning", reason, message)
        fins = pod["metadata"].get("finalizers") or []
        if "batch.kubernetes.io/job-tracking" in fins:
            fins.remove("batch.kubernetes.io/job-tracking")
            self._bump("Pod", "MODIFIED", pod)
        self._maybe_remove_pod(pod)

    def _failure(self, job: dict[str, Any], pod: dict[str, Any]) -> tuple[str, str]:
        """The podFailurePolicy's first matching rule (FailJob), else backoffLimit 0 exceeded."""
        ns, pname = pod["metadata"]["namespace"], pod["metadata"]["name"]
        pconds = {c["type"] for c in pod["status"].get("conditions") or [] if c.get("status") == "True"}
        for cs in pod["status"].get("containerStatuses") or []:
            term = (cs.get("state") or {}).get("terminated") or {}
            for rule in (job["spec"].get("podFailurePolicy") or {}).get("rules") or []:
                if rule.get("action") != "FailJob":
                    continue
                for pc in rule.get("onPodConditions") or []:
                    if pc["type"] in pconds:
                        return (
                            "PodFailurePolicy",
                            f"Pod {ns}/{pname} has condition {pc['type']} matching FailJob rule at index 0",
                        )
                ec = rule.get("onExitCodes")
                if ec and term and ec.get("containerName") in (None, cs["name"]):
                    inside = term.get("exitCode") in ec["values"]
                    if inside == (ec["operator"] == "In"):
                        return (
                            "PodFailurePolicy",
                            f"Container {cs['name']} for pod {ns}/{pname} failed with exit code {term.get('exitCode')} matching FailJob rule at index 1",
                        )
        return "BackoffLimitExceeded", "Job has reached the specified backoff limit"

    async def _deadline(self, ns: str, name: str, seconds: float) -> None:
        await asyncio.sleep(seconds)
        job = self.jobs.get((ns, name))
        if job is None or any(
            c["type"] in ("Complete", "Failed", "FailureTarget", "SuccessCriteriaMet")
            for c in job["status"].get("conditions") or []
        ):
            return
        msg = "Job was active longer than specified deadline"
        self._set_conditions(job, "FailureTarget", "Failed", "DeadlineExceeded", msg)
        self.event(job, "Job", "Warning", "DeadlineExceeded", msg)
        for pod in self._active_pods(job):
            self.spawn(self.delete_pod(ns, pod["metadata"]["name"], None))

    # -- the kubelet ------------------------------------------------------------------------

    async def _kubelet(self, ns: str, name: str) -> None:
        pod = self.pods.get((ns, name))
        if pod is None:
            return
        pod["spec"]["nodeName"] = "fake-node"
        pod["status"]["conditions"] = [{"type": "PodScheduled", "status": "True", "lastTransitionTime": now_iso()}]
        self._bump("Pod", "MODIFIED", pod)
        self.event(pod, "Pod", "Normal", "Scheduled", f"Successfully assigned {ns}/{name} to fake-node")
        c = pod["spec"]["containers"][0]
        image = c["image"]
        self.event(pod, "Pod", "Normal", "Pulling", f'Pulling image "{image}"')
        present = await self.blocking(self._image_present, image)
        if not present:
            await self._pull_backoff(pod, image)
            return
        self.event(pod, "Pod", "Normal", "Pulled", f'Container image "{image}" already present on machine')
        try:
            cid = await self.blocking(self._create_container, pod)
        except docker.errors.APIError as exc:
            self._waiting(pod, "CreateContainerError", str(exc.explanation or exc))
            self.event(pod, "Pod", "Warning", "Failed", f"Error: {exc.explanation or exc}")
            return
        self.containers[(ns, name)] = cid
        self.event(pod, "Pod", "Normal", "Created", f"Created container: {c['name']}")
        if pod["metadata"].get("deletionTimestamp"):
            await self._finish(pod, cid)
            return
        await self.blocking(lambda: self.docker.api.start(cid))
        self.event(pod, "Pod", "Normal", "Started", f"Started container {c['name']}")
        pod["status"].update(phase="Running", startTime=now_iso(), podIP="")
        pod["status"]["conditions"] += [
            {"type": "Initialized", "status": "True"},
            {"type": "ContainersReady", "status": "True"},
            {"type": "Ready", "status": "True"},
        ]
        pod["status"]["containerStatuses"] = [
            {
                "name": c["name"],
                "image": image,
                "ready": True,
                "restartCount": 0,
                "started": True,
                "containerID": f"docker://{cid}",
                "state": {"running": {"startedAt": now_iso()}},
            }
        ]
        self._bump("Pod", "MODIFIED", pod)
        await self.blocking(lambda: self.docker.api.wait(cid))
        await self._finish(pod, cid)

    def _image_present(self, image: str) -> bool:
        try:
            self.docker.api.inspect_image(image)  # type: ignore[no-untyped-call]  # unannotated in types-docker
            return True
        except docker.errors.ImageNotFound:
            return False
        except docker.errors.APIError:
            return False

    def _waiting(self, pod: dict[str, Any], reason: str, message: str) -> None:
        c = pod["spec"]["containers"][0]
        pod["status"]["containerStatuses"] = [
            {
                "name": c["name"],
                "image": c["image"],
                "ready": False,
                "restartCount": 0,
                "started": False,
                "state": {"waiting": {"reason": reason, "message": message}},
            }
        ]
        self._bump("Pod", "MODIFIED", pod)

    async def _pull_backoff(self, pod: dict[str, Any], image: str) -> None:
        """Nothing is ever pulled (no registry): ErrImagePull, then ImagePullBackOff, until deleted."""
        msg = f'Failed to pull image "{image}": rpc error: code = NotFound desc = failed to pull and unpack image "{image}": not found'
        delay = 1.0
        while (
            not pod["metadata"].get("deletionTimestamp")
            and (pod["metadata"]["namespace"], pod["metadata"]["name"]) in self.pods
        ):
            self._waiting(pod, "ErrImagePull", msg)
            self.event(pod, "Pod", "Warning", "Failed", msg)
            self.event(pod, "Pod", "Warning", "Failed", "Error: ErrImagePull")
            await asyncio.sleep(0.5)
            self._waiting(pod, "ImagePullBackOff", f'Back-off pulling image "{image}"')
            self.event(pod, "Pod", "Normal", "BackOff", f'Back-off pulling image "{image}"')
            self.event(pod, "Pod", "Warning", "Failed", "Error: ImagePullBackOff")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    def _create_container(self, pod: dict[str, Any]) -> str:
        spec = pod["spec"]
        c = spec["containers"][0]
        psc = spec.get("securityContext") or {}
        sc = c.get("securityContext") or {}
        uid = sc.get("runAsUser", psc.get("runAsUser", 0))
        gid = sc.get("runAsGroup", psc.get("runAsGroup", uid))
        fs_group = psc.get("fsGroup", gid)
        limits = (c.get("resources") or {}).get("limits") or {}
        volumes = {v["name"]: v for v in spec.get("volumes") or []}
        tmpfs = {}
        for vm in c.get("volumeMounts") or []:
            ed = volumes[vm["name"]].get("emptyDir")
            if ed is None:
                raise docker.errors.APIError(f"the fake backs emptyDir volumes only, not {vm['name']}")
            size = _quantity(ed.get("sizeLimit", "64Mi"))
            # An emptyDir is created world-writable (0777) with its group fsGroup
            # (https://kubernetes.io/docs/tasks/configure-pod-container/security-context/); the
            # engine here drops a tmpfs `mode` beside uid/gid, so the folder is the user's own
            # instead: writable alike, but chmod of the mount point itself succeeds here only.
            tmpfs[vm["mountPath"]] = f"rw,nosuid,nodev,size={size},uid={uid},gid={fs_group},mode=0770"
        caps = (sc.get("capabilities") or {}).get("drop") or []
        memory = _quantity(limits["memory"]) if "memory" in limits else None
        name = pod["metadata"]["name"]
        container = self.docker.api.create_container(
            image=c["image"],
            command=c.get("command"),
            environment={e["name"]: e.get("value", "") for e in c.get("env") or []},
            user=f"{uid}:{gid}",
            working_dir=c.get("workingDir"),
            labels={OWNER_LABEL: self.cluster_id, "io.kubernetes.pod.name": name},
            host_config=self.docker.api.create_host_config(
                tmpfs=tmpfs,
                read_only=bool(sc.get("readOnlyRootFilesystem")),
                cap_drop=["ALL"] if "ALL" in caps else caps,
                security_opt=["no-new-privileges"] if sc.get("allowPrivilegeEscalation") is False else [],
                network_mode="none",  # dnsPolicy None and the NetworkPolicy deny-all: no network at all
                mem_limit=memory,
                memswap_limit=memory,
                nano_cpus=_millicpu(limits["cpu"]) * 1_000_000 if "cpu" in limits else None,
                pids_limit=1024,
                init=False,
                log_config=docker.types.LogConfig(type="json-file", config={"max-size": "10m"}),
            ),
            name=f"fake-kube-{self.cluster_id}-{name}",
        )
        return str(container["Id"])

    async def _finish(self, pod: dict[str, Any], cid: str) -> None:
        info = await self.blocking(lambda: self.docker.api.inspect_container(cid))
        st = info["State"]
        code = int(st.get("ExitCode", -1))
        reason = "OOMKilled" if st.get("OOMKilled") else ("Completed" if code == 0 else "Error")
        c = pod["spec"]["containers"][0]
        term = {
            "exitCode": code,
            "reason": reason,
            "startedAt": st.get("StartedAt"),
            "finishedAt": st.get("FinishedAt"),
            "containerID": f"docker://{cid}",
        }
        pod["status"]["phase"] = "Succeeded" if code == 0 else "Failed"
        pod["status"]["containerStatuses"] = [
            {
                "name": c["name"],
                "image": c["image"],
                "ready": False,
                "restartCount": 0,
                "started": False,
                "state": {"terminated": term},
            }
        ]
        for cond in pod["status"].get("conditions") or []:
            if cond["type"] in ("Ready", "ContainersReady"):
                cond["status"] = "False"
        self._bump("Pod", "MODIFIED", pod)
        self._pod_ended(pod)

    def _maybe_remove_pod(self, pod: dict[str, Any]) -> None:
        key = (pod["metadata"]["namespace"], pod["metadata"]["name"])
        if pod["metadata"].get("deletionTimestamp") and not pod["metadata"].get("finalizers") and key in self.pods:
            terminal = pod["status"].get("phase") in ("Succeeded", "Failed")
            if terminal or key not in self.containers:
                del self.pods[key]
                self._bump("Pod", "DELETED", pod)
                cid = self.containers.pop(key, None)
                if cid is not None:
                    self.spawn(self.blocking(self._remove_container, cid))
                self._maybe_remove_job(pod)

    def _remove_container(self, cid: str) -> None:
        with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
            self.docker.api.remove_container(cid, force=True)

    def _maybe_remove_job(self, pod: dict[str, Any]) -> None:
        job = self._job_of(pod)
        if job is None or not job["metadata"].get("deletionTimestamp"):
            return
        name, ns = job["metadata"]["name"], job["metadata"]["namespace"]
        left = [
            p
            for (pns, _), p in self.pods.items()
            if pns == ns and p["metadata"]["labels"].get("batch.kubernetes.io/job-name") == name
        ]
        if not left:
            job["metadata"]["finalizers"] = []
            del self.jobs[(ns, name)]
            self._bump("Job", "DELETED", job)

    async def delete_pod(self, ns: str, name: str, grace: int | None) -> dict[str, Any] | None:
        pod = self.pods.get((ns, name))
        if pod is None:
            return None
        if grace is None:
            grace = int(pod["spec"].get("terminationGracePeriodSeconds", 30))
        first = not pod["metadata"].get("deletionTimestamp")
        pod["metadata"]["deletionTimestamp"] = now_iso()
        pod["metadata"]["deletionGracePeriodSeconds"] = grace
        self._bump("Pod", "MODIFIED", pod)
        if pod["status"].get("phase") in ("Succeeded", "Failed") or (ns, name) not in self.containers:
            if pod["status"].get("phase") == "Pending":
                pod["status"]["phase"] = "Failed"  # never ran: no container, nothing to stop
                self._bump("Pod", "MODIFIED", pod)
                self._pod_ended(pod)
            self._maybe_remove_pod(pod)
            return pod
        if first or grace == 0:
            cid = self.containers[(ns, name)]
            self.event(pod, "Pod", "Normal", "Killing", f"Stopping container {pod['spec']['containers'][0]['name']}")
            # The kubelet: SIGTERM to PID 1, SIGKILL after the grace; the end is seen by _kubelet.
            self.spawn(self.blocking(self._stop_container, cid, grace))
        return pod

    def _stop_container(self, cid: str, grace: int) -> None:
        with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
            if grace == 0:
                self.docker.api.kill(cid)
            else:
                self.docker.api.stop(cid, timeout=grace)

    async def delete_job(self, ns: str, name: str, policy: str | None, grace: int | None) -> dict[str, Any] | None:
        job = self.jobs.get((ns, name))
        if job is None:
            return None
        pods = [
            p
            for (pns, _), p in list(self.pods.items())
            if pns == ns and p["metadata"]["labels"].get("batch.kubernetes.io/job-name") == name
        ]
        if policy == "Foreground":
            job["metadata"]["deletionTimestamp"] = now_iso()
            job["metadata"]["finalizers"] = ["foregroundDeletion"]
            self._bump("Job", "MODIFIED", job)
            for p in pods:
                await self.delete_pod(ns, p["metadata"]["name"], grace)
            if not pods:
                self._maybe_remove_job(
                    {"metadata": {"namespace": ns, "labels": {"batch.kubernetes.io/job-name": name}}}
                )
            return job
        del self.jobs[(ns, name)]
        self._bump("Job", "DELETED", job)
        if policy == "Background":
            for p in pods:
                await self.delete_pod(ns, p["metadata"]["name"], grace)
        else:  # Orphan (a Job's default through the API): the pods stay, without their owner
            for p in pods:
                p["metadata"]["ownerReferences"] = []
                self._bump("Pod", "MODIFIED", p)
        return job

    async def evict(self, ns: str, name: str) -> None:
        """What the Eviction API does to a pod (a test's hook: the runtime never evicts): the
        `DisruptionTarget` condition (reason EvictionByEvictionAPI), then a graceful deletion
        (https://kubernetes.io/docs/concepts/scheduling-eviction/api-eviction/)."""
        pod = self.pods[(ns, name)]
        pod["status"].setdefault("conditions", []).append(
            {
                "type": "DisruptionTarget",
                "status": "True",
                "reason": "EvictionByEvictionAPI",
                "message": "Eviction API: evicting",
                "lastTransitionTime": now_iso(),
            }
        )
        self._bump("Pod", "MODIFIED", pod)
        await self.delete_pod(ns, name, None)

    def cleanup(self) -> None:
        """Remove every container the fake created (tests call it at the end)."""
        for c in self.docker.api.containers(all=True, filters={"label": f"{OWNER_LABEL}={self.cluster_id}"}):
            self._remove_container(c["Id"])

    def left(self) -> dict[str, list[str]]:
        """What is left in the cluster: Job and pod names, and backing containers."""
        containers = self.docker.api.containers(all=True, filters={"label": f"{OWNER_LABEL}={self.cluster_id}"})
        return {
            "jobs": sorted(n for _, n in self.jobs),
            "pods": sorted(n for _, n in self.pods),
            "containers": sorted(c["Names"][0] for c in containers),
        }


class _Refused(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message


def _public(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if not k.startswith("_")}


def _list(kind: str, items: list[dict[str, Any]], rv: int) -> dict[str, Any]:
    api = "batch/v1" if kind == "Job" else "v1"
    return {
        "apiVersion": api,
        "kind": f"{kind}List",
        "metadata": {"resourceVersion": str(rv)},
        "items": [_public(i) for i in items],
    }


def make_app(cluster: FakeCluster) -> web.Application:
    """The HTTP routes the runtime calls (and nothing else: anything more is 404)."""
    routes = web.RouteTableDef()

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        cluster.calls.append((request.method, request.path, dict(request.query)))
        try:
            response: web.StreamResponse = await handler(request)
            return response
        except _Refused as exc:
            return _error(exc.code, exc.reason, exc.message)

    async def watch(request: web.Request, kind: str, ns: str) -> web.StreamResponse:
        q = request.query
        w = _Watcher(kind, ns, q.get("labelSelector"), q.get("fieldSelector"))
        since = int(q.get("resourceVersion") or 0)
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        if since and cluster.history and since < cluster.history[0][0] - 1:
            gone = {"type": "ERROR", "object": status_body(410, "Expired", f"too old resource version: {since}")}
            await resp.write(json.dumps(gone).encode() + b"\n")
            return resp
        if since:  # every change after `since`, in order
            for rv, k, t, obj in list(cluster.history):
                if (
                    rv > since
                    and k == kind
                    and obj["metadata"].get("namespace") == ns
                    and _match_labels(obj, w.labels)
                    and _match_fields(obj, w.fields)
                ):
                    w.queue.put_nowait({"type": t, "object": obj})
        else:  # no resourceVersion: the current objects as ADDED first
            store = cluster.jobs if kind == "Job" else cluster.pods
            for (ons, _), obj in store.items():
                if ons == ns and _match_labels(obj, w.labels) and _match_fields(obj, w.fields):
                    w.queue.put_nowait({"type": "ADDED", "object": _public(copy.deepcopy(obj))})
        cluster.watchers.append(w)
        end = time.monotonic() + float(q.get("timeoutSeconds") or 1800)
        try:
            while (left := end - time.monotonic()) > 0:
                try:
                    ev = await asyncio.wait_for(w.queue.get(), left)
                except TimeoutError:
                    break
                ev = {"type": ev["type"], "object": _public(ev["object"])}
                await resp.write(json.dumps(ev).encode() + b"\n")
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            cluster.watchers.remove(w)
        return resp

    @routes.post("/apis/batch/v1/namespaces/{ns}/jobs")
    async def create_job(request: web.Request) -> web.Response:
        body = await request.json()
        job = cluster.create_job(request.match_info["ns"], body)
        return web.json_response(_public(job), status=201)

    @routes.get("/apis/batch/v1/namespaces/{ns}/jobs")
    async def list_jobs(request: web.Request) -> web.StreamResponse:
        ns = request.match_info["ns"]
        if request.query.get("watch") in ("true", "1"):
            return await watch(request, "Job", ns)
        sel = request.query.get("labelSelector")
        items = [j for (jns, _), j in cluster.jobs.items() if jns == ns and _match_labels(j, sel)]
        limit = int(request.query.get("limit") or 0)
        return web.json_response(_list("Job", items[:limit] if limit else items, cluster.rv))

    @routes.get("/apis/batch/v1/namespaces/{ns}/jobs/{name}")
    async def get_job(request: web.Request) -> web.Response:
        job = cluster.jobs.get((request.match_info["ns"], request.match_info["name"]))
        if job is None:
            return _error(404, "NotFound", f'jobs.batch "{request.match_info["name"]}" not found')
        return web.json_response(_public(job))

    @routes.delete("/apis/batch/v1/namespaces/{ns}/jobs/{name}")
    async def delete_job(request: web.Request) -> web.Response:
        opts = await _delete_options(request)
        job = await cluster.delete_job(
            request.match_info["ns"],
            request.match_info["name"],
            opts.get("propagationPolicy"),
            opts.get("gracePeriodSeconds"),
        )
        if job is None:
            return _error(404, "NotFound", f'jobs.batch "{request.match_info["name"]}" not found')
        # 200 with the object (still there with deletionTimestamp under Foreground; gone otherwise)
        return web.json_response(_public(job))

    @routes.get("/api/v1/namespaces/{ns}/pods")
    async def list_pods(request: web.Request) -> web.StreamResponse:
        ns = request.match_info["ns"]
        if request.query.get("watch") in ("true", "1"):
            return await watch(request, "Pod", ns)
        q = request.query
        items = [
            p
            for (pns, _), p in cluster.pods.items()
            if pns == ns and _match_labels(p, q.get("labelSelector")) and _match_fields(p, q.get("fieldSelector"))
        ]
        return web.json_response(_list("Pod", items, cluster.rv))

    @routes.get("/api/v1/namespaces/{ns}/pods/{name}")
    async def get_pod(request: web.Request) -> web.Response:
        pod = cluster.pods.get((request.match_info["ns"], request.match_info["name"]))
        if pod is None:
            return _error(404, "NotFound", f'pods "{request.match_info["name"]}" not found')
        return web.json_response(_public(pod))

    @routes.delete("/api/v1/namespaces/{ns}/pods/{name}")
    async def delete_pod(request: web.Request) -> web.Response:
        opts = await _delete_options(request)
        pod = await cluster.delete_pod(
            request.match_info["ns"], request.match_info["name"], opts.get("gracePeriodSeconds")
        )
        if pod is None:
            return _error(404, "NotFound", f'pods "{request.match_info["name"]}" not found')
        return web.json_response(_public(pod))

    @routes.get("/api/v1/namespaces/{ns}/events")
    async def list_events(request: web.Request) -> web.Response:
        ns, sel = request.match_info["ns"], request.query.get("fieldSelector")
        items = [e for e in cluster.events if e["metadata"]["namespace"] == ns and _match_fields(e, sel)]
        return web.json_response(
            {"apiVersion": "v1", "kind": "EventList", "metadata": {"resourceVersion": str(cluster.rv)}, "items": items}
        )

    @routes.get("/api/v1/namespaces/{ns}/pods/{name}/log")
    async def pod_log(request: web.Request) -> web.StreamResponse:
        key = (request.match_info["ns"], request.match_info["name"])
        pod = cluster.pods.get(key)
        if pod is None:
            return _error(404, "NotFound", f'pods "{key[1]}" not found')
        cid = cluster.containers.get(key)
        if cid is None:
            c = pod["spec"]["containers"][0]["name"]
            return _error(
                400,
                "BadRequest",
                f'container "{c}" in pod "{key[1]}" is waiting to start: trying and failing to pull image',
            )
        tail = request.query.get("tailLines")
        if request.query.get("follow") in ("true", "1"):
            # follow: the output so far, then as it comes, until the container exits.
            return await _follow_log(cluster, request, cid, tail)
        out = await cluster.blocking(
            lambda: cluster.docker.api.logs(cid, stdout=True, stderr=True, tail=int(tail) if tail else "all")
        )
        return web.Response(body=out, content_type="text/plain")

    async def exec_route(request: web.Request) -> web.StreamResponse:
        key = (request.match_info["ns"], request.match_info["name"])
        pod = cluster.pods.get(key)
        if pod is None:
            return _error(404, "NotFound", f'pods "{key[1]}" not found')
        cid = cluster.containers.get(key)
        running = pod["status"].get("phase") == "Running" and not pod["metadata"].get("deletionTimestamp")
        if cid is None or not running:
            phase = pod["status"].get("phase")
            return _error(400, "BadRequest", f"unable to upgrade connection: container not found (pod is {phase})")
        argv = request.query.getall("command", [])
        ws = web.WebSocketResponse(protocols=cluster.protocols, max_msg_size=0, autoping=True)
        await ws.prepare(request)
        await _bridge_exec(cluster, ws, cid, argv, ws.ws_protocol or V4)
        return ws

    routes.get("/api/v1/namespaces/{ns}/pods/{name}/exec")(exec_route)
    routes.post("/api/v1/namespaces/{ns}/pods/{name}/exec")(exec_route)

    app = web.Application(middlewares=[record])
    app.add_routes(routes)
    return app


async def _follow_log(cluster: FakeCluster, request: web.Request, cid: str, tail: str | None) -> web.StreamResponse:
    loop = asyncio.get_running_loop()
    chunks: asyncio.Queue[bytes | None] = asyncio.Queue()

    def pump() -> None:
        try:
            for chunk in cluster.docker.api.logs(
                cid, stdout=True, stderr=True, stream=True, follow=True, tail=int(tail) if tail else "all"
            ):
                loop.call_soon_threadsafe(chunks.put_nowait, bytes(chunk))
        except (docker.errors.APIError, OSError):
            pass
        loop.call_soon_threadsafe(chunks.put_nowait, None)

    threading.Thread(target=pump, daemon=True, name="fake-kube-log").start()
    resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
    await resp.prepare(request)
    with contextlib.suppress(ConnectionResetError):
        while (chunk := await chunks.get()) is not None:
            await resp.write(chunk)
    return resp


async def _delete_options(request: web.Request) -> dict[str, Any]:
    """DeleteOptions from the body (the client sends them there) or the query."""
    opts: dict[str, Any] = {}
    if request.can_read_body:
        with contextlib.suppress(ValueError):
            body = await request.json()
            if isinstance(body, dict):
                opts.update(body)
    q = request.query
    if "propagationPolicy" in q:
        opts["propagationPolicy"] = q["propagationPolicy"]
    if "gracePeriodSeconds" in q:
        opts["gracePeriodSeconds"] = int(q["gracePeriodSeconds"])
    return opts


async def _bridge_exec(
    cluster: FakeCluster, ws: web.WebSocketResponse, cid: str, argv: list[str], protocol: str
) -> None:
    """An exec in the backing container, its attached socket framed as the channel protocol."""
    loop = asyncio.get_running_loop()

    def start() -> tuple[str, socket.socket]:
        ex = cluster.docker.api.exec_create(cid, argv, stdin=True, stdout=True, stderr=True, tty=False)
        raw = cluster.docker.api.exec_start(ex["Id"], socket=True)
        sock: socket.socket = getattr(raw, "_sock", raw)  # type: ignore[arg-type]  # a plain socket over the unix adapter
        sock.settimeout(None)
        return str(ex["Id"]), sock

    exec_id, sock = await cluster.blocking(start)
    out: asyncio.Queue[bytes | None] = asyncio.Queue()

    def pump() -> None:
        header = struct.Struct(">BxxxI")
        buf = b""
        try:
            while True:
                data = sock.recv(256 << 10)
                if not data:
                    break
                buf += data
                while len(buf) >= 8:
                    kind, size = header.unpack_from(buf)
                    if len(buf) < 8 + size:
                        break
                    payload, buf = buf[8 : 8 + size], buf[8 + size :]
                    loop.call_soon_threadsafe(out.put_nowait, bytes([kind]) + payload)
        except OSError:
            pass
        loop.call_soon_threadsafe(out.put_nowait, None)

    threading.Thread(target=pump, daemon=True, name="fake-kube-exec").start()

    async def to_client() -> None:
        while (msg := await out.get()) is not None:
            await ws.send_bytes(msg)

    async def from_client() -> None:
        async for msg in ws:
            if msg.type != WSMsgType.BINARY or not msg.data:
                continue
            channel, payload = msg.data[0], msg.data[1:]
            if channel == 0:
                await cluster.blocking(sock.sendall, payload)
            elif channel == 255 and protocol == V5 and payload[:1] == b"\x00":
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_WR)

    sender = asyncio.ensure_future(to_client())
    receiver = asyncio.ensure_future(from_client())
    await asyncio.wait([sender, receiver], return_when=asyncio.FIRST_COMPLETED)
    if receiver.done():  # the client went away: the exec's stdin and stdout close
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        sender.cancel()
        return
    receiver.cancel()
    info = await cluster.blocking(lambda: cluster.docker.api.exec_inspect(exec_id))
    code = info.get("ExitCode")
    if code == 0:
        status: dict[str, Any] = {"metadata": {}, "status": "Success"}
    else:
        status = {
            "metadata": {},
            "status": "Failure",
            "message": f"command terminated with non-zero exit code: exit status {code}",
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]},
        }
    with contextlib.suppress(ConnectionResetError, RuntimeError):
        await ws.send_bytes(b"\x03" + json.dumps(status).encode())
        await ws.close()
    sock.close()


class FakeKubeAPI:
    """The fake served on a loopback port from a thread of its own; `kubeconfig()` points clients at it."""

    def __init__(self, cluster: FakeCluster | None = None) -> None:
        self.cluster = cluster or FakeCluster()
        self.url = ""
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None

    def start(self) -> FakeKubeAPI:
        self._thread = threading.Thread(target=self._serve, daemon=True, name="fake-kube-api")
        self._thread.start()
        if not self._ready.wait(20):
            raise RuntimeError("the fake Kubernetes API did not come up")
        return self

    def _serve(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self.cluster.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        runner = web.AppRunner(make_app(self.cluster), handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]  # aiohttp keeps the bound socket there
        self.url = f"http://127.0.0.1:{port}"
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the fake's loop (its state is the loop's) and return its result."""
        assert self.cluster.loop is not None

        async def run() -> Any:
            out = fn()
            return await out if asyncio.iscoroutine(out) else out

        return asyncio.run_coroutine_threadsafe(run(), self.cluster.loop).result(30)

    def kubeconfig(self, path: Path, namespace: str = "massgen") -> Path:
        """A kubeconfig for this fake (no TLS, a token the fake ignores)."""
        path.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
                    "users": [{"name": "fake", "user": {"token": "fake-token"}}],
                    "contexts": [
                        {"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": namespace}}
                    ],
                    "current-context": "fake",
                }
            ),
            encoding="utf-8",
        )
        return path

    def close(self) -> None:
        if self._stop is not None and self.cluster.loop is not None:
            self.cluster.loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)
        self.cluster.cleanup()

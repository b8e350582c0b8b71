"""Pod and Job states -> what the lifecycle is told (pure functions over the API's JSON).

Mapped from the documented semantics, never guessed (the links are the pages followed):

- A container's end is `status.containerStatuses[].state.terminated`: `exitCode`, and `reason`
  "OOMKilled" when the kernel's OOM killer killed a process of it
  (https://kubernetes.io/docs/tasks/configure-pod-container/assign-memory-resource/).
- A Job past `activeDeadlineSeconds` fails with condition reason "DeadlineExceeded", and its
  running pods are terminated (https://kubernetes.io/docs/concepts/workloads/controllers/job/
  #job-termination-and-cleanup).
- Since 1.31 (JobManagedBy/JobPodReplacementPolicy GA work) a failing Job first gets the
  `FailureTarget` condition, and `Failed` only once all its pods are terminal
  (https://kubernetes.io/docs/concepts/workloads/controllers/job/#termination-of-job-pods);
  a successful one gets `SuccessCriteriaMet` before `Complete`. Either of a pair tells the reason.
- A disrupted pod (eviction, preemption, node drain, taint manager) carries the
  `DisruptionTarget` condition (https://kubernetes.io/docs/concepts/workloads/pods/disruptions/
  #pod-disruption-conditions); a kubelet eviction (node pressure) sets `status.reason`
  "Evicted" (https://kubernetes.io/docs/concepts/scheduling-eviction/node-pressure-eviction/).
- A pod that never starts stays `Pending`: its container `state.waiting.reason` says why
  (ErrImagePull, ImagePullBackOff, InvalidImageName, CreateContainerConfigError, ...) and an
  unschedulable one has `PodScheduled` False with reason "Unschedulable"
  (https://kubernetes.io/docs/concepts/workloads/pods/pod-lifecycle/).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from supervisor.runtime.kubernetes.manifests import CONTAINER

# Reasons (agent_image.protocol.result.Reason values) the runtime itself establishes.
TIMEOUT = "timeout"
CRASHED = "container_crashed"

# Waiting reasons after which the container can never start by itself (kubelet's own names).
STUCK_WAITING = frozenset(
    {
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "ErrImageNeverPull",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
    }
)
_DISRUPTION_REASONS = {
    "EvictionByEvictionAPI": "evicted through the Eviction API",
    "PreemptionByScheduler": "preempted by the scheduler",
    "DeletionByTaintManager": "deleted by the taint manager (node taint)",
    "TerminationByKubelet": "terminated by the kubelet (node shutdown or pressure)",
    "DeletionByPodGC": "deleted by the pod garbage collector (node gone)",
}
UNKNOWN_EXIT = -1


@dataclass(frozen=True)
class Outcome:
    """How a run's Job ended, as the runtime reports it (supervisor/runtime/base.py ExitInfo)."""

    exit_code: int
    oom_killed: bool = False
    reason: str | None = None  # a Reason value the cluster established (timeout, container_crashed)
    detail: str | None = None


def condition(obj: Mapping[str, Any] | None, kind: str) -> Mapping[str, Any] | None:
    """The `kind` condition of a Job or pod when its status is "True", else None."""
    for c in ((obj or {}).get("status") or {}).get("conditions") or ():
        if c.get("type") == kind and c.get("status") == "True":
            return dict(c)
    return None


def container_status(pod: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """The sandbox container's status (empty before the kubelet reports one)."""
    for cs in ((pod or {}).get("status") or {}).get("containerStatuses") or ():
        if cs.get("name") == CONTAINER:
            return dict(cs)
    return {}


def phase(pod: Mapping[str, Any] | None) -> str:
    """The pod's phase: Pending, Running, Succeeded, Failed, Unknown ("" for no pod)."""
    return str(((pod or {}).get("status") or {}).get("phase") or ("Pending" if pod else ""))


def is_running(pod: Mapping[str, Any] | None) -> bool:
    """The sandbox container runs (the channel can be opened)."""
    return phase(pod) == "Running" and bool((container_status(pod).get("state") or {}).get("running"))


def is_terminal(pod: Mapping[str, Any] | None) -> bool:
    """The pod will never run again (restartPolicy Never): Succeeded or Failed."""
    return phase(pod) in ("Succeeded", "Failed")


def _disruption(pod: Mapping[str, Any] | None) -> str | None:
    cond = condition(pod, "DisruptionTarget")
    if cond is not None:
        reason = str(cond.get("reason") or "")
        why = _DISRUPTION_REASONS.get(reason, f"disrupted ({reason or 'DisruptionTarget'})")
        msg = str(cond.get("message") or "").strip()
        return f"the pod was {why}" + (f": {msg}" if msg else "")
    status = (pod or {}).get("status") or {}
    if status.get("reason") == "Evicted":
        msg = str(status.get("message") or "").strip()
        return "the pod was evicted by the kubelet" + (f": {msg}" if msg else "")
    return None


def _job_failure(job: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    # FailureTarget (1.31+) comes first and carries the same reason as the later Failed.
    return condition(job, "Failed") or condition(job, "FailureTarget")


def outcome(job: Mapping[str, Any] | None, pod: Mapping[str, Any] | None) -> Outcome | None:
    """The run's end from its Job and pod, or None while it may still run.

    The order: the cluster's own reasons (deadline, disruption) first, since the container's
    exit code then only says it was killed; then OOM; then the exit code. A Job and pod both
    gone is a vanished sandbox.
    """
    failed = _job_failure(job)
    cs = container_status(pod)
    term = (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated") or {}
    code = int(term["exitCode"]) if term.get("exitCode") is not None else None
    terminal = is_terminal(pod) or (pod is None and job is not None and (failed or condition(job, "Complete")))
    if failed is not None and failed.get("reason") == "DeadlineExceeded":
        if not terminal and pod is not None and condition(job, "Failed") is None:
            return None  # its pod is still being terminated
        msg = str(failed.get("message") or "the Job was active longer than its activeDeadlineSeconds")
        return Outcome(code if code is not None else UNKNOWN_EXIT, reason=TIMEOUT, detail=msg)
    disrupted = _disruption(pod)
    if disrupted is None and failed is not None and "DisruptionTarget" in str(failed.get("message") or ""):
        disrupted = f"the pod was disrupted ({failed.get('message')})"
    if disrupted is not None and (terminal or condition(job, "Failed") is not None):
        return Outcome(code if code is not None else UNKNOWN_EXIT, reason=CRASHED, detail=disrupted)
    if not terminal:
        if job is None and pod is None:
            return Outcome(UNKNOWN_EXIT, reason=CRASHED, detail="the Job and its pod vanished before the pod ended")
        if pod is None and job is not None and failed is not None:
            # Failed with no pod left (e.g. deleted by someone): the Job's reason is all there is.
            return Outcome(UNKNOWN_EXIT, reason=CRASHED, detail=f"the Job failed: {_cond_text(failed)}")
        return None
    if term.get("reason") == "OOMKilled":
        return Outcome(code if code is not None else 137, oom_killed=True)
    if code is None:
        status = (pod or {}).get("status") or {}
        why = status.get("message") or status.get("reason") or "no container state reported"
        return Outcome(UNKNOWN_EXIT, reason=CRASHED, detail=f"the pod {phase(pod).lower()} without an exit code: {why}")
    return Outcome(code)


def _cond_text(cond: Mapping[str, Any]) -> str:
    return " ".join(str(cond.get(k) or "") for k in ("reason", "message")).strip() or str(cond.get("type"))


def start_problem(pod: Mapping[str, Any] | None) -> str | None:
    """Why the pod is not running yet, in the API's words (None when nothing is said)."""
    if pod is None:
        return "no pod was created for the Job"
    sched = next(
        (
            c
            for c in ((pod.get("status") or {}).get("conditions") or ())
            if c.get("type") == "PodScheduled" and c.get("status") == "False"
        ),
        None,
    )
    if sched is not None:
        return f"unschedulable: {_cond_text(sched)}"
    waiting = (container_status(pod).get("state") or {}).get("waiting") or {}
    if waiting:
        return f"container waiting: {_cond_text(waiting)}"
    return None


def stuck(pod: Mapping[str, Any] | None) -> bool:
    """The container waits for a reason it never recovers from by itself (e.g. a bad image name)."""
    waiting = (container_status(pod).get("state") or {}).get("waiting") or {}
    return waiting.get("reason") in ("InvalidImageName", "ErrImageNeverPull", "CreateContainerConfigError")


def describe_events(events: Sequence[Mapping[str, Any]], limit: int = 12) -> str:
    """Events as `kubectl describe` lists them: type, reason, message (last `limit`, oldest first)."""

    def when(e: Mapping[str, Any]) -> str:
        return str(e.get("lastTimestamp") or e.get("eventTime") or e.get("firstTimestamp") or "")

    rows = []
    for e in sorted(events, key=when)[-limit:]:
        count = int(e.get("count") or 1)
        times = f" (x{count})" if count > 1 else ""
        rows.append(f"{e.get('type', 'Normal')} {e.get('reason', '')}: {str(e.get('message') or '').strip()}{times}")
    return "; ".join(rows) if rows else "no events"

"""supervisor/runtime/kubernetes/states.py: pod and Job states -> the run's end, as a table.

Each row is a Job/pod pair as the API serves it (only the fields the mapping reads), and what
the lifecycle must be told. The shapes follow the documentation cited in states.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from supervisor.runtime.kubernetes import states
from supervisor.runtime.kubernetes.states import Outcome


def _cond(kind: str, reason: str = "", message: str = "", status: str = "True") -> dict[str, Any]:
    return {"type": kind, "status": status, "reason": reason, "message": message}


def job(*conditions: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"name": "mg-r-1"}, "status": {"conditions": list(conditions)}}


def pod(
    phase: str,
    *,
    running: bool = False,
    terminated: dict[str, Any] | None = None,
    waiting: dict[str, Any] | None = None,
    conditions: tuple[dict[str, Any], ...] = (),
    **status: Any,
) -> dict[str, Any]:
    state: dict[str, Any] = {}
    if running:
        state["running"] = {"startedAt": "2026-01-01T00:00:00Z"}
    if terminated is not None:
        state["terminated"] = terminated
    if waiting is not None:
        state["waiting"] = waiting
    return {
        "metadata": {"name": "mg-r-1-abcde"},
        "status": {
            "phase": phase,
            "conditions": list(conditions),
            "containerStatuses": [{"name": "sandbox", "state": state}],
            **status,
        },
    }


DEADLINE = _cond("FailureTarget", "DeadlineExceeded", "Job was active longer than specified deadline")
DEADLINE_FAILED = _cond("Failed", "DeadlineExceeded", "Job was active longer than specified deadline")
EVICTED = _cond("DisruptionTarget", "EvictionByEvictionAPI", "Eviction API: evicting")
POLICY = _cond(
    "Failed", "PodFailurePolicy", "Container sandbox for pod ns/p failed with exit code 1 matching FailJob rule"
)

ROWS: list[tuple[str, dict[str, Any] | None, dict[str, Any] | None, Outcome | None]] = [
    ("pending pod: still starting", job(), pod("Pending"), None),
    ("running pod", job(), pod("Running", running=True), None),
    (
        "succeeded: exit 0",
        job(_cond("SuccessCriteriaMet"), _cond("Complete")),
        pod("Succeeded", terminated={"exitCode": 0, "reason": "Completed"}),
        Outcome(0),
    ),
    (
        "failed with exit 3 (the engine's own timeout), the pod failure policy's FailJob",
        job(_cond("FailureTarget", "PodFailurePolicy"), POLICY),
        pod("Failed", terminated={"exitCode": 3, "reason": "Error"}),
        Outcome(3),
    ),
    (
        "OOMKilled -> oom",
        job(POLICY),
        pod("Failed", terminated={"exitCode": 137, "reason": "OOMKilled"}),
        Outcome(137, oom_killed=True),
    ),
    (
        "1.31+: FailureTarget DeadlineExceeded while the pod still terminates: not over yet",
        job(DEADLINE),
        pod("Running", running=True),
        None,
    ),
    (
        "DeadlineExceeded and the pod terminated -> timeout",
        job(DEADLINE),
        pod("Failed", terminated={"exitCode": 143, "reason": "Error"}),
        Outcome(143, reason="timeout", detail="Job was active longer than specified deadline"),
    ),
    (
        "Failed DeadlineExceeded with the pod already gone -> timeout",
        job(DEADLINE, DEADLINE_FAILED),
        None,
        Outcome(-1, reason="timeout", detail="Job was active longer than specified deadline"),
    ),
    (
        "evicted (DisruptionTarget) -> execution error with the reason",
        job(_cond("Failed", "PodFailurePolicy", "Pod ns/p has condition DisruptionTarget matching FailJob rule")),
        pod("Failed", terminated={"exitCode": 137, "reason": "Error"}, conditions=(EVICTED,)),
        Outcome(
            137,
            reason="container_crashed",
            detail="the pod was evicted through the Eviction API: Eviction API: evicting",
        ),
    ),
    (
        "kubelet eviction (node pressure): status.reason Evicted",
        job(_cond("Failed", "BackoffLimitExceeded")),
        pod("Failed", reason="Evicted", message="The node was low on resource: memory."),
        Outcome(
            -1,
            reason="container_crashed",
            detail="the pod was evicted by the kubelet: The node was low on resource: memory.",
        ),
    ),
    (
        "preempted, pod gone, Job Failed by the policy",
        job(_cond("Failed", "PodFailurePolicy", "Pod ns/p has condition DisruptionTarget matching FailJob rule")),
        None,
        Outcome(
            -1,
            reason="container_crashed",
            detail="the pod was disrupted (Pod ns/p has condition DisruptionTarget matching FailJob rule)",
        ),
    ),
    (
        "Job and pod vanished",
        None,
        None,
        Outcome(-1, reason="container_crashed", detail="the Job and its pod vanished before the pod ended"),
    ),
    (
        "failed pod with no container state",
        job(_cond("Failed", "BackoffLimitExceeded")),
        pod("Failed", message="Pod was rejected: Node didn't have enough resource"),
        Outcome(
            -1,
            reason="container_crashed",
            detail="the pod failed without an exit code: Pod was rejected: Node didn't have enough resource",
        ),
    ),
]


@pytest.mark.parametrize(("why", "job_body", "pod_body", "want"), ROWS, ids=[r[0] for r in ROWS])
def test_outcome_table(why: str, job_body: Any, pod_body: Any, want: Outcome | None) -> None:
    """Every documented Job/pod end maps to one outcome; a pod still running maps to none."""
    assert states.outcome(job_body, pod_body) == want, why


def test_start_problems_say_why_in_the_apis_words() -> None:
    """Pending pods: the waiting reason or the scheduler's message, as the API gives them."""
    pull = pod("Pending", waiting={"reason": "ErrImagePull", "message": 'pull access denied for "nope"'})
    assert states.start_problem(pull) == 'container waiting: ErrImagePull pull access denied for "nope"'
    unsched = pod("Pending", conditions=(_cond("PodScheduled", "Unschedulable", "0/3 nodes are available", "False"),))
    assert states.start_problem(unsched) == "unschedulable: Unschedulable 0/3 nodes are available"
    assert states.start_problem(None) == "no pod was created for the Job"
    assert not states.stuck(pull)  # a pull may still succeed (backoff) until the start timeout
    assert states.stuck(pod("Pending", waiting={"reason": "InvalidImageName", "message": "bad"}))
    assert states.is_running(pod("Running", running=True))
    assert not states.is_running(pod("Running"))  # the phase alone is not the container


def test_events_read_like_kubectl_describe() -> None:
    """Events sorted by time, counts shown, the last ones kept."""
    events: list[dict[str, Any]] = [
        {
            "type": "Warning",
            "reason": "Failed",
            "message": "Error: ErrImagePull",
            "lastTimestamp": "2026-01-01T00:00:02Z",
        },
        {"type": "Normal", "reason": "Scheduled", "message": "assigned", "lastTimestamp": "2026-01-01T00:00:01Z"},
        {
            "type": "Warning",
            "reason": "BackOff",
            "message": "Back-off",
            "count": 4,
            "lastTimestamp": "2026-01-01T00:00:09Z",
        },
    ]
    assert states.describe_events(events) == (
        "Normal Scheduled: assigned; Warning Failed: Error: ErrImagePull; Warning BackOff: Back-off (x4)"
    )
    assert states.describe_events(events, limit=1) == "Warning BackOff: Back-off (x4)"
    assert states.describe_events([]) == "no events"

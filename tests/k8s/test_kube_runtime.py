"""KubernetesRuntime against the fake API server: the real `kubernetes` client, real containers.

What the conformance suite does not show: a pod that never starts, the cluster's own reasons
(a Job past its deadline, an evicted pod) reaching the verdict's inputs, both exec protocols,
and that every call made is one the deployed Role grants.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from supervisor.errors import RuntimeCallFailed, RuntimeUnavailable, SandboxStartFailed
from supervisor.images import agent_image_tag
from supervisor.runtime.base import LABEL_DEADLINE, LABEL_RUN, LABEL_SUPERVISOR, SandboxSpec, Tmpfs
from supervisor.runtime.kubernetes.manifests import KubeSettings
from supervisor.runtime.kubernetes.runtime import KubeHandle, KubernetesRuntime
from tests.cli_helpers import load, massgen_run, parse_lines
from tests.fakes.kube_api import V4, FakeCluster, FakeKubeAPI

pytestmark = pytest.mark.docker

ROLE = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes" / "role.yaml"


def _spec(run_id: str, *command: str, deadline_in: float = 600.0, **overrides: Any) -> SandboxSpec:
    labels = {LABEL_SUPERVISOR: "k8s-tests", LABEL_RUN: run_id, LABEL_DEADLINE: f"{time.time() + deadline_in:.3f}"}
    base: dict[str, Any] = {
        "run_id": run_id,
        "image": agent_image_tag(),
        "command": command,
        "mounts": (),
        "env": {"MASSGEN_RUN_ID": run_id},
        "labels": labels,
        "tmpfs_mounts": (Tmpfs("/workspace", 8 << 20),),
        "memory_bytes": 256 << 20,
        "start_timeout": 60.0,
    }
    base.update(overrides)
    return SandboxSpec(**base)


@pytest.fixture
def kube(fake_kubeconfig: Path) -> Iterator[KubernetesRuntime]:
    rt = KubernetesRuntime(env={"MASSGEN_K8S_KUBECONFIG": str(fake_kubeconfig)})
    yield rt
    for facts in rt.list_owned({LABEL_SUPERVISOR: "k8s-tests"}):
        rt.remove(KubeHandle(facts.id))


def _until_empty(api: FakeKubeAPI, timeout: float = 30.0) -> dict[str, list[str]]:
    end = time.monotonic() + timeout
    left = api.call(api.cluster.left)
    while any(left.values()) and time.monotonic() < end:
        time.sleep(0.2)
        left = api.call(api.cluster.left)
    return dict(left)


def test_bad_image_exits_2_start_failed_with_the_pods_events(
    fake_kube: FakeKubeAPI, fake_kubeconfig: Path, tmp_path: Path
) -> None:
    """An image no node can pull: exit 2 start_failed within the start timeout, the pod's waiting
    reason and events in massgen.log, and nothing left in the cluster."""
    t0 = time.monotonic()
    p = massgen_run(
        ["--automation", "--sandbox", "docker", "--runtime", "kubernetes", "--image", "massgen-sandbox/agent:no-such-tag",
         "--config", "@examples/quickstart", "What is 2+2?"],
        tmp_path,
        120,
        MASSGEN_K8S_KUBECONFIG=str(fake_kubeconfig),
        MASSGEN_K8S_START_TIMEOUT="6",
    )  # fmt: skip
    took = time.monotonic() - t0
    assert p.returncode == 2, p.stdout + p.stderr
    assert p.stdout.splitlines()[-1].startswith("FAILED: start_failed"), p.stdout
    assert took < 6 + 20, took  # the start timeout, plus the CLI's own start and the cleanup
    log_dir = Path(parse_lines(p.stdout)["LOG_DIR"])
    assert load(log_dir / "result.json")["reason"] == "start_failed"
    text = (log_dir / "massgen.log").read_text()
    assert "the pod did not start within 6s" in text
    assert "ErrImagePull" in text and "events:" in text
    assert 'Warning Failed: Failed to pull image "massgen-sandbox/agent:no-such-tag"' in text
    assert "Normal Scheduled" in text
    assert _until_empty(fake_kube) == {"jobs": [], "pods": [], "containers": []}


def test_a_job_past_its_active_deadline_is_a_timeout(fake_kube: FakeKubeAPI, fake_kubeconfig: Path) -> None:
    """activeDeadlineSeconds passing (the supervisor not there to stop the run): the cluster
    terminates the pod, and the runtime reports reason timeout with the Job's message."""
    settings = KubeSettings(namespace="massgen", grace_s=1, deadline_slack_s=0)
    rt = KubernetesRuntime(env={"MASSGEN_K8S_KUBECONFIG": str(fake_kubeconfig)}, settings=settings)
    handle = rt.start(_spec("k8s-deadline-1", "sleep", "600", deadline_in=1.0))
    try:
        info = rt.wait(handle, 60.0)
        assert info is not None
        assert (info.reason, info.error) == ("timeout", "Job was active longer than specified deadline")
        assert info.exit_code in (137, 143)  # SIGTERM (sleep as PID 1 ignores it) then SIGKILL
        assert rt.facts(handle).state == "exited"
    finally:
        rt.remove(handle)
    assert rt.facts(handle).state == "removed"


def test_an_evicted_pod_is_an_execution_error_with_the_reason(fake_kube: FakeKubeAPI, kube: KubernetesRuntime) -> None:
    """The Eviction API's DisruptionTarget: reason container_crashed, the detail says evicted; the
    pod failure policy fails the Job instead of re-running it (no second pod)."""
    handle = kube.start(_spec("k8s-evict-1", "sh", "-c", "echo before-eviction; exec sleep 600"))
    [pod] = kube._pods(handle.id)[0]
    time.sleep(1.0)  # the output is written (and followed) before the eviction
    fake_kube.call(lambda: fake_kube.cluster.evict("massgen", pod["metadata"]["name"]))
    info = kube.wait(handle, 60.0)
    assert info is not None and info.reason == "container_crashed"
    assert info.error == "the pod was evicted through the Eviction API: Eviction API: evicting"
    job = kube._job(handle.id)
    assert job is not None
    failed = [c for c in job["status"]["conditions"] if c["type"] == "Failed"]
    assert [c["reason"] for c in failed] == ["PodFailurePolicy"]
    assert len(kube._pods(handle.id)[0]) <= 1
    # The pod is gone (evicted, then deleted): its output was streamed while it ran.
    end = time.monotonic() + 30
    while kube._pods(handle.id)[0] and time.monotonic() < end:
        time.sleep(0.2)
    assert kube._pods(handle.id)[0] == []
    assert b"before-eviction" in kube.logs(handle)
    kube.remove(handle)


def test_exec_stream_exit_status_and_v5_half_close(kube: KubernetesRuntime) -> None:
    """pods/exec: stdout and stderr apart, channel 3's exit code; with v5 a half-closed stdin ends `cat`."""
    handle = kube.start(_spec("k8s-exec-1", "sleep", "600"))
    stream = kube.open_link(handle, ("sh", "-c", "cat; echo bye >&2; exit 7"))
    assert stream.v5
    stream.write(b"x" * 200_000)
    stream.close_stdin()
    got = bytearray()
    while chunk := stream.read(65536):
        got += chunk
    assert bytes(got) == b"x" * 200_000
    assert bytes(stream.stderr) == b"bye\n" and stream.exit_code == 7
    stream.close()
    kube.kill(handle)
    assert kube.wait(handle, 30.0) is not None
    kube.remove(handle)


def test_exec_over_the_v4_protocol(tmp_path: Path) -> None:
    """A server that speaks only v4: the stream works; stdin cannot be half-closed (a no-op), so
    the command reads a known length; the exit status still comes on channel 3."""
    api = FakeKubeAPI(FakeCluster(protocols=(V4,))).start()
    try:
        rt = KubernetesRuntime(env={"MASSGEN_K8S_KUBECONFIG": str(api.kubeconfig(tmp_path / "config"))})
        handle = rt.start(_spec("k8s-v4-1", "sleep", "600"))
        stream = rt.open_link(handle, ("head", "-c", "5"))
        assert not stream.v5
        stream.close_stdin()  # v4: nothing is sent
        stream.write(b"hello world")
        got = b""
        while chunk := stream.read(100):
            got += chunk
        assert got == b"hello" and stream.exit_code == 0
        stream.close()
        rt.remove(handle)
        assert _until_empty(api) == {"jobs": [], "pods": [], "containers": []}
    finally:
        api.close()


def _granted() -> set[tuple[str, str, str]]:
    role = yaml.safe_load(ROLE.read_text())
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def _authorised_as(method: str, path: str, query: dict[str, str]) -> tuple[str, str, str]:
    """The (apiGroup, resource, verb) the API server's authorizer sees for one request
    (https://kubernetes.io/docs/reference/access-authn-authz/authorization/#determine-the-request-verb)."""
    parts = path.strip("/").split("/")
    group = parts[1] if parts[0] == "apis" else ""
    rest = parts[3:] if parts[0] == "apis" else parts[2:]
    assert rest[0] == "namespaces", path
    resource = rest[2]
    named = len(rest) > 3
    if len(rest) > 4:
        resource = f"{resource}/{rest[4]}"
    if method == "GET":
        verb = "watch" if query.get("watch") in ("true", "1") else ("get" if named else "list")
        if resource == "pods/exec":
            verb = "create"  # the websocket upgrade, since 1.30
    else:
        verb = {"POST": "create", "DELETE": "delete", "PUT": "update", "PATCH": "patch"}[method]
    return group, resource, verb


def test_every_call_the_runtime_made_is_granted_by_the_role(fake_kube: FakeKubeAPI, kube: KubernetesRuntime) -> None:
    """The fake recorded every request of this session's runs (conformance included when run
    together); each is authorised by deploy/kubernetes/role.yaml, and the Role grants nothing
    the runtime never uses."""
    handle = kube.start(_spec("k8s-role-1", "sleep", "600"))
    stream = kube.open_link(handle, ("true",))
    while stream.read(100):
        pass
    stream.close()
    kube.logs(handle)
    kube.list_owned({LABEL_RUN: "k8s-role-1"})
    kube.stop(handle, 1.0)
    kube.wait(handle, 30.0)
    kube.remove(handle)
    with pytest.raises(Exception, match="did not start"):
        KubernetesRuntime(env=kube._env, start_timeout=1.0).start(_spec("k8s-role-2", "true", image="nope/none:1"))
    used = {_authorised_as(m, p, q) for m, p, q in fake_kube.call(lambda: list(fake_kube.cluster.calls))}
    granted = _granted()
    assert used <= granted, used - granted
    # Granted but not called today: pods/exec "get" (how servers before 1.30 authorise the
    # upgrade), single gets/watches an operator's tooling or a later watch-based reconciler uses.
    spare = {
        ("", "pods/exec", "get"),
        ("", "events", "get"),
        ("", "events", "watch"),
        ("batch", "jobs", "watch"),
        ("", "pods", "get"),
    }
    assert granted - used <= spare, (granted - used) - spare


def test_errors_name_the_problem(fake_kube: FakeKubeAPI, kube: KubernetesRuntime, tmp_path: Path) -> None:
    """A second Job of the same run is refused (409: start fails saying so); an exec on a pod that
    no longer runs is refused by the API server (RuntimeCallFailed); an API server nobody answers
    is RuntimeUnavailable naming the kubeconfig, and the CLI says so (exit 2, no traceback)."""
    handle = kube.start(_spec("k8s-err-1", "true"))
    with pytest.raises(SandboxStartFailed, match="already exists"):
        kube.start(_spec("k8s-err-1", "true"))
    assert kube.wait(handle, 30.0) is not None
    with pytest.raises(RuntimeCallFailed, match="not running"):
        kube.open_link(handle, ("true",))
    kube.remove(handle)
    dead = FakeKubeAPI.__new__(FakeKubeAPI)
    dead.url = "http://127.0.0.1:9"  # discard: nothing listens
    config = dead.kubeconfig(tmp_path / "dead")
    with pytest.raises(RuntimeUnavailable, match=str(config)):
        KubernetesRuntime(env={"MASSGEN_K8S_KUBECONFIG": str(config)}).ping()
    p = massgen_run(
        ["--automation", "--sandbox", "docker", "--runtime", "kubernetes", "--config", "@examples/quickstart", "q"],
        tmp_path,
        60,
        MASSGEN_K8S_KUBECONFIG=str(config),
    )
    assert "Traceback" not in p.stderr, p.stderr
    assert p.returncode == 1, p.stdout + p.stderr
    assert p.stdout.splitlines()[-1].startswith("FAILED: engine_unavailable")
    assert f"http://127.0.0.1:9 (from {config})" in p.stderr, p.stderr
    with pytest.raises(RuntimeUnavailable, match="no usable Kubernetes configuration"):
        KubernetesRuntime(env={"MASSGEN_K8S_KUBECONFIG": str(tmp_path / "missing")}).ping()


def test_the_pods_output_is_streamed_to_the_log_dir(fake_kubeconfig: Path, tmp_path: Path) -> None:
    """While the pod runs its output goes to <log dir>/sandbox/pod.log (the hub's lines here), and
    the end of it to massgen.log as for every runtime."""
    p = massgen_run(
        ["--automation", "--sandbox", "docker", "--runtime", "kubernetes", "--config", "@examples/quickstart", "q"],
        tmp_path,
        180,
        MASSGEN_K8S_KUBECONFIG=str(fake_kubeconfig),
    )
    assert p.returncode == 0, p.stdout + p.stderr
    log_dir = Path(parse_lines(p.stdout)["LOG_DIR"])
    pod_log = (log_dir / "sandbox" / "pod.log").read_text()
    assert "massgen-hub: listening" in pod_log and "massgen-hub: engine exited code=0" in pod_log
    assert "---- sandbox output ----" in (log_dir / "massgen.log").read_text()


def test_sigint_while_the_pod_pulls_its_image_exits_4_at_once(
    fake_kube: FakeKubeAPI, fake_kubeconfig: Path, tmp_path: Path
) -> None:
    """Ctrl+C while the Job's pod is still Pending (an image pull): exit 4 interrupted within
    seconds, not after the start timeout, and its Job deleted."""
    import signal

    from tests.cli_helpers import start_cli

    proc, log_dir = start_cli(
        ["--automation", "--sandbox", "docker", "--runtime", "kubernetes", "--image", "massgen-sandbox/agent:no-such-tag",
         "--config", "@examples/quickstart", "q"],
        tmp_path,
        MASSGEN_K8S_KUBECONFIG=str(fake_kubeconfig),
        MASSGEN_K8S_START_TIMEOUT="120",
    )  # fmt: skip
    try:
        end = time.monotonic() + 60
        while not fake_kube.call(lambda: list(fake_kube.cluster.pods)) and time.monotonic() < end:
            time.sleep(0.2)
        time.sleep(1.0)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 4, out + err
    assert took < 20, took  # the start timeout is 120 s
    result = load(log_dir / "result.json")
    assert (result["reason"], result["detail"]) == (
        "interrupted",
        "interrupted by SIGINT while the sandbox was starting",
    ), result
    assert _until_empty(fake_kube) == {"jobs": [], "pods": [], "containers": []}


def test_stop_without_a_channel_deletes_with_the_grace_and_keeps_the_last_state(kube: KubernetesRuntime) -> None:
    """stop(grace): the pod's deletion with that grace (SIGTERM, SIGKILL after it); once the pod
    and Job are gone, wait() and facts() still tell its exit from the last state seen."""
    handle = kube.start(_spec("k8s-stop-1", "sh", "-c", "trap 'exit 42' TERM; echo up; while :; do sleep 0.1; done"))
    time.sleep(1.0)
    t0 = time.monotonic()
    kube.stop(handle, 5.0)
    info = kube.wait(handle, 30.0)
    assert info is not None and info.exit_code == 42, info  # the SIGTERM's own exit, within the grace
    assert time.monotonic() - t0 < 5.0 + 5
    end = time.monotonic() + 30
    while kube.facts(handle).state != "removed" and time.monotonic() < end:
        time.sleep(0.2)
    assert kube.facts(handle).state == "removed"
    again = kube.wait(handle, 1.0)
    assert again is not None and again.exit_code == 42
    assert b"up" in kube.logs(handle)

"""`KubernetesRuntime`: each run a batch/v1 Job, linked through the run channel over pods/exec.

The only supervisor module that imports the `kubernetes` client (tests/unit/test_layering.py).
Every call goes through the official client with raw JSON (`_preload_content=False`): the
bodies are `manifests.job_manifest`'s dicts, and answers are read as the API's own JSON, so no
field is lost to a model class of another version. Quirks of the client handled here:

- `kubernetes.stream.stream` swaps the ApiClient's `call_api` for the duration of the call, so
  an exec on a client other threads use would send their requests over websockets: each exec
  gets an ApiClient of its own.
- `Watch.stream(..., deserialize=False)` raises KeyError on an ERROR event (it reads
  `raw_object`, which only the deserialising path sets): watches are read line by line here.
- The exec websocket's channel 3 carries the command's exit status (a metav1.Status); stdin can
  be half-closed only with the v5 protocol (a CLOSE frame, channel 255); `WSClient`'s reads are
  not thread-safe, so the stream is read through its websocket directly, by one thread.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import kubernetes.client
import kubernetes.config
import kubernetes.stream
import urllib3.exceptions
from kubernetes.client.exceptions import ApiException
from websocket import ABNF, WebSocketConnectionClosedException, WebSocketException

from supervisor.errors import ContainerRuntimeError, RuntimeCallFailed, RuntimeUnavailable, SandboxStartFailed
from supervisor.runtime.base import LABEL_LOG_DIR, ExitInfo, SandboxFacts, SandboxHandle, SandboxSpec
from supervisor.runtime.kubernetes import manifests, states
from supervisor.runtime.kubernetes.manifests import CONTAINER, KubeSettings

__all__ = ["KubeHandle", "KubernetesRuntime", "PodExecStream", "settings_from_env"]

log = logging.getLogger(__name__)
T = TypeVar("T")

LOG_TAIL_LINES = 2000
LOG_KEEP_BYTES = 1 << 20  # of a followed pod's output, in memory (massgen.log keeps less)
POD_LOG_MAX_BYTES = 10 << 20  # <log dir>/sandbox/pod.log, as Docker's json-file cap
FOLLOW_READ_S = 25 * 3600.0  # a followed pod may be quiet this long (a run's longest default is 24 h)
SEEN_MAX = 1024  # Jobs whose last state is kept (runs in flight are far fewer: --max-concurrent)
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"  # set on a Job's pods since 1.27 (and "job-name" before)
IN_CLUSTER_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


@dataclass
class KubeHandle:
    """A run's sandbox: `id` is its Job's name (pods are found by the Job's label)."""

    id: str


@dataclass
class _Seen:
    """The last Job and pod bodies seen for a handle: what is reported once they are deleted."""

    job: dict[str, Any] | None = None
    pod: dict[str, Any] | None = None
    logs: bytes = b""
    gone: bool = False
    following: bool = False  # a pods/log follower was started (one per pod: it streams from its start)


def settings_from_env(env: Mapping[str, str], namespace: str | None = None) -> KubeSettings:
    """The operator's choices (docs/kubernetes.md): MASSGEN_K8S_NAMESPACE, ..._RUNTIME_CLASS, ..._PULL_POLICY."""
    s = KubeSettings()
    ns = env.get("MASSGEN_K8S_NAMESPACE") or namespace or s.namespace
    return replace(
        s,
        namespace=ns,
        runtime_class_gvisor=env.get("MASSGEN_K8S_RUNTIME_CLASS") or s.runtime_class_gvisor,
        image_pull_policy=env.get("MASSGEN_K8S_PULL_POLICY") or s.image_pull_policy,
    )


class KubernetesRuntime:
    """`LinkRuntime` over the Kubernetes API: Jobs, their pods, pods/exec and pods/log.

    The client is configured on first use (kubeconfig from MASSGEN_K8S_KUBECONFIG, else
    KUBECONFIG / ~/.kube/config, else the in-cluster service account), so constructing the
    runtime never needs a cluster.
    """

    name = "kubernetes"
    linked = True

    def __init__(
        self,
        *,
        env: Mapping[str, str] | None = None,
        configuration: kubernetes.client.Configuration | None = None,
        settings: KubeSettings | None = None,
        timeout: float = 30.0,
        start_timeout: float | None = None,
    ) -> None:
        self._env = dict(os.environ if env is None else env)
        self._configuration = configuration
        self._settings = settings
        self._timeout = timeout
        raw = self._env.get("MASSGEN_K8S_START_TIMEOUT")
        self._start_timeout = start_timeout if start_timeout is not None else _seconds("MASSGEN_K8S_START_TIMEOUT", raw)
        self._lock = threading.Lock()
        self._client: kubernetes.client.ApiClient | None = None
        # The last state of recent Jobs (the oldest dropped past SEEN_MAX: a daemon runs for long).
        self._seen: collections.OrderedDict[str, _Seen] = collections.OrderedDict()
        self._cancelled: set[str] = set()  # run ids whose start() is to give up (cancel_start)

    def start_timeout_for(self, default: float) -> float:
        """How long a pod may take to start (image pull, scheduling): MASSGEN_K8S_START_TIMEOUT, else `default`.

        The lifecycle asks too, for a run it re-adopts while its pod is still Pending.
        """
        return self._start_timeout if self._start_timeout is not None else default

    # -- plumbing ---------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """The API server and where its configuration came from, for messages."""
        where = self._kubeconfig() or "the in-cluster service account"
        host = getattr(self._configuration, "host", None)
        return f"{host} (from {where})" if host else where

    def _kubeconfig(self) -> str | None:
        path = self._env.get("MASSGEN_K8S_KUBECONFIG") or self._env.get("KUBECONFIG")
        if path:
            return path.split(os.pathsep)[0]
        default = os.path.expanduser("~/.kube/config")
        if "KUBERNETES_SERVICE_HOST" not in self._env and os.path.exists(default):
            return default
        return None

    def _connect(self) -> tuple[kubernetes.client.Configuration, KubeSettings]:
        with self._lock:
            if self._configuration is None or self._settings is None:
                cfg = kubernetes.client.Configuration()
                namespace: str | None = None
                path = self._kubeconfig()
                try:
                    if path:
                        kubernetes.config.load_kube_config(config_file=path, client_configuration=cfg)  # type: ignore[no-untyped-call]  # unannotated in kubernetes.config
                        _contexts, active = kubernetes.config.list_kube_config_contexts(config_file=path)  # type: ignore[no-untyped-call]  # unannotated
                        namespace = ((active or {}).get("context") or {}).get("namespace")
                    else:
                        kubernetes.config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]  # unannotated
                        with contextlib.suppress(OSError), open(IN_CLUSTER_NAMESPACE, encoding="utf-8") as f:
                            namespace = f.read().strip() or None
                except Exception as exc:  # ConfigException, OSError, a bad file's YAML error: all unusable
                    where = path or "the in-cluster service account (KUBERNETES_SERVICE_HOST)"
                    raise RuntimeUnavailable(f"no usable Kubernetes configuration from {where}: {exc}") from exc
                self._configuration = self._configuration or cfg
                self._settings = self._settings or settings_from_env(self._env, namespace)
            return self._configuration, self._settings

    @property
    def settings(self) -> KubeSettings:
        """What every Job gets (namespace, runtime class, grace, ...)."""
        return self._connect()[1]

    @property
    def namespace(self) -> str:
        """The one namespace the runs live in."""
        return self.settings.namespace

    def _api(self) -> kubernetes.client.ApiClient:
        cfg, _ = self._connect()
        with self._lock:
            if self._client is None:
                self._client = kubernetes.client.ApiClient(cfg)
            return self._client

    def _batch(self) -> kubernetes.client.BatchV1Api:
        return kubernetes.client.BatchV1Api(self._api())

    def _core(self) -> kubernetes.client.CoreV1Api:
        return kubernetes.client.CoreV1Api(self._api())

    def _call(self, op: str, target: str, call: Callable[[], Any]) -> Any:
        """One API call: its JSON answer, with the client's failures mapped to our errors.

        Raises:
            RuntimeUnavailable: the API server cannot be reached.
            RuntimeCallFailed: the API server refused (404 included: `_unless_gone` tells).
        """
        try:
            resp = call()
        except ApiException as exc:
            if exc.status == 0 or exc.status is None:
                raise RuntimeUnavailable(f"op={op} target={target}: {exc.reason}") from exc
            raise RuntimeCallFailed(op, target, f"{exc.status} {_api_message(exc)}") from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise RuntimeUnavailable(f"op={op} target={target} at {self.endpoint}: {exc}") from exc
        data = getattr(resp, "data", resp)
        if isinstance(data, bytes | bytearray):
            return json.loads(data) if data.strip().startswith(b"{") else bytes(data)
        return data

    def _unless_gone(self, op: str, target: str, call: Callable[[], Any]) -> Any:
        try:
            return self._call(op, target, call)
        except RuntimeCallFailed as exc:
            if isinstance(exc.__cause__, ApiException) and exc.__cause__.status == 404:
                return None
            raise

    def _seen_for(self, name: str) -> _Seen:
        with self._lock:
            seen = self._seen.get(name)
            if seen is None:
                seen = self._seen[name] = _Seen()
                while len(self._seen) > SEEN_MAX:
                    self._seen.popitem(last=False)
            else:
                self._seen.move_to_end(name)
            return seen

    def ping(self) -> None:
        """Check that the API server answers and the runs' namespace can be listed.

        Raises:
            RuntimeUnavailable: it does not answer.
            RuntimeCallFailed: it refuses (RBAC).
        """
        ns = self.namespace
        self._call("list", f"jobs in {ns}", lambda: self._batch().list_namespaced_job(ns, limit=1, **self._opts()))

    def _opts(self, read: float | None = None) -> dict[str, Any]:
        return {"_preload_content": False, "_request_timeout": (self._timeout, read or self._timeout)}

    # -- reads ------------------------------------------------------------------------------

    def _job(self, name: str) -> dict[str, Any] | None:
        ns = self.namespace
        job = self._unless_gone(
            "get", f"job/{name}", lambda: self._batch().read_namespaced_job(name, ns, **self._opts())
        )
        return dict(job) if isinstance(job, dict) else None

    def _pods(self, name: str) -> tuple[list[dict[str, Any]], str]:
        ns = self.namespace
        got = self._call(
            "list",
            f"pods of job/{name}",
            lambda: self._core().list_namespaced_pod(ns, label_selector=f"{JOB_NAME_LABEL}={name}", **self._opts()),
        )
        items = [dict(p) for p in (got or {}).get("items") or ()]
        # backoffLimit 0 and restartPolicy Never: one pod; the newest if a controller made another.
        items.sort(key=lambda p: str((p.get("metadata") or {}).get("creationTimestamp") or ""))
        return items, str((got.get("metadata") or {}).get("resourceVersion") or "")

    def _observe(self, name: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None, str]:
        """The Job and its pod now (kept as the last seen), and the pods' list resourceVersion."""
        job = self._job(name)
        pods, rv = self._pods(name)
        pod = pods[-1] if pods else None
        seen = self._seen_for(name)
        with self._lock:
            if job is not None:
                seen.job = job
            if pod is not None:
                seen.pod = pod
            seen.gone = job is None and pod is None
        return job, pod, rv

    def _watch_pods(self, name: str, resource_version: str, seconds: float) -> None:
        """Block until a pod of the Job changes (or `seconds` pass); the change is kept as seen."""
        if seconds <= 0:
            return
        ns = self.namespace
        wait_s = max(1, math.ceil(seconds))

        def call() -> Any:
            return self._core().list_namespaced_pod(
                ns,
                label_selector=f"{JOB_NAME_LABEL}={name}",
                watch=True,
                resource_version=resource_version or None,
                allow_watch_bookmarks=False,
                timeout_seconds=wait_s,
                _preload_content=False,
                _request_timeout=(self._timeout, wait_s + 5),
            )

        try:
            resp = call()
        except ApiException as exc:
            if exc.status in (0, None):
                raise RuntimeUnavailable(f"op=watch target=pods of job/{name}: {exc.reason}") from exc
            return  # e.g. 410 Gone: the caller lists again
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise RuntimeUnavailable(f"op=watch target=pods of job/{name}: {exc}") from exc
        try:
            for event in _watch_events(resp):
                obj = event.get("object") or {}
                if event.get("type") in ("ADDED", "MODIFIED", "DELETED") and obj.get("kind", "Pod") == "Pod":
                    seen = self._seen_for(name)
                    with self._lock:
                        seen.pod = dict(obj)  # a DELETED event carries the pod's last state
                    return
                if event.get("type") == "ERROR":
                    return
        except (urllib3.exceptions.HTTPError, OSError):
            return  # the watch ended early (timeout, server closed it): the caller re-lists
        finally:
            with contextlib.suppress(Exception):
                resp.close()
                resp.release_conn()

    # -- Runtime protocol -------------------------------------------------------------------

    def start(self, spec: SandboxSpec) -> KubeHandle:
        """Create the run's Job and wait (at most the start timeout) for its pod to run.

        A pod still not running by then (image not pullable, unschedulable, ...) is described
        with its events, then its Job deleted, and the start fails with that description.

        Raises:
            RuntimeUnavailable: the API server cannot be reached.
            SandboxStartFailed: the Job was refused, or its pod did not start in time.
        """
        _cfg, settings = self._connect()
        try:
            body = manifests.job_manifest(spec, settings, now=time.time())
        except ValueError as exc:
            raise SandboxStartFailed(spec.run_id, str(exc)) from exc
        name = body["metadata"]["name"]
        ns = settings.namespace
        try:
            self._call(
                "create",
                f"job/{name}",
                lambda: self._batch().create_namespaced_job(ns, body, **self._opts()),  # type: ignore[arg-type]  # the JSON body, sent as is
            )
        except RuntimeCallFailed as exc:
            raise SandboxStartFailed(spec.run_id, f"the Job was refused: {exc.detail}") from exc
        handle = KubeHandle(name)
        limit = self.start_timeout_for(spec.start_timeout)
        end = time.monotonic() + limit
        problem: str | None = None
        try:
            while True:
                job, pod, rv = self._observe(name)
                if states.is_running(pod) or states.is_terminal(pod):
                    self._cancelled.discard(spec.run_id)  # too late: the run stops as a running one
                    log.info("sandbox started run_id=%s job=%s pod=%s", spec.run_id, name, _name(pod))
                    self._follow_logs(name, pod)
                    return handle
                if job is None:
                    problem = "the Job was deleted before its pod ran"
                    break
                failed = states.condition(job, "Failed") or states.condition(job, "FailureTarget")
                if failed is not None:
                    problem = f"the Job failed before its pod ran: {failed.get('reason')} {failed.get('message') or ''}"
                    break
                if states.stuck(pod):
                    problem = states.start_problem(pod)
                    break
                if spec.run_id in self._cancelled:
                    problem = f"the start was cancelled while the pod was {states.start_problem(pod) or 'pending'}"
                    break
                left = end - time.monotonic()
                if left <= 0:
                    problem = f"the pod did not start within {limit:g}s: {states.start_problem(pod) or 'pending'}"
                    break
                self._watch_pods(name, rv, min(left, 1.0))  # (1 s: a cancel is seen that soon)
        except RuntimeUnavailable:
            self._delete_quietly(handle, 0)
            raise
        # Recorded before anything is deleted: what the pod was waiting for, and its events.
        pod = self._seen_for(name).pod
        events = self._events(name, pod)
        detail = f"{problem}; events: {events}"
        log.info("run_id=%s job=%s did not start: %s", spec.run_id, name, detail)
        self._delete_quietly(handle, 0)
        self._wait_gone(name, 30.0)
        self._cancelled.discard(spec.run_id)
        raise SandboxStartFailed(spec.run_id, detail)

    def cancel_start(self, run_id: str) -> None:
        """Make a `start` of `run_id` waiting for its pod give up within a second (an interrupt):
        it deletes the Job and raises SandboxStartFailed. Thread-safe; unknown ids are fine."""
        self._cancelled.add(run_id)

    def _events(self, job_name: str, pod: Mapping[str, Any] | None) -> str:
        """The pod's (and Job's) events, one line each, as `kubectl describe` would list them."""
        ns = self.namespace
        found: list[dict[str, Any]] = []
        for kind, obj in (("Pod", _name(pod)), ("Job", job_name)):
            if not obj:
                continue
            selector = f"involvedObject.kind={kind},involvedObject.name={obj}"
            with contextlib.suppress(ContainerRuntimeError):
                got = self._call(
                    "list",
                    f"events of {kind.lower()}/{obj}",
                    functools.partial(self._core().list_namespaced_event, ns, field_selector=selector, **self._opts()),
                )
                found += [dict(e) for e in (got or {}).get("items") or ()]
        return states.describe_events(found)

    def wait(self, handle: SandboxHandle, timeout: float) -> ExitInfo | None:
        """Wait up to `timeout` seconds for the pod to end; None while it still runs.

        Raises:
            RuntimeUnavailable: the API server cannot be reached.
        """
        end = time.monotonic() + max(0.0, timeout)
        self._follow_logs(handle.id, self._seen_for(handle.id).pod)  # an adopted pod's too
        while True:
            result, rv = self._outcome(handle.id)
            if result is not None:
                return ExitInfo(
                    result.exit_code, oom_killed=result.oom_killed, error=result.detail, reason=result.reason
                )
            left = end - time.monotonic()
            if left <= 0:
                return None
            self._watch_pods(handle.id, rv, left)

    def _outcome(self, name: str) -> tuple[states.Outcome | None, str]:
        """The run's end now (None while it runs), from the API or, for what is deleted, from the
        last state seen (a pod's DELETED watch event carries its terminated state)."""
        job, pod, rv = self._observe(name)
        seen = self._seen_for(name)
        last_pod = seen.pod if states.is_terminal(seen.pod) else None
        if job is None and pod is None:
            if seen.job is None and seen.pod is None:
                return states.outcome(None, None), rv
            return states.outcome(seen.job, last_pod) or states.outcome(None, None), rv
        return states.outcome(job, pod if pod is not None else last_pod), rv

    def stop(self, handle: SandboxHandle, grace: float) -> None:
        """SIGTERM to the sandbox's PID 1 (the kubelet's, on deletion), SIGKILL after `grace`.

        The Job is deleted with foreground propagation (its pod first); its last state and
        output are recorded before.

        Raises:
            RuntimeUnavailable: the API server cannot be reached.
        """
        self._record(handle.id)
        self._delete(handle, max(0, math.ceil(grace)))

    def kill(self, handle: SandboxHandle) -> None:
        """Delete the Job and its pod at once (grace 0: SIGKILL); one already gone is fine.

        Raises:
            RuntimeUnavailable: the API server cannot be reached.
        """
        self._record(handle.id)
        self._delete(handle, 0)

    def remove(self, handle: SandboxHandle) -> None:
        """Delete the Job (foreground: its pod goes first) and wait until both are gone.

        Raises:
            RuntimeUnavailable: the API server cannot be reached.
        """
        self._record(handle.id)
        self._delete(handle, None)
        self._wait_gone(handle.id, 60.0)

    def logs(self, handle: SandboxHandle) -> bytes:
        """The tail of the sandbox's output; what was recorded before deletion once it is gone.

        Raises:
            RuntimeUnavailable: the API server cannot be reached.
        """
        seen = self._seen_for(handle.id)
        pod = seen.pod
        if pod is None or not seen.gone:
            _job, pod, _rv = self._observe(handle.id)
        out = self._pod_logs(pod) if pod is not None and not seen.gone else None
        if out is None:
            return seen.logs
        with self._lock:
            seen.logs = out
        return out

    def _follow_logs(self, name: str, pod: Mapping[str, Any] | None) -> None:
        """Stream the running pod's output (pods/log, follow) while it runs, on a thread of its
        own: kept in memory (its last LOG_KEEP_BYTES, what `logs` answers once the pod is
        deleted, by us or an eviction) and appended to `<log dir>/sandbox/pod.log` (at most
        POD_LOG_MAX_BYTES) when the run's log dir is on this host."""
        pod_name = _name(pod)
        if not pod_name or not states.is_running(pod):
            return
        seen = self._seen_for(name)
        with self._lock:
            if seen.following:
                return
            seen.following = True
        log_dir = _labels(seen.job).get(LABEL_LOG_DIR)
        target = Path(log_dir) / "sandbox" / "pod.log" if log_dir else None
        if target is not None and not target.parent.is_dir():
            target = None
        cfg, settings = self._connect()

        def follow() -> None:
            core = kubernetes.client.CoreV1Api(kubernetes.client.ApiClient(cfg))
            written = 0
            out = None
            try:
                resp: Any = core.read_namespaced_pod_log(
                    pod_name,
                    settings.namespace,
                    container=CONTAINER,
                    follow=True,
                    _preload_content=False,
                    # A quiet pod is fine: the read may wait as long as a run may last.
                    _request_timeout=(self._timeout, FOLLOW_READ_S),
                )
                if target is not None:
                    # The stream starts at the pod's first byte, so the file does too (an
                    # adopting supervisor rewrites what the previous one wrote).
                    out = open(target, "wb")  # noqa: SIM115 - closed in finally
                for chunk in resp.stream(64 << 10, decode_content=False):
                    with self._lock:
                        seen.logs = (seen.logs + chunk)[-LOG_KEEP_BYTES:]
                    if out is not None and written < POD_LOG_MAX_BYTES:
                        piece = chunk[: POD_LOG_MAX_BYTES - written]
                        out.write(piece)
                        out.flush()
                        written += len(piece)
            except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
                log.info("job=%s pod log follower ended: %s", name, exc)
            finally:
                if out is not None:
                    with contextlib.suppress(OSError):
                        out.close()

        threading.Thread(target=follow, name=f"pod-log-{name}", daemon=True).start()

    def _pod_logs(self, pod: Mapping[str, Any] | None) -> bytes | None:
        name = _name(pod)
        if not name:
            return None
        ns = self.namespace
        try:
            got = self._unless_gone(
                "logs",
                f"pod/{name}",
                lambda: self._core().read_namespaced_pod_log(
                    name, ns, container=CONTAINER, tail_lines=LOG_TAIL_LINES, **self._opts()
                ),
            )
        except RuntimeCallFailed:
            return None  # e.g. 400 while the container is still being created
        if got is None:
            return None
        return got if isinstance(got, bytes) else json.dumps(got).encode()

    def facts(self, handle: SandboxHandle, *, stats: bool = False) -> SandboxFacts:
        """The Job's and pod's state (no resource sample: the Role grants no metrics API).

        Raises:
            RuntimeUnavailable: the API server cannot be reached.
        """
        job, pod, _rv = self._observe(handle.id)
        if job is None and pod is None:
            seen = self._seen_for(handle.id)
            return SandboxFacts(
                id=handle.id,
                image=_image(seen.job),
                runtime=self.name,
                state="removed",
                labels=_labels(seen.job),
            )
        if pod is None:
            seen = self._seen_for(handle.id)
            pod = seen.pod if states.is_terminal(seen.pod) else None
        return _facts(handle.id, job, pod)

    def list_owned(self, labels: Mapping[str, str]) -> list[SandboxFacts]:
        """The Jobs carrying the owner label and all of `labels` (by label selector only).

        Raises:
            RuntimeUnavailable: the API server cannot be reached.
        """
        ns = self.namespace
        sel = manifests.selector(labels)
        got = self._call(
            "list", f"jobs {sel}", lambda: self._batch().list_namespaced_job(ns, label_selector=sel, **self._opts())
        )
        found = []
        for job in (got or {}).get("items") or ():
            name = str((job.get("metadata") or {}).get("name") or "")
            if not name:
                continue
            facts = self.facts(KubeHandle(name))
            wanted = all(facts.labels.get(k) == v for k, v in labels.items())
            if facts.state != "removed" and wanted:
                found.append(facts)
        return found

    # -- the run channel --------------------------------------------------------------------

    def open_link(self, handle: SandboxHandle, argv: tuple[str, ...]) -> PodExecStream:
        """Exec `argv` in the run's pod with stdin/stdout attached (pods/exec, a websocket).

        Raises:
            RuntimeUnavailable: the API server cannot be reached.
            RuntimeCallFailed: the pod is not running, or the exec was refused.
        """
        pod = self._seen_for(handle.id).pod
        if not states.is_running(pod):
            _job, pod, _rv = self._observe(handle.id)
        name = _name(pod)
        if not name or not states.is_running(pod):
            raise RuntimeCallFailed(
                "exec", f"job/{handle.id}", f"its pod is not running ({states.phase(pod) or 'none'})"
            )
        cfg, settings = self._connect()
        # An ApiClient of its own: stream() swaps the client's call_api while it runs.
        core = kubernetes.client.CoreV1Api(kubernetes.client.ApiClient(cfg))
        try:
            ws = kubernetes.stream.stream(
                core.connect_get_namespaced_pod_exec,
                name,
                settings.namespace,
                command=list(argv),
                container=CONTAINER,
                stdin=True,
                stdout=True,
                stderr=True,
                tty=False,
                binary=True,
                _preload_content=False,
            )
        except ApiException as exc:
            # The websocket call folds every failure into status 0; a refused handshake says so.
            text = str(exc.reason or exc)
            if "Handshake status" in text:
                raise RuntimeCallFailed("exec", f"pod/{name}", text) from exc
            raise RuntimeUnavailable(f"op=exec target=pod/{name}: {text}") from exc
        return PodExecStream(ws)

    # -- helpers ----------------------------------------------------------------------------

    def _record(self, name: str) -> None:
        """Keep the Job's and pod's state and the pod's output before they are deleted."""
        with contextlib.suppress(ContainerRuntimeError):
            _job, pod, _rv = self._observe(name)
            out = self._pod_logs(pod)
            if out is not None:
                seen = self._seen_for(name)
                with self._lock:
                    seen.logs = out

    def _delete(self, handle: SandboxHandle, grace: int | None) -> None:
        ns = self.namespace
        opts: dict[str, Any] = {"propagation_policy": "Foreground"}
        if grace is not None:
            opts["grace_period_seconds"] = grace
        self._unless_gone(
            "delete",
            f"job/{handle.id}",
            lambda: self._batch().delete_namespaced_job(handle.id, ns, **opts, **self._opts()),
        )
        if grace is not None:
            # Foreground deletion deletes the pod with the pod's own grace; ask for ours on it too.
            for pod in self._pods(handle.id)[0]:
                pod_name = _name(pod)
                self._unless_gone(
                    "delete",
                    f"pod/{pod_name}",
                    functools.partial(
                        self._core().delete_namespaced_pod, pod_name, ns, grace_period_seconds=grace, **self._opts()
                    ),
                )

    def _delete_quietly(self, handle: SandboxHandle, grace: int | None) -> None:
        try:
            self._delete(handle, grace)
        except ContainerRuntimeError as exc:
            log.warning("cleanup failed job=%s error=%s", handle.id, exc)

    def _wait_gone(self, name: str, seconds: float) -> bool:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                if self._job(name) is None and not self._pods(name)[0]:
                    self._seen_for(name).gone = True
                    return True
            except RuntimeUnavailable:
                pass
            time.sleep(0.2)
        log.warning("job=%s still present %gs after its deletion", name, seconds)
        return False


def _api_message(exc: ApiException) -> str:
    body = exc.body
    if isinstance(body, bytes | bytearray):
        body = body.decode("utf-8", "replace")
    with contextlib.suppress(ValueError, TypeError):
        status = json.loads(body or "")
        if isinstance(status, dict) and status.get("message"):
            return str(status["message"])
    return str(exc.reason or "").strip() or "refused"


def _seconds(name: str, raw: str | None) -> float | None:
    """A positive number of seconds from variable `name` (None when unset).

    Raises:
        ValueError: naming the variable and what it holds.
    """
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}={raw!r}: give a positive number of seconds")
    return value


def _watch_events(resp: Any) -> Iterator[dict[str, Any]]:
    """The JSON lines of a watch response (one event a line), as they arrive."""
    buf = b""
    for chunk in resp.stream(64 << 10, decode_content=False):
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if line.strip():
                yield json.loads(line)
    if buf.strip():
        yield json.loads(buf)


def _name(obj: Mapping[str, Any] | None) -> str:
    return str(((obj or {}).get("metadata") or {}).get("name") or "")


def _labels(job: Mapping[str, Any] | None) -> dict[str, str]:
    ann = ((job or {}).get("metadata") or {}).get("annotations") or {}
    with contextlib.suppress(ValueError, TypeError):
        given = json.loads(ann.get(manifests.ANNOTATION_LABELS) or "{}")
        if isinstance(given, dict):
            return {str(k): str(v) for k, v in given.items()}
    return {}


def _image(job: Mapping[str, Any] | None) -> str:
    pod_spec = (((job or {}).get("spec") or {}).get("template") or {}).get("spec") or {}
    for c in pod_spec.get("containers") or ():
        if c.get("name") == CONTAINER:
            return str(c.get("image") or "")
    return ""


def _facts(name: str, job: Mapping[str, Any] | None, pod: Mapping[str, Any] | None) -> SandboxFacts:
    phase = states.phase(pod)
    state = {"Pending": "created", "Running": "running", "Succeeded": "exited", "Failed": "exited"}.get(
        phase, "unknown"
    )
    if pod is None:
        state = "exited" if states.outcome(job, None) is not None else "created"
    end = states.outcome(job, pod) if state == "exited" else None
    pod_spec = (((job or {}).get("spec") or {}).get("template") or {}).get("spec") or {}
    labels = _labels(job)
    return SandboxFacts(
        id=name,
        image=_image(job),
        runtime=str(pod_spec.get("runtimeClassName") or "default"),
        state=state,
        exit_code=end.exit_code if end is not None else None,
        oom_killed=bool(end and end.oom_killed),
        labels=labels,
    )


class PodExecStream:
    """A pods/exec websocket as a `ByteStream`: stdin channel 0, stdout 1, stderr 2 (its last
    4 KiB kept), channel 3 the exec's exit status; v5 adds CLOSE (255) for half-closes.

    Reads are done by one thread on the websocket itself (WSClient's buffers are not
    thread-safe); writes may come from another (websocket-client locks its sends).
    """

    def __init__(self, ws: Any) -> None:
        self._ws = ws
        self._sock = ws.sock
        self.v5 = getattr(ws, "subprotocol", None) == "v5.channel.k8s.io"
        self._buf = bytearray()
        self._eof = False
        self._closed = False
        self.stderr = bytearray()
        self.status: dict[str, Any] | None = None  # channel 3: {"status": "Success"} or a Failure

    @property
    def exit_code(self) -> int | None:
        """The command's exit code from channel 3 (None before it ended)."""
        st = self.status
        if st is None:
            return None
        if st.get("status") == "Success":
            return 0
        for cause in (st.get("details") or {}).get("causes") or ():
            if cause.get("reason") == "ExitCode":
                with contextlib.suppress(ValueError, TypeError):
                    return int(cause.get("message"))
        return -1

    def read(self, n: int) -> bytes:
        while not self._buf and not self._eof:
            self._frame()
        take = bytes(self._buf[:n])
        del self._buf[:n]
        return take

    def _frame(self) -> None:
        try:
            opcode, frame = self._sock.recv_data_frame(True)
        except WebSocketConnectionClosedException:
            self._eof = True
            return
        except (WebSocketException, OSError) as exc:
            if self._closed:
                self._eof = True
                return
            raise OSError(f"pods/exec stream: {exc}") from exc
        if opcode == ABNF.OPCODE_CLOSE:
            self._eof = True
            return
        if opcode not in (ABNF.OPCODE_BINARY, ABNF.OPCODE_TEXT):
            return
        data = bytes(frame.data or b"")
        if not data:
            return
        channel, payload = data[0], data[1:]
        if channel == 1:
            self._buf += payload
        elif channel == 2:
            self.stderr = (self.stderr + payload)[-4096:]
        elif channel == 3:
            with contextlib.suppress(ValueError):
                self.status = json.loads(payload or b"{}")
        elif channel == 255 and self.v5 and payload[:1] == b"\x01":
            self._eof = True  # the server closed stdout

    def write(self, data: bytes) -> None:
        if self._closed:
            raise OSError("pods/exec stream closed")
        view = memoryview(data)
        try:
            for i in range(0, len(view), 64 << 10):
                self._sock.send(b"\x00" + bytes(view[i : i + (64 << 10)]), opcode=ABNF.OPCODE_BINARY)
        except (WebSocketException, OSError) as exc:
            raise OSError(f"pods/exec stream: {exc}") from exc

    def close_stdin(self) -> None:
        """Half-close: the command sees EOF on stdin (v5 only; v4 has no way, so it is a no-op)."""
        if self.v5 and not self._closed:
            with contextlib.suppress(WebSocketException, OSError):
                self._sock.send(bytes([255, 0]), opcode=ABNF.OPCODE_BINARY)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self._sock.close(timeout=1)
        with contextlib.suppress(Exception):
            self._sock.shutdown()

"""The Docker implementation of the runtime seam: the only supervisor module that imports docker."""

from __future__ import annotations

import logging
import math
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import docker
import docker.errors
import docker.types
import docker.utils
import requests.exceptions

from supervisor.errors import (
    ContainerRuntimeError,
    ImageBuildFailed,
    ImageMissing,
    RuntimeCallFailed,
    RuntimeUnavailable,
    SandboxStartFailed,
)
from supervisor.runtime.base import (
    LABEL_OWNER,
    LABEL_RUN,
    ExitInfo,
    SandboxFacts,
    SandboxHandle,
    SandboxSpec,
)

__all__ = ["DockerHandle", "DockerRuntime", "ImageBuildFailed", "RemoteDockerRuntime", "RuntimeCallFailed"]

log = logging.getLogger(__name__)

_OWNER_VALUE = "1"
# The connection starts at the lowest API docker-py supports, then uses the engine's own.
_MIN_API_VERSION = "1.24"
# Reported when the engine can no longer tell an exit code (the container vanished).
_UNKNOWN_EXIT = -1


T = TypeVar("T")

LOG_TAIL_LINES = 2000  # what massgen.log keeps of a sandbox's own output


@dataclass
class DockerHandle:
    """A started sandbox; `id` is the full container id."""

    id: str


def _is_read_timeout(exc: BaseException) -> bool:
    # Over the unix-socket adapter a read timeout can surface as ConnectionError wrapping
    # urllib3's ReadTimeoutError instead of requests' ReadTimeout.
    if isinstance(exc, requests.exceptions.ReadTimeout):
        return True
    return "read timed out" in str(exc).lower()


def _explain(exc: Exception) -> str:
    explanation = getattr(exc, "explanation", None)
    return str(explanation or exc).strip() or type(exc).__name__


class DockerRuntime:
    """`Runtime` over the Docker Engine API, plus the image operations the builder needs.

    The client is created on first use so that constructing the runtime never needs an engine;
    every engine call is bounded by `timeout` seconds (long waits pass their own bound).
    """

    name = "docker"

    def __init__(
        self,
        client: docker.DockerClient | None = None,
        *,
        timeout: float = 60.0,
        max_pool_size: int = 32,
        environment: Mapping[str, str] | None = None,
    ) -> None:
        self._client = client
        self._timeout = timeout
        self._max_pool_size = max_pool_size
        self._environment = dict(environment) if environment is not None else None
        self._lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        """Where the engine is expected (DOCKER_HOST, default the local unix socket)."""
        env = self._environment if self._environment is not None else os.environ
        return env.get("DOCKER_HOST") or "unix:///var/run/docker.sock"

    @classmethod
    def from_env(cls, *, timeout: float = 60.0) -> DockerRuntime:
        """A runtime for the engine named by DOCKER_HOST (default: the local unix socket)."""
        return cls(timeout=timeout)

    # -- plumbing ---------------------------------------------------------------------------

    @property
    def _docker(self) -> docker.DockerClient:
        with self._lock:
            if self._client is None:
                with self._engine("connect", self.endpoint):
                    env = self._environment if self._environment is not None else os.environ
                    client = docker.DockerClient(
                        **docker.utils.kwargs_from_env(environment=env),
                        version=_MIN_API_VERSION,
                        timeout=math.ceil(self._timeout),
                        max_pool_size=self._max_pool_size,
                    )
                    # requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE replace the CA docker-py
                    # configures from DOCKER_CERT_PATH, and a TLS engine then fails verification;
                    # the engine connection follows docker's conventions only. The API version is
                    # negotiated after that (docker-py's "auto" would ask before).
                    client.api.trust_env = False
                    client.api._version = client.api._retrieve_server_version()  # type: ignore[attr-defined]  # untyped private of docker-py
                    self._client = client
            return self._client

    @property
    def _api(self) -> docker.APIClient:
        return self._docker.api

    @contextmanager
    def _engine(self, op: str, target: str) -> Iterator[None]:
        """Map the Docker SDK's failures of one call to our errors (the only place that does).

        The engine's refusals (APIError, NotFound included) become `RuntimeCallFailed` with the
        SDK error as `__cause__` (see `_gone`), failures to reach it `RuntimeUnavailable`.
        Callers translate further where an operation has its own error (create, build).
        """
        try:
            yield
        except ContainerRuntimeError:
            raise
        except docker.errors.APIError as exc:
            raise RuntimeCallFailed(op, target, _explain(exc)) from exc
        except (requests.exceptions.RequestException, docker.errors.DockerException) as exc:
            raise RuntimeUnavailable(f"op={op} target={target}: {_explain(exc)}") from exc

    def _unless_gone(self, op: str, target: str, call: Callable[[], T], *, fine: tuple[str, ...] = ()) -> T | None:
        """`call()` through `_engine`; None when its object is gone (404) or the refusal says `fine`."""
        try:
            with self._engine(op, target):
                return call()
        except RuntimeCallFailed as exc:
            if _gone(exc) or any(f in exc.detail for f in fine):
                return None
            raise

    def ping(self) -> None:
        """Check that the engine answers.

        Raises:
            RuntimeUnavailable: it does not.
        """
        with self._engine("ping", "engine"):
            self._api.ping()

    def available_runtimes(self) -> frozenset[str]:
        """OCI runtimes the engine has registered (e.g. runc, runsc)."""
        with self._engine("info", "engine"):
            info = self._api.info()
        return frozenset((info.get("Runtimes") or {}).keys())

    # -- Runtime protocol -------------------------------------------------------------------

    def start(self, spec: SandboxSpec) -> DockerHandle:
        """Create and start a hardened container for `spec` (DESIGN 4.3).

        Raises:
            RuntimeUnavailable: the engine cannot be reached.
            ImageMissing: the image does not exist locally (nothing is ever pulled).
            SandboxStartFailed: the engine refused to create or start the container.
        """
        labels = dict(spec.labels)
        labels[LABEL_OWNER] = _OWNER_VALUE
        labels.setdefault(LABEL_RUN, spec.run_id)
        mounts = [
            docker.types.Mount(target=m.target, source=str(m.source), type="bind", read_only=m.read_only)
            for m in spec.mounts
        ]
        tmpfs_opts = f"rw,nosuid,nodev,size={spec.tmpfs_bytes},mode=1777"
        tmpfs = {"/tmp": tmpfs_opts}  # noqa: S108 - the sandbox's own private tmpfs
        uid, _, gid = spec.user.partition(":")
        for t in spec.tmpfs_mounts:
            inodes = f",nr_inodes={t.inodes}" if t.inodes else ""
            tmpfs[t.target] = f"rw,nosuid,nodev,size={t.size_bytes}{inodes},uid={uid},gid={gid or uid},mode=0700"
        kwargs: dict[str, Any] = {
            "image": spec.image,
            "command": list(spec.command),
            "user": spec.user,
            "working_dir": spec.workdir,
            "environment": dict(spec.env),
            "labels": labels,
            "mounts": mounts,
            "cap_drop": ["ALL"],
            "security_opt": ["no-new-privileges"],
            "read_only": True,
            "tmpfs": tmpfs,
            "init": True,
            "pids_limit": spec.pids_limit,
            "mem_limit": spec.memory_bytes,
            # Equal to mem_limit: no swap, so a memory hog is OOM-killed instead of thrashing.
            "memswap_limit": spec.memory_bytes,
            "nano_cpus": spec.nano_cpus,
            "network_mode": spec.network,
            "runtime": spec.runtime,
            "auto_remove": False,
            # A sandbox printing without end must not fill the host's disk (json-file is capped
            # here) nor, at the end, our memory (logs() reads only the tail).
            "log_config": docker.types.LogConfig(
                type=docker.types.LogConfig.types.JSON, config={"max-size": "10m", "max-file": "2"}
            ),
        }
        try:
            with self._engine("create", spec.image):
                container = self._docker.containers.create(**kwargs)
        except RuntimeCallFailed as exc:
            if isinstance(exc.__cause__, docker.errors.ImageNotFound):
                raise ImageMissing(spec.image) from exc.__cause__
            raise SandboxStartFailed(spec.run_id, f"create: {exc.detail}") from exc.__cause__
        if not container.id:
            raise SandboxStartFailed(spec.run_id, "create: the engine answered without a container id")
        handle = DockerHandle(container.id)
        try:
            with self._engine("start", handle.id):
                container.start()
        except ContainerRuntimeError as exc:
            # A created-but-never-started container would only be found later by label; drop it.
            self._remove_quietly(handle)
            if isinstance(exc, RuntimeCallFailed):
                raise SandboxStartFailed(spec.run_id, f"start: {exc.detail}") from exc
            raise
        log.info("sandbox started run_id=%s container=%s", spec.run_id, handle.id[:12])
        return handle

    def wait(self, handle: SandboxHandle, timeout: float) -> ExitInfo | None:
        """Wait up to `timeout` seconds for the sandbox to exit; None while it still runs.

        A sandbox removed behind our back reports exit code -1 with an `error`.

        Raises:
            RuntimeUnavailable: the engine cannot be reached.
            RuntimeCallFailed: the engine refused.
        """
        error: str | None = None
        until = time.monotonic() + timeout
        if timeout > 0:
            try:
                with self._engine("wait", handle.id):
                    # The SDK hands `timeout` to requests, which takes a float (the stub says int).
                    result = self._api.wait(handle.id, timeout=timeout)  # type: ignore[arg-type]
            except RuntimeCallFailed as exc:
                if isinstance(exc.__cause__, docker.errors.NotFound):
                    return ExitInfo(_UNKNOWN_EXIT, error="sandbox vanished before it exited")
                raise
            except RuntimeUnavailable as exc:
                if exc.__cause__ is not None and _is_read_timeout(exc.__cause__):
                    return None  # still running after `timeout`
                raise
            err: Mapping[str, Any] = (result or {}).get("Error") or {}
            error = err.get("Message") or None
        state = self._inspect_state(handle)
        if state is None:
            return ExitInfo(_UNKNOWN_EXIT, error="sandbox vanished before it exited")
        if state.get("Running") or state.get("Status") in ("created", "restarting"):
            if not state.get("Running"):
                # The engine's wait returns at once for a container that is not running: hold
                # the caller to its timeout, or its polling loop spins on the engine.
                time.sleep(max(0.0, until - time.monotonic()))
            return None
        return ExitInfo(
            exit_code=int(state.get("ExitCode", _UNKNOWN_EXIT)),
            oom_killed=bool(state.get("OOMKilled", False)),
            error=error or (state.get("Error") or None),
        )

    def stop(self, handle: SandboxHandle, grace: float) -> None:
        """SIGTERM to the sandbox's init (which forwards it), SIGKILL after `grace` seconds.

        Raises:
            RuntimeUnavailable: the engine cannot be reached.
            RuntimeCallFailed: the engine refused.
        """
        # The engine takes whole seconds; rounding up never kills earlier than asked.
        seconds = max(0, math.ceil(grace))
        self._unless_gone("stop", handle.id, lambda: self._api.stop(handle.id, timeout=seconds))

    def kill(self, handle: SandboxHandle) -> None:
        """SIGKILL the sandbox; a sandbox that is already stopped or gone is fine.

        Raises:
            RuntimeUnavailable: the engine cannot be reached.
            RuntimeCallFailed: the engine refused.
        """
        self._unless_gone("kill", handle.id, lambda: self._api.kill(handle.id), fine=("is not running",))

    def remove(self, handle: SandboxHandle) -> None:
        """Force-remove the sandbox; never raises if it is already gone.

        Raises:
            RuntimeUnavailable: the engine cannot be reached.
            RuntimeCallFailed: the engine refused.
        """
        # "removal already in progress" is a 409 that means the same as success here.
        self._unless_gone(
            "remove",
            handle.id,
            lambda: self._api.remove_container(handle.id, force=True, v=True),
            fine=("already in progress",),
        )

    def logs(self, handle: SandboxHandle) -> bytes:
        """stdout and stderr of the sandbox so far, interleaved; empty if it is gone.

        Raises:
            RuntimeUnavailable: the engine cannot be reached.
        """
        out = self._unless_gone(
            "logs",
            handle.id,
            lambda: self._api.logs(handle.id, stdout=True, stderr=True, stream=False, tail=LOG_TAIL_LINES),
        )
        if out is None:
            return b""
        return out if isinstance(out, bytes) else bytes(out)

    def facts(self, handle: SandboxHandle, *, stats: bool = False) -> SandboxFacts:
        """Inspect the sandbox; with `stats`, add one stats sample (takes about a second).

        A removed sandbox reports state "removed".

        Raises:
            RuntimeUnavailable: the engine cannot be reached.
        """
        info = self._unless_gone("inspect", handle.id, lambda: self._api.inspect_container(handle.id))
        if info is None:
            return SandboxFacts(id=handle.id, image="", runtime="", state="removed")
        facts = _facts_from_inspect(info)
        if not stats or facts.state != "running":
            return facts
        sample = self._stats_sample(handle)
        if sample is None:
            return facts
        return SandboxFacts(
            id=facts.id,
            image=facts.image,
            runtime=facts.runtime,
            state=facts.state,
            exit_code=facts.exit_code,
            oom_killed=facts.oom_killed,
            cpu_percent=_cpu_percent(sample),
            memory_bytes=_memory_bytes(sample),
            pids=(sample.get("pids_stats") or {}).get("current"),
            labels=facts.labels,
        )

    def list_owned(self, labels: Mapping[str, str]) -> list[SandboxFacts]:
        """Sandboxes (any state) carrying the owner label and all of `labels`; never by name.

        Raises:
            RuntimeUnavailable: the engine cannot be reached.
        """
        wanted = {**labels, LABEL_OWNER: _OWNER_VALUE}
        filters = {"label": [f"{k}={v}" for k, v in sorted(wanted.items())]}
        with self._engine("list", "containers"):
            rows = self._api.containers(all=True, filters=filters)
        found = []
        for row in rows:
            facts = self.facts(DockerHandle(row["Id"]))
            if facts.state != "removed":
                found.append(facts)
        return found

    # -- images -----------------------------------------------------------------------------

    def image_exists(self, tag: str) -> bool:
        """Whether `tag` exists locally.

        Raises:
            RuntimeUnavailable: the engine cannot be reached.
        """
        return self.image_labels(tag) is not None

    def image_labels(self, tag: str) -> dict[str, str] | None:
        """The labels of image `tag`, or None when it does not exist locally.

        Raises:
            RuntimeUnavailable: the engine cannot be reached.
        """
        info = self._unless_gone(
            "inspect-image",
            tag,
            lambda: self._api.inspect_image(tag),  # type: ignore[no-untyped-call]  # unannotated in types-docker
        )
        if info is None:
            return None
        return dict((info.get("Config") or {}).get("Labels") or {})

    def build_image(
        self,
        context_dir: Path,
        tag: str,
        buildargs: Mapping[str, str] | None = None,
        dockerfile: str = "Dockerfile",
        *,
        nocache: bool = False,
        labels: Mapping[str, str] | None = None,
        on_line: Callable[[str], None] | None = None,
        timeout: float = 1800.0,
    ) -> str:
        """Build `context_dir` into `tag` with the build's network off; returns the image id.

        Nothing is pulled: the FROM image must exist locally. `on_line` gets every build
        output line; `timeout` bounds the silence between two lines.

        Raises:
            RuntimeUnavailable: the engine cannot be reached.
            ImageBuildFailed: a build step failed.
        """
        tail: list[str] = []
        image_id = ""
        try:
            with self._engine("build", tag):
                stream = self._api.build(
                    path=str(context_dir),
                    tag=tag,
                    dockerfile=dockerfile,
                    buildargs=dict(buildargs or {}),
                    labels=dict(labels or {}),
                    network_mode="none",
                    pull=False,
                    rm=True,
                    forcerm=True,
                    nocache=nocache,
                    decode=True,
                    timeout=math.ceil(timeout),
                )
                for chunk in stream:
                    if "error" in chunk or "errorDetail" in chunk:
                        detail = (chunk.get("errorDetail") or {}).get("message") or chunk.get("error")
                        raise ImageBuildFailed(tag, str(detail).strip(), "".join(tail[-40:]))
                    if "aux" in chunk and "ID" in chunk["aux"]:
                        image_id = chunk["aux"]["ID"]
                    text = chunk.get("stream")
                    if text:
                        tail.append(text)
                        del tail[:-200]
                        if on_line is not None:
                            for line in text.splitlines():
                                if line.strip():
                                    on_line(line.rstrip())
        except RuntimeCallFailed as exc:
            raise ImageBuildFailed(tag, exc.detail, "".join(tail[-40:])) from exc.__cause__
        if not image_id:
            labels_now = self.image_labels(tag)
            if labels_now is None:
                raise ImageBuildFailed(tag, "build ended without an image", "".join(tail[-40:]))
        return image_id

    def import_rootfs(self, tar_path: Path, tag: str, changes: Sequence[str] = ()) -> None:
        """`docker import` a root filesystem tarball as `tag`, applying Dockerfile `changes`.

        Raises:
            RuntimeUnavailable: the engine cannot be reached.
            ImageBuildFailed: the engine rejected the tarball.
        """
        repository, _, version = tag.rpartition(":")
        if not repository or "/" in version:
            repository, version = tag, "latest"
        try:
            with self._engine("import", tag):
                self._api.import_image(
                    src=str(tar_path),
                    repository=repository,
                    tag=version,
                    changes=list(changes) or None,
                )
        except RuntimeCallFailed as exc:
            raise ImageBuildFailed(tag, f"import {tar_path}: {exc.detail}") from exc.__cause__
        if not self.image_exists(tag):
            raise ImageBuildFailed(tag, f"import of {tar_path} produced no image")

    def image_id(self, tag: str) -> str | None:
        """The id of image `tag` on this engine, None when it has no such image.

        Raises:
            RuntimeUnavailable: the engine cannot be reached.
        """
        info = self._unless_gone(
            "inspect-image",
            tag,
            lambda: self._api.inspect_image(tag),  # type: ignore[no-untyped-call]  # unannotated in types-docker
        )
        return None if info is None else str(info["Id"])

    def image_size(self, tag: str) -> int:
        """The size in bytes the engine reports for image `tag` (0 when unknown)."""
        info = self._unless_gone("inspect-image", tag, lambda: self._api.inspect_image(tag))  # type: ignore[no-untyped-call]  # unannotated in types-docker
        return int((info or {}).get("Size") or 0)

    def copy_image_to(self, tag: str, target: DockerRuntime, on_bytes: Callable[[int], None] | None = None) -> None:
        """Stream `docker save` of `tag` here into `docker load` on `target`, chunk by chunk.

        Raises:
            RuntimeUnavailable: either engine cannot be reached.
            RuntimeCallFailed: either engine refused (the detail says which side).
        """
        # Small pieces (docker-py's default is 2 MiB): every buffer of the copy stays under glibc's
        # mmap threshold and is reused from the heap, so the peak stays flat at any speed of
        # either side (a CI run once peaked at 378 MiB copying a 280 MiB image with 2 MiB pieces).
        with self._engine("save", tag):
            chunks = self._api.get_image(tag, chunk_size=_COPY_CHUNK_BYTES)

        def counted() -> Iterator[bytes]:
            total = 0
            for chunk in chunks:
                total += len(chunk)
                if on_bytes is not None:
                    on_bytes(total)
                yield chunk

        with target._engine("load", f"{tag} at {target.endpoint}"):
            for line in target._api.load_image(counted()):  # type: ignore[no-untyped-call]  # unannotated in types-docker
                if isinstance(line, dict) and line.get("error"):
                    raise RuntimeCallFailed("load", tag, str(line["error"]))

    def remove_image(self, tag: str, *, force: bool = False) -> None:
        """Remove image `tag`; a missing image is fine.

        Raises:
            RuntimeUnavailable: the engine cannot be reached.
            RuntimeCallFailed: the engine refused (e.g. a container still uses it).
        """
        self._unless_gone("remove-image", tag, lambda: self._api.remove_image(tag, force=force))

    # -- helpers ----------------------------------------------------------------------------

    def _inspect_state(self, handle: SandboxHandle) -> dict[str, Any] | None:
        info = self._unless_gone("inspect", handle.id, lambda: self._api.inspect_container(handle.id))
        return None if info is None else dict(info.get("State") or {})

    def _stats_sample(self, handle: SandboxHandle) -> dict[str, Any] | None:
        # stream=False without one_shot makes the engine take two readings (about 1 s apart),
        # which fills precpu_stats so a cpu percentage can be computed.
        sample = self._unless_gone("stats", handle.id, lambda: self._api.stats(handle.id, stream=False))
        return sample if isinstance(sample, dict) else None

    def _remove_quietly(self, handle: SandboxHandle) -> None:
        try:
            self.remove(handle)
        except ContainerRuntimeError as exc:
            log.warning("cleanup failed container=%s error=%s", handle.id[:12], exc)


_COPY_CHUNK_BYTES = 64 << 10


def _gone(exc: RuntimeCallFailed) -> bool:
    cause = exc.__cause__
    if isinstance(cause, docker.errors.NotFound):
        return True
    return isinstance(cause, docker.errors.APIError) and cause.status_code == 404


def _facts_from_inspect(info: Mapping[str, Any]) -> SandboxFacts:
    state = info.get("State") or {}
    config = info.get("Config") or {}
    host = info.get("HostConfig") or {}
    status = str(state.get("Status") or "unknown")
    exit_code = state.get("ExitCode") if status in ("exited", "dead") else None
    return SandboxFacts(
        id=str(info.get("Id", "")),
        image=str(config.get("Image") or info.get("Image") or ""),
        runtime=str(host.get("Runtime") or ""),
        state=status,
        exit_code=int(exit_code) if exit_code is not None else None,
        oom_killed=bool(state.get("OOMKilled", False)),
        labels=dict(config.get("Labels") or {}),
    )


def _cpu_percent(sample: Mapping[str, Any]) -> float | None:
    cpu = sample.get("cpu_stats") or {}
    pre = sample.get("precpu_stats") or {}
    try:
        cpu_delta = cpu["cpu_usage"]["total_usage"] - pre["cpu_usage"]["total_usage"]
        system_delta = cpu["system_cpu_usage"] - pre["system_cpu_usage"]
    except (KeyError, TypeError):
        return None
    if system_delta <= 0 or cpu_delta < 0:
        return None
    online = cpu.get("online_cpus") or len(cpu["cpu_usage"].get("percpu_usage") or ()) or 1
    return round(float(cpu_delta) / float(system_delta) * float(online) * 100.0, 2)


def _memory_bytes(sample: Mapping[str, Any]) -> int | None:
    mem = sample.get("memory_stats") or {}
    usage = mem.get("usage")
    if usage is None:
        return None
    extra = mem.get("stats") or {}
    # Same as `docker stats`: page cache is reclaimable, so it is not the sandbox's footprint
    # (cgroup v1 reports it as total_inactive_file, v2 as inactive_file).
    cache = extra.get("total_inactive_file", extra.get("inactive_file", 0))
    return max(0, int(usage) - int(cache))


class _ExecStream:
    """An exec's attached stdin/stdout as a `ByteStream` (stdout demultiplexed, stderr kept).

    Without a TTY the engine frames the output: an 8-byte header (stream: 1 stdout, 2 stderr;
    3 bytes zero; u32 length) before each chunk.
    """

    _HEADER = struct.Struct(">BxxxI")

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._buf = bytearray()
        self._want = 0  # payload bytes left of the current chunk
        self._kind = 1
        self.stderr = bytearray()  # its last 4 KiB
        self._closed = False

    def read(self, n: int) -> bytes:
        out = bytearray()
        while not out:
            if self._want == 0:
                while len(self._buf) < self._HEADER.size:
                    if not self._fill():
                        return b""
                self._kind, self._want = self._HEADER.unpack_from(self._buf)
                del self._buf[: self._HEADER.size]
                continue
            if not self._buf and not self._fill():
                return b""
            take = min(self._want, len(self._buf), n - len(out))
            chunk = bytes(self._buf[:take])
            del self._buf[:take]
            self._want -= take
            if self._kind == 2:
                self.stderr = (self.stderr + chunk)[-4096:]
            else:
                out += chunk
        return bytes(out)

    def _fill(self) -> bool:
        try:
            data = self._sock.recv(256 << 10)
        except OSError:
            if self._closed:
                return False
            raise
        if not data:
            return False
        self._buf += data
        return True

    def write(self, data: bytes) -> None:
        self._sock.sendall(data)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with suppress(OSError, ValueError):
            self._sock.shutdown(socket.SHUT_RDWR)
        with suppress(OSError, ValueError):
            self._sock.close()


class RemoteDockerRuntime(DockerRuntime):
    """Docker with no shared filesystem: the engine may be anywhere `DOCKER_HOST` says.

    Sandboxes get no host bind mounts at all (a spec with `mounts` is refused): their folders
    are tmpfs mounts, and everything else goes through the run channel (docs/channel.md) over
    the engine's exec stream, so the sandbox needs no network. TLS follows docker's own
    `DOCKER_TLS_VERIFY` / `DOCKER_CERT_PATH`.
    """

    name = "remote-docker"
    linked = True

    def start(self, spec: SandboxSpec) -> DockerHandle:
        """Like `DockerRuntime.start`, with no host path in the sandbox.

        Raises:
            SandboxStartFailed: the spec asks for a bind mount.
        """
        if spec.mounts:
            raise SandboxStartFailed(
                spec.run_id, f"the remote runtime mounts no host path (asked: {spec.mounts[0].source})"
            )
        return super().start(spec)

    def open_link(self, handle: SandboxHandle, argv: tuple[str, ...]) -> _ExecStream:
        """Exec `argv` in the sandbox with stdin and stdout attached.

        Raises:
            RuntimeUnavailable: the engine cannot be reached.
            RuntimeCallFailed: the engine refused (e.g. the sandbox is not running).
        """
        with self._engine("exec", handle.id):
            exec_id = self._api.exec_create(handle.id, list(argv), stdin=True, stdout=True, stderr=True, tty=False)
            raw = self._api.exec_start(exec_id["Id"], socket=True)
        sock: Any = getattr(raw, "_sock", raw)
        with suppress(OSError, AttributeError):
            sock.settimeout(None)  # the client's call timeout must not end a quiet link
        return _ExecStream(sock)

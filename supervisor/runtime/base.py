"""The container runtime seam: what the run lifecycle needs from Docker (or a later engine)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

# A runtime's errors, part of its contract (the whole tree is drawn in supervisor/errors.py).
from ..errors import ContainerRuntimeError as ContainerRuntimeError
from ..errors import ImageMissing as ImageMissing
from ..errors import RuntimeUnavailable as RuntimeUnavailable
from ..errors import SandboxStartFailed as SandboxStartFailed

# Labels carried by every container we create; reconciliation finds containers by these only.
LABEL_OWNER = "io.massgen.sandbox"  # value: "1"
LABEL_SUPERVISOR = "io.massgen.supervisor-id"
LABEL_RUN = "io.massgen.run-id"
LABEL_PARENT = "io.massgen.parent-run-id"
LABEL_DEADLINE = "io.massgen.deadline"  # unix time, seconds, as a decimal string
LABEL_LOG_DIR = "io.massgen.log-dir"
LABEL_WORKSPACE = "io.massgen.workspace"

# How long a sandbox may take to get running (image pull, scheduling) before it is a start failure.
START_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Mount:
    """A bind mount: a host folder at a path in the sandbox."""

    source: Path  # host path, absolute
    target: str  # path inside the sandbox
    read_only: bool = True


@dataclass(frozen=True)
class Tmpfs:
    """A private in-memory folder of the sandbox, owned by its user (runtimes without shared files).

    Its pages count against the sandbox's memory limit; `size_bytes` and `inodes` are enforced
    by the kernel (ENOSPC).
    """

    target: str
    size_bytes: int
    inodes: int | None = None


@dataclass(frozen=True)
class SandboxSpec:
    """Everything needed to start one run's sandbox."""

    run_id: str
    image: str
    command: tuple[str, ...]
    mounts: tuple[Mount, ...]
    env: Mapping[str, str]
    labels: Mapping[str, str]
    workdir: str = "/workspace"
    user: str = "10001:10001"
    memory_bytes: int = 1 << 30
    nano_cpus: int = 1_000_000_000
    pids_limit: int = 256
    network: str = "none"
    runtime: str = "runc"
    tmpfs_bytes: int = 256 << 20
    # Runtimes without a shared filesystem get folders here instead of `mounts` (which is empty).
    tmpfs_mounts: tuple[Tmpfs, ...] = ()
    # Seconds the runtime may take to get the sandbox running (image pull, scheduling) before
    # start() fails with SandboxStartFailed; runtimes that start synchronously ignore it.
    start_timeout: float = START_TIMEOUT_S


@dataclass(frozen=True)
class ExitInfo:
    """How a sandbox ended: its exit code, whether it was OOM-killed, the engine's error."""

    exit_code: int
    oom_killed: bool = False
    error: str | None = None
    # A reason (agent_image.protocol.result.Reason value) the runtime itself established, e.g.
    # "timeout" for a Kubernetes Job past its activeDeadlineSeconds or "container_crashed" for
    # an evicted pod; `error` then says why. The supervisor's own stop reason still wins.
    reason: str | None = None


@dataclass(frozen=True)
class SandboxFacts:
    """A snapshot of a sandbox for status.json's `container` section."""

    id: str
    image: str
    runtime: str
    state: str  # created | running | exited | removed | ...
    exit_code: int | None = None
    oom_killed: bool = False
    cpu_percent: float | None = None
    memory_bytes: int | None = None
    pids: int | None = None
    labels: Mapping[str, str] = field(default_factory=dict)


class SandboxHandle(Protocol):
    """A started sandbox, as its runtime knows it."""

    id: str


class Runtime(Protocol):
    """Blocking calls; the lifecycle runs them through asyncio.to_thread."""

    name: str

    def start(self, spec: SandboxSpec) -> SandboxHandle:
        """Create and start the sandbox.

        Raises:
            RuntimeUnavailable: the engine cannot be reached.
            ImageMissing: the image does not exist.
            SandboxStartFailed: anything else that stopped the start.
        """
        ...

    def wait(self, handle: SandboxHandle, timeout: float) -> ExitInfo | None:
        """Wait up to `timeout` seconds; None while the sandbox still runs."""
        ...

    def stop(self, handle: SandboxHandle, grace: float) -> None:
        """SIGTERM to the sandbox's init, SIGKILL after `grace` seconds."""
        ...

    def kill(self, handle: SandboxHandle) -> None:
        """SIGKILL the sandbox; one that is already stopped or gone is fine."""
        ...

    def remove(self, handle: SandboxHandle) -> None:
        """Remove the sandbox; never raises if it is already gone."""
        ...

    def logs(self, handle: SandboxHandle) -> bytes:
        """The tail of the sandbox's stdout and stderr; empty once it is gone."""
        ...

    def facts(self, handle: SandboxHandle, *, stats: bool = False) -> SandboxFacts:
        """Its state (with `stats`, one resource sample too); state 'removed' once it is gone."""
        ...

    def list_owned(self, labels: Mapping[str, str]) -> list[SandboxFacts]:
        """Sandboxes carrying all the given labels (and the owner label)."""
        ...


class ByteStream(Protocol):
    """A blocking, bidirectional byte stream to a process in the sandbox (its stdin/stdout)."""

    def read(self, n: int) -> bytes:
        """Up to `n` bytes of the process's stdout; b"" once it is closed."""
        ...

    def write(self, data: bytes) -> None:
        """All of `data` to the process's stdin.

        Raises:
            OSError: the stream is broken.
        """
        ...

    def close(self) -> None:
        """Close both directions; never raises."""
        ...


class LinkRuntime(Runtime, Protocol):
    """A runtime whose sandboxes share no filesystem with the supervisor (docs/channel.md).

    `start` gets a spec with no `mounts` (only `tmpfs_mounts`), and the run channel goes
    through `open_link`: the engine's own exec stream, so the sandbox needs no network.
    """

    linked: bool  # True: the lifecycle uses the channel (supervisor/channel) for this runtime

    def open_link(self, handle: SandboxHandle, argv: tuple[str, ...]) -> ByteStream:
        """Run `argv` in the sandbox with stdin/stdout attached to the returned stream.

        Raises:
            RuntimeUnavailable: the engine cannot be reached.
            ContainerRuntimeError: the engine refused (e.g. the sandbox is not running).
        """
        ...


def shares_filesystem(runtime: Runtime) -> bool:
    """False for runtimes that link their sandboxes through the channel (`linked` is true)."""
    return not getattr(runtime, "linked", False)

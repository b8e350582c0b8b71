"""Every error the supervisor raises on purpose, under one root.

The tree (each error carries its context as fields)::

    SupervisorError
    ├── ContainerRuntimeError ......... the container runtime failed (supervisor/runtime/)
    │   ├── RuntimeUnavailable ........ the engine cannot be reached (detail)
    │   ├── RuntimeCallFailed ......... the engine refused one operation (op, target, detail)
    │   ├── ImageMissing .............. the image does not exist locally (image)
    │   ├── ImageBuildFailed .......... an engine build or import failed (tag, detail, log_tail)
    │   └── SandboxStartFailed ........ the sandbox could not be created or started (run_id, detail)
    ├── BuildError .................... the image builder gave up (detail; supervisor/images.py)
    ├── PolicyError ................... a run refused as configured (reason, detail)
    ├── SnapshotError ................. a folder cannot be snapshotted safely (limit)
    ├── DiskError ..................... a run's disk could not be set up or released (op, path, detail)
    └── DataFileError (ValueError) .... a pricing or keys file is unusable (path, problem)

Third-party exceptions are translated where that library is called (Docker SDK errors only in
`runtime/docker.py`, through its one mapping helper) and raised ``from`` the original.
Control-flow signals of `lifecycle` (`Detached`, `InterruptedWhileQueued`) are not errors and
are not part of this tree.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "BuildError",
    "ContainerRuntimeError",
    "DataFileError",
    "DiskError",
    "ImageBuildFailed",
    "ImageMissing",
    "PolicyError",
    "RuntimeCallFailed",
    "RuntimeUnavailable",
    "SandboxStartFailed",
    "SnapshotError",
    "SupervisorError",
]


class SupervisorError(Exception):
    """Root of every error the supervisor raises on purpose."""


class ContainerRuntimeError(SupervisorError):
    """Root of container-runtime failures (any `Runtime`: Docker, local)."""


class RuntimeUnavailable(ContainerRuntimeError):
    """The container engine cannot be reached."""

    def __init__(self, detail: str) -> None:
        self.detail = detail
        super().__init__(f"container engine unavailable: {detail}")


class RuntimeCallFailed(ContainerRuntimeError):
    """The engine answered but refused or failed an operation on an existing sandbox or image."""

    def __init__(self, op: str, target: str, detail: str) -> None:
        self.op = op
        self.target = target
        self.detail = detail
        super().__init__(f"op={op} target={target} failed: {detail}")


class ImageMissing(ContainerRuntimeError):
    """The image does not exist locally (nothing is ever pulled)."""

    def __init__(self, image: str) -> None:
        self.image = image
        super().__init__(f"image not found: {image}")


class ImageBuildFailed(ContainerRuntimeError):
    """`docker build` (or import) of an image failed; `log_tail` holds the last build output."""

    def __init__(self, tag: str, detail: str, log_tail: str = "") -> None:
        self.tag = tag
        self.detail = detail
        self.log_tail = log_tail
        super().__init__(f"image={tag} build failed: {detail}")


class SandboxStartFailed(ContainerRuntimeError):
    """The engine refused to create or start a run's sandbox."""

    def __init__(self, run_id: str, detail: str) -> None:
        self.run_id = run_id
        self.detail = detail
        super().__init__(f"run_id={run_id} sandbox failed to start: {detail}")


class BuildError(SupervisorError):
    """An image could not be built; `detail` says which step and why."""

    def __init__(self, detail: str) -> None:
        self.detail = detail
        super().__init__(f"image build failed: {detail}")


class PolicyError(SupervisorError):
    """The supervisor refuses to start this run as configured (a limit, a path, a mode)."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


class SnapshotError(SupervisorError):
    """The folder cannot be snapshotted safely (escape attempt, not a directory, too large).

    `limit` names the budget that was passed ("bytes" or "entries"), None for anything else.
    """

    def __init__(self, detail: str, limit: str | None = None) -> None:
        self.limit = limit
        super().__init__(detail)


class DiskError(SupervisorError):
    """A run's disk could not be set up or released (supervisor/diskquota.py)."""

    def __init__(self, op: str, path: Path, detail: str) -> None:
        self.op = op
        self.path = path
        self.detail = detail
        super().__init__(f"op={op} path={path}: {detail}")


class DataFileError(SupervisorError, ValueError):
    """A pricing or keys file that cannot be used; the message names the file (never its values)."""

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}")

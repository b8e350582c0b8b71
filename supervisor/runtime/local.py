"""`--sandbox none`: the engine as a plain host process (no isolation; for development and tests)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SandboxStartFailed
from .base import ExitInfo, SandboxFacts, SandboxSpec


@dataclass
class LocalHandle:
    id: str
    proc: subprocess.Popen[bytes]
    output: Path
    spec: SandboxSpec
    removed: bool = field(default=False)


class LocalRuntime:
    """Runs the engine with the host's Python in its own process group."""

    name = "none"

    def __init__(self, output_dir: Path | None = None) -> None:
        self._lock = threading.Lock()
        self.output_dir = output_dir

    def start(self, spec: SandboxSpec) -> LocalHandle:
        out_dir = self.output_dir or Path(spec.labels.get("io.massgen.log-dir", "."))
        output = out_dir / ".engine-output"
        env = dict(spec.env)
        try:
            with open(output, "wb") as fh:
                proc = subprocess.Popen(
                    [sys.executable, *spec.command],
                    cwd=spec.workdir,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        except OSError as exc:
            raise SandboxStartFailed(spec.run_id, str(exc)) from exc
        return LocalHandle(id=f"pid-{proc.pid}", proc=proc, output=output, spec=spec)

    def wait(self, handle: LocalHandle, timeout: float) -> ExitInfo | None:
        try:
            code = handle.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        # A negative code is death by signal; report it the way a container engine would (128+n).
        return ExitInfo(exit_code=128 - code if code < 0 else code)

    def _signal_group(self, handle: LocalHandle, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(handle.proc.pid, sig)

    def stop(self, handle: LocalHandle, grace: float) -> None:
        if handle.proc.poll() is not None:
            return
        self._signal_group(handle, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if handle.proc.poll() is not None:
                break
            time.sleep(0.02)
        self._signal_group(handle, signal.SIGKILL)
        handle.proc.wait()

    def kill(self, handle: LocalHandle) -> None:
        self._signal_group(handle, signal.SIGKILL)
        handle.proc.wait()

    def remove(self, handle: LocalHandle) -> None:
        if handle.proc.poll() is None:
            self.kill(handle)
        with contextlib.suppress(FileNotFoundError):
            handle.output.unlink()
        handle.removed = True

    def logs(self, handle: LocalHandle) -> bytes:
        try:
            return handle.output.read_bytes()[-(1 << 20) :]
        except FileNotFoundError:
            return b""

    def facts(self, handle: LocalHandle, *, stats: bool = False) -> SandboxFacts:
        code = handle.proc.poll()
        state = "removed" if handle.removed else ("running" if code is None else "exited")
        return SandboxFacts(
            id=handle.id,
            image="host-python",
            runtime="none",
            state=state,
            exit_code=code,
            labels=dict(handle.spec.labels),
        )

    def list_owned(self, labels: Mapping[str, str]) -> list[SandboxFacts]:
        return []

"""An in-memory `Runtime` (supervisor/runtime/base.py) for fast lifecycle, core and api tests.

A fake sandbox is a thread running a behaviour. The default, `engine`, is the real engine
(agent_image's `run_engine`, scripted backends only) over the run's own spec.json, writing the
outbox the supervisor follows and ending with `run_finished`, as the container's entrypoint
does; `stop` cancels it the way SIGTERM does. Other behaviours (`hang`, `crash`,
`ignore_sigterm`, `claim`) play a sandbox that misbehaves. Every call is recorded, so a test
can hold the lifecycle to its contract: one start, a stop with the config's grace, a kill when
the stop is overdue, and one removal whatever happened.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from agent_image.engine.main import run_engine
from agent_image.engine.orchestrator import Outcome
from agent_image.engine.outbox import EVENTS_FILE, EventWriter
from agent_image.protocol.events import RunFinished
from agent_image.protocol.result import Reason, exit_code_for
from agent_image.protocol.spec import RunSpec
from supervisor.errors import ContainerRuntimeError
from supervisor.runtime.base import (
    LABEL_LOG_DIR,
    LABEL_OWNER,
    LABEL_WORKSPACE,
    ExitInfo,
    Runtime,
    SandboxFacts,
    SandboxHandle,
    SandboxSpec,
)

__all__ = ["FakeRuntime", "FakeSandbox", "by_question", "claim", "crash", "engine", "hang", "ignore_sigterm"]

SIGTERM_EXIT = 143
SIGKILL_EXIT = 137
_ids = itertools.count(1)


@dataclass
class FakeSandbox:
    """One fake sandbox: its spec, where its outbox is on the host, and what happened to it."""

    id: str
    spec: SandboxSpec
    outbox: Path
    workspace: Path
    calls: list[str] = field(default_factory=list)
    output: bytes = b""
    oom_killed: bool = False
    exit_code: int | None = None
    removed: bool = False
    stop_grace: float | None = None
    terminated: threading.Event = field(default_factory=threading.Event)  # SIGTERM delivered
    killed: threading.Event = field(default_factory=threading.Event)
    exited: threading.Event = field(default_factory=threading.Event)
    on_terminate: Callable[[], None] | None = None  # how the behaviour reacts to SIGTERM

    def exit(self, code: int, *, oom: bool = False) -> None:
        """The sandbox's process ends with `code` (the first exit wins)."""
        if not self.exited.is_set():
            self.exit_code, self.oom_killed = code, oom
            self.exited.set()

    def write_events(self, *events: Mapping[str, object]) -> None:
        """Append raw event lines to the outbox, as an engine (or a forger) would."""
        with open(self.outbox / EVENTS_FILE, "a", encoding="utf-8") as fh:
            for ev in events:
                fh.write(json.dumps(ev) + "\n")


Behaviour = Callable[[FakeSandbox], None]


def engine(box: FakeSandbox) -> None:
    """The real engine over the run's spec.json; SIGTERM cancels it (exit 4, as in the container)."""
    raw = json.loads((box.outbox / "spec.json").read_text(encoding="utf-8"))
    raw.update(outbox=str(box.outbox), workspace=str(box.workspace))
    spec = RunSpec.model_validate(raw)
    writer = EventWriter(box.outbox / EVENTS_FILE)
    loop = asyncio.new_event_loop()
    task = loop.create_task(run_engine(spec, writer))

    def terminate() -> None:
        loop.call_soon_threadsafe(task.cancel)

    box.on_terminate = terminate  # set before the check below: a stop racing it is never lost
    if box.terminated.is_set():
        loop.call_soon(task.cancel)
    try:
        outcome = loop.run_until_complete(task)
    except asyncio.CancelledError:
        writer.log("interrupted by SIGTERM", "warning")
        outcome = Outcome(exit_code_for(Reason.INTERRUPTED), Reason.INTERRUPTED, "received SIGTERM")
    finally:
        loop.close()
    writer.emit(RunFinished, exit_code=outcome.exit_code, reason=str(outcome.reason), detail=outcome.detail[:2000])
    writer.close()
    box.exit(outcome.exit_code)


def hang(box: FakeSandbox) -> None:
    """Writes nothing and runs until stopped; SIGTERM ends it (143)."""
    box.on_terminate = lambda: box.exit(SIGTERM_EXIT)
    if box.terminated.is_set():
        box.exit(SIGTERM_EXIT)


def ignore_sigterm(box: FakeSandbox) -> None:
    """Runs until SIGKILL: SIGTERM is ignored, so only the kill after the grace ends it."""
    box.on_terminate = lambda: None


def crash(code: int = 1, *, oom: bool = False, output: bytes = b"Traceback: boom\n") -> Behaviour:
    """Exits at once with `code` (and the OOM flag) without a run_finished event."""

    def behaviour(box: FakeSandbox) -> None:
        box.output = output
        box.exit(code, oom=oom)

    return behaviour


def claim(exit_code: int, reason: str, *, code: int | None = None) -> Behaviour:
    """Writes one `run_finished(exit_code, reason)` and exits with `code`: what a lying sandbox claims."""

    def behaviour(box: FakeSandbox) -> None:
        event = {"v": 1, "seq": 0, "ts": time.time(), "type": "run_finished", "exit_code": exit_code, "reason": reason}
        box.write_events(event)
        box.exit(exit_code if code is None else code)

    return behaviour


class FakeRuntime:
    """`Runtime` whose sandboxes are threads; `behaviour` decides what each sandbox does."""

    name = "fake"

    def __init__(self, behaviour: Behaviour = engine, *, start_error: ContainerRuntimeError | None = None) -> None:
        self.behaviour = behaviour
        self.start_error = start_error
        self.sandboxes: dict[str, FakeSandbox] = {}
        self._lock = threading.Lock()

    # -- the Runtime protocol ----------------------------------------------------------------

    def start(self, spec: SandboxSpec) -> FakeSandbox:
        if self.start_error is not None:
            raise self.start_error
        log_dir = Path(spec.labels[LABEL_LOG_DIR])
        box = FakeSandbox(f"fake-{next(_ids)}", spec, log_dir / "sandbox", Path(spec.labels[LABEL_WORKSPACE]))
        box.calls.append("start")
        with self._lock:
            self.sandboxes[box.id] = box
        threading.Thread(target=self._run, args=(box,), name=f"fake-sandbox-{box.id}", daemon=True).start()
        return box

    def wait(self, handle: SandboxHandle, timeout: float) -> ExitInfo | None:
        box = self._box(handle)
        if not box.exited.wait(max(0.0, timeout)):
            return None
        assert box.exit_code is not None
        return ExitInfo(box.exit_code, oom_killed=box.oom_killed)

    def stop(self, handle: SandboxHandle, grace: float) -> None:
        box = self._box(handle)
        box.calls.append("stop")
        box.stop_grace = grace
        if box.exited.is_set():
            return
        box.terminated.set()
        if box.on_terminate is not None:
            box.on_terminate()
        # Like `docker stop`: SIGKILL when the grace is over.
        if not box.exited.wait(grace):
            self.kill(handle)

    def kill(self, handle: SandboxHandle) -> None:
        box = self._box(handle)
        box.calls.append("kill")
        box.killed.set()
        box.exit(SIGKILL_EXIT)

    def remove(self, handle: SandboxHandle) -> None:
        box = self._box(handle)
        box.calls.append("remove")
        box.exit(SIGKILL_EXIT)  # like `docker rm -f`
        box.removed = True

    def logs(self, handle: SandboxHandle) -> bytes:
        return self._box(handle).output

    def facts(self, handle: SandboxHandle, *, stats: bool = False) -> SandboxFacts:
        box = self._box(handle)
        state = "removed" if box.removed else ("exited" if box.exited.is_set() else "running")
        return SandboxFacts(
            id=box.id,
            image=box.spec.image,
            runtime=box.spec.runtime,
            state=state,
            exit_code=box.exit_code,
            oom_killed=box.oom_killed,
            labels=dict(box.spec.labels),
        )

    def list_owned(self, labels: Mapping[str, str]) -> list[SandboxFacts]:
        wanted = {**labels, LABEL_OWNER: "1"}
        with self._lock:
            boxes = list(self.sandboxes.values())
        return [
            self.facts(b) for b in boxes if not b.removed and all(b.spec.labels.get(k) == v for k, v in wanted.items())
        ]

    # -- for tests ---------------------------------------------------------------------------

    @property
    def only(self) -> FakeSandbox:
        """The one sandbox started so far."""
        [box] = self.sandboxes.values()
        return box

    def _box(self, handle: SandboxHandle) -> FakeSandbox:
        return self.sandboxes[handle.id]

    def _run(self, box: FakeSandbox) -> None:
        try:
            self.behaviour(box)
        except Exception as exc:  # noqa: BLE001 - a behaviour that breaks is a sandbox that crashed
            box.output += f"fake sandbox behaviour failed: {type(exc).__name__}: {exc}\n".encode()
            box.exit(1)


def _conforms(runtime: FakeRuntime) -> Runtime:
    return runtime  # for mypy: FakeRuntime implements the Runtime protocol


def by_question(behaviours: Mapping[str, Behaviour], default: Behaviour = engine) -> Behaviour:
    """Pick each sandbox's behaviour by its run's question (so parent and child runs can differ)."""

    def behaviour(box: FakeSandbox) -> None:
        question = json.loads((box.outbox / "spec.json").read_text(encoding="utf-8"))["question"]
        behaviours.get(question, default)(box)

    return behaviour

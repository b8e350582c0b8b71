"""One run end to end over the fake runtime (tests/fakes/runtime.py): verdicts and the sandbox's life."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from agent_image.protocol.result import RunResult
from supervisor.errors import ContainerRuntimeError, ImageMissing, SandboxStartFailed
from supervisor.lifecycle import RunControl, RunExecution, RunRequest
from tests.fakes.runtime import Behaviour, FakeRuntime, claim, crash, engine, hang, ignore_sigterm

SCRIPTED = """\
agents:
  - id: agent_a
    backend: {type: scripted, steps: [{answer: "four"}, {vote: auto}], final: "final: four"}
  - id: agent_b
    backend: {type: scripted, steps: [{answer: "4"}, {vote: auto}]}
timeout_settings: {orchestrator_timeout_seconds: TIMEOUT}
sandbox: {stop_grace_seconds: GRACE}
"""


def _config(tmp_path: Path, timeout: float = 60, grace: float = 0.3) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.yaml"
    path.write_text(SCRIPTED.replace("TIMEOUT", str(timeout)).replace("GRACE", str(grace)))
    return path


def _request(tmp_path: Path, config: Path) -> RunRequest:
    return RunRequest(question="2 + 2?", config_source=str(config), logs_root=tmp_path / "runs", sandbox="none")


def _run(
    tmp_path: Path,
    runtime: FakeRuntime,
    *,
    timeout: float = 60,
    grace: float = 0.3,
    interrupt_after_s: float | None = None,
    force_after_s: float | None = None,
) -> tuple[RunResult, RunExecution]:
    control = RunControl()
    execution = RunExecution(_request(tmp_path, _config(tmp_path, timeout, grace)), runtime, control=control)

    async def go() -> RunResult:
        async def steer() -> None:
            while not runtime.sandboxes:
                await asyncio.sleep(0.01)
            if interrupt_after_s is not None:
                await asyncio.sleep(interrupt_after_s)
                control.interrupt.set()
            if force_after_s is not None:
                await asyncio.sleep(force_after_s)
                control.force.set()

        steering = asyncio.create_task(steer())
        try:
            return await asyncio.wait_for(execution.run(), 30)
        finally:
            steering.cancel()

    return asyncio.run(go()), execution


def _result(execution: RunExecution) -> dict[str, object]:
    assert execution.paths is not None
    data = json.loads(execution.paths.result.read_text())
    assert isinstance(data, dict)
    return data


def test_a_completed_run_has_its_winner_and_its_sandbox_removed_once(tmp_path: Path) -> None:
    """The engine's events become status and result (exit 0, completed, winner); start and remove once each."""
    runtime = FakeRuntime(engine)
    res, execution = _run(tmp_path, runtime)
    assert (res.exit_code, res.reason, res.winner) == (0, "completed", "agent_a")
    assert runtime.only.calls == ["start", "remove"]
    assert execution.paths is not None
    status = json.loads(execution.paths.status.read_text())
    assert (status["run"]["state"], status["run"]["exit_code"]) == ("finished", 0)
    assert execution.paths.final_file("agent_a").read_text() == "final: four"
    assert _result(execution)["reason"] == "completed"


def test_the_deadline_stops_the_sandbox_with_the_configured_grace(tmp_path: Path) -> None:
    """A sandbox that never finishes is stopped at the deadline (grace from the config): exit 3 timeout."""
    runtime = FakeRuntime(hang)
    t0 = time.monotonic()
    res, _ = _run(tmp_path, runtime, timeout=0.5, grace=0.25)
    assert (res.exit_code, res.reason) == (3, "timeout")
    assert time.monotonic() - t0 < 10
    box = runtime.only
    assert box.calls == ["start", "stop", "remove"] and box.stop_grace == 0.25


def test_an_interrupt_stops_the_run_with_exit_4(tmp_path: Path) -> None:
    """An interrupt while the engine runs ends it gracefully: the engine's own interrupted claim, exit 4."""
    runtime = FakeRuntime(hang)
    res, _ = _run(tmp_path, runtime, interrupt_after_s=0.1)
    assert (res.exit_code, res.reason) == (4, "interrupted")
    assert runtime.only.calls == ["start", "stop", "remove"]


def test_a_sandbox_ignoring_sigterm_is_killed_after_the_grace(tmp_path: Path) -> None:
    """SIGTERM ignored: the runtime's stop kills it once the grace is over; still exit 4 and removed."""
    runtime = FakeRuntime(ignore_sigterm)
    res, _ = _run(tmp_path, runtime, grace=0.2, interrupt_after_s=0.05)
    assert (res.exit_code, res.reason) == (4, "interrupted")
    assert runtime.only.calls == ["start", "stop", "kill", "remove"]


def test_a_second_signal_kills_at_once(tmp_path: Path) -> None:
    """force (the second Ctrl+C) kills the sandbox without waiting out a long grace."""
    runtime = FakeRuntime(ignore_sigterm)
    t0 = time.monotonic()
    res, _ = _run(tmp_path, runtime, grace=20, interrupt_after_s=0.05, force_after_s=0.2)
    assert (res.exit_code, res.reason) == (4, "interrupted")
    assert "kill" in runtime.only.calls and runtime.only.calls[-1] == "remove"
    assert time.monotonic() - t0 < 15


def test_start_failures_are_verdicts_and_leave_no_sandbox(tmp_path: Path) -> None:
    """ImageMissing is exit 1 image_missing; any other start failure exit 2 container_crashed."""
    cases: list[tuple[ContainerRuntimeError, int, str]] = [
        (ImageMissing("massgen-sandbox/agent:gone"), 1, "image_missing"),
        (SandboxStartFailed("log_x", "create: refused"), 2, "container_crashed"),
    ]
    for i, (error, code, reason) in enumerate(cases):
        runtime = FakeRuntime(engine, start_error=error)
        res, _ = _run(tmp_path / str(i), runtime)
        assert (res.exit_code, res.reason) == (code, reason), error
        assert str(error) in (res.detail or "")
        assert not runtime.sandboxes


def test_a_crash_or_an_oom_kill_is_the_verdict_and_the_output_is_kept(tmp_path: Path) -> None:
    """No run_finished: container_crashed (exit 2) with the sandbox's output in massgen.log; OOM flag: oom."""
    behaviours: list[tuple[Behaviour, str]] = [(crash(1), "container_crashed"), (crash(137, oom=True), "oom")]
    for i, (behaviour, reason) in enumerate(behaviours):
        runtime = FakeRuntime(behaviour)
        res, execution = _run(tmp_path / str(i), runtime)
        assert (res.exit_code, res.reason) == (2, reason)
        assert execution.paths is not None
        assert "Traceback: boom" in execution.paths.log.read_text()
        assert runtime.only.calls == ["start", "remove"]


def test_forged_claims_are_checked(tmp_path: Path) -> None:
    """run_finished(0, completed) without a final answer is no_answer; a supervisor-only reason is refused."""
    res, _ = _run(tmp_path / "a", FakeRuntime(claim(0, "completed")))
    assert (res.exit_code, res.reason) == (2, "no_answer")
    res, _ = _run(tmp_path / "b", FakeRuntime(claim(2, "oom")))
    assert (res.exit_code, res.reason) == (2, "agent_failed")
    assert "only the supervisor decides" in (res.detail or "")

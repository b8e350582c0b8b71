"""Runs on the remote engine while its link is cut (the host side of the veth pair down).

The engine and its sandboxes keep running behind the cut; the supervisor cannot reach either.
A short cut must cost nothing (the channel resumes from the bytes the supervisor holds); a cut
past the deadline ends the run as a timeout, and the sandbox is gone once the link is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent_image.protocol.result import RunResult
from supervisor.lifecycle import RunExecution, RunRequest
from supervisor.runtime.base import LABEL_RUN
from supervisor.runtime.docker import RemoteDockerRuntime
from tests.cli_helpers import load, start_cli, wait_for_event, write_config
from tests.remote import engine

pytestmark = pytest.mark.docker

TICKS = 14  # one-second shell steps: the agent writes events all through a 5 s cut
COPY = "/workspace/outbox-copy.jsonl"


def _steps() -> str:
    ticks = "\n".join(f"        - shell: sleep 1  # tick {i}" for i in range(TICKS))
    return f"""\
agents:
  - id: a
    backend:
      type: scripted
      steps:
{ticks}
        - shell: cp /run/massgen/outbox/events.jsonl {COPY}
        - answer: done
        - vote: auto
timeout_settings: {{orchestrator_timeout_seconds: 150}}
"""


@pytest.fixture
def link() -> Iterator[None]:
    """The link is up after the test, whatever happened in it (other tests share the engine)."""
    try:
        yield
    finally:
        engine.restore_link()
        engine.wait_answers(timeout=30)


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _seqs(data: bytes) -> list[int]:
    return [json.loads(line)["seq"] for line in data.splitlines()]


def test_a_5s_cut_mid_run_loses_and_duplicates_nothing(
    remote_engine: dict[str, str], remote_agent_image: str, link: None, tmp_path: Path
) -> None:
    """Veth down for 5 s mid-run, then up: exit 0; nothing arrived during the cut; afterwards the
    supervisor's mirror of the outbox starts with the sandbox's own copy of it byte for byte, and
    the log dir holds each event exactly once, in sequence."""
    cfg = write_config(tmp_path, _steps())
    args = ["--automation", "--sandbox", "docker", "--runtime", "remote-docker", "--config", str(cfg), "q"]
    proc, log_dir = start_cli(args, tmp_path, **remote_engine)
    mirror = log_dir / "sandbox" / "events.jsonl"
    try:
        wait_for_event(log_dir, "turn_started", timeout=90)
        time.sleep(1.0)
        engine.cut_link()
        cut_at = time.monotonic()
        time.sleep(0.5)  # what was in flight has landed
        size_in_cut = _size(mirror)
        time.sleep(5.0 - (time.monotonic() - cut_at) - 0.2)
        size_end_of_cut = _size(mirror)
        engine.restore_link()
        out, err = proc.communicate(timeout=150)
    finally:
        engine.restore_link()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out + err
    assert size_in_cut == size_end_of_cut > 0  # the cut was real: nothing came through it

    held = mirror.read_bytes()
    copy = (tmp_path / ".massgen" / "workspaces" / log_dir.name / Path(COPY).name).read_bytes()
    # The sandbox wrote events during the cut (the copy was taken after it) ...
    assert len(copy) > size_end_of_cut
    # ... and what the supervisor holds is exactly what it wrote: the copy, then the events after.
    assert held[: len(copy)] == copy and len(held) > len(copy)
    assert held.endswith(b"\n")
    sandbox_seqs = _seqs(held)
    assert sandbox_seqs == list(range(len(sandbox_seqs)))
    # The follower appended each of them once to the run's events.jsonl.
    assert _seqs((log_dir / "events.jsonl").read_bytes()) == sandbox_seqs
    log = (log_dir / "massgen.log").read_text()
    assert "did not arrive" not in log
    assert load(log_dir / "result.json")["exit_code"] == 0
    assert RemoteDockerRuntime(environment=remote_engine).list_owned({LABEL_RUN: log_dir.name}) == []


def test_a_cut_past_the_deadline_exits_3_and_the_sandbox_is_gone_once_the_link_is_back(
    remote_engine: dict[str, str], remote_agent_image: str, link: None, tmp_path: Path
) -> None:
    """An engine that ignores SIGTERM and has no timeout of its own; veth down from mid-run until
    past deadline + grace + 10 s: the supervisor reaches nothing, so the hub's own backstop kills
    the engine (137); the run is exit 3 timeout, and once the link is back the sandbox is removed."""
    grace_s = 1
    cfg = write_config(
        tmp_path,
        f"""\
        agents:
          - id: a
            backend: {{type: scripted}}
        sandbox: {{timeout_seconds: 15, stop_grace_seconds: {grace_s}}}
        """,
    )
    req = RunRequest(
        question="q",
        config_source=str(cfg),
        logs_root=tmp_path / "runs",
        sandbox="docker",
        image=remote_agent_image,
        engine_command=(
            "python3",
            "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)",
        ),
    )
    got: dict[str, RunResult | BaseException] = {}

    def run() -> None:
        try:
            got["result"] = asyncio.run(RunExecution(req, RemoteDockerRuntime(environment=remote_engine)).run())
        except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
            got["result"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    remote = RemoteDockerRuntime(environment=remote_engine, timeout=10)
    try:
        status = _wait_running(tmp_path / "runs", thread)
        deadline = status["run"]["deadline"]
        run_id = status["meta"]["run_id"]
        assert len(remote.list_owned({LABEL_RUN: run_id})) == 1
        assert deadline - time.time() > 3, "the deadline passed before the cut: raise timeout_seconds"
        engine.cut_link()
        # Past the deadline, the supervisor's stop (which cannot get through) and the hub's backstop.
        time.sleep(deadline + grace_s + 10 + 3 - time.time())
        engine.restore_link()
        thread.join(120)
    finally:
        engine.restore_link()
    assert not thread.is_alive(), "the run did not end within 120 s of the link coming back"
    result = got["result"]
    assert isinstance(result, RunResult), result
    assert (result.exit_code, result.reason) == (3, "timeout")
    assert result.container_exit_code == 137
    log = (tmp_path / "runs" / run_id / "massgen.log").read_text()
    assert "deadline + grace passed: killing the engine's process group" in log  # the hub's own kill
    end = time.monotonic() + 40
    while remote.list_owned({LABEL_RUN: run_id}):
        assert time.monotonic() < end, "the sandbox is still on the remote engine 40 s after the link is back"
        time.sleep(0.5)


def _wait_running(logs_root: Path, thread: threading.Thread, timeout: float = 90.0) -> dict[str, Any]:
    """status.json of the one run under `logs_root` once its sandbox runs."""
    end = time.monotonic() + timeout
    while True:
        for path in logs_root.glob("*/status.json"):
            with contextlib.suppress(ValueError, OSError):
                status: dict[str, Any] = load(path)
                if status["run"]["state"] == "running":
                    return status
        assert thread.is_alive(), "the run ended before its sandbox ran"
        assert time.monotonic() < end, f"no running sandbox after {timeout:g}s"
        time.sleep(0.1)

"""Runs on a runtime that shares no filesystem (remote-docker), here against the local engine.

The same code path as a remote engine except the engine's address: no host path is mounted,
the run channel carries spec, events, the API and the workspace (docs/channel.md). The second,
TLS-only engine in its own network namespace is exercised by tests/remote/, and the shared
contract cases (timeout, SIGINT, OOM, nested, SIGTERM ignored, ...) on both runtimes by tests/conformance/.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from supervisor.lifecycle import RunExecution, RunRequest
from supervisor.runtime.base import LABEL_RUN
from supervisor.runtime.docker import DockerRuntime, RemoteDockerRuntime
from tests.cli_helpers import load, parse_lines, start_cli, wait_for_event, write_config

pytestmark = pytest.mark.docker

QUICK = ["--automation", "--config", "@examples/quickstart", "What is 2+2?"]


def _gone(runtime: DockerRuntime, run_id: str) -> bool:
    return runtime.list_owned({LABEL_RUN: run_id}) == []


def test_quickstart_through_the_channel_mounts_no_host_path(
    runtime: DockerRuntime, agent_image: str, tmp_path: Path
) -> None:
    """Exit 0 with the contract lines; the events came through the channel; no bind mount; removed."""
    proc, log_dir = start_cli([*QUICK, "--image", agent_image], tmp_path, MASSGEN_RUNTIME="remote-docker")
    wait_for_event(log_dir, "run_started")
    st = load(log_dir / "status.json")
    info = runtime._api.inspect_container(st["container"]["id"])  # still running: the hub waits for BYE
    assert [m for m in info["Mounts"] if m["Type"] == "bind"] == []
    assert "/workspace" in info["HostConfig"]["Tmpfs"]
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, out + err
    f = parse_lines(out)
    assert "2 + 2 = 4" in Path(f["ANSWER_FILE"]).read_text()
    seqs = [ev["seq"] for ev in map(json.loads, (log_dir / "events.jsonl").read_text().splitlines())]
    assert seqs == list(range(len(seqs))) and len(seqs) > 5
    # The winner's workspace came back over the channel before the sandbox was removed.
    assert (log_dir / "final" / f["WINNER"] / "workspace").is_dir()
    log = (log_dir / "massgen.log").read_text()
    # No context folder: the spec went with the hub's command, no PUT and no START.
    assert "run channel up" in log and "the hub started the engine with its spec" in log
    assert _gone(runtime, log_dir.name)


def test_sandbox_that_exits_before_its_channel_is_up_fails_the_start_at_once(
    runtime: DockerRuntime, agent_image: str, tmp_path: Path
) -> None:
    """A sandbox whose hub is gone before the supervisor links to it (here: the run's deadline had
    passed when the hub started, and with a context folder to put in first the engine was not
    started yet, so its backstop ended it at once): exit 2 start_failed within seconds, not after
    the start timeout spent dialling a container that is not running."""
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    cfg = write_config(
        tmp_path,
        f"""\
        agents:
          - id: a
            backend: {{type: scripted}}
        orchestrator:
          context_paths: [{{path: "{ctx}", permission: read}}]
        """,
    )
    req = RunRequest(
        question="q",
        config_source=str(cfg),
        logs_root=tmp_path / "runs",
        sandbox="docker",
        image=agent_image,
        deadline_cap=time.time() - 60,
    )
    t0 = time.monotonic()
    result = asyncio.run(RunExecution(req, RemoteDockerRuntime()).run())
    assert (result.exit_code, result.reason) == (2, "start_failed"), result
    assert time.monotonic() - t0 < 30
    assert "exited (137) before its run channel came up" in (result.detail or "")
    assert _gone(runtime, result.run_id)

"""A remote sandbox whose massgen-run died (kill -9) is reaped by the next massgen-run on this host."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from supervisor.runtime.base import LABEL_RUN
from supervisor.runtime.docker import RemoteDockerRuntime
from tests.cli_helpers import load, massgen_run, start_cli, wait_for_event, write_config

pytestmark = pytest.mark.docker

REMOTE = ["--automation", "--sandbox", "docker", "--runtime", "remote-docker"]


def test_the_next_run_reaps_a_remote_sandbox_whose_cli_was_killed(
    remote_engine: dict[str, str], remote_agent_image: str, tmp_path: Path
) -> None:
    """kill -9 of a remote run's massgen-run: its sandbox (the hub waits for a BYE that never comes)
    stays on the remote engine; the next remote run on this host removes it and ends the lost run
    with supervisor_lost, then runs normally."""
    remote = RemoteDockerRuntime(environment=remote_engine, timeout=30)
    cfg = write_config(
        tmp_path,
        """\
        agents:
          - id: a
            backend: {type: scripted, steps: [{shell: "sleep 300", timeout: 600}, {answer: never}]}
        """,
    )
    proc, log_dir = start_cli([*REMOTE, "--config", str(cfg), "q"], tmp_path, **remote_engine)
    try:
        wait_for_event(log_dir, "turn_started", timeout=90)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    time.sleep(1.0)
    assert [f.state for f in remote.list_owned({LABEL_RUN: log_dir.name})] == ["running"]
    assert not (log_dir / "result.json").exists()

    p = massgen_run([*REMOTE, "--config", "@examples/quickstart", "What is 2+2?"], tmp_path, 180, **remote_engine)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "reaped 1 sandbox(es) left behind" in p.stderr
    assert remote.list_owned({LABEL_RUN: log_dir.name}) == []
    res = load(log_dir / "result.json")
    assert (res["exit_code"], res["reason"]) == (2, "supervisor_lost"), res
    assert f"pid {proc.pid}" in res["detail"]

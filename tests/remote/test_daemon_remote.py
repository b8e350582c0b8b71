"""`massgen-supervisor --runtime remote-docker` killed with -9 while its runs are in flight.

The sandboxes are on the remote engine; nothing of theirs is on this host but what the channel
brought. A restarted daemon finds them by label, re-links each (HELLO says how many outbox
bytes the log dir holds, the hub replays from there) and follows them to their end.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.runtime.docker import RemoteDockerRuntime
from tests.cli_helpers import load, parse_lines, write_config
from tests.e2e.test_daemon import (
    Daemon,
    _assert_events_mirror_the_outbox,
    _assert_finished_ok,
    _finish,
    _first_line_log_dir,
    _types,
    _until,
)

pytestmark = pytest.mark.docker

TICKS = 10
COPY = "/workspace/outbox-copy.jsonl"


def _ticking_config() -> str:
    """One agent writing events every second for TICKS s, then copying its outbox, answering, voting."""
    ticks = "".join(f'        - shell: "sleep 1; echo t{i}"\n' for i in range(TICKS))
    return (
        "agents:\n  - id: a\n    backend:\n      type: scripted\n      steps:\n"
        f"{ticks}        - shell: cp /run/massgen/outbox/events.jsonl {COPY}\n"
        '        - answer: "a is done"\n        - vote: auto\n'
        "timeout_settings: {orchestrator_timeout_seconds: 150}\n"
    )


class RemoteDaemon(Daemon):
    """The test daemon with `--runtime remote-docker` on the remote engine (MASSGEN_RUNTIME)."""

    def __init__(self, engine_env: dict[str, str], image: str, work: Path) -> None:
        super().__init__(RemoteDockerRuntime(environment=engine_env, timeout=30), image, work)
        self.engine_env = engine_env

    def env(self) -> dict[str, str]:
        return {**super().env(), **self.engine_env, "MASSGEN_RUNTIME": "remote-docker"}


@pytest.fixture
def remote_daemon(remote_engine: dict[str, str], remote_agent_image: str, tmp_path: Path) -> Iterator[RemoteDaemon]:
    d = RemoteDaemon(remote_engine, remote_agent_image, tmp_path)
    d.start()
    try:
        yield d
    finally:
        d.cleanup()
    assert d.containers() == []


def _events(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []


def test_kill_9_of_the_daemon_with_4_remote_runs_then_restart_readopts_all(
    remote_daemon: RemoteDaemon, tmp_path: Path
) -> None:
    """kill -9 of the daemon with 4 remote runs in flight; a restart with the same runtime re-adopts
    all four (re-linked), they exit 0, the CLI clients following them reattach, and each log dir
    holds every event the sandbox wrote exactly once: the mirror starts with the sandbox's own copy
    of its outbox byte for byte, events written while the daemon was down included."""
    d = remote_daemon
    cfg = write_config(tmp_path, _ticking_config())
    procs = [d.cli(["--automation", "--config", str(cfg), "q"], tmp_path) for _ in range(4)]
    runs = [(p, _first_line_log_dir(p)) for p in procs]
    for _, log_dir in runs:

        def running_a_tool(ld: Path = log_dir) -> bool:
            return "tool_called" in _types(ld / "events.jsonl")

        _until(running_a_tool, 90, f"{log_dir.name} running a tool")
    assert len([c for c in d.containers() if c.state == "running"]) == 4
    assert all(load(ld / "status.json")["container"]["runtime"] for _, ld in runs)
    d.kill9()
    held_at_kill = {ld: len(_events(ld / "sandbox" / "events.jsonl")) for _, ld in runs}
    time.sleep(4.0)  # the sandboxes write on; nothing reaches this host meanwhile
    assert {ld: len(_events(ld / "sandbox" / "events.jsonl")) for _, ld in runs} == held_at_kill
    assert len(d.containers()) == 4
    d.start()
    for proc, log_dir in runs:
        rc, out, err = _finish(proc, timeout=180)
        assert rc == 0, out + err + d.stderr_tail()
        assert parse_lines(out)["RUN_ID"] == log_dir.name
        _assert_finished_ok(log_dir)
        _assert_events_mirror_the_outbox(log_dir)
        held = (log_dir / "sandbox" / "events.jsonl").read_bytes()
        copy = (tmp_path / "workspaces" / log_dir.name / Path(COPY).name).read_bytes()
        assert held[: len(copy)] == copy and len(held) > len(copy)
        assert len(copy.splitlines()) > held_at_kill[log_dir]  # written while the daemon was down
        log = (log_dir / "massgen.log").read_text()
        assert "supervisor resumed" in log and "run channel re-linked" in log, log[-2000:]
    assert d.containers() == []


def test_bad_runtime_name_is_a_clear_error_not_a_traceback(tmp_path: Path) -> None:
    """MASSGEN_RUNTIME=nonsense: the daemon exits 2 naming the value and the known runtimes."""
    from tests.cli_helpers import cli_env

    p = subprocess.run(
        [sys.executable, "-m", "supervisor.daemon", "--socket", str(tmp_path / "d.sock")],
        env=cli_env(MASSGEN_RUNTIME="nonsense"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2, p.stdout + p.stderr
    assert "Traceback" not in p.stderr
    assert "unknown runtime 'nonsense'" in p.stderr and "remote-docker" in p.stderr, p.stderr


def test_a_bad_runtime_setting_is_a_clear_error_and_kubernetes_is_a_choice(tmp_path: Path) -> None:
    """--runtime kubernetes is accepted; MASSGEN_K8S_START_TIMEOUT=abc is exit 2 naming it, no traceback."""
    from tests.cli_helpers import cli_env

    p = subprocess.run(
        [sys.executable, "-m", "supervisor.daemon", "--socket", str(tmp_path / "d.sock"), "--runtime", "kubernetes"],
        env=cli_env(MASSGEN_K8S_START_TIMEOUT="abc", MASSGEN_K8S_KUBECONFIG=str(tmp_path / "none")),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2, p.stdout + p.stderr
    assert "Traceback" not in p.stderr and "invalid choice" not in p.stderr, p.stderr
    assert "MASSGEN_K8S_START_TIMEOUT='abc': give a positive number of seconds" in p.stderr, p.stderr

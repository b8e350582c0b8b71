"""The supervisor as a compose service: its image builds offline, and the host CLI runs the quickstart through it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent_image.client import ClientError, SupervisorClient
from supervisor.daemon import supervisor_id_for
from supervisor.runtime.base import LABEL_SUPERVISOR
from supervisor.runtime.docker import DockerHandle, DockerRuntime
from tests.cli_helpers import REPO, load, massgen_run, parse_lines

# The docker tests' fixtures (see test_ops_tmux.py for why they are imported, not plugged in).
from tests.docker.conftest import agent_image, runtime  # noqa: F401

pytestmark = pytest.mark.docker


def _compose_bin() -> str:
    found = shutil.which("docker-compose")
    if found is None:
        pytest.fail("docker-compose is not installed (Debian: apt-get install docker-compose)")
    return found


@pytest.fixture(scope="module")
def supervisor_image(agent_image: str) -> str:  # noqa: F811 - the imported fixture
    """The supervisor's image, built by the offline build script (the build itself has no network)."""
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "build-supervisor-image.sh")],
        cwd=REPO,
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, f"build failed:\n{proc.stderr[-4000:]}"
    tag = proc.stdout.strip().splitlines()[-1]
    assert tag == "massgen-sandbox/supervisor:latest"
    return tag


class Compose:
    """One compose project (unique name) over compose.yaml; `down -v` in teardown."""

    def __init__(self, home: Path, agent_tag: str, supervisor_tag: str) -> None:
        self.project = f"mgtest{uuid.uuid4().hex[:10]}"
        self.home = home
        self.env = {
            **os.environ,
            "MASSGEN_HOME": str(home),
            "MASSGEN_AGENT_IMAGE": agent_tag,
            "MASSGEN_SUPERVISOR_IMAGE": supervisor_tag,
        }

    def __call__(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [_compose_bin(), "-f", str(REPO / "compose.yaml"), "-p", self.project, *args],
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    @property
    def socket(self) -> Path:
        return self.home / "daemon" / "supervisor.sock"

    @property
    def logs_root(self) -> Path:
        return self.home / "runs"


def _containers(rt: DockerRuntime, **labels: str) -> list[str]:
    client = rt._docker
    filters: dict[str, str | list[str] | bool] = {"label": [f"{k}={v}" for k, v in labels.items()]}
    ids: list[str] = []
    for c in client.containers.list(all=True, filters=filters):
        assert c.id is not None, c
        ids.append(c.id)
    return ids


@pytest.fixture
def compose(
    runtime: DockerRuntime,  # noqa: F811 - the imported fixture
    agent_image: str,  # noqa: F811
    supervisor_image: str,
) -> Iterator[Compose]:
    """`docker-compose up -d` of compose.yaml with a fresh MASSGEN_HOME; torn down with no container left."""
    # Short, because per-run unix sockets live under it (sun_path is ~107 bytes).
    home = Path(tempfile.mkdtemp(prefix="mgc-", dir="/tmp"))
    c = Compose(home, agent_image, supervisor_image)
    try:
        up = c("up", "-d")
        assert up.returncode == 0, f"compose up failed:\n{up.stderr}"
        yield c
    finally:
        logs = c("logs", "--no-color")
        down = c("down", "-v", "--timeout", "30")
        sandbox_label = {LABEL_SUPERVISOR: supervisor_id_for(c.socket)}
        for cid in _containers(runtime, **sandbox_label):  # a failed run must not leave sandboxes behind
            runtime.kill(DockerHandle(cid))
            runtime.remove(DockerHandle(cid))
        left = _containers(runtime, **{"com.docker.compose.project": c.project})
        shutil.rmtree(home, ignore_errors=True)
        assert down.returncode == 0, f"compose down failed:\n{down.stderr}"
        assert left == [], f"containers left behind by {c.project}: {left}\n{logs.stdout[-3000:]}"


def _wait_healthy(sock: Path, timeout: float = 60) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if sock.exists():
            client = SupervisorClient(str(sock), timeout=5)
            try:
                _, body = client.request("GET", "/v1/health")
                return dict(body)
            except ClientError as exc:
                last = exc
            finally:
                client.close()
        time.sleep(0.2)
    raise AssertionError(f"the supervisor did not answer on {sock} within {timeout}s ({last})")


def test_quickstart_through_the_compose_service(compose: Compose, runtime: DockerRuntime) -> None:  # noqa: F811
    """The host CLI submits to the containerised daemon; the run's sandbox is a sibling on the host engine.

    Exit 0, the answer file on the host at the path printed, status.json written by that daemon,
    and the sandbox removed once the run ended.
    """
    health = _wait_healthy(compose.socket)
    assert health["supervisor_id"] == supervisor_id_for(compose.socket)
    assert health["logs_root"] == str(compose.logs_root)
    proc = massgen_run(
        ["--automation", "--config", "@examples/quickstart", "What is 2+2?"],
        compose.home,
        timeout=180,
        MASSGEN_DAEMON_SOCKET=str(compose.socket),
        MASSGEN_LOGS_ROOT=str(compose.logs_root),
    )
    logs = compose("logs", "--no-color").stdout[-3000:]
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\n{logs}"
    lines = parse_lines(proc.stdout)
    log_dir = Path(lines["LOG_DIR"])
    assert log_dir.parent == compose.logs_root and log_dir.is_dir()
    answer = Path(lines["ANSWER_FILE"])
    assert answer.is_file() and answer.is_relative_to(log_dir)
    assert "4" in answer.read_text()
    status = load(lines["STATUS_FILE"])
    assert status["run"]["state"] == "finished" and status["run"]["exit_code"] == 0
    # run by the service, not by a supervisor embedded in the CLI
    assert status["run"]["supervisor_id"] == supervisor_id_for(compose.socket)
    assert status["container"]["image"].startswith("massgen-sandbox/agent:")
    assert load(log_dir / "result.json")["exit_code"] == 0
    assert _containers(runtime, **{LABEL_SUPERVISOR: supervisor_id_for(compose.socket)}) == []

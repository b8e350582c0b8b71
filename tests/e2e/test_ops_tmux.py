"""`massgen-run watch` and `ps` in a real terminal (tmux): runs appear, and their state updates to finished."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent_image.protocol.status import RunState, Status
from supervisor.logdir import atomic_write_json, create_run_dirs
from tests.cli_helpers import REPO, cli_env, write_config

# The docker tests' fixtures, imported rather than listed in pytest_plugins: that conftest is
# already registered as a conftest when the whole suite runs, and pytest refuses it twice.
from tests.docker.conftest import agent_image, runtime  # noqa: F401

SLOW_CONFIG = """\
agents:
  - id: slowpoke
    backend:
      type: scripted
      steps:
        - sleep: 10
        - answer: "done waiting"
        - vote: auto
timeout_settings:
  orchestrator_timeout_seconds: 120
"""


class Tmux:
    """A private tmux server (its own -L socket) with one 200x50 session; killed in teardown."""

    def __init__(self, env: dict[str, str]) -> None:
        self.sock = f"mg-{uuid.uuid4().hex[:8]}"
        self.session = "ops"
        self.env = env
        self._tmux("new-session", "-d", "-s", self.session, "-x", "200", "-y", "50", "-c", str(REPO))

    def _tmux(self, *args: str) -> str:
        proc = subprocess.run(
            ["tmux", "-L", self.sock, "-f", "/dev/null", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return proc.stdout

    def send(self, command: str) -> None:
        self._tmux("send-keys", "-t", self.session, command, "Enter")

    def keys(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", self.session, *keys)

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-t", self.session)

    def wait_for(self, predicate: Callable[[str], bool], timeout: float, what: str) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.screen()
            if predicate(text):
                return text
            assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}; screen:\n{text}"
            time.sleep(0.1)

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.sock, "kill-session", "-t", self.session], capture_output=True, timeout=10)
        subprocess.run(["tmux", "-L", self.sock, "kill-server"], capture_output=True, timeout=10)


def row_of(screen: str, run_id: str) -> str:
    return next((ln for ln in screen.splitlines() if run_id in ln), "")


def scrape(port: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def cli(*args: str) -> str:
    return " ".join(shlex.quote(a) for a in (sys.executable, "-m", "supervisor.cli", *args))


@pytest.fixture
def tmux() -> Iterator[Callable[[dict[str, str]], Tmux]]:
    """Factory for a tmux session with the given environment; every session is killed afterwards."""
    if shutil.which("tmux") is None:
        pytest.fail("tmux is not installed (apt-get install tmux)")
    made: list[Tmux] = []

    def make(env: dict[str, str]) -> Tmux:
        t = Tmux({**env, "TERM": "xterm-256color"})
        made.append(t)
        return t

    yield make
    for t in made:
        t.close()


def test_watch_redraws_when_a_status_json_is_replaced(tmp_path: Path, tmux: Callable[[dict[str, str]], Tmux]) -> None:
    """Without Docker: a running run shows as running, then finished within a second of its status.json changing."""
    root = tmp_path / "runs"
    paths = create_run_dirs(root, tmp_path / "ws")
    st = Status()
    st.meta.run_id = paths.run_id
    st.meta.start_time = time.time()
    st.run.state = RunState.RUNNING
    atomic_write_json(paths.status, st.model_dump(mode="json"))
    term = tmux(cli_env())
    term.send(cli("watch", "--logs-root", str(root)))
    term.wait_for(lambda s: "running" in row_of(s, paths.run_id), 20, "the run as running")
    st.run.state, st.run.exit_code = RunState.FINISHED, 0
    atomic_write_json(paths.status, st.model_dump(mode="json"))
    t0 = time.monotonic()
    term.wait_for(lambda s: "finished (0)" in row_of(s, paths.run_id), 10, "the run as finished")
    # well before the fallback pass (5 s): the redraw came from the watchdog event
    assert time.monotonic() - t0 < 3
    child = create_run_dirs(paths.children, tmp_path / "ws")
    st.meta.run_id, st.run.state, st.run.exit_code, st.run.depth = child.run_id, RunState.QUEUED, None, 1
    atomic_write_json(child.status, st.model_dump(mode="json"))
    screen = term.wait_for(lambda s: "queued" in row_of(s, child.run_id), 10, "the nested run")
    assert f"`-- {child.run_id}" in screen
    term.keys("C-c")
    term.send("echo WATCH-$((40 + 2))-ENDED")
    term.wait_for(lambda s: "WATCH-42-ENDED" in s.splitlines(), 10, "watch to end on Ctrl+C")


@pytest.fixture
def daemon(agent_image: str, tmp_path: Path) -> Iterator[dict[str, str]]:  # noqa: F811 - the imported fixture
    """A real `massgen-supervisor` on a short socket; yields the CLI environment that reaches it."""
    sock_dir = Path(tempfile.mkdtemp(prefix="mgt-", dir="/tmp"))
    sock = sock_dir / "d.sock"
    logs_root = tmp_path / "runs"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "supervisor.daemon", "--socket", str(sock), "--logs-root", str(logs_root)]
        + ["--image", agent_image, "--metrics-port", str(port)],
        cwd=tmp_path,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("SOCKET: "), f"daemon did not start: {line!r} (exit {proc.poll()})"
        yield {"MASSGEN_DAEMON_SOCKET": str(sock), "MASSGEN_LOGS_ROOT": str(logs_root), "METRICS_PORT": str(port)}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(sock_dir, ignore_errors=True)


@pytest.mark.docker
def test_watch_and_ps_follow_a_daemon_run(
    daemon: dict[str, str], tmp_path: Path, tmux: Callable[[dict[str, str]], Tmux]
) -> None:
    """A run submitted to a real daemon shows in `watch` as running (with sampled cpu/mem), then finished (0).

    `ps` agrees, and the daemon's /metrics counted it.
    """
    env = cli_env(**daemon)
    logs_root = daemon["MASSGEN_LOGS_ROOT"]
    term = tmux(env)
    term.send(cli("watch", "--logs-root", logs_root))
    term.wait_for(lambda s: "RUN ID" in s, 20, "the watch table")
    config = write_config(tmp_path, SLOW_CONFIG)
    client = subprocess.Popen(
        [sys.executable, "-m", "supervisor.cli", "--automation", "--config", str(config), "wait a bit"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert client.stdout is not None
        first = client.stdout.readline()
        m = re.match(r"LOG_DIR: (\S+)", first)
        assert m, f"unexpected first line {first!r}"
        run_id = os.path.basename(m.group(1))
        assert os.path.dirname(m.group(1)) == logs_root
        term.wait_for(lambda s: "running" in row_of(s, run_id), 60, f"{run_id} running in watch")
        assert scrape(daemon["METRICS_PORT"])[("massgen_runs", (("state", "running"),))] == 1
        # the stats sampler (every 5 s) reaches the sandbox while it sleeps, and watch shows it
        screen = term.wait_for(lambda s: "MiB" in row_of(s, run_id), 20, f"{run_id} memory in watch")
        assert row_of(screen, run_id).split()[-3].endswith("%")  # RUN ID STATE PHASE % AGE CPU MEM DEPTH
        assert scrape(daemon["METRICS_PORT"])[("massgen_containers_memory_bytes", ())] > 0
        out, err = client.communicate(timeout=120)
        assert client.returncode == 0, f"{first}{out}\n{err}"
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    screen = term.wait_for(lambda s: "finished (0)" in row_of(s, run_id), 15, f"{run_id} finished in watch")
    assert "100" in row_of(screen, run_id).split()
    metrics = scrape(daemon["METRICS_PORT"])
    assert metrics[("massgen_runs_finished_total", (("exit_code", "0"), ("reason", "completed")))] == 1
    assert metrics[("massgen_run_duration_seconds_count", ())] == 1
    assert metrics[("massgen_runs", (("state", "finished"),))] == 1
    term.keys("C-c")
    # the marker is computed by the shell, so the typed command line itself never matches it
    term.send(f"clear; {cli('ps', '--all', '--tree', '--logs-root', logs_root)}; echo PS-$((40 + 2))-DONE")
    screen = term.wait_for(lambda s: "PS-42-DONE" in s.splitlines(), 20, "ps output")
    assert row_of(screen, run_id).split()[1:4] == ["finished", "done", "0"]

"""The `massgen-supervisor` daemon as a subprocess on a short socket, driven by the real CLI and raw HTTP.

Covers: FIFO admission under load, crash safety (kill -9 and graceful detach, then re-adoption),
containers killed from outside, deadlines that pass while the daemon is down, API input
validation, and a schemathesis fuzz of the OpenAPI description.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest

from agent_image.protocol.api import ErrorBody
from supervisor.daemon import supervisor_id_for
from supervisor.diskquota import mount_points
from supervisor.reaper import reap_disks
from supervisor.runtime.base import LABEL_RUN, LABEL_SUPERVISOR, SandboxFacts
from supervisor.runtime.docker import DockerHandle, DockerRuntime
from tests.cli_helpers import REPO, cli_env, load, parse_lines, write_config
from tests.docker.conftest import agent_image, runtime  # noqa: F401 - fixtures shared with the docker tests

pytestmark = pytest.mark.docker

QUICK = ["--automation", "--config", "@examples/quickstart", "What is 2+2?"]
START_TIMEOUT_S = 60.0
# Fuzz budget per operation and generation mode (about 15 s in all): most on the one that creates runs.
EXAMPLES = {"POST /v1/runs": 1000}


def _slow_config(seconds: int) -> str:
    """Two scripted agents emitting events every second for `seconds` s, then answering and voting."""
    agents = []
    for agent in ("a", "b"):
        steps = "".join(f'        - shell: "sleep 1; echo {agent}{i}"\n' for i in range(seconds))
        agents.append(
            f"  - id: {agent}\n    backend:\n      type: scripted\n      steps:\n{steps}"
            f'        - answer: "{agent} is done"\n        - vote: auto\n'
        )
    return "agents:\n" + "".join(agents)


SLEEPER_CONFIG = """\
agents:
  - id: a
    backend: {type: scripted, steps: [{shell: "sleep 300", timeout: 600}, {answer: never}]}
"""


class Daemon:
    """One `massgen-supervisor` on its own short socket, logs root and per-run socket dir; restartable."""

    def __init__(self, engine: DockerRuntime, image: str, work: Path, max_concurrent: int = 4) -> None:
        self.runtime = engine
        self.image = image
        self.work = work
        self.max_concurrent = max_concurrent
        # Unix socket paths are limited to ~107 bytes: pytest's tmp_path is too long for one.
        self.dir = Path(tempfile.mkdtemp(prefix="mgd-", dir="/tmp"))
        self.socket = self.dir / "d.sock"
        self.sid = supervisor_id_for(self.socket)
        self.logs_root = work / "runs"
        self.proc: subprocess.Popen[str] | None = None
        self.starts = 0

    # -- process ----------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        env = cli_env(
            MASSGEN_DAEMON_SOCKET=str(self.socket),
            MASSGEN_LOGS_ROOT=str(self.logs_root),
            MASSGEN_SOCKET_DIR=str(self.dir / "r"),
            MASSGEN_RECONNECT_SECONDS="60",
        )
        env.pop("MASSGEN_NO_DAEMON", None)
        return env

    def start(self) -> float:
        """Start the daemon and wait for its `SOCKET:` line; returns the monotonic time it was launched."""
        assert self.proc is None or self.proc.poll() is not None, "daemon already running"
        self.starts += 1
        err = open(self.work / f"daemon-{self.starts}.log", "w")  # noqa: SIM115 - handed to the child
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "supervisor.daemon",
                "--socket",
                str(self.socket),
                "--logs-root",
                str(self.logs_root),
                "--image",
                self.image,
                "--max-concurrent",
                str(self.max_concurrent),
            ],
            cwd=self.dir,
            env=self.env(),
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
        err.close()
        lines: queue.Queue[str | None] = queue.Queue()
        proc = self.proc

        def reader() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=reader, daemon=True).start()
        deadline = t0 + START_TIMEOUT_S
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"daemon printed no SOCKET line within {START_TIMEOUT_S}s:\n{self.stderr_tail()}")
            if line is None:
                pytest.fail(f"daemon exited with {proc.wait()} before listening:\n{self.stderr_tail()}")
            if line.startswith("SOCKET: "):
                assert line.split(": ", 1)[1].strip() == str(self.socket)
                return t0

    def stderr_tail(self, n: int = 40) -> str:
        text = (self.work / f"daemon-{self.starts}.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-n:])

    def kill9(self) -> None:
        assert self.proc is not None and self.proc.poll() is None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def terminate(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- clients ----------------------------------------------------------------------------

    def http(self, timeout: float = 30.0) -> httpx2.Client:
        return httpx2.Client(transport=httpx2.HTTPTransport(uds=str(self.socket)), base_url="http://d", timeout=timeout)

    def cli(self, args: list[str], cwd: Path) -> subprocess.Popen[bytes]:
        """`massgen-run` as a client of this daemon (no --image: that would bypass the daemon).

        Unbuffered binary pipes: reading line 1 early must not swallow what communicate() reads later.
        """
        return subprocess.Popen(
            [sys.executable, "-m", "supervisor.cli", *args],
            cwd=cwd,
            env=self.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            bufsize=0,
        )

    def containers(self) -> list[SandboxFacts]:
        return self.runtime.list_owned({LABEL_SUPERVISOR: self.sid})

    def mounts(self) -> list[str]:
        """Mount points below this daemon's logs root's parent (run disks, sandbox folders)."""
        below = str(self.logs_root.parent) + "/"
        return sorted(m for m in mount_points() if m.startswith(below))

    # -- teardown ---------------------------------------------------------------------------

    def cleanup(self) -> None:
        """SIGTERM (graceful: sandboxes survive it), then remove every container with our supervisor id.

        A graceful stop keeps the disks of runs still in flight mounted for their re-adoption; with
        their containers gone, the product's own sweep releases them (else tmp_path stays busy).
        """
        if self.alive:
            try:
                self.terminate(timeout=30)
            except subprocess.TimeoutExpired:
                assert self.proc is not None
                self.proc.kill()
                self.proc.wait(timeout=10)
        for facts in self.containers():
            handle = DockerHandle(facts.id)
            self.runtime.kill(handle)
            self.runtime.remove(handle)
        reap_disks(self.runtime, self.logs_root.parent / "workspaces")
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def daemon(runtime: DockerRuntime, agent_image: str, tmp_path: Path) -> Iterator[Daemon]:  # noqa: F811
    """A running daemon (`--image agent_image`, --max-concurrent 4); label-based container cleanup in teardown."""
    d = Daemon(runtime, agent_image, tmp_path)
    d.start()
    try:
        yield d
    finally:
        d.cleanup()
    assert d.containers() == []
    assert d.mounts() == []


def _until(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.05)


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines() if path.exists() else []


def _types(path: Path) -> list[str]:
    out = []
    for raw in _lines(path):
        with contextlib.suppress(ValueError):
            out.append(json.loads(raw).get("type", ""))
    return out


def _first_line_log_dir(proc: subprocess.Popen[bytes]) -> Path:
    """Line 1 of an automation run (LOG_DIR), read as soon as the daemon accepted the run."""
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    if not line.startswith("LOG_DIR: "):
        _, out, err = _finish(proc, timeout=30)
        pytest.fail(f"no LOG_DIR line: {line + out}\n{err}")
    return Path(line.split(": ", 1)[1].strip())


def _finish(proc: subprocess.Popen[bytes], timeout: float = 120.0) -> tuple[int, str, str]:
    """Exit code, the rest of stdout, stderr."""
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out.decode(), err.decode()


def _assert_events_mirror_the_outbox(log_dir: Path) -> None:
    """The log dir's events.jsonl holds exactly what the container wrote: same lines, in order, no dupes, no gaps."""
    host = _lines(log_dir / "events.jsonl")
    sandbox = _lines(log_dir / "sandbox" / "events.jsonl")
    assert host == sandbox, f"{log_dir.name}: {len(host)} host lines vs {len(sandbox)} sandbox lines"
    seqs = [json.loads(raw)["seq"] for raw in host]
    assert seqs == list(range(len(seqs))), seqs


def _assert_finished_ok(log_dir: Path) -> None:
    res = load(log_dir / "result.json")
    assert (res["exit_code"], res["reason"]) == (0, "completed"), res
    st = load(log_dir / "status.json")
    assert (st["run"]["state"], st["run"]["exit_code"]) == ("finished", 0)


def _assert_4xx_json(resp: httpx2.Response, *codes: int) -> ErrorBody:
    assert resp.status_code in codes, (resp.status_code, resp.text[:300])
    assert resp.headers["content-type"].startswith("application/json"), resp.headers
    return ErrorBody.model_validate(resp.json())


# -- admission under load ----------------------------------------------------------------------


class _Sampler(threading.Thread):
    """Counts the daemon's containers (and queued runs) every ~50 ms."""

    def __init__(self, d: Daemon) -> None:
        super().__init__(daemon=True)
        self.d = d
        self.stop = threading.Event()
        self.max_containers = 0
        self.samples = 0
        self.queued_seen: set[str] = set()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.max_containers = max(self.max_containers, len(self.d.containers()))
                self.samples += 1
                for status in self.d.logs_root.glob("log_*/status.json"):
                    with contextlib.suppress(OSError, ValueError):
                        if json.loads(status.read_text())["run"]["state"] == "queued":
                            self.queued_seen.add(status.parent.name)
                self.stop.wait(0.05)
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            self.error = exc


def test_sixteen_quickstarts_at_once_queue_fifo_behind_four_containers(daemon: Daemon, tmp_path: Path) -> None:
    """16 CLI quickstarts at once through the daemon (--max-concurrent 4): all exit 0, 16 log dirs, <= 4 containers, some queued, none left."""
    sampler = _Sampler(daemon)
    sampler.start()
    try:
        procs = [daemon.cli(QUICK, tmp_path) for _ in range(16)]
        results = [_finish(p, timeout=240) for p in procs]
    finally:
        sampler.stop.set()
        sampler.join(timeout=10)
    assert sampler.error is None, sampler.error
    assert [rc for rc, _, _ in results] == [0] * 16, [out + err for _, out, err in results]
    runs = [parse_lines(out) for _, out, _ in results]
    log_dirs = {Path(r["LOG_DIR"]) for r in runs}
    assert len(log_dirs) == 16
    for log_dir in log_dirs:
        _assert_finished_ok(log_dir)
        # submitted through the daemon, not an embedded supervisor
        assert load(log_dir / "status.json")["run"]["supervisor_id"] == daemon.sid
    assert sampler.samples > 10
    assert 1 <= sampler.max_containers <= 4, sampler.max_containers
    queued_in_log = {d.name for d in log_dirs if "queued" in (d / "massgen.log").read_text()}
    assert sampler.queued_seen | queued_in_log, "no run was ever queued"
    assert daemon.containers() == []


# -- crash safety ---------------------------------------------------------------------------------


def _start_in_flight(d: Daemon, cfg: Path, cwd: Path, n: int) -> list[tuple[subprocess.Popen[bytes], Path]]:
    """Start n CLI runs and wait until every one has a running container that has already run a tool."""
    procs = [d.cli(["--automation", "--config", str(cfg), "q"], cwd) for _ in range(n)]
    runs = [(p, _first_line_log_dir(p)) for p in procs]
    for _, log_dir in runs:

        def running_a_tool(ld: Path = log_dir) -> bool:
            return "tool_called" in _types(ld / "events.jsonl")

        _until(running_a_tool, 30, f"{log_dir.name} running a tool")
    assert len([c for c in d.containers() if c.state == "running"]) == n
    return runs


def test_kill_9_of_the_daemon_mid_run_loses_and_duplicates_nothing(daemon: Daemon, tmp_path: Path) -> None:
    """kill -9 of the daemon with 4 runs in flight, then a restart on the same socket: the runs are re-adopted and finish
    exit 0 (status finished, result.json), the CLI clients following them reattach and exit 0, events.jsonl mirrors the
    sandbox outbox exactly (events written while the daemon was down included), and no container is left."""
    cfg = write_config(tmp_path, _slow_config(4))
    runs = _start_in_flight(daemon, cfg, tmp_path, 4)
    daemon.kill9()
    down_at = {ld: len(_lines(ld / "sandbox" / "events.jsonl")) for _, ld in runs}
    # while the daemon is down the sandboxes keep running and keep writing events
    _until(
        lambda: all(len(_lines(ld / "sandbox" / "events.jsonl")) > down_at[ld] for _, ld in runs),
        15,
        "events written while the daemon is down",
    )
    assert len(daemon.containers()) == 4
    daemon.start()
    for proc, log_dir in runs:
        rc, out, err = _finish(proc)
        assert rc == 0, out + err
        assert parse_lines(out)["RUN_ID"] == log_dir.name
        _assert_finished_ok(log_dir)
        _assert_events_mirror_the_outbox(log_dir)
        assert "supervisor resumed" in (log_dir / "massgen.log").read_text()
    assert daemon.containers() == []


def test_sigterm_detaches_and_the_next_daemon_readopts_the_run(daemon: Daemon, tmp_path: Path) -> None:
    """First SIGTERM: the daemon exits 0 and the run's container keeps running; after a restart the run is re-adopted
    and completes exit 0 (the CLI client reattaches), with no event lost or duplicated."""
    # longer than the shutdown may take (a blocked engine wait holds the process for up to 5 s)
    cfg = write_config(tmp_path, _slow_config(10))
    [(proc, log_dir)] = _start_in_flight(daemon, cfg, tmp_path, 1)
    t0 = time.monotonic()
    assert daemon.terminate(timeout=60) == 0, daemon.stderr_tail()
    shutdown_s = time.monotonic() - t0
    [facts] = daemon.containers()
    assert facts.state == "running" and facts.labels[LABEL_RUN] == log_dir.name
    assert not (log_dir / "result.json").exists()
    assert load(log_dir / "status.json")["run"]["state"] != "finished"
    # The run's own filesystem stays mounted for the sandbox that keeps running ...
    workspaces = log_dir.parent.parent / "workspaces"
    assert str(workspaces / log_dir.name) in mount_points()
    daemon.start()
    rc, out, err = _finish(proc)
    assert rc == 0, out + err
    _assert_finished_ok(log_dir)
    _assert_events_mirror_the_outbox(log_dir)
    assert daemon.containers() == []
    assert shutdown_s < 10, f"graceful shutdown took {shutdown_s:.1f}s"
    # ... and the daemon that re-adopted the run released it: folders back, nothing mounted.
    assert not any(log_dir.name in m for m in mount_points())
    assert sorted(p.name for p in (workspaces / ".disks").iterdir()) == []
    assert load(log_dir / "status.json")["disk"]["mode"] == "mount"


def test_container_killed_from_outside_ends_with_exit_2(daemon: Daemon, tmp_path: Path) -> None:
    """A run whose container is SIGKILLed from outside the daemon ends with exit 2 container_crashed in result.json; the CLI exits 2."""
    cfg = write_config(tmp_path, SLEEPER_CONFIG)
    proc = daemon.cli(["--automation", "--config", str(cfg), "q"], tmp_path)
    log_dir = _first_line_log_dir(proc)
    _until(lambda: "tool_called" in _types(log_dir / "events.jsonl") or daemon.containers(), 30, "the container")
    [facts] = _until(lambda: [c for c in daemon.containers() if c.state == "running"], 30, "a running container")
    daemon.runtime.kill(DockerHandle(facts.id))
    rc, out, err = _finish(proc, timeout=60)
    assert rc == 2, out + err
    assert out.splitlines()[-1].startswith("FAILED: container_crashed"), out
    res = load(log_dir / "result.json")
    assert (res["exit_code"], res["reason"]) == (2, "container_crashed"), res
    assert res["container_exit_code"] == 137
    assert load(log_dir / "status.json")["run"]["state"] == "finished"
    assert daemon.containers() == []


def test_deadline_passing_while_the_daemon_is_down_is_enforced_at_restart(daemon: Daemon, tmp_path: Path) -> None:
    """A run whose 4 s deadline passes while the daemon is down (kill -9; its engine frozen by SIGSTOP, so only the
    supervisor can enforce the deadline) is stopped within 5 s of the restart with exit 3; the CLI reattaches, exits 3."""
    cfg = write_config(
        tmp_path,
        """\
        agents:
          - id: a
            backend: {type: scripted, steps: [{shell: "kill -STOP $PPID; sleep 300", timeout: 600}, {answer: never}]}
        sandbox: {timeout_seconds: 4, stop_grace_seconds: 1}
        """,
    )
    proc = daemon.cli(["--automation", "--config", str(cfg), "q"], tmp_path)
    log_dir = _first_line_log_dir(proc)
    _until(lambda: "turn_started" in _types(log_dir / "events.jsonl"), 30, "the run to start")
    deadline = load(log_dir / "status.json")["run"]["deadline"]
    assert deadline is not None
    daemon.kill9()
    _until(lambda: time.time() > deadline + 1.0, 30, "the deadline to pass")
    # the frozen engine could not time itself out: the sandbox outlived its deadline
    assert [c.state for c in daemon.containers()] == ["running"]
    assert not (log_dir / "result.json").exists()
    t_restart = daemon.start()
    _until(lambda: (log_dir / "result.json").exists(), 10, "result.json after the restart")
    took = time.monotonic() - t_restart
    res = load(log_dir / "result.json")
    assert (res["exit_code"], res["reason"]) == (3, "timeout"), res
    assert res["container_exit_code"] == 137  # SIGKILLed after the grace: the engine never saw the SIGTERM
    assert took < 5.0, f"stopped {took:.1f}s after the restart"
    rc, out, err = _finish(proc, timeout=60)
    assert rc == 3, out + err
    assert out.splitlines()[-1].startswith("TIMEOUT: timeout"), out
    assert load(log_dir / "status.json")["run"]["state"] == "finished"
    assert daemon.containers() == []


# -- API input ---------------------------------------------------------------------------------


def test_bad_api_input_gets_a_4xx_with_a_json_error_body(daemon: Daemon, tmp_path: Path) -> None:
    """Unknown run id 404, malformed JSON 400, > 2 MiB body 413, '../../etc' as run id 400/404, relative or '..' logs_root 400; all JSON errors."""
    unknown = "log_20200101_000000_000000_abcdef"
    with daemon.http() as c:
        assert c.get("/v1/health").json()["supervisor_id"] == daemon.sid
        for path in (f"/v1/runs/{unknown}", f"/v1/runs/{unknown}/status", f"/v1/runs/{unknown}/result?wait=1"):
            assert _assert_4xx_json(c.get(path), 404).error
        _assert_4xx_json(c.post(f"/v1/runs/{unknown}/stop"), 404)

        err = _assert_4xx_json(
            c.post("/v1/runs", content=b'{"question": "q", "example": ', headers={"content-type": "application/json"}),
            400,
        )
        assert err.error == "invalid_body"
        _assert_4xx_json(c.post("/v1/runs", content=b"\xff\xfe not json"), 400)
        _assert_4xx_json(c.post("/v1/runs", json=["question"]), 400)
        _assert_4xx_json(c.post("/v1/runs", json={"question": "q", "example": "quickstart", "extra": 1}), 400)
        _assert_4xx_json(c.post("/v1/runs", json={"question": "q"}), 400)  # no config source

        big = b'{"question": "' + b"a" * ((2 << 20) + 1) + b'", "example": "quickstart"}'
        _assert_4xx_json(c.post("/v1/runs", content=big, headers={"content-type": "application/json"}), 413)

        # the client normalises the dot segments; the encoded form reaches the handler as a run id
        for path in ("/v1/runs/../../etc", "/v1/runs/..%2F..%2Fetc", "/v1/runs/..%2F..%2Fetc/status"):
            _assert_4xx_json(c.get(path), 400, 404)
        _assert_4xx_json(c.post("/v1/runs/..%2F..%2Fetc/stop"), 400, 404)
        _assert_4xx_json(c.get("/v1/runs/%2E%2E%2F%2E%2E%2Fetc%2Fpasswd/result"), 400, 404)

        base = {"question": "q", "example": "quickstart"}
        for bad_root in ("runs", "./runs", "../runs", f"{tmp_path}/../escape", "/tmp/x/../../etc"):
            err = _assert_4xx_json(c.post("/v1/runs", json={**base, "logs_root": bad_root}), 400)
            assert "logs_root" in err.detail
        assert not (tmp_path.parent / "escape").exists()
        # a NUL byte (was a 500) and a root that cannot be created (was a 500)
        _assert_4xx_json(c.post("/v1/runs", json={**base, "logs_root": f"{tmp_path}/a\x00b"}), 400)
        (tmp_path / "file").write_text("")
        err = _assert_4xx_json(c.post("/v1/runs", json={**base, "logs_root": f"{tmp_path}/file/runs"}), 400)
        assert err.error == "logs_root_unusable"

        # `example` names a file under configs/: an absolute path used to load (and run) any host
        # YAML file, also from a run's own socket; glob characters or a NUL left the run hanging
        outside = tmp_path / "outside.yaml"
        shutil.copy(REPO / "configs" / "quickstart.yaml", outside)
        for example in (str(outside.with_suffix("")), "../../etc/passwd", "meta/../quickstart", "**", "q[", "a\x00b"):
            _assert_4xx_json(c.post("/v1/runs", json={**base, "example": example}), 400)
        _assert_4xx_json(c.post("/v1/runs", json={"question": "q", "config_path": f"{outside}\x00"}), 400)
        for bad in (
            {**base, "example": "no_such_example"},
            {"question": "q", "config_path": str(tmp_path / "nope.yaml")},
        ):
            # well-formed but wrong: the run exists and fails as a config error (exit 1), in the logs root
            resp = c.post("/v1/runs", json=bad)
            assert resp.status_code == 201, resp.text
            info = resp.json()
            assert Path(info["log_dir"]).parent == daemon.logs_root
            res = c.get(f"/v1/runs/{info['run_id']}/result", params={"wait": "30"}).json()
            assert (res["exit_code"], res["reason"]) == (1, "config_missing"), res
        assert c.get("/v1/health").status_code == 200
    assert daemon.alive
    assert not list(daemon.logs_root.glob("*/final/*/answer.txt"))  # nothing ran


def test_a_run_that_breaks_the_supervisor_still_gets_a_result(daemon: Daemon) -> None:
    """A config whose YAML holds a lone surrogate escape still ends with a result.json (every exit path writes one)."""
    text = (REPO / "configs" / "quickstart.yaml").read_text()
    text = text.replace("You check arithmetic with Python.", '"\\ud800"')
    with daemon.http() as c:
        resp = c.post("/v1/runs", json={"question": "q", "config_text": text})
        assert resp.status_code == 201, resp.text
        res = c.get(f"/v1/runs/{resp.json()['run_id']}/result", params={"wait": "10"})
    assert res.status_code == 200, res.text


# -- fuzzing ----------------------------------------------------------------------------------------


def test_openapi_fuzz_finds_no_server_error(daemon: Daemon, tmp_path: Path) -> None:
    """schemathesis over /openapi.json (positive and negative cases for every operation): no 5xx, every 4xx a JSON error, daemon alive."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.checks import not_a_server_error
    from schemathesis.core.result import Ok

    with daemon.http() as c:
        doc = c.get("/openapi.json").json()
    schema = schemathesis.openapi.from_dict(doc)
    # Submissions name host paths: put every generated one under a scratch root. That also makes
    # them absolute, so the generated names reach the code that creates directories and reads
    # files (relative ones are refused up front, see the test above).
    scratch = tmp_path / "fuzz"
    scratch.mkdir()
    seen: dict[int, int] = {}

    def confine(body: Any) -> None:
        if isinstance(body, dict):
            for key in ("logs_root", "config_path"):
                v = body.get(key)
                if isinstance(v, str):
                    body[key] = f"{scratch}/{v}"

    http = daemon.http(timeout=90)
    try:
        for result in schema.get_all_operations():
            assert isinstance(result, Ok), result.err()
            op = result.ok()
            for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):

                @given(case=op.as_strategy(generation_mode=mode))
                @settings(
                    max_examples=EXAMPLES.get(op.label, 60),
                    deadline=None,
                    database=None,
                    phases=[Phase.generate],
                    suppress_health_check=list(HealthCheck),
                )
                def fuzz(case: schemathesis.Case[Any]) -> None:
                    confine(case.body)
                    kw = case.as_transport_kwargs(base_url="http://d")
                    if "data" in kw and isinstance(kw["data"], str | bytes):
                        kw["content"] = kw.pop("data")
                    if not kw.get("cookies"):
                        kw.pop("cookies", None)
                    resp = http.request(**kw)
                    seen[resp.status_code] = seen.get(resp.status_code, 0) + 1
                    case.validate_response(resp, checks=[not_a_server_error])
                    if resp.status_code >= 400:
                        _assert_4xx_json(resp, resp.status_code)

                try:
                    fuzz()
                except Unsatisfiable:
                    # nothing to break in an operation without inputs (GET /v1/health in negative mode)
                    assert mode == schemathesis.GenerationMode.NEGATIVE, op.label
        assert daemon.alive
        assert http.get("/v1/health").status_code == 200
        # every run the fuzzer managed to create still ends with a result (none hangs in "starting")
        runs = http.get("/v1/runs").json()
        for info in runs:
            res = http.get(f"/v1/runs/{info['run_id']}/result", params={"wait": "30"})
            assert res.status_code == 200, (info, res.text[:300])
            assert (Path(info["log_dir"]) / "result.json").exists()
    finally:
        http.close()
    assert seen and all(code < 500 for code in seen), seen
    assert 201 in seen and 400 in seen and 404 in seen, seen


def test_unreadable_config_through_the_daemon_prints_the_same_lines_as_embedded(daemon: Daemon, tmp_path: Path) -> None:
    """A config file the client cannot read: LOG_DIR first, FAILED: config_missing, exit 1, result.json - as embedded."""
    proc = daemon.cli(["--automation", "--config", str(tmp_path / "nope.yaml"), "q"], tmp_path)
    out, err = proc.communicate(timeout=60)
    lines = out.decode().splitlines()
    assert proc.returncode == 1, out + err
    assert lines[0].startswith("LOG_DIR: ") and lines[-1].startswith("FAILED: config_missing: ")
    log_dir = Path(lines[0].split(": ", 1)[1])
    assert json.loads((log_dir / "result.json").read_text())["exit_code"] == 1

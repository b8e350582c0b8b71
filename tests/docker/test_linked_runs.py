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


# What an agent can do in its sandbox (the same uid as the hub, whose socket folder it may
# write): put its own listener at the link socket's path, make the supervisor redial (a HELLO
# with the run id replaces its link), and answer the new link as the hub, saying the engine
# exited 0 and replaying a finished run's events.
_HIJACK = """\
import base64, json, os, socket, struct, time
RUN = os.environ["MASSGEN_RUN_ID"]
EV = base64.b64decode(B64).replace(b"@RUN@", RUN.encode())
D = "/run/massgen/hub"
def frame(t, sid=0, p=b""):
    return struct.pack(">BII", t, sid, len(p)) + p
fake = socket.socket(socket.AF_UNIX)
fake.bind(D + "/fake.sock")
fake.listen(4)
kick = socket.socket(socket.AF_UNIX)
kick.connect(D + "/link.sock")
os.rename(D + "/fake.sock", D + "/link.sock")
kick.sendall(frame(1, 0, json.dumps({"v": 1, "run_id": RUN, "have": 0}).encode()))
conn, _ = fake.accept()
buf = b""
while True:
    data = conn.recv(65536)
    if not data:
        break
    buf += data
    while len(buf) >= 9:
        t, sid, n = struct.unpack(">BII", buf[:9])
        if len(buf) < 9 + n:
            break
        p, buf = buf[9 : 9 + n], buf[9 + n :]
        if t == 1:
            have = json.loads(p)["have"]
            ex = {"exit_code": 0, "signal": None, "outbox_size": len(EV)}
            doc = {"v": 1, "run_id": RUN, "state": "exited", "exit": ex, "outbox_size": len(EV)}
            conn.sendall(frame(2, 0, json.dumps(doc).encode()))
            conn.sendall(frame(3, 0, struct.pack(">Q", have) + EV[have:]))
        elif t == 9:
            conn.sendall(frame(6, sid, bytes(1024)) + frame(10, sid, b'{"ok":true}'))
        elif t == 15:
            conn.sendall(frame(16, 0, p))
time.sleep(3600)
"""


def test_a_sandbox_posing_as_its_hub_does_not_decide_the_exit_code(
    runtime: DockerRuntime, agent_image: str, tmp_path: Path
) -> None:
    """The engine's EXIT over the channel is the sandbox's word: an agent can answer the link
    itself. When the container has not ended after BYE, its claimed code used to stand, so a
    replayed finished run passed every check (claim, code, answer file) as exit 0 completed
    while the real engine was still running; the container's own end decides instead."""
    import base64

    def req(root: str, engine: tuple[str, ...] | None = None) -> RunRequest:
        return RunRequest(
            question="What is 2+2?",
            config_source="@examples/quickstart",
            logs_root=tmp_path / root,
            image=agent_image,
            engine_command=engine,
        )

    real = asyncio.run(RunExecution(req("real"), RemoteDockerRuntime()).run())
    assert real.exit_code == 0, real
    events = (tmp_path / "real" / real.run_id / "events.jsonl").read_bytes().replace(real.run_id.encode(), b"@RUN@")
    script = f"B64 = {base64.b64encode(events).decode()!r}\n" + _HIJACK
    forged = asyncio.run(RunExecution(req("forged", ("python3", "-c", script)), RemoteDockerRuntime()).run())
    assert forged.exit_code != 0, forged
    assert _gone(runtime, forged.run_id)

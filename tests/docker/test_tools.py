"""Custom tools and stdio MCP servers run inside the sandbox, driven by a real OpenAI SDK agent.

Every test runs the real CLI against a loopback fake of the OpenAI API (through the run's
gateway socket); the fake records each request, so the tool messages the model received are
read back from it. Tool files and servers are written by the tests into a context path.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from supervisor.runtime.docker import DockerRuntime
from tests.cli_helpers import load, massgen_run, parse_lines, write_config
from tests.fakes import FakeOpenAI, FakeRequest, FakeToolCall, Reply, sequence

pytestmark = pytest.mark.docker

KEY = "sk-host-secret-tools"
MODEL = "gpt-4o-mini"
QUESTION = "Where do my tools run?"

PROBE = """
import json, os, socket

def facts() -> dict:
    with open("/proc/1/cgroup") as f:
        cgroup = f.read()
    return {
        "uid": os.getuid(),
        "hostname": socket.gethostname(),
        "cgroup": cgroup,
        "interfaces": sorted(os.listdir("/sys/class/net")),
        "api_keys": sorted(k for k in os.environ if k.endswith("_API_KEY")),
    }
"""

CUSTOM_TOOLS = (
    PROBE
    + '''
import sys, time
from massgen.tool._result import ExecutionResult, TextContent

async def probe(label: str) -> ExecutionResult:
    """Report where this tool runs.

    Args:
        label: A tag echoed back.
    """
    return ExecutionResult(output_blocks=[TextContent(data=json.dumps({"label": label, "from": "custom", **facts()}))])

def sleepy() -> str:
    """Sleep past the timeout."""
    time.sleep(600)
    return "never"

def boom() -> str:
    """Raise."""
    raise RuntimeError("custom tool exploded")

def flood() -> str:
    """Print 50 MB."""
    chunk = "x" * (1 << 20)
    for _ in range(50):
        sys.stdout.write(chunk)
    return "printed"

def die() -> str:
    """Leave without a result."""
    os._exit(3)
'''
)

MCP_SERVER = (
    PROBE
    + """
import threading
from mcp.server.fastmcp import FastMCP

server = FastMCP("probe")

@server.tool()
def where(label: str) -> str:
    \"\"\"Report where this MCP server runs.\"\"\"
    return json.dumps({"label": label, "from": "mcp", **facts()})

@server.tool()
def once() -> str:
    \"\"\"Answer, then the whole server exits.\"\"\"
    threading.Timer(0.2, lambda: os._exit(0)).start()
    return "last answer"

if __name__ == "__main__":
    server.run()
"""
)


def _config(ctx: Path, base_url: str, *, more_servers: str = "") -> str:
    config = textwrap.dedent(f"""\
        agents:
          - id: gpt
            backend:
              type: openai
              model: {MODEL}
              base_url: "{base_url}"
              custom_tools:
                - name: [probe, sleepy, boom, flood, die]
                  function: [probe, sleepy, boom, flood, die]
                  path: {ctx}/tools.py
                  category: test
              mcp_servers:
                - name: probe
                  type: stdio
                  command: python3
                  args: ["{ctx}/server.py"]
        """)
    config += textwrap.indent(textwrap.dedent(more_servers), " " * 8)
    config += textwrap.dedent(f"""\
        orchestrator:
          context_paths:
            - path: {ctx}
        sandbox:
          tool_timeout_seconds: 4
        """)
    return config


@pytest.fixture
def ctx(tmp_path: Path) -> Path:
    d = tmp_path / "ctx"
    d.mkdir()
    (d / "tools.py").write_text(CUSTOM_TOOLS)
    (d / "server.py").write_text(MCP_SERVER)
    for p in (d, d / "tools.py", d / "server.py"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    return d


def _call(name: str, **arguments: Any) -> FakeToolCall:
    return FakeToolCall(name, arguments)


ANSWER = Reply(tool_calls=[_call("new_answer", content="tools ran in the sandbox")])
VOTE = Reply(tool_calls=[_call("vote", agent_id="agent1", reason="mine")])
FINAL = Reply(text="FINAL: tools ran in the sandbox")


def _run(tmp: Path, image: str, config: str) -> tuple[subprocess.CompletedProcess[str], dict[str, str]]:
    cfg = write_config(tmp, config)
    p = massgen_run(
        ["--automation", "--image", image, "--config", str(cfg), QUESTION], tmp, timeout=240, OPENAI_API_KEY=KEY
    )
    return p, parse_lines(p.stdout)


def _tool_messages(requests: list[FakeRequest]) -> dict[str, str]:
    """tool_call_id -> content of every tool message the model was sent (last request has them all)."""
    out: dict[str, str] = {}
    for req in requests:
        for m in req.get("messages") or []:
            if m.get("role") == "tool":
                out[m["tool_call_id"]] = m["content"]
    return out


def _events(log_dir: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (Path(log_dir) / "events.jsonl").read_text().splitlines()]


def _host_interfaces() -> list[str]:
    return sorted(os.listdir("/sys/class/net"))


@pytest.fixture(scope="module")
def sandboxed_round(agent_image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One run: the model calls the custom tool and the MCP tool, then answers, votes and presents."""
    tmp = tmp_path_factory.mktemp("tools_round")
    ctx = tmp / "ctx"
    ctx.mkdir()
    (ctx / "tools.py").write_text(CUSTOM_TOOLS)
    (ctx / "server.py").write_text(MCP_SERVER)
    policy = sequence(
        Reply(tool_calls=[FakeToolCall("custom_tool__probe", {"label": "c1"}, id="call_custom")]),
        Reply(tool_calls=[FakeToolCall("mcp__probe__where", {"label": "m1"}, id="call_mcp")]),
        ANSWER,
        VOTE,
        FINAL,
    )
    with FakeOpenAI(policy, api_key=KEY) as oa:
        p, f = _run(tmp, agent_image, _config(ctx, oa.base_url))
    yield {"proc": p, "lines": f, "requests": list(oa.requests)}


def test_custom_tool_and_mcp_server_run_inside_the_container(sandboxed_round: dict[str, Any]) -> None:
    """Both tools report the sandbox's uid, hostname and cgroup, only `lo`, no *_API_KEY; the run exits 0."""
    p, f = sandboxed_round["proc"], sandboxed_round["lines"]
    assert p.returncode == 0, p.stdout + p.stderr
    assert Path(f["ANSWER_FILE"]).read_text() == "FINAL: tools ran in the sandbox"
    tools = _tool_messages(sandboxed_round["requests"])
    custom, mcp = json.loads(tools["call_custom"]), json.loads(tools["call_mcp"])
    with open("/proc/1/cgroup") as fh:
        host_cgroup = fh.read()
    for facts, origin, label in ((custom, "custom", "c1"), (mcp, "mcp", "m1")):
        assert facts["from"] == origin and facts["label"] == label
        assert facts["uid"] != os.getuid() and facts["uid"] == 10001
        assert facts["hostname"] != socket.gethostname()
        assert facts["cgroup"] != host_cgroup
        assert facts["interfaces"] == ["lo"] != _host_interfaces()
        assert facts["api_keys"] == []
    # The model was offered both, next to the sandbox's own tools.
    names = sandboxed_round["requests"][0].tool_names
    assert {"shell", "custom_tool__probe", "custom_tool__die", "mcp__probe__where", "mcp__probe__once"} <= set(names)


def test_both_calls_are_in_events_and_status(sandboxed_round: dict[str, Any]) -> None:
    """events.jsonl has a tool_called per call with its kind; status.json counts them per agent and by tool."""
    f = sandboxed_round["lines"]
    calls = [e for e in _events(f["LOG_DIR"]) if e["type"] == "tool_called"]
    assert [(e["tool"], e["kind"], e["ok"]) for e in calls] == [
        ("custom_tool__probe", "custom", True),
        ("mcp__probe__where", "mcp", True),
    ]
    st = load(f["STATUS_FILE"])
    for section in (st["tools"], st["agents"]["gpt"]["tools"]):
        assert section["total_calls"] == 2 and section["total_failures"] == 0
        assert section["by_tool"]["custom_tool__probe"] == {
            "kind": "custom",
            "calls": 1,
            "failures": 0,
            "execution_time_ms": pytest.approx(calls[0]["duration_s"] * 1000, abs=0.01),
        }
        assert section["by_tool"]["mcp__probe__where"]["calls"] == 1
    log = (Path(f["LOG_DIR"]) / "massgen.log").read_text()
    # The server was started before the engine's imports and adopted (same launch in the container).
    assert "custom tools and MCP servers ready" in log and "(1 of 1 MCP servers started early)" in log


def test_failing_tools_and_a_dying_server_fail_only_their_calls(agent_image: str, ctx: Path, tmp_path: Path) -> None:
    """Timeout, raise, 50 MB of output, os._exit(3) and an MCP server that exits: tool errors each; exit 0."""
    policy = sequence(
        Reply(
            tool_calls=[
                FakeToolCall("custom_tool__sleepy", {}, id="c_sleepy"),
                FakeToolCall("custom_tool__boom", {}, id="c_boom"),
                FakeToolCall("custom_tool__flood", {}, id="c_flood"),
                FakeToolCall("custom_tool__die", {}, id="c_die"),
                FakeToolCall("mcp__probe__once", {}, id="c_once"),
            ]
        ),
        # Late enough that the server's exit (0.2 s after its answer) has surely happened.
        Reply(tool_calls=[FakeToolCall("mcp__probe__where", {"label": "after"}, id="c_after")], delay_s=2.0),
        Reply(tool_calls=[FakeToolCall("custom_tool__probe", {"label": "still fine"}, id="c_fine")]),
        ANSWER,
        VOTE,
        FINAL,
    )
    with FakeOpenAI(policy, api_key=KEY) as oa:
        p, f = _run(tmp_path, agent_image, _config(ctx, oa.base_url))
    assert p.returncode == 0, p.stdout + p.stderr
    msgs = _tool_messages(list(oa.requests))
    assert "custom_tool__sleepy timed out after 4s" in msgs["c_sleepy"]
    assert "RuntimeError: custom tool exploded" in msgs["c_boom"]
    assert "printed more than" in msgs["c_flood"] and len(msgs["c_flood"]) < 10_000
    assert "exited with code 3 before returning a result" in msgs["c_die"]
    assert msgs["c_once"] == "last answer"
    assert "MCP server 'probe'" in msgs["c_after"] and "fail for the rest of the run" in msgs["c_after"]
    assert json.loads(msgs["c_fine"])["label"] == "still fine"
    st = load(f["STATUS_FILE"])
    by_tool = st["agents"]["gpt"]["tools"]["by_tool"]
    for name in ("custom_tool__sleepy", "custom_tool__boom", "custom_tool__flood", "custom_tool__die"):
        assert by_tool[name]["failures"] == 1, name
    assert by_tool["mcp__probe__once"]["failures"] == 0 and by_tool["mcp__probe__where"]["failures"] == 1
    assert st["tools"]["total_failures"] == 5


def test_missing_mcp_command_ends_the_run_before_any_model_call(agent_image: str, ctx: Path, tmp_path: Path) -> None:
    """An MCP command not in the image: exit 1 tool_unavailable naming server and command, and no model call."""
    weather = """\
        - name: weather
          type: stdio
          command: npx
          args: ["-y", "@modelcontextprotocol/server-weather"]
        """
    with FakeOpenAI(lambda _r: FINAL, api_key=KEY) as oa:
        p, f = _run(tmp_path, agent_image, _config(ctx, oa.base_url, more_servers=weather))
    assert p.returncode == 1, p.stdout + p.stderr
    last = p.stdout.strip().splitlines()[-1]
    assert last.startswith("FAILED: tool_unavailable:"), last
    assert "'weather'" in last and "'npx' not found" in last and "sandbox.image" in last
    assert oa.requests == []
    assert load(Path(f["LOG_DIR"]) / "result.json")["reason"] == "tool_unavailable"


def test_custom_tool_outside_every_context_path_is_refused(agent_image: str, ctx: Path, tmp_path: Path) -> None:
    """A custom tool file outside the context paths: exit 1 config_invalid naming the file; nothing starts."""
    outside = tmp_path / "outside.py"
    outside.write_text(CUSTOM_TOOLS)
    config = _config(ctx, "http://127.0.0.1:9/v1").replace(f"path: {ctx}/tools.py", f"path: {outside}")
    p, f = _run(tmp_path, agent_image, config)
    assert p.returncode == 1, p.stdout + p.stderr
    last = p.stdout.strip().splitlines()[-1]
    assert last.startswith("FAILED: config_invalid:") and str(outside) in last and "context_paths" in last
    assert load(f["STATUS_FILE"])["container"] is None


def test_the_human_live_view_shows_custom_and_mcp_calls(agent_image: str, ctx: Path, tmp_path: Path) -> None:
    """Without --automation each custom and MCP call is a live line; exclude_custom_tools removes `boom` for real."""
    config = textwrap.dedent(f"""\
        agents:
          - id: sc
            backend:
              type: scripted
              steps:
                - raw_tool_calls:
                    - {{name: custom_tool__probe, arguments: {{label: live}}}}
                    - {{name: mcp__probe__where, arguments: {{label: live}}}}
                    - {{name: custom_tool__boom, arguments: {{}}}}
                - answer: "done"
                - vote: auto
              custom_tools:
                - {{path: {ctx}/tools.py, function: [probe, boom]}}
              exclude_custom_tools: [boom]
              mcp_servers:
                - {{name: probe, type: stdio, command: python3, args: ["{ctx}/server.py"]}}
        orchestrator:
          context_paths:
            - path: {ctx}
        """)
    cfg = write_config(tmp_path, config)
    p = massgen_run(["--image", agent_image, "--config", str(cfg), QUESTION], tmp_path, timeout=240)
    assert p.returncode == 0, p.stdout + p.stderr
    live = [line for line in p.stdout.splitlines() if line.startswith("[") and "s] sc " in line]
    assert any("custom_tool__probe ok:" in line and '"label": "live"' in line for line in live), p.stdout
    assert any("mcp__probe__where ok:" in line and '"from": "mcp"' in line for line in live), p.stdout
    assert any("custom_tool__boom error: unknown tool" in line for line in live), p.stdout


# -- an image to extend ------------------------------------------------------------------------

EXTRA_SERVER = """
from mcp.server.fastmcp import FastMCP

server = FastMCP("greeter")

@server.tool()
def greet(name: str) -> str:
    \"\"\"Greet someone, from a server baked into the image.\"\"\"
    return f"hello {name} from the extended image"

def main() -> None:
    server.run()
"""


@pytest.fixture
def extended_image(runtime: DockerRuntime, agent_image: str, tmp_path: Path) -> Iterator[str]:
    """An image FROM the agent image adding a CLI and a Python MCP server, built offline (network none)."""
    context = tmp_path / "image"
    context.mkdir()
    (context / "greeter_mcp.py").write_text(EXTRA_SERVER)
    (context / "Dockerfile").write_text(
        textwrap.dedent(f"""\
            FROM {agent_image}
            USER root
            COPY greeter_mcp.py /opt/tools/greeter_mcp.py
            RUN printf '#!/bin/sh\\nexec python3 -c "import sys; sys.path.insert(0, \\\\"/opt/tools\\\\"); import greeter_mcp; greeter_mcp.main()"\\n' > /usr/local/bin/greeter-mcp \\
                && printf '#!/bin/sh\\necho "cowsay says: $*"\\n' > /usr/local/bin/cowsay \\
                && chmod 0755 /usr/local/bin/greeter-mcp /usr/local/bin/cowsay
            USER 10001:10001
            """)
    )
    tag = f"massgen-sandbox-test/extended:{os.getpid()}"
    runtime.build_image(context, tag)
    try:
        yield tag
    finally:
        runtime.remove_image(tag, force=True)


def test_an_image_built_from_the_agent_image_adds_tools(agent_image: str, extended_image: str, tmp_path: Path) -> None:
    """sandbox.image FROM the agent image: its MCP server command and CLI work; the engine still runs it."""
    config = textwrap.dedent(f"""\
        agents:
          - id: gpt
            backend:
              type: openai
              model: {MODEL}
              base_url: "BASE"
              mcp_servers:
                - name: greeter
                  type: stdio
                  command: greeter-mcp
        sandbox:
          image: {extended_image}
        """)
    policy = sequence(
        Reply(
            tool_calls=[
                FakeToolCall("mcp__greeter__greet", {"name": "ada"}, id="c_greet"),
                FakeToolCall("shell", {"command": "cowsay moo"}, id="c_cli"),
            ]
        ),
        ANSWER,
        VOTE,
        FINAL,
    )
    with FakeOpenAI(policy, api_key=KEY) as oa:
        p, f = _run(tmp_path, agent_image, config.replace("BASE", oa.base_url))
    assert p.returncode == 0, p.stdout + p.stderr
    msgs = _tool_messages(list(oa.requests))
    assert msgs["c_greet"] == "hello ada from the extended image"
    assert json.loads(msgs["c_cli"])["stdout"] == "cowsay says: moo\n"
    assert load(f["STATUS_FILE"])["container"]["image"] == extended_image


def test_an_image_without_the_engine_is_refused_at_start(agent_image: str, tmp_path: Path) -> None:
    """sandbox.image without the engine (the bare base image): exit 1 image_invalid with the FROM line to use."""
    config = textwrap.dedent("""\
        agents:
          - id: a
            backend: {type: scripted, steps: [{answer: "x"}, {vote: auto}]}
        sandbox:
          image: massgen-sandbox/base:bookworm
        """)
    p, f = _run(tmp_path, agent_image, config)
    assert p.returncode == 1, p.stdout + p.stderr
    last = p.stdout.strip().splitlines()[-1]
    assert last.startswith("FAILED: image_invalid:") and "does not carry the sandbox engine" in last
    assert f"FROM {agent_image}" in last
    # Refused before anything was set up: no disk of its own left mounted, no container.
    assert f["RUN_ID"] not in Path("/proc/self/mounts").read_text()
    assert load(f["STATUS_FILE"])["container"] is None

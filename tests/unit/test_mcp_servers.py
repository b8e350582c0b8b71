"""stdio MCP servers through the official SDK: naming, filters, calls, a server dying, start failures."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from agent_image import launch
from agent_image.protocol.config import RunConfig
from agent_image.protocol.tools_config import McpServerConfig
from agent_image.tools.custom import ToolSetupError
from agent_image.tools.mcp_servers import McpServer, McpTools
from agent_image.tools.shell import minimal_env

SERVER = '''
import os, sys
from mcp.server.fastmcp import FastMCP

server = FastMCP("probe")
calls = {"n": 0}

@server.tool()
def info(tag: str = "") -> str:
    """Who and where the server is."""
    return f"pid={os.getpid()} cwd={os.getcwd()} tag={tag} env={os.environ.get('PROBE_ENV', '')}"

@server.tool()
def add(x: int, y: int) -> int:
    """Add two integers."""
    return x + y

@server.tool()
def fail() -> str:
    """Raise inside the server."""
    raise RuntimeError("server-side failure")

@server.tool()
def quit_after() -> str:
    """Exit the whole server as soon as this call is answered."""
    import threading
    threading.Timer(0.1, lambda: os._exit(0)).start()
    return "bye"

@server.tool()
def crash_now() -> str:
    """Exit without answering."""
    os._exit(7)

if __name__ == "__main__":
    if "--broken" in sys.argv:
        print("cannot start: broken on purpose", file=sys.stderr)
        sys.exit(2)
    if "--http" in sys.argv:
        server.settings.port = int(sys.argv[sys.argv.index("--http") + 1])
        server.settings.log_level = "WARNING"
        server.run(transport="streamable-http")
    else:
        server.run()
'''


@pytest.fixture(scope="module")
def server_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("mcp") / "probe_server.py"
    path.write_text(textwrap.dedent(SERVER))
    return path


def _server(
    path: Path, ws: Path, *, args: tuple[str, ...] = (), prestarted: launch.ServerProcess | None = None, **cfg: Any
) -> McpServer:
    config = McpServerConfig(name="probe", command=sys.executable, args=[str(path), *args], **cfg)
    return McpServer(
        config,
        agent="a",
        workspace=ws,
        env=minimal_env(),
        call_timeout=10,
        max_output_bytes=64_000,
        prestarted=prestarted,
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_tools_are_named_mcp_server_tool_and_filtered(server_file: Path, tmp_path: Path) -> None:
    """Tools come as mcp__probe__<tool>; allowed_tools (plain or prefixed names) and exclude_tools filter them."""

    async def go() -> tuple[list[str], Any, Any]:
        s = _server(
            server_file,
            tmp_path,
            allowed_tools=["info", "mcp__probe__add", "fail"],
            exclude_tools=["mcp__probe__fail"],
            env={"PROBE_ENV": "${cwd}/x"},
        )
        tools = McpTools([s])
        await tools.start(30)
        try:
            names = sorted(tools.names)
            info = await tools.call("mcp__probe__info", {"tag": "hi"})
            add = await tools.call("mcp__probe__add", {"x": 2, "y": 40})
        finally:
            await tools.aclose()
        return names, info, add

    names, info, add = asyncio.run(go())
    assert names == ["mcp__probe__add", "mcp__probe__info"]
    assert info.ok and f"cwd={tmp_path}" in info.content and "tag=hi" in info.content
    assert f"env={tmp_path}/x" in info.content
    assert add.ok and add.content == "42"


def test_a_tool_error_and_a_dying_server_fail_only_their_calls(server_file: Path, tmp_path: Path) -> None:
    """isError results are tool errors; after the server exits every call fails fast with a clear message."""

    async def go() -> list[Any]:
        s = _server(server_file, tmp_path)
        await s.start(30)
        try:
            out = [await s.call("mcp__probe__fail", {}), await s.call("mcp__probe__quit_after", {})]
            await asyncio.sleep(0.5)
            out.append(await s.call("mcp__probe__info", {}))
            out.append(await s.call("mcp__probe__add", {"x": 1, "y": 1}))
        finally:
            await s.aclose()
        return out

    fail, bye, after, again = asyncio.run(go())
    assert not fail.ok and "server-side failure" in fail.content
    assert bye.ok and bye.content == "bye"
    for r in (after, again):
        assert not r.ok and "MCP server 'probe'" in r.content and "fail for the rest of the run" in r.content


def test_a_server_exiting_during_a_call_fails_that_call(server_file: Path, tmp_path: Path) -> None:
    """A server that exits without answering ends the pending call with an error, not a hang."""

    async def go() -> Any:
        s = _server(server_file, tmp_path)
        await s.start(30)
        try:
            return await asyncio.wait_for(s.call("mcp__probe__crash_now", {}), 8)
        finally:
            await s.aclose()

    r = asyncio.run(go())
    assert not r.ok and "exited during the call" in r.content


def test_missing_command_and_broken_server_are_setup_errors(server_file: Path, tmp_path: Path) -> None:
    """A command not in the image names the server, the command and sandbox.image; a crash at start shows its stderr."""
    missing = McpServer(
        McpServerConfig(name="weather", command="npx", args=["-y", "@x/weather"]),
        agent="a",
        workspace=tmp_path,
        env={"PATH": str(tmp_path)},
        call_timeout=5,
        max_output_bytes=1000,
    )
    with pytest.raises(ToolSetupError) as info:
        asyncio.run(missing.start(10))
    msg = str(info.value)
    assert "'weather'" in msg and "'npx' not found" in msg and "sandbox.image" in msg and "FROM the agent image" in msg

    broken = _server(server_file, tmp_path, args=("--broken",))
    with pytest.raises(ToolSetupError, match="broken on purpose") as info:
        asyncio.run(broken.start(30))
    assert "'probe'" in str(info.value)


def test_servers_stop_with_the_run(server_file: Path, tmp_path: Path) -> None:
    """aclose stops the server process (no process outlives the run)."""

    async def go() -> int:
        s = _server(server_file, tmp_path)
        await s.start(30)
        info = await s.call("mcp__probe__info", {})
        pid = int(info.content.split()[0].split("=")[1])
        assert _alive(pid)
        await s.aclose()
        return pid

    pid = asyncio.run(go())
    assert not _alive(pid)


def test_a_loopback_http_server_the_run_starts_is_reached(server_file: Path, tmp_path: Path) -> None:
    """streamable-http with a command and a loopback URL: the engine starts the server, waits for the port, connects."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def go() -> Any:
        srv = _server(
            server_file,
            tmp_path,
            args=("--http", str(port)),
            type="streamable-http",
            url=f"http://127.0.0.1:{port}/mcp",
        )
        await srv.start(60)
        try:
            return await srv.call("mcp__probe__add", {"x": 20, "y": 22})
        finally:
            await srv.aclose()

    r = asyncio.run(go())
    assert r.ok and r.content == "42"


@pytest.mark.parametrize(
    ("server", "message"),
    [
        ({"name": "web", "type": "streamable-http", "url": "https://example.com/mcp"}, "the sandbox has no network"),
        ({"name": "web", "type": "sse", "url": "http://127.0.0.1:8931/sse"}, "add the server's command"),
        ({"name": "w", "command": "npx", "env": {"KEY": "${BRAVE_API_KEY}"}}, "secrets never enter it"),
        ({"name": "bad__name", "command": "x"}, "MCP server name"),
    ],
)
def test_unreachable_or_leaky_servers_are_refused(server: dict[str, Any], message: str) -> None:
    """Remote HTTP servers, loopback URLs nobody starts, host ${VARS} and bad names are config errors with the reason."""
    with pytest.raises(ValidationError, match=message):
        McpServerConfig(**server)


def test_mapping_form_of_mcp_servers_is_accepted() -> None:
    """MassGen's `mcp_servers: {name: {...}}` form is the same as the list form."""
    raw = {
        "agents": [
            {"id": "a", "backend": {"type": "scripted", "mcp_servers": {"pw": {"type": "stdio", "command": "x"}}}}
        ]
    }
    cfg = RunConfig.model_validate(raw)
    assert cfg.agents[0].backend.mcp_servers[0].name == "pw"


def _raw_spec(ws: Path, backend: dict[str, Any], agent: str = "a") -> dict[str, Any]:
    return {"config": {"agents": [{"id": agent, "backend": backend}]}, "workspace": str(ws)}


def test_plan_reads_servers_from_the_raw_spec_as_the_engine_starts_them(tmp_path: Path) -> None:
    """launch.plan: list and mapping forms, ${cwd} -> the agent's workspace; odd or missing commands are left out."""
    env = minimal_env()
    backend = {
        "type": "scripted",
        "mcp_servers": [
            {"name": "one", "command": sys.executable, "args": ["-c", "pass", "${cwd}/x"], "env": {"W": "${cwd}"}},
            {"name": "sub", "command": sys.executable, "cwd": "${cwd}/sub/"},
            {"name": "gone", "command": "no-such-command-here"},
            {"name": "odd", "command": sys.executable, "args": [1, 2]},
            {"name": "web", "type": "streamable-http", "command": sys.executable, "url": "http://127.0.0.1:1/mcp"},
        ],
    }
    plan = launch.plan(_raw_spec(tmp_path, backend), env)
    assert sorted(plan) == [("a", "one"), ("a", "sub"), ("a", "web")]
    assert plan[("a", "sub")].cwd == str(tmp_path / "a" / "sub")  # spelled as the engine's Path spells it
    one = plan[("a", "one")]
    assert one.argv == (sys.executable, "-c", "pass", f"{tmp_path}/a/x")
    assert one.cwd == str(tmp_path / "a") and one.env["W"] == str(tmp_path / "a") and one.stdio
    assert not plan[("a", "web")].stdio
    mapping = {"type": "scripted", "mcp_servers": {"m": {"command": sys.executable}}}
    assert list(launch.plan({"config": {"agent": {"id": "b", "backend": mapping}}, "workspace": "/w"}, env)) == [
        ("b", "m")
    ]
    assert launch.plan({"config": "nonsense"}, env) == {}


def test_a_prestarted_server_is_adopted_and_another_launch_is_stopped(server_file: Path, tmp_path: Path) -> None:
    """The engine takes a prestarted process only when it is exactly the launch it would make; else it kills it."""
    ws = tmp_path / "a"

    async def go() -> tuple[bool, int, int, str, bool, int]:
        backend = {
            "type": "scripted",
            "mcp_servers": [{"name": "probe", "command": sys.executable, "args": [str(server_file)]}],
        }
        early = await launch.prestart(_raw_spec(tmp_path, backend), minimal_env())
        same = early.pop(("a", "probe"))
        s = _server(server_file, ws, prestarted=same)  # as AgentTools hands it over
        await s.start(30)
        info = await s.call("mcp__probe__info", {})
        await s.aclose()
        # A different launch (other args): the prestarted process is killed and the engine starts its own.
        moved = {"name": "probe", "command": sys.executable, "args": [str(server_file), "--x"]}
        other = await launch.prestart(_raw_spec(tmp_path, {**backend, "mcp_servers": [moved]}), minimal_env())
        stale = other.pop(("a", "probe"))
        t = _server(server_file, ws, prestarted=stale)
        await t.start(30)
        info2 = await t.call("mcp__probe__info", {})
        await t.aclose()
        code = await asyncio.wait_for(stale.proc.wait(), 5)
        return (
            s.prestarted,
            same.proc.pid,
            int(info.content.split()[0].split("=")[1]),
            info2.content,
            t.prestarted,
            code,
        )

    adopted, early_pid, served_pid, info2, adopted2, code = asyncio.run(go())
    assert adopted and served_pid == early_pid
    assert not adopted2 and f"pid={early_pid}" not in info2 and code == -9


def test_the_client_sdk_loads_without_the_server_side(tmp_path: Path) -> None:
    """client_sdk() imports the client without FastMCP/uvicorn/starlette; `mcp`'s own names still resolve later."""
    code = textwrap.dedent("""
        import sys
        from agent_image.tools.mcp_servers import client_sdk
        sdk = client_sdk()
        heavy = sorted(m for m in ("uvicorn", "starlette", "mcp.server", "mcp.server.fastmcp") if m in sys.modules)
        print("heavy", heavy)
        import mcp
        from mcp import ClientSession, stdio_client
        assert ClientSession is sdk.ClientSession and mcp.types is sdk.types and callable(stdio_client)
        print("complete", "mcp.server.fastmcp" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[:2] == ["heavy []", "complete True"]


def test_the_engine_process_starts_servers_before_its_imports(server_file: Path, tmp_path: Path) -> None:
    """`python -m agent_image run-spec` (host process): the server is started early, adopted, used; the run exits 0."""
    outbox, ws = tmp_path / "outbox", tmp_path / "ws"
    outbox.mkdir()
    backend = {
        "type": "scripted",
        "steps": [
            {"raw_tool_calls": [{"name": "mcp__probe__add", "arguments": {"x": 1, "y": 2}}]},
            {"answer": "3"},
            {"vote": "auto"},
        ],
        "mcp_servers": [{"name": "probe", "command": sys.executable, "args": [str(server_file)]}],
    }
    spec = {**_raw_spec(ws, backend), "run_id": "r", "question": "Q", "outbox": str(outbox)}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    p = subprocess.run(
        [sys.executable, "-m", "agent_image", "run-spec", str(tmp_path / "spec.json")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    events = [json.loads(line) for line in (outbox / "events.jsonl").read_text().splitlines()]
    assert p.returncode == 0, (p.stdout, p.stderr, events[-1])
    logs = [e["message"] for e in events if e["type"] == "log"]
    assert any("(1 of 1 MCP servers started early)" in m for m in logs), logs
    calls = [e for e in events if e["type"] == "tool_called" and e["tool"] == "mcp__probe__add"]
    assert len(calls) == 1 and calls[0]["ok"] and calls[0]["kind"] == "mcp", calls


def test_a_signal_during_start_up_stops_a_prestarted_server(tmp_path: Path) -> None:
    """SIGTERM while the engine waits for a (slow) prestarted server: the run ends interrupted, the server is gone."""
    outbox, ws, pid_file = tmp_path / "outbox", tmp_path / "ws", tmp_path / "server.pid"
    outbox.mkdir()
    slow = tmp_path / "slow_server.py"
    slow.write_text(f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\ntime.sleep(120)\n")
    backend = {
        "type": "scripted",
        "steps": [{"answer": "x"}, {"vote": "auto"}],
        "mcp_servers": [{"name": "slow", "command": sys.executable, "args": [str(slow)]}],
    }
    spec = {**_raw_spec(ws, backend), "run_id": "r", "question": "Q", "outbox": str(outbox)}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    engine = subprocess.Popen(
        [sys.executable, "-m", "agent_image", "run-spec", str(tmp_path / "spec.json")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.02)
        server_pid = int(pid_file.read_text())
        engine.send_signal(signal.SIGTERM)
        code = engine.wait(timeout=30)
    finally:
        engine.kill()
    assert code == 4, engine.stderr.read() if engine.stderr else ""
    deadline = time.monotonic() + 10
    while _alive(server_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(server_pid)

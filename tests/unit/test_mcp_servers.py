"""stdio MCP servers through the official SDK: naming, filters, calls, a server dying, start failures."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

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


def _server(path: Path, ws: Path, *, args: tuple[str, ...] = (), **cfg: Any) -> McpServer:
    config = McpServerConfig(name="probe", command=sys.executable, args=[str(path), *args], **cfg)
    return McpServer(config, agent="a", workspace=ws, env=minimal_env(), call_timeout=10, max_output_bytes=64_000)


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

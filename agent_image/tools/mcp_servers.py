"""MCP servers inside the sandbox: started with the run, spoken to with the official `mcp` SDK.

Each agent's `backend.mcp_servers` entry becomes one server process of its own (MassGen starts
servers per agent too), a child of the engine: no network, no keys, the sandbox's user. Its
tools are offered as `mcp__<server>__<tool>`. A server that cannot start ends the run before
any model call (`ToolSetupError`); one that dies later fails its tools' calls with a clear
error while the run goes on. All are stopped when the run ends.

The SDK's session runs in one task per server (its anyio scopes must be entered and left by
the same task); calls come from the agents' turns through the session object.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from agent_image.backends.base import ToolSpec
from agent_image.protocol.tools_config import ENV_REF_RE, TOOL_NAME_RE, McpServerConfig, mcp_tool_name
from agent_image.tools.custom import CallOutcome, ToolSetupError

logger = logging.getLogger(__name__)

STDERR_TAIL_BYTES = 4000
STOP_TIMEOUT_S = 5.0
IMAGE_HINT = (
    "install it in an image built FROM the agent image and set sandbox.image "
    "(see docs/tools.md, 'Adding tools to the image')"
)


class _TailSink(asyncio.Protocol):
    """Keeps the last bytes of the server's stderr; EOF means the server (and its children) are gone."""

    def __init__(self, closed: asyncio.Event) -> None:
        self.buf = bytearray()
        self.closed = closed

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) > 2 * STDERR_TAIL_BYTES:
            del self.buf[: len(self.buf) - STDERR_TAIL_BYTES]

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set()

    def tail(self) -> str:
        text = self.buf[-STDERR_TAIL_BYTES:].decode("utf-8", "replace").strip()
        return " | ".join(line for line in text.splitlines() if line.strip())[-1500:]


def _expand(value: str, workspace: Path) -> str:
    return ENV_REF_RE.sub(lambda m: str(workspace) if m.group(1) == "cwd" else m.group(0), value)


def _render(result: Any) -> tuple[str, bool]:
    """The model's text for a CallToolResult, and whether the server flagged an error."""
    parts: list[str] = []
    for block in getattr(result, "content", None) or []:
        kind = getattr(block, "type", "")
        if kind == "text":
            parts.append(str(block.text))
        elif kind in ("image", "audio"):
            size = len(base64.b64decode(block.data, validate=False)) if block.data else 0
            parts.append(f"[{kind} {getattr(block, 'mimeType', '')}, {size} bytes, not shown]")
        elif kind == "resource":
            res = block.resource
            text = getattr(res, "text", None)
            parts.append(str(text) if text is not None else f"[resource {res.uri}, binary, not shown]")
        elif kind == "resource_link":
            parts.append(f"[resource link {block.uri}]")
        else:
            parts.append(str(block))
    structured = getattr(result, "structuredContent", None)
    if structured is not None and not parts:
        import json

        parts.append(json.dumps(structured, ensure_ascii=False, default=str))
    return "\n".join(parts), bool(getattr(result, "isError", False))


class McpServer:
    """One running server of one agent."""

    def __init__(
        self,
        config: McpServerConfig,
        *,
        agent: str,
        workspace: Path,
        env: Mapping[str, str],
        call_timeout: float,
        max_output_bytes: int,
        exclude_tools: Sequence[str] = (),
    ) -> None:
        self.config = config
        self.agent = agent
        self.workspace = workspace
        self.env = dict(env)
        self.call_timeout = config.timeout or call_timeout
        self.max_output_bytes = max_output_bytes
        self.exclude_tools = set(exclude_tools)
        self.tools: dict[str, ToolSpec] = {}  # model-facing name -> spec
        self._remote: dict[str, str] = {}  # model-facing name -> the server's own name
        self._session: Any = None
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._stderr_closed = asyncio.Event()
        self._stderr: _TailSink | None = None
        self._stderr_transport: asyncio.ReadTransport | None = None
        self._error: BaseException | None = None
        self._dead_reason: str | None = None
        self._http_proc: subprocess.Popen[bytes] | None = None

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def command_line(self) -> str:
        return " ".join([self.config.command or "", *self.config.args]).strip()

    def _stderr_tail(self) -> str:
        return self._stderr.tail() if self._stderr is not None else ""

    def _setup_error(self, detail: str) -> ToolSetupError:
        tail = self._stderr_tail()
        return ToolSetupError(
            f"MCP server {self.name!r} of agent {self.agent}",
            detail + (f"; its stderr: {tail}" if tail else ""),
        )

    # -- start --------------------------------------------------------------------------

    async def start(self, timeout: float) -> None:
        """Start the server, initialize the session and list its tools.

        Raises:
            ToolSetupError: the command is missing, the server exits, fails or does not answer
                within `timeout`; the message names the server and the command.
        """
        cfg = self.config
        command = _expand(cfg.command or "", self.workspace)
        path = self.env.get("PATH", os.defpath)
        if shutil.which(command, path=path) is None:
            raise ToolSetupError(
                f"MCP server {self.name!r} of agent {self.agent}",
                f"command {command!r} not found in the sandbox image (PATH={path}); {IMAGE_HINT}",
            )
        cwd = Path(_expand(cfg.cwd, self.workspace)) if cfg.cwd else self.workspace
        if not cwd.is_dir():
            raise ToolSetupError(f"MCP server {self.name!r} of agent {self.agent}", f"cwd {cwd} is not a directory")
        loop = asyncio.get_running_loop()
        read_fd, write_fd = os.pipe()
        sink = self._stderr = _TailSink(self._stderr_closed)
        pipe = open(read_fd, "rb", buffering=0)  # noqa: SIM115 - the transport owns and closes it
        self._stderr_transport, _ = await loop.connect_read_pipe(lambda: sink, pipe)
        errlog = open(write_fd, "w")  # noqa: SIM115 - closed right after the server has started
        self._task = asyncio.create_task(self._own(command, cwd, errlog), name=f"mcp-{self.agent}-{self.name}")
        try:
            async with asyncio.timeout(timeout):
                await self._ready.wait()
        except TimeoutError:
            await self.aclose()
            raise self._setup_error(
                f"did not answer MCP initialize/tools/list within {timeout:g}s (command: {self.command_line})"
            ) from None
        if self._error is not None or self._session is None:
            err = self._error
            await self.aclose()
            detail = _explain(err) if err is not None else "stopped before it was ready"
            raise self._setup_error(f"failed to start ({detail}; command: {self.command_line})")

    async def _own(self, command: str, cwd: Path, errlog: Any) -> None:
        from mcp import ClientSession  # imported here: only runs with MCP servers pay for it

        cfg = self.config
        env = {**self.env, **{k: _expand(v, self.workspace) for k, v in cfg.env.items()}}
        args = [_expand(a, self.workspace) for a in cfg.args]
        try:
            async with contextlib.AsyncExitStack() as stack:
                if cfg.type == "stdio":
                    from mcp.client.stdio import StdioServerParameters, stdio_client

                    params = StdioServerParameters(command=command, args=args, env=env, cwd=str(cwd))
                    read, write = await stack.enter_async_context(stdio_client(params, errlog=errlog))
                else:
                    read, write = await self._start_http(stack, command, args, env, cwd, errlog)
                # The server holds its own copy now; ours must go, or EOF (its death) never shows.
                errlog.close()
                # No session-wide read timeout: start() bounds initialize, call() bounds each call.
                session = await stack.enter_async_context(ClientSession(read, write))
                await session.initialize()
                await self._list_tools(session)
                self._session = session
                self._ready.set()
                await self._stop.wait()
        except BaseException as exc:  # noqa: BLE001 - a dying server surfaces as anything (ExceptionGroup too)
            if not isinstance(exc, asyncio.CancelledError):
                self._error = exc
                if self._session is not None:
                    self._dead_reason = f"its connection failed: {_explain(exc)}"
            else:
                raise
        finally:
            with contextlib.suppress(OSError):
                errlog.close()
            self._session = None
            self._ready.set()
            if self._http_proc is not None:
                _kill_group(self._http_proc)

    async def _start_http(
        self,
        stack: contextlib.AsyncExitStack,
        command: str,
        args: list[str],
        env: dict[str, str],
        cwd: Path,
        errlog: Any,
    ) -> tuple[Any, Any]:
        cfg = self.config
        assert cfg.url is not None
        self._http_proc = subprocess.Popen(  # noqa: S603 - the user's own server command, inside the sandbox
            [command, *args],
            stdin=subprocess.DEVNULL,
            stdout=errlog,
            stderr=errlog,
            cwd=cwd,
            env=env,
            start_new_session=True,
        )
        parts = urlsplit(cfg.url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        host = parts.hostname or "127.0.0.1"
        while True:  # bounded by start()'s timeout, which cancels this task
            if self._http_proc.poll() is not None:
                raise ConnectionError(f"the server exited with code {self._http_proc.returncode} before listening")
            with contextlib.suppress(OSError):
                socket.create_connection((host, port), timeout=0.2).close()
                break
            await asyncio.sleep(0.05)
        headers = dict(cfg.headers)
        if cfg.type == "sse":
            from mcp.client.sse import sse_client

            read, write = await stack.enter_async_context(sse_client(cfg.url, headers=headers))
        else:
            from mcp.client.streamable_http import streamablehttp_client

            read, write, _ = await stack.enter_async_context(streamablehttp_client(cfg.url, headers=headers))
        return read, write

    async def _list_tools(self, session: Any) -> None:
        cursor = None
        while True:
            page = await (session.list_tools(cursor) if cursor else session.list_tools())
            for tool in page.tools:
                full = mcp_tool_name(self.name, tool.name)
                if not self.config.offers(tool.name) or {tool.name, full} & self.exclude_tools:
                    continue
                if not TOOL_NAME_RE.match(full):
                    logger.warning(
                        "agent=%s mcp=%s tool %r skipped: name not usable by models", self.agent, self.name, full
                    )
                    continue
                schema = dict(tool.inputSchema or {})
                schema.setdefault("type", "object")
                schema.setdefault("properties", {})
                desc = tool.description or f"Tool {tool.name} of MCP server {self.name}."
                self.tools[full] = ToolSpec(full, desc, schema)
                self._remote[full] = tool.name
            cursor = getattr(page, "nextCursor", None)
            if not cursor:
                break

    # -- calls --------------------------------------------------------------------------

    def _gone(self) -> str | None:
        if self._dead_reason is not None:
            return self._dead_reason
        if self._task is None or self._task.done() or self._session is None:
            return "it is not running"
        if self._stderr_closed.is_set() and self.config.type == "stdio":
            return "it exited"
        return None

    def _dead(self, name: str, why: str) -> CallOutcome:
        self._dead_reason = self._dead_reason or why
        tail = self._stderr_tail()
        msg = f"ERROR: {name} failed: MCP server {self.name!r} {why}; its tools fail for the rest of the run" + (
            f". Its stderr: {tail}" if tail else ""
        )
        return CallOutcome(False, msg, f"{name} error: MCP server {self.name} {why}", None)

    async def call(self, name: str, arguments: dict[str, Any]) -> CallOutcome:
        gone = self._gone()
        if gone is not None:
            return self._dead(name, gone)
        session = self._session
        remote = self._remote[name]
        t0 = time.monotonic()
        call = asyncio.ensure_future(session.call_tool(remote, arguments))
        died = asyncio.ensure_future(self._stderr_closed.wait())
        try:
            done, _ = await asyncio.wait({call, died}, timeout=self.call_timeout, return_when=asyncio.FIRST_COMPLETED)
            if call not in done and died in done:
                # The answer may still be in the pipe: give it a moment before calling it dead.
                done, _ = await asyncio.wait({call}, timeout=0.5)
        finally:
            died.cancel()
        if call not in done:
            call.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await call
            if self._stderr_closed.is_set():
                return self._dead(name, "exited during the call")
            return CallOutcome(
                False,
                f"ERROR: {name} timed out after {self.call_timeout:g}s (MCP server {self.name!r} did not answer)",
                f"{name} error: timed out after {self.call_timeout:g}s",
                None,
            )
        exc = call.exception()
        if exc is not None:
            if self._stderr_closed.is_set() or "Connection closed" in str(exc):
                return self._dead(name, "exited during the call")
            return CallOutcome(False, f"ERROR: {name} failed: {_explain(exc)}", f"{name} error: {_explain(exc)}", None)
        text, is_error = _render(call.result())
        own = time.monotonic() - t0
        limit = self.max_output_bytes
        if len(text) > limit:
            text = text[:limit] + f"\n[truncated: showing the first {limit} of {len(text)} characters]"
        if is_error:
            return CallOutcome(False, f"ERROR: {name} failed: {text}", f"{name} error: {text}", own)
        return CallOutcome(True, text, f"{name} ok: {text}", own)

    async def aclose(self) -> None:
        """Stop the server (the SDK closes its stdin, then SIGTERM, then SIGKILL); bounded."""
        self._stop.set()
        task = self._task
        if task is not None and not task.done():
            try:
                async with asyncio.timeout(STOP_TIMEOUT_S):
                    await asyncio.shield(task)
            except TimeoutError:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            except Exception:  # noqa: BLE001 - stopping must not fail the run
                pass
        if self._http_proc is not None:
            _kill_group(self._http_proc)
        if self._stderr_transport is not None:
            self._stderr_transport.close()


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=1.0)


def _explain(exc: BaseException) -> str:
    """One line for an exception, unwrapping anyio's exception groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if type(exc).__name__ not in text else text


class McpTools:
    """One agent's MCP servers, as one source of tools for its toolbox."""

    kind = "mcp"

    def __init__(self, servers: Sequence[McpServer]) -> None:
        self.servers = list(servers)
        self._by_tool: dict[str, McpServer] = {}

    async def start(self, timeout: float) -> None:
        """Start every server concurrently.

        Raises:
            ToolSetupError: the first server that failed (the others are stopped).
        """
        results = await asyncio.gather(*(s.start(timeout) for s in self.servers), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await self.aclose()
            first = errors[0]
            if isinstance(first, ToolSetupError):
                raise first
            raise ToolSetupError("MCP servers", _explain(first))
        for s in self.servers:
            for name in s.tools:
                self._by_tool[name] = s

    def specs(self) -> list[ToolSpec]:
        return [spec for s in self.servers for spec in s.tools.values()]

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self._by_tool)

    async def call(self, name: str, arguments: dict[str, Any]) -> CallOutcome:
        return await self._by_tool[name].call(name, arguments)

    async def aclose(self) -> None:
        await asyncio.gather(*(s.aclose() for s in self.servers), return_exceptions=True)

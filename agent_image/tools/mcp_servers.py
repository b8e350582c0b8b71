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
import importlib.util
import logging
import os
import shutil
import signal
import sys
import time
import warnings
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

from agent_image.backends.base import ToolSpec
from agent_image.launch import Launch, ServerProcess, TailSink, expand, signal_group, spawn
from agent_image.protocol.tools_config import TOOL_NAME_RE, McpServerConfig, mcp_tool_name
from agent_image.tools.custom import CallOutcome, ToolSetupError

logger = logging.getLogger(__name__)

STOP_TIMEOUT_S = 5.0  # for the session to end
STOP_GRACE_S = 2.0  # per step of closing stdin, SIGTERM, SIGKILL
IMAGE_HINT = (
    "install it in an image built FROM the agent image and set sandbox.image "
    "(see docs/tools.md, 'Adding tools to the image')"
)


def client_sdk() -> SimpleNamespace:
    """The `mcp` SDK's client side: `ClientSession`, `types`, `SessionMessage`.

    `mcp/__init__.py` imports the server side too (FastMCP, uvicorn, starlette, jsonschema:
    half or more of the SDK's import time, none of it used by a client). So the package
    module is registered without running its `__init__` and the client's submodules are
    imported under it; the first lookup of a name only `__init__` defines (`mcp.FastMCP`,
    `from mcp import ClientSession`) runs it then, so the package stays complete for anyone
    else. If any of that fails, the plain import is used.
    """
    if "mcp" not in sys.modules:
        spec = importlib.util.find_spec("mcp")
        if spec is not None and spec.loader is not None and spec.submodule_search_locations is not None:
            pkg = importlib.util.module_from_spec(spec)
            loader = spec.loader

            def finish(name: str) -> Any:
                del pkg.__dict__["__getattr__"]
                loader.exec_module(pkg)  # the real __init__, over the submodules already loaded
                return getattr(pkg, name)

            pkg.__dict__["__getattr__"] = finish
            sys.modules["mcp"] = pkg
            try:
                importlib.import_module("mcp.types")
                importlib.import_module("mcp.shared.message")
                importlib.import_module("mcp.client.session")
            except Exception:  # noqa: BLE001 - an SDK laid out otherwise: import it whole
                for name in [n for n in sys.modules if n == "mcp" or n.startswith("mcp.")]:
                    del sys.modules[name]
    import mcp.types
    from mcp.client.session import ClientSession
    from mcp.shared.message import SessionMessage

    return SimpleNamespace(ClientSession=ClientSession, types=mcp.types, SessionMessage=SessionMessage)


@contextlib.asynccontextmanager
async def _stdio_streams(proc: asyncio.subprocess.Process) -> AsyncIterator[tuple[Any, Any]]:
    """The SDK's session streams over the server's stdin/stdout (newline-delimited JSON-RPC).

    Our own process rather than the SDK's `stdio_client`, so that the server starts before the
    SDK is imported, and so the engine knows its pid and exit (and kills its whole group).
    """
    import anyio

    sdk = client_sdk()
    types, SessionMessage = sdk.types, sdk.SessionMessage

    assert proc.stdout is not None and proc.stdin is not None
    stdout, stdin = proc.stdout, proc.stdin
    read_send, read_recv = anyio.create_memory_object_stream[Any](0)
    write_send, write_recv = anyio.create_memory_object_stream[Any](0)

    async def from_server() -> None:
        async with read_send:
            while True:
                try:
                    line = await stdout.readline()
                except ValueError:  # a line past MAX_MESSAGE_BYTES: the stream is unusable
                    break
                if not line:
                    break
                if not line.strip():
                    continue
                try:
                    message = types.JSONRPCMessage.model_validate_json(line)
                except Exception as exc:  # noqa: BLE001 - the session logs and skips bad lines
                    await read_send.send(exc)
                    continue
                await read_send.send(SessionMessage(message))

    async def to_server() -> None:
        async with write_recv:
            async for item in write_recv:
                data = item.message.model_dump_json(by_alias=True, exclude_none=True)
                try:
                    stdin.write(data.encode() + b"\n")
                    await stdin.drain()
                except (ConnectionError, RuntimeError):
                    return  # the server is gone; the session's next send fails at once

    async with anyio.create_task_group() as tg:
        tg.start_soon(from_server)
        tg.start_soon(to_server)
        try:
            yield read_recv, write_send
        finally:
            tg.cancel_scope.cancel()


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
        prestarted: ServerProcess | None = None,
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
        self._prestarted = prestarted  # started from the raw spec; adopted if it is this very launch
        self._server: ServerProcess | None = None
        self.prestarted = False  # whether start() adopted the prestarted process
        self._stderr: TailSink | None = None
        self._error: BaseException | None = None
        self._dead_reason: str | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._waiter: asyncio.Task[int] | None = None

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
        command = expand(cfg.command or "", self.workspace)
        path = self.env.get("PATH", os.defpath)
        early, self._prestarted = self._prestarted, None
        try:
            if shutil.which(command, path=path) is None:
                raise ToolSetupError(
                    f"MCP server {self.name!r} of agent {self.agent}",
                    f"command {command!r} not found in the sandbox image (PATH={path}); {IMAGE_HINT}",
                )
            cwd = Path(expand(cfg.cwd, self.workspace)) if cfg.cwd else self.workspace
            if not cwd.is_dir():
                raise ToolSetupError(f"MCP server {self.name!r} of agent {self.agent}", f"cwd {cwd} is not a directory")
        except ToolSetupError:
            if early is not None:
                early.kill()
            raise
        launch = Launch(
            argv=(command, *(expand(a, self.workspace) for a in cfg.args)),
            cwd=str(cwd),
            env={**self.env, **{k: expand(v, self.workspace) for k, v in cfg.env.items()}},
            stdio=cfg.type == "stdio",
        )
        if early is not None and early.launch == launch:
            server = early  # started before the engine's imports, so it has been booting meanwhile
            self.prestarted = True
        else:
            if early is not None:
                early.kill()
            try:
                # Started before the SDK is imported: the server's own start-up runs meanwhile.
                server = await spawn(launch)
            except OSError as exc:
                raise self._setup_error(f"could not start {self.command_line!r}: {exc}") from None
        self._server, self._proc, self._stderr = server, server.proc, server.sink
        self._waiter = asyncio.create_task(self._proc.wait(), name=f"mcp-wait-{self.agent}-{self.name}")
        self._task = asyncio.create_task(self._own(), name=f"mcp-{self.agent}-{self.name}")
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
            code = self._proc.returncode
            await self.aclose()
            detail = _explain(err) if err is not None else "stopped before it was ready"
            if code is not None:
                detail = f"exited with code {code}"
            raise self._setup_error(f"failed to start ({detail}; command: {self.command_line})")

    async def _own(self) -> None:
        ClientSession = client_sdk().ClientSession  # imported here: only runs with servers pay for it

        assert self._proc is not None
        try:
            async with contextlib.AsyncExitStack() as stack:
                if self.config.type == "stdio":
                    read, write = await stack.enter_async_context(_stdio_streams(self._proc))
                else:
                    read, write = await self._connect_http(stack)
                # No session-wide read timeout: start() bounds initialize, call() bounds each call.
                session = await stack.enter_async_context(ClientSession(read, write))
                await session.initialize()
                await self._list_tools(session)
                self._session = session
                self._ready.set()
                await self._stop.wait()
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                raise
            self._error = exc
            if self._session is not None:
                self._dead_reason = f"its connection failed: {_explain(exc)}"
        finally:
            self._session = None
            self._ready.set()

    async def _connect_http(self, stack: contextlib.AsyncExitStack) -> tuple[Any, Any]:
        cfg = self.config
        assert cfg.url is not None and self._proc is not None
        parts = urlsplit(cfg.url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        host = parts.hostname or "127.0.0.1"
        while True:  # bounded by start()'s timeout, which cancels this task
            if self._proc.returncode is not None:
                raise ConnectionError(f"the server exited with code {self._proc.returncode} before listening")
            try:
                _, writer = await asyncio.open_connection(host, port)
                writer.close()
                break
            except OSError:
                await asyncio.sleep(0.05)
        headers = dict(cfg.headers)
        if cfg.type == "sse":
            from mcp.client.sse import sse_client

            read, write = await stack.enter_async_context(sse_client(cfg.url, headers=headers))
        else:
            from mcp.client.streamable_http import streamablehttp_client

            with warnings.catch_warnings():  # renamed in later 1.x releases; this name works in all
                warnings.simplefilter("ignore", DeprecationWarning)
                client = streamablehttp_client(cfg.url, headers=headers)
            read, write, _ = await stack.enter_async_context(client)
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
        if self._proc is not None and self._proc.returncode is not None:
            return f"exited with code {self._proc.returncode}"
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
        died = asyncio.ensure_future(asyncio.shield(self._waiter)) if self._waiter is not None else None
        try:
            waits = {call} if died is None else {call, died}
            done, _ = await asyncio.wait(waits, timeout=self.call_timeout, return_when=asyncio.FIRST_COMPLETED)
            if call not in done and died in done:
                # The answer may still be in the pipe: give it a moment before calling it dead.
                done, _ = await asyncio.wait({call}, timeout=0.5)
        finally:
            if died is not None:
                died.cancel()
        if call not in done:
            call.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await call
            if self._exited():
                return self._dead(name, "exited during the call")
            return CallOutcome(
                False,
                f"ERROR: {name} timed out after {self.call_timeout:g}s (MCP server {self.name!r} did not answer)",
                f"{name} error: timed out after {self.call_timeout:g}s",
                None,
            )
        exc = call.exception()
        if exc is not None:
            if self._exited() or "Connection closed" in str(exc):
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

    def _exited(self) -> bool:
        return self._proc is not None and self._proc.returncode is not None

    async def aclose(self) -> None:
        """Stop the server: end the session (its stdin closes), then SIGTERM, then SIGKILL; bounded."""
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
            except Exception:  # noqa: BLE001, S110 - stopping must not fail the run
                pass
        proc = self._proc
        if proc is not None:
            if proc.returncode is None and proc.stdin is not None:
                proc.stdin.close()  # MCP's stdio shutdown: close its input, let it leave
            for sig, wait_s in ((None, STOP_GRACE_S), (signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, STOP_GRACE_S)):
                if sig is not None:
                    signal_group(proc.pid, sig)  # the whole group: servers that spawned helpers
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait_s):
                        await proc.wait()
                if proc.returncode is not None:
                    break
            signal_group(proc.pid, signal.SIGKILL)  # helpers the server left behind
        if self._waiter is not None and not self._waiter.done():
            self._waiter.cancel()
        if self._server is not None:
            self._server.close_stderr()
        if self._prestarted is not None:  # closed before start() (another server failed first)
            self._prestarted.kill()
            self._prestarted = None


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

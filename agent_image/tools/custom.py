"""MassGen custom tools inside the sandbox: each call runs in its own worker process.

The engine never imports a tool file. A `describe` worker imports them once at the start of
the run and reports each tool's JSON schema; every call then runs in a fresh `serve` worker
(own session, the shell tool's timeout and output cap), so a tool that hangs, crashes,
prints without end or calls `os._exit` ends that call with a tool error, never the engine.
One worker is kept warm per agent (already past Python's start-up and the tool imports), so a
call costs little more than the function itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent_image.backends.base import ToolSpec
from agent_image.protocol.tools_config import CustomToolSpec
from agent_image.tools.shell import _CappedSink, _connect, _signal_group, _terminate_group

logger = logging.getLogger(__name__)

WORKER = Path(__file__).resolve().with_name("_custom_worker.py")
COMPAT_DIR = Path(__file__).resolve().parent.parent / "compat"
MAX_RESULT_BYTES = 8 << 20  # the answer pipe; text beyond the model's cap is cut in the worker
DRAIN_S = 0.5
STDERR_TAIL = 2000
TRACE_TAIL = 3000


class ToolSetupError(Exception):
    """A tool cannot be offered: the run ends before any model call (exit 1)."""

    def __init__(self, what: str, detail: str) -> None:
        self.what = what
        self.detail = detail
        super().__init__(f"{what}: {detail}")


@dataclass(frozen=True)
class LoadedTool:
    """A custom tool as described by its worker: what the model sees and how to call it."""

    name: str
    description: str
    parameters: dict[str, Any]
    agent_cwd: bool  # the function takes MassGen's `agent_cwd` (filled with the workspace)
    spec: CustomToolSpec


@dataclass(frozen=True)
class WorkerOutcome:
    answer: dict[str, Any] | None
    exit_code: int | None
    timed_out: bool
    overflow: bool
    stdout: str
    stderr: str
    duration_s: float


class _WatchedSink(_CappedSink):
    """A capped pipe reader that also says when the cap was first exceeded."""

    def __init__(self, cap: int, closed: asyncio.Future[None], overflow: asyncio.Event) -> None:
        super().__init__(cap, closed)
        self.overflow = overflow

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.truncated:
            self.overflow.set()


class _Worker:
    """One worker process with its pipes; `finish` sends the request and collects the answer."""

    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None
        self.sinks: list[_CappedSink] = []
        self.transports: list[asyncio.ReadTransport] = []
        self.overflow = asyncio.Event()
        self.started = time.monotonic()

    @classmethod
    async def spawn(
        cls, mode: str, header: dict[str, Any], *, cwd: Path, env: Mapping[str, str], max_output_bytes: int
    ) -> _Worker:
        """Start a worker and send it the tool list.

        Raises:
            OSError: the interpreter could not be started.
        """
        loop = asyncio.get_running_loop()
        w = cls()
        write_fds: list[int] = []
        try:
            caps = (max_output_bytes, max_output_bytes, MAX_RESULT_BYTES)
            for i, cap in enumerate(caps):
                read_fd, write_fd = os.pipe()
                write_fds.append(write_fd)
                overflow = w.overflow if i < 2 else asyncio.Event()
                sink = _WatchedSink(cap, loop.create_future(), overflow)
                w.transports.append(await _connect(loop, read_fd, sink))
                w.sinks.append(sink)
            result_fd = write_fds[2]
            w.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-I",
                "-B",
                "-u",
                str(WORKER),
                mode,
                str(COMPAT_DIR),
                str(result_fd),
                stdin=asyncio.subprocess.PIPE,
                stdout=write_fds[0],
                stderr=write_fds[1],
                pass_fds=(result_fd,),
                cwd=cwd,
                env=dict(env),
                start_new_session=True,
            )
            assert w.proc.stdin is not None
            w.proc.stdin.write(json.dumps(header).encode() + b"\n")
        except BaseException:
            w.close_transports()
            raise
        finally:
            for fd in write_fds:
                os.close(fd)
        return w

    def close_transports(self) -> None:
        for t in self.transports:
            t.close()

    async def finish(self, request: dict[str, Any] | None, timeout: float, grace: float = 1.0) -> WorkerOutcome:
        """Send `request` (or nothing), wait for the worker to exit within `timeout`, read it all."""
        proc = self.proc
        assert proc is not None and proc.stdin is not None
        t0 = time.monotonic()
        try:
            if request is not None:
                proc.stdin.write(json.dumps(request, ensure_ascii=False).encode("utf-8", "surrogatepass") + b"\n")
            with contextlib.suppress(ConnectionError):
                await proc.stdin.drain()
            proc.stdin.close()
            timed_out = overflow = False
            waiter = asyncio.ensure_future(proc.wait())
            flood = asyncio.ensure_future(self.overflow.wait())
            try:
                done, _ = await asyncio.wait({waiter, flood}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            finally:
                flood.cancel()
            if waiter not in done:
                overflow = flood in done and not waiter.done()
                timed_out = not overflow
                # Printing past the cap is a tool error: stop the flood now rather than read 50 MB.
                await _terminate_group(proc, 0.0 if overflow else grace)
            await waiter
            await asyncio.wait([s.closed for s in self.sinks], timeout=DRAIN_S)
            overflow = overflow or self.overflow.is_set()
            answer: dict[str, Any] | None = None
            raw = bytes(self.sinks[2].buf)
            if raw and not self.sinks[2].truncated:
                with contextlib.suppress(ValueError):
                    answer = json.loads(raw.decode("utf-8", "replace"))
            return WorkerOutcome(
                answer=answer if isinstance(answer, dict) else None,
                exit_code=proc.returncode,
                timed_out=timed_out,
                overflow=overflow,
                stdout=self.sinks[0].text(),
                stderr=self.sinks[1].text(),
                duration_s=time.monotonic() - t0,
            )
        except asyncio.CancelledError:
            _signal_group(proc.pid, signal.SIGKILL)
            raise
        finally:
            self.close_transports()
            if proc.returncode is None:
                _signal_group(proc.pid, signal.SIGKILL)
                with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                    async with asyncio.timeout(grace):
                        await proc.wait()

    async def kill(self) -> None:
        proc = self.proc
        self.close_transports()
        if proc is None or proc.returncode is not None:
            return
        _signal_group(proc.pid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError, asyncio.CancelledError, ProcessLookupError):
            async with asyncio.timeout(1.0):
                await proc.wait()


def _header(specs: Sequence[CustomToolSpec]) -> dict[str, Any]:
    return {"tools": [{**s.model_dump(), "tool": s.tool} for s in specs]}


def _why_no_answer(out: WorkerOutcome, timeout: float, cap: int) -> str:
    if out.timed_out:
        return f"timed out after {timeout:g}s; the tool and every process it started were killed"
    if out.overflow:
        return f"printed more than {cap} bytes to stdout/stderr (the output cap); the tool was stopped"
    code = out.exit_code
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name} before returning a result"
    return f"exited with code {code} before returning a result"


def _tail(text: str, limit: int) -> str:
    text = text.strip()
    return text if len(text) <= limit else "..." + text[-limit:]


async def describe_tools(
    specs: Sequence[CustomToolSpec],
    *,
    cwd: Path,
    env: Mapping[str, str],
    timeout: float,
    max_output_bytes: int,
) -> list[LoadedTool]:
    """Import the tool files in a worker and return the tools with their schemas.

    Raises:
        ToolSetupError: a file or module cannot be imported, a function is missing, or the
            worker died; the message names the tool and what to fix.
    """
    if not specs:
        return []
    try:
        worker = await _Worker.spawn("describe", _header(specs), cwd=cwd, env=env, max_output_bytes=max_output_bytes)
    except OSError as exc:
        raise ToolSetupError("custom tools", f"could not start {sys.executable}: {exc}") from exc
    out = await worker.finish(None, timeout)
    if out.answer is None:
        names = ", ".join(s.tool for s in specs)
        detail = _why_no_answer(out, timeout, max_output_bytes)
        stderr = _tail(out.stderr, STDERR_TAIL)
        raise ToolSetupError(
            f"custom tools {names}", f"loading them {detail}" + (f"; stderr: {stderr}" if stderr else "")
        )
    errors = out.answer.get("errors") or []
    if errors:
        first = errors[0]
        spec = next(s for s in specs if s.tool == first["tool"])
        where = spec.path or spec.module
        raise ToolSetupError(
            f"custom tool {first['tool']}",
            f"cannot load function {spec.function!r} from {where}: {first['error']}",
        )
    by_name = {s.tool: s for s in specs}
    return [
        LoadedTool(
            name=t["tool"],
            description=str(t.get("description") or f"Custom tool {by_name[t['tool']].function}."),
            parameters=t["parameters"],
            agent_cwd=bool(t.get("agent_cwd")),
            spec=by_name[t["tool"]],
        )
        for t in out.answer["tools"]
    ]


@dataclass(frozen=True)
class CallOutcome:
    ok: bool
    content: str
    summary: str
    own_s: float | None


class CustomTools:
    """One agent's custom tools; `call` never raises for anything a tool or the model does."""

    def __init__(
        self,
        tools: Sequence[LoadedTool],
        *,
        workspace: Path,
        env: Mapping[str, str],
        timeout: float,
        max_output_bytes: int,
    ) -> None:
        self.tools = {t.name: t for t in tools}
        self.workspace = workspace
        self.env = dict(env)
        self.timeout = timeout
        self.max_output_bytes = max_output_bytes
        self._spare: _Worker | None = None
        self._header = _header([t.spec for t in tools])
        self._lock = asyncio.Lock()
        self._closed = False
        self._warming: asyncio.Task[None] | None = None

    kind = "custom"

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self.tools)

    def specs(self) -> list[ToolSpec]:
        return [ToolSpec(t.name, t.description, t.parameters) for t in self.tools.values()]

    async def _spawn(self) -> _Worker:
        return await _Worker.spawn(
            "serve", self._header, cwd=self.workspace, env=self.env, max_output_bytes=self.max_output_bytes
        )

    async def warm(self) -> None:
        """Start the spare worker now, so the first call does not pay for start-up."""
        async with self._lock:
            if self._spare is None and not self._closed and self.tools:
                with contextlib.suppress(OSError):
                    self._spare = await self._spawn()

    async def call(self, name: str, arguments: dict[str, Any]) -> CallOutcome:
        tool = self.tools[name]
        async with self._lock:
            worker, self._spare = self._spare, None
        try:
            if worker is None:
                worker = await self._spawn()
        except OSError as exc:
            return CallOutcome(False, f"ERROR: {name} could not start: {exc}", f"{name} error: cannot start", None)
        request = {
            "tool": name,
            "arguments": arguments,
            "max_chars": self.max_output_bytes,
            "agent_cwd": str(self.workspace) if tool.agent_cwd else None,
        }
        try:
            out = await worker.finish(request, self.timeout)
        finally:
            # The next call's worker starts while the model thinks about this result; the task
            # is ours (kept, awaited in aclose), never left to the loop.
            if not self._closed and (self._warming is None or self._warming.done()):
                self._warming = asyncio.create_task(self.warm())
        return self._outcome(name, out)

    def _outcome(self, name: str, out: WorkerOutcome) -> CallOutcome:
        ans = out.answer
        if ans is None or out.overflow:
            why = _why_no_answer(out, self.timeout, self.max_output_bytes)
            stderr = _tail(out.stderr, STDERR_TAIL)
            content = f"ERROR: {name} {why}." + (f"\nstderr:\n{stderr}" if stderr and not out.overflow else "")
            return CallOutcome(False, content, f"{name} error: {why}", None)
        own = ans.get("own_s")
        own_s = float(own) if isinstance(own, int | float) else None
        if not ans.get("ok"):
            error = str(ans.get("error") or "failed")
            content = f"ERROR: {name} failed: {error}"
            trace = str(ans.get("traceback") or "")
            if trace:
                content += "\n" + _tail(trace, TRACE_TAIL)
            return CallOutcome(False, content, f"{name} error: {error}", own_s)
        text = str(ans.get("text") or "")
        if ans.get("truncated"):
            text += f"\n[truncated: showing the first {len(text)} of {ans.get('chars')} characters]"
        return CallOutcome(True, text, f"{name} ok: {text}", own_s)

    async def aclose(self) -> None:
        self._closed = True
        if self._warming is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._warming
        async with self._lock:
            spare, self._spare = self._spare, None
        if spare is not None:
            await spare.kill()

"""Run one shell command in its own process group, with a deadline and capped output."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

# The allow-listed environment commands run with; defined in `launch` (standard library only),
# which starts MCP servers with it before the engine's own imports.
from agent_image.launch import minimal_env as minimal_env

LINGERING_NOTE = (
    "[toolbox] background processes still hold stdout/stderr after the command exited; "
    "their later output is not captured (redirect it to a file)"
)


@dataclass(frozen=True)
class ShellOutcome:
    """What one command did. `exit_code` is negative when a signal ended the shell."""

    exit_code: int | None
    stdout: str
    stderr: str
    truncated: bool
    timed_out: bool
    duration_s: float


class _CappedSink(asyncio.Protocol):
    """Keeps the first `cap` bytes of a pipe and discards the rest, never pausing the reader,
    so a chatty child can never block on a full pipe."""

    def __init__(self, cap: int, closed: asyncio.Future[None]) -> None:
        self.cap = cap
        self.buf = bytearray()
        self.truncated = False
        self.closed = closed

    def data_received(self, data: bytes) -> None:
        room = self.cap - len(self.buf)
        if room > 0:
            self.buf += data[:room]
        if len(data) > room:
            self.truncated = True

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    def text(self) -> str:
        return self.buf.decode("utf-8", errors="replace")


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    # The shell is a session leader (start_new_session), so its pid is the group id; the
    # group outlives the leader while any member (a backgrounded grandchild) is alive.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _group_alive(pgid: int) -> bool:
    """Whether any non-zombie process is left in group `pgid`."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # Zombies still count for killpg(); under a PID 1 that does not reap (a container
    # without `init: true`) they would hold us for the whole grace period, so ask /proc.
    try:
        pids = [name for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return True
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # comm, in parentheses, may hold anything; the fields after the last ")" are
        # state, ppid, pgrp, ...
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 2 and fields[2] == str(pgid).encode() and fields[0] != b"Z":
            return True
    return False


async def _terminate_group(proc: asyncio.subprocess.Process, grace: float) -> None:
    """SIGTERM the whole group, give it `grace` seconds to leave, then SIGKILL what is left."""
    _signal_group(proc.pid, signal.SIGTERM)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout_at(deadline):
            await proc.wait()
            # Members ignoring SIGTERM keep the group alive after the leader is reaped.
            while _group_alive(proc.pid):  # noqa: ASYNC110 - no event tells when a process group is empty
                await asyncio.sleep(0.02)
    _signal_group(proc.pid, signal.SIGKILL)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(grace):
            await proc.wait()


async def _connect(loop: asyncio.AbstractEventLoop, read_fd: int, sink: _CappedSink) -> asyncio.ReadTransport:
    pipe = open(read_fd, "rb", buffering=0)  # noqa: SIM115, ASYNC230 - wraps a pipe fd (no I/O); the transport closes it
    try:
        transport, _ = await loop.connect_read_pipe(lambda: sink, pipe)
    except BaseException:
        pipe.close()
        raise
    return transport


async def run_shell(
    command: str,
    *,
    cwd: Path,
    env: Mapping[str, str],
    timeout: float,
    max_output_bytes: int,
    grace: float = 1.0,
    drain: float = 0.5,
) -> ShellOutcome:
    """Run `/bin/sh -c command` in a new session with stdin from /dev/null.

    On timeout the whole process group gets SIGTERM, `grace` seconds, then SIGKILL. If the
    awaiting task is cancelled the group gets SIGKILL at once and the cancellation
    propagates. After the shell exits, pipes still held open by background processes are
    drained for at most `drain` seconds.

    Raises:
        OSError: the shell could not be started (missing cwd, no /bin/sh, ...).
        ValueError: `command` contains a NUL byte.
    """
    loop = asyncio.get_running_loop()
    sinks: list[_CappedSink] = []
    transports: list[asyncio.ReadTransport] = []
    write_fds: list[int] = []
    proc: asyncio.subprocess.Process | None = None

    def close_write_fds() -> None:
        while write_fds:
            os.close(write_fds.pop())

    try:
        # Our own pipes rather than asyncio's PIPE streams: we own the read ends, can close
        # them even while a background grandchild still holds the write ends, and never
        # stall on StreamReader flow control.
        for _ in range(2):
            read_fd, write_fd = os.pipe()
            write_fds.append(write_fd)
            sink = _CappedSink(max_output_bytes, loop.create_future())
            transports.append(await _connect(loop, read_fd, sink))
            sinks.append(sink)

        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            "/bin/sh",
            "-c",
            command,
            stdin=subprocess.DEVNULL,
            stdout=write_fds[0],
            stderr=write_fds[1],
            cwd=cwd,
            env=dict(env),
            start_new_session=True,
        )
        # EOF arrives only once every writer is gone, so the parent's copies must go now.
        close_write_fds()

        timed_out = False
        try:
            async with asyncio.timeout(timeout):
                await proc.wait()
        except TimeoutError:
            timed_out = True
            await _terminate_group(proc, grace)
        duration = time.monotonic() - started

        _, pending = await asyncio.wait([s.closed for s in sinks], timeout=drain)
        stderr = sinks[1].text()
        if pending and not timed_out:
            stderr = f"{stderr}\n{LINGERING_NOTE}" if stderr else LINGERING_NOTE
        return ShellOutcome(
            exit_code=proc.returncode,
            stdout=sinks[0].text(),
            stderr=stderr,
            truncated=any(s.truncated for s in sinks),
            timed_out=timed_out,
            duration_s=duration,
        )
    except asyncio.CancelledError:
        if proc is not None:
            # No grace on cancellation: whoever cancelled us is on a deadline of their own.
            _signal_group(proc.pid, signal.SIGKILL)
        raise
    finally:
        close_write_fds()
        for transport in transports:
            transport.close()
        if proc is not None and proc.returncode is None:
            # Reap the killed leader so no zombie or child-watcher callback outlives us.
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                async with asyncio.timeout(grace):
                    await proc.wait()

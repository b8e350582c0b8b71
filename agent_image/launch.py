"""Processes the engine starts, and those it starts before its own imports.

Standard library only: `python -m agent_image run-spec` starts each agent's MCP server
processes from the raw spec first (`prestart`), so that a server's own start-up (for a Python
server, mostly importing the `mcp` SDK) runs on another core while the engine imports its
config models, backends and the SDK's client side. The engine adopts a process started here
only when the command line, folder and environment it would start itself are exactly these
(`McpServer.start`); any other is stopped (`stop_all`). Starting early never changes what
runs, only when: a server that is not prestarted (its command is missing, the spec is odd) is
started, or refused with its error, by the engine as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Variables a shell needs to behave normally. Everything else in the agent's environment
# (API tokens, gateway settings, the engine's own knobs) stays out of model-driven commands.
_ENV_KEEP = frozenset({"PATH", "HOME", "USER", "LOGNAME", "SHELL", "TERM", "LANG", "LANGUAGE", "TZ", "TMPDIR"})
# LC_* for locale; MASSGEN_* so `massgen-run` inside the sandbox finds its supervisor socket.
_ENV_KEEP_PREFIXES = ("LC_", "MASSGEN_")
_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

STDERR_TAIL_BYTES = 4000
MAX_MESSAGE_BYTES = 32 << 20  # one JSON-RPC line from a server
CWD_REF = "${cwd}"  # the one variable a server's args, env and cwd may name: the agent's workspace
ServerKey = tuple[str, str]  # (agent id, server name)


def minimal_env(source: Mapping[str, str] | None = None) -> dict[str, str]:
    """The allow-listed subset of `source` (default `os.environ`) that commands run with."""
    source = os.environ if source is None else source
    env = {k: v for k, v in source.items() if k in _ENV_KEEP or k.startswith(_ENV_KEEP_PREFIXES)}
    env.setdefault("PATH", _DEFAULT_PATH)
    return env


def expand(value: str, workspace: Path) -> str:
    """`${cwd}` -> the agent's workspace (the config refuses every other `${VAR}`)."""
    return value.replace(CWD_REF, str(workspace))


class TailSink(asyncio.Protocol):
    """Keeps the last bytes of a server's stderr; EOF means the server (and its children) are gone."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.closed = asyncio.Event()

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


def signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


@dataclass(frozen=True)
class Launch:
    """What starting one server means: its command line, folder, environment and transport."""

    argv: tuple[str, ...]
    cwd: str
    env: Mapping[str, str]
    stdio: bool  # JSON-RPC over stdin/stdout; else the server listens on loopback (stdout -> stderr tail)


@dataclass
class ServerProcess:
    """A started server: its process (own session and group) and the tail of its stderr."""

    launch: Launch
    proc: asyncio.subprocess.Process
    sink: TailSink
    transport: asyncio.ReadTransport | None = field(default=None, repr=False)

    def close_stderr(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def kill(self) -> None:
        """SIGKILL the server's whole group (it may have started helpers) and drop its pipes."""
        signal_group(self.proc.pid, signal.SIGKILL)
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.close_stderr()


async def spawn(launch: Launch) -> ServerProcess:
    """Start one server process in its own session, its stderr into a `TailSink`.

    Raises:
        OSError: the command could not be executed.
    """
    loop = asyncio.get_running_loop()
    read_fd, write_fd = os.pipe()
    sink = TailSink()
    pipe = open(read_fd, "rb", buffering=0)  # noqa: SIM115, ASYNC230 - wraps a pipe fd (no I/O); the transport closes it
    transport, _ = await loop.connect_read_pipe(lambda: sink, pipe)
    try:
        proc = await asyncio.create_subprocess_exec(
            *launch.argv,
            stdin=asyncio.subprocess.PIPE if launch.stdio else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE if launch.stdio else write_fd,
            stderr=write_fd,
            cwd=launch.cwd,
            env=dict(launch.env),
            start_new_session=True,
            limit=MAX_MESSAGE_BYTES,
        )
    except BaseException:
        transport.close()
        raise
    finally:
        os.close(write_fd)  # the server holds its own copy; EOF on ours means it is gone
    return ServerProcess(launch, proc, sink, transport)


def _str_list(value: Any) -> list[str] | None:
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    return None


def plan(raw: Mapping[str, Any], env: Mapping[str, str]) -> dict[ServerKey, Launch]:
    """The servers a raw spec's config names, as the engine would start them; best effort.

    Anything unusual (a missing command, a non-string argument, an unknown shape) is left
    out: the engine validates the config and starts or refuses that server itself.
    """
    out: dict[ServerKey, Launch] = {}
    config = raw.get("config")
    workspace = raw.get("workspace")
    if not isinstance(config, dict) or not isinstance(workspace, str):
        return out
    agents = config.get("agents", [config["agent"]] if "agent" in config else [])
    path = env.get("PATH", os.defpath)
    for agent in agents if isinstance(agents, list) else []:
        if not isinstance(agent, dict) or not isinstance(agent.get("id"), str) or "/" in agent["id"]:
            continue
        backend = agent.get("backend")
        servers = backend.get("mcp_servers") if isinstance(backend, dict) else None
        if isinstance(servers, dict):  # MassGen's mapping form {name: {...}}
            servers = [{"name": k, **v} if isinstance(v, dict) else v for k, v in servers.items()]
        ws = Path(workspace) / agent["id"]
        for s in servers if isinstance(servers, list) else []:
            if not isinstance(s, dict) or not isinstance(s.get("name"), str) or not isinstance(s.get("command"), str):
                continue
            args, senv, cwd = _str_list(s.get("args", [])), s.get("env", {}), s.get("cwd")
            if args is None or not isinstance(senv, dict) or not all(isinstance(v, str) for v in senv.values()):
                continue
            if cwd is not None and not isinstance(cwd, str):
                continue
            command = expand(s["command"], ws)
            if not command.strip() or shutil.which(command, path=path) is None:
                continue
            full_env = {**env, **{str(k): expand(v, ws) for k, v in senv.items()}}
            out[(agent["id"], s["name"])] = Launch(
                argv=(command, *(expand(a, ws) for a in args)),
                cwd=str(Path(expand(cwd, ws))) if cwd else str(ws),  # as the engine spells it
                env=full_env,
                stdio=s.get("type", "stdio") == "stdio",
            )
    return out


async def prestart(raw: Mapping[str, Any], env: Mapping[str, str]) -> dict[ServerKey, ServerProcess]:
    """Start the servers of `plan(raw, env)` now; never raises but CancelledError (failures are the
    engine's to report: it starts or refuses such a server itself)."""
    started: dict[ServerKey, ServerProcess] = {}
    try:
        launches = plan(raw, env)
    except Exception:  # noqa: BLE001 - best effort: the engine validates the spec itself
        return started
    try:
        for (agent, name), launch in launches.items():
            try:
                if _folder_ready(Path(raw["workspace"]) / agent, launch.cwd):
                    started[(agent, name)] = await spawn(launch)
            except (OSError, ValueError):
                continue
    except BaseException:  # cancelled (a signal): none of them may outlive the engine
        stop_all(started)
        raise
    return started


def _folder_ready(agent_workspace: Path, cwd: str) -> bool:
    agent_workspace.mkdir(parents=True, exist_ok=True)  # as the engine makes it: a server's default folder
    return Path(cwd).is_dir()


def stop_all(servers: dict[ServerKey, ServerProcess]) -> None:
    """Kill the prestarted servers nobody adopted (at most a start-up's worth of their work is lost)."""
    while servers:
        _, server = servers.popitem()
        server.kill()

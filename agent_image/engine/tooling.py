"""Bring up every agent's custom tools and MCP servers before the first model call; stop them after.

A tool that cannot be offered ends the run here, before any model call, with exit 1
(`tool_unavailable`) and a message naming the tool or server and the way forward.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from ..launch import ServerKey, ServerProcess, stop_all
from ..protocol.config import AgentConfig
from ..protocol.tools_config import CustomToolSpec
from ..tools.custom import CustomTools, ToolSetupError, describe_tools
from ..tools.toolbox import ExtraTools

# Importing tool files and starting servers (the mcp SDK alone is ~0.6 s of CPU) can take long
# on a loaded host; this bounds it, independent of the per-call timeout.
SETUP_TIMEOUT_S = 90.0


class _Closable(Protocol):
    async def aclose(self) -> None: ...


def _inside(path: Path, roots: Sequence[Path]) -> bool:
    return any(path == r or path.is_relative_to(r) for r in roots)


def check_custom_paths(agent: AgentConfig, contexts: Sequence[Path]) -> list[CustomToolSpec]:
    """The agent's custom tools, each file checked to lie inside a context path.

    Raises:
        ToolSetupError: a file outside every context path (or missing).
    """
    specs: list[CustomToolSpec] = []
    for _, spec in agent.backend.custom_tool_specs():  # without those exclude_custom_tools names
        if spec.path is not None:
            p = Path(spec.path)
            where = f"custom tool {spec.tool} of agent {agent.id}"
            if not p.is_absolute() or not _inside(Path(p), contexts):
                listed = ", ".join(map(str, contexts)) or "none"
                raise ToolSetupError(
                    where,
                    f"path {spec.path} is outside every orchestrator.context_paths entry ({listed}); "
                    "add its folder as a context path",
                )
            if not p.is_file():
                raise ToolSetupError(where, f"path {spec.path} is not a file in the sandbox")
        specs.append(spec)
    return specs


class AgentTools:
    """Everything one run opened for its agents' tools; `aclose` stops it all (bounded)."""

    def __init__(self, prestarted: dict[ServerKey, ServerProcess] | None = None) -> None:
        self.by_agent: dict[str, list[ExtraTools]] = {}
        self._open: list[_Closable] = []
        self.startup_s = 0.0
        self.servers = 0
        self.servers_prestarted = 0
        self._prestarted = prestarted if prestarted is not None else {}  # servers started from the raw spec

    async def open(
        self,
        agents: Sequence[AgentConfig],
        workspaces: dict[str, Path],
        contexts: Sequence[Path],
        env: dict[str, str],
        *,
        timeout: float,
        max_output_bytes: int,
    ) -> None:
        """Describe custom tools and start MCP servers for every agent, concurrently.

        Raises:
            ToolSetupError: the first tool or server that cannot be offered.
        """
        t0 = time.monotonic()
        results = await asyncio.gather(
            *(self._open_agent(a, workspaces[a.id], contexts, env, timeout, max_output_bytes) for a in agents),
            return_exceptions=True,
        )
        self.startup_s = time.monotonic() - t0
        for r in results:
            if isinstance(r, BaseException):
                await self.aclose()
                raise r

    async def _open_agent(
        self,
        agent: AgentConfig,
        ws: Path,
        contexts: Sequence[Path],
        env: dict[str, str],
        timeout: float,
        max_output_bytes: int,
    ) -> None:
        cfg = agent.backend
        extras: list[ExtraTools] = []
        self.by_agent[agent.id] = extras
        specs = check_custom_paths(agent, contexts)
        if cfg.mcp_servers:
            from ..tools.mcp_servers import McpServer, McpTools

            servers = [
                McpServer(
                    s,
                    agent=agent.id,
                    workspace=ws,
                    env=env,
                    call_timeout=timeout,
                    max_output_bytes=max_output_bytes,
                    exclude_tools=cfg.exclude_tools,
                    prestarted=self._prestarted.pop((agent.id, s.name), None),
                )
                for s in cfg.mcp_servers
            ]
            mcp = McpTools(servers)
            self.servers += len(servers)
            self._open.append(mcp)
            start = asyncio.ensure_future(mcp.start(max(SETUP_TIMEOUT_S, timeout)))
        else:
            start = None
        try:
            if specs:
                loaded = await describe_tools(
                    specs, cwd=ws, env=env, timeout=max(SETUP_TIMEOUT_S, timeout), max_output_bytes=max_output_bytes
                )
                excluded = set(cfg.exclude_tools)
                loaded = [t for t in loaded if t.name not in excluded and t.spec.function not in excluded]
                custom = CustomTools(loaded, workspace=ws, env=env, timeout=timeout, max_output_bytes=max_output_bytes)
                self._open.append(custom)
                await custom.warm()
                extras.append(custom)
        finally:
            if start is not None:
                await asyncio.wait({start})
        if start is not None:
            start.result()  # raises the server's ToolSetupError
            extras.append(mcp)
            self.servers_prestarted += sum(s.prestarted for s in mcp.servers)

    def stop_unadopted(self) -> None:
        """Kill the prestarted servers no agent took (the config named them otherwise)."""
        stop_all(self._prestarted)

    async def aclose(self) -> None:
        """Stop every source at once (bounded), and any prestarted server that was never adopted."""
        stop_all(self._prestarted)
        opened, self._open = self._open, []
        await asyncio.gather(*(_close(source) for source in opened))


async def _close(source: _Closable) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(source.aclose(), 10)


__all__ = ["AgentTools", "ToolSetupError", "check_custom_paths"]

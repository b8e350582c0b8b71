"""The engine entrypoint: run one spec, write events to the outbox, exit with the run's code."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Only the standard library at import time: `run_spec_file` starts the agents' MCP servers
# before the engine's own imports (config models, backends, orchestrator), so they overlap.
from ..launch import ServerKey, ServerProcess, minimal_env, prestart, stop_all

if TYPE_CHECKING:
    from ..backends.base import Backend
    from ..protocol.spec import RunSpec
    from .clock import Clock
    from .orchestrator import Outcome
    from .outbox import EventWriter

ENGINE_DEADLINE_MARGIN_S = 0.5
PEERS_DIR = ".peers"
MAX_PEER_SNAPSHOT_BYTES = 64 << 20


def snapshot_workspace(src: Path, dest: Path) -> None:
    """Replace `dest` with a copy of `src` (symlinks copied as links, never followed), read-only.

    Raises:
        OSError: the copy failed, or `src` holds more than MAX_PEER_SNAPSHOT_BYTES.
    """
    import shutil

    total = 0
    for dirpath, _dirs, names in os.walk(src):
        for name in names:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    if total > MAX_PEER_SNAPSHOT_BYTES:
        raise OSError(f"workspace {src} holds {total} bytes, over {MAX_PEER_SNAPSHOT_BYTES}; not shared")
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, symlinks=True)
    for dirpath, _dirs, names in os.walk(tmp):
        for name in names:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, 0o444)
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)


def startup_done() -> None:
    """The imports are done (the backends import their SDKs): what start-up made is kept for good.

    `python -m agent_image run-spec` starts with the collector off (agent_image/__main__.py);
    freezing moves start-up's objects out of every later collection's way.
    """
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


async def run_engine(
    spec: RunSpec,
    writer: EventWriter,
    clock: Clock | None = None,
    *,
    prestarted: dict[ServerKey, ServerProcess] | None = None,
) -> Outcome:
    """Run one spec to its outcome. `prestarted`: MCP servers `launch.prestart` started from it."""
    from ..backends import make_backend
    from ..protocol.config import RunConfig
    from ..protocol.result import Reason, exit_code_for
    from ..tools import ToolBox  # imported here: keeps `massgen-run --help` light
    from .clock import SystemClock
    from .orchestrator import Orchestrator, Outcome, TurnView
    from .tooling import AgentTools, ToolSetupError

    clock = clock or SystemClock()
    config = RunConfig.model_validate(spec.config)  # on failure the caller stops `prestarted`
    extra = AgentTools(prestarted)
    workspace = Path(spec.workspace)
    contexts = [(Path(p), False) for p in spec.context_paths]
    orch: Orchestrator | None = None
    backends: dict[str, Backend] = {}
    tools = {}
    workspaces = {}
    for agent in config.agents:
        ws = workspaces[agent.id] = workspace / agent.id
        ws.mkdir(parents=True, exist_ok=True)
    peers_dir = workspace / PEERS_DIR
    if config.orchestrator.share_workspaces:
        # Agent ids start with a letter, so no agent's folder is ever ".peers".
        peers_dir.mkdir(exist_ok=True)
        contexts = [*contexts, (peers_dir, False)]

    def snapshot_for_peers(agent_id: str, anon: str) -> None:
        snapshot_workspace(workspaces[agent_id], peers_dir / anon)

    try:
        # The backends first: building them imports the model SDKs (the openai SDK alone is
        # ~0.3 s of CPU), which runs while prestarted MCP servers boot. They make no call yet.
        for agent in config.agents:

            def view(aid: str = agent.id) -> TurnView:  # a closure over the orchestrator built below
                assert orch is not None
                return orch.view(aid)

            ws = workspaces[agent.id]
            backends[agent.id] = make_backend(agent, view=view, sleep=clock.sleep, workspace=str(ws))
        if any(a.backend.custom_tools or a.backend.mcp_servers for a in config.agents):
            # The shell's timeout and output cap apply to every tool.
            probe = ToolBox(workspace, shell_timeout=config.sandbox.tool_timeout_seconds)
            try:
                await extra.open(
                    config.agents,
                    workspaces,
                    [Path(p) for p in spec.context_paths],
                    minimal_env(),  # an allowlist, never secrets
                    timeout=probe.shell_timeout,
                    max_output_bytes=probe.max_output_bytes,
                )
            except ToolSetupError as exc:
                writer.log(f"tool setup failed: {exc}", "error")
                return Outcome(exit_code_for(Reason.TOOL_UNAVAILABLE), Reason.TOOL_UNAVAILABLE, str(exc)[:2000])
            early = ""
            if extra.servers:
                early = f" ({extra.servers_prestarted} of {extra.servers} MCP servers started early)"
            writer.log(f"custom tools and MCP servers ready in {extra.startup_s:.2f}s{early}")
        extra.stop_unadopted()
        for agent in config.agents:
            ws = workspaces[agent.id]
            tools[agent.id] = ToolBox(  # default env: an allowlist, never secrets
                ws,
                contexts,
                shell_timeout=config.sandbox.tool_timeout_seconds,
                allowed_commands=agent.backend.command_line_allowed_commands,
                blocked_commands=agent.backend.command_line_blocked_commands,
                extra=extra.by_agent.get(agent.id, ()),
            )
        startup_done()
        timeout = None
        if spec.deadline is not None:
            # Finish (exit 3 from inside) just before the supervisor's own deadline fires.
            timeout = max(0.1, spec.deadline - clock.now() - ENGINE_DEADLINE_MARGIN_S)
        orch = Orchestrator(
            config,
            spec.question,
            spec.run_id,
            writer,
            backends,
            tools,
            sandbox=spec.sandbox,
            timeout=timeout,
            write_paths=spec.write_context_paths,
            peers=snapshot_for_peers,
            peers_dir=str(peers_dir),
        )
        return await orch.run()
    finally:
        # Servers and spare workers stop with the run, all at once (a server's own exit after
        # its stdin closes is most of the cost); closing must not mask the run's outcome.
        async def close_backend(b: Backend) -> None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(b.aclose(), 5)

        await asyncio.gather(extra.aclose(), *(close_backend(b) for b in backends.values()))


def run_spec_file(spec_path: Path) -> int:
    """Run the spec at `spec_path`; returns the process exit code (0-4).

    Raises:
        ValueError: the spec is not valid JSON or not a valid RunSpec (no outbox to report to).
    """
    raw: Any = json.loads(spec_path.read_bytes())
    opened: list[EventWriter] = []

    async def main() -> Outcome:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        interrupted: list[str] = []

        def on_signal(signame: str) -> None:
            # First signal: cancel the run (tools kill their process groups); the finally below
            # still records the outcome. A second signal is handled the same way: cancel is idempotent.
            interrupted.append(signame)
            task.cancel()

        # Before any server starts: they have sessions of their own, so a signal during start-up
        # must still reach the code that stops them.
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig.name)
        early: dict[ServerKey, ServerProcess] = {}
        try:
            # First the agents' MCP servers (they boot on another core meanwhile), then the imports.
            if isinstance(raw, dict):
                early = await prestart(raw, minimal_env())
            from ..protocol.result import Reason, exit_code_for
            from ..protocol.spec import RunSpec
            from .orchestrator import Outcome
            from .outbox import EVENTS_FILE, EventWriter

            spec = RunSpec.model_validate(raw)
            writer = EventWriter(Path(spec.outbox) / EVENTS_FILE)
            opened.append(writer)
            try:
                return await run_engine(spec, writer, prestarted=early)
            except asyncio.CancelledError:
                signame = interrupted[0] if interrupted else "cancel"
                writer.log(f"interrupted by {signame}", "warning")
                return Outcome(exit_code_for(Reason.INTERRUPTED), Reason.INTERRUPTED, f"received {signame}")
        finally:
            stop_all(early)  # those run_engine never took

    try:
        outcome = asyncio.run(main())
    except asyncio.CancelledError:
        if opened:
            raise
        from ..protocol.result import Reason, exit_code_for

        return exit_code_for(Reason.INTERRUPTED)  # a signal before there was an outbox to report to
    except Exception as exc:  # the engine must always end with a run_finished event
        if not opened:
            raise
        from ..protocol.result import Reason, exit_code_for
        from .orchestrator import Outcome

        outcome = Outcome(
            exit_code_for(Reason.AGENT_FAILED), Reason.AGENT_FAILED, f"engine error: {type(exc).__name__}: {exc}"
        )
    from ..protocol.events import RunFinished

    writer = opened[0]
    writer.emit(RunFinished, exit_code=outcome.exit_code, reason=str(outcome.reason), detail=outcome.detail[:2000])
    writer.close()
    return outcome.exit_code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "run-spec":
        return run_spec_file(Path(argv[1]))
    # Anything else is the in-sandbox `massgen-run` client (nested runs).
    from ..client import main as client_main

    return client_main(argv)

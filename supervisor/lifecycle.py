"""One run from request to result.json: prepare, start the sandbox, follow, enforce, finalize."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from agent_image.protocol.config import RunConfig
from agent_image.protocol.loader import (
    ConfigError,
    ConfigProblem,
    LoadedConfig,
    dump_config,
    parse_config,
    parse_config_text,
)
from agent_image.protocol.result import Reason, RunResult
from agent_image.protocol.spec import RunSpec
from agent_image.protocol.status import ContainerSection, DiskSection, RunState

from .configs import check_context_paths, price_problems, resolve_loaded
from .diskaccount import DiskAccount
from .diskquota import WALK_INTERVAL_S, DiskUse, Mode, RunDisk
from .diskquota import disabled as disk_quota_disabled
from .errors import ContainerRuntimeError, DiskError, ImageMissing, RuntimeUnavailable, SandboxStartFailed
from .errors import PolicyError as PolicyError  # also importable from here
from .logdir import RunPaths, atomic_write, create_run_dirs
from .materializer import Materializer, OutboxTailer
from .outbox_watch import OutboxWatch
from .runtime.base import (
    LABEL_DEADLINE,
    LABEL_LOG_DIR,
    LABEL_OWNER,
    LABEL_PARENT,
    LABEL_RUN,
    LABEL_SUPERVISOR,
    LABEL_WORKSPACE,
    START_TIMEOUT_S,
    ExitInfo,
    Mount,
    Runtime,
    SandboxFacts,
    SandboxHandle,
    SandboxSpec,
    Tmpfs,
    shares_filesystem,
)
from .tools_policy import engine_image_problem, resolve_custom_tools
from .verdict import ContainerExit, EngineClaim, Verdict, decide

log = logging.getLogger(__name__)

OUTBOX_IN_SANDBOX = "/run/massgen/outbox"
CHILDREN_IN_SANDBOX = "/run/massgen/children"
API_DIR_IN_SANDBOX = "/run/massgen/api"
HUB_DIR_IN_SANDBOX = "/run/massgen/hub"
# Linked runtimes (no shared filesystem): the container's command is the channel's hub, and the
# supervisor reaches it by exec'ing the link (docs/channel.md).
LINK_ARGV = ("python3", "-m", "agent_image.channel.link", f"{HUB_DIR_IN_SANDBOX}/link.sock")
LINK_UP_S = 30.0  # a linked sandbox whose channel is not up by then failed to start
# A spec up to this size goes to a linked sandbox's hub with its command (an argument may hold
# 128 KiB; base64 makes 4 bytes of 3); larger ones, or runs with context folders, are PUT.
SPEC_ON_COMMAND_LINE_BYTES = 64 << 10
EXIT_EVENTS_S = 10.0  # after the engine exited: how long the outbox may take to reach us
FETCH_S = 120.0  # bringing the workspace back over the channel
UNREACHABLE_GIVE_UP_S = 20.0  # past a failed kill: an unreachable engine's sandbox is given up
WORKSPACE_IN_SANDBOX = "/workspace"
SANDBOX_UID = 10001
POLL_S = 0.5
STOP_OVERDUE_S = 10.0  # past grace + this, a stop that has not ended the sandbox becomes a kill
MAX_OUTBOX_BYTES = 256 << 20  # a sandbox writing more events than this is stopped (limit_exceeded)
# Lines that are not acceptable events (junk, forgeries, out of sequence): the engine writes
# none, so past this many the sandbox is flooding and is stopped (limit_exceeded).
MAX_IGNORED_LINES = 100_000
# After the sandbox exited: how long the follower may spend on what is left of the outbox
# (yielding between slices); shorter when the supervisor stopped it, shortest when it flooded.
FINAL_DRAIN_S = 60.0
FINAL_DRAIN_STOPPED_S = 10.0  # the supervisor stopped it (deadline, interrupt): the verdict is ours
DRAIN_REST_S = 0.005  # between two drain slices of a backlog (materializer.DRAIN_SLICE_S each)
FINAL_DRAIN_FLOODED_S = 2.0
MAX_OUTPUT_BYTES = 256 << 10  # of the sandbox's own stdout/stderr, the tail kept in massgen.log
REMOVE_TIMEOUT_S = 30.0
DISK_CHECK_S = 0.25  # how often a run's disk charge is measured (a statvfs and a few stats)
MIN_CHILD_DISK_BYTES = 16 << 20  # a nested run given less than this by its parent is refused
KEY_VARS = {
    "openai": ("OPENAI_API_KEY",),
    "gemini": ("GEMINI_API_KEY", "GOOGLE_API_KEY"),
    "claude": ("ANTHROPIC_API_KEY",),
}


@dataclass(frozen=True)
class Limits:
    """The resources a run's sandbox actually got."""

    memory_bytes: int
    nano_cpus: int
    pids: int
    runtime: str


@dataclass(frozen=True)
class RunRequest:
    question: str
    config_source: str  # a path or @examples/NAME
    logs_root: Path
    sandbox: str = "docker"  # "docker" | "none"
    image: str | None = None
    supervisor_id: str = "embedded"
    parent_run_id: str | None = None
    depth: int = 0
    # Test seam: run this instead of the engine (e.g. a process that ignores SIGTERM).
    engine_command: tuple[str, ...] | None = None
    workspaces_root: Path | None = None  # default: <logs_root>/../workspaces
    deadline_cap: float | None = None  # unix time; a child never outlives its parent
    config_text: str | None = None  # a submitted config (nested runs); config_source then only names it
    limits_cap: Limits | None = None  # a nested run's resources: at most its parent's
    config_error: str | None = None  # the client could not read the config: record config_missing


class RunHooks:
    """What the supervisor adds around one run; the default adds nothing."""

    async def context_paths(self, config: RunConfig, source: str) -> list[Path]:
        """Host paths to mount read-only.

        Raises:
            PolicyError: a path is missing or not allowed.
        """
        contexts, problems = _context_paths(config, source)
        if problems:
            raise PolicyError(Reason.PATH_MISSING, str(ConfigError(problems)))
        return contexts

    def check(self, config: RunConfig, source: str) -> None:
        """Raise PolicyError to refuse the run before anything starts."""

    async def start_services(
        self, execution: RunExecution, config: RunConfig, deadline: float
    ) -> tuple[list[Mount], dict[str, str]]:
        """Start per-run services (the run's socket); returns extra mounts and environment."""
        return [], {}

    async def services_ready(self, execution: RunExecution) -> None:
        """Wait until the services started by start_services answer (they may come up late)."""

    async def stop_services(self, execution: RunExecution) -> None: ...

    def admission(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Held while the run's sandbox exists (a concurrency limit queues runs here)."""
        return contextlib.nullcontext()


@dataclass
class RunControl:
    """How a caller steers a running run: interrupt (graceful stop) and force (kill now)."""

    interrupt: asyncio.Event = field(default_factory=asyncio.Event)
    force: asyncio.Event = field(default_factory=asyncio.Event)
    interrupt_reason: str = "interrupted"
    # When the supervisor stops a run for a reason of its own (budget, limits), the verdict to record.
    verdict: Verdict | None = None
    # Set by a supervisor shutting down gracefully: stop following, leave the sandbox running.
    detach: asyncio.Event = field(default_factory=asyncio.Event)


class InterruptedWhileQueued(Exception):
    """Stopped before a slot to start the sandbox was free."""


class Detached(Exception):
    """The supervisor let go of a running sandbox; a restarted supervisor re-adopts it."""


class Listener:
    """Callbacks for a caller that prints progress (the CLI); all optional."""

    def prepared(self, paths: RunPaths, config: RunConfig | None, question: str) -> None: ...

    def config_notes(self, notes: tuple[ConfigProblem, ...]) -> None:
        """The config's warnings and info notes (errors end the run and are in its result)."""

    def event(self, ev: Any) -> None: ...

    def progress(self, message: str) -> None: ...


def _key_problems(config: RunConfig, source: str, sandbox: str) -> list[ConfigProblem]:
    problems = []
    configured: set[str] = set()
    docker = sandbox == "docker" and bool(config.needs_models())
    if docker:
        # The gateway holds the keys: the environment or $MASSGEN_KEYS_FILE.
        from .gateway import upstreams_from_env

        try:
            configured = set(upstreams_from_env())
        except Exception as exc:  # noqa: BLE001 - a broken keys file is a config problem, named
            return [ConfigProblem(os.environ.get("MASSGEN_KEYS_FILE", "<keys file>"), "", None, str(exc))]
    for i, agent in enumerate(config.agents):
        b = agent.backend
        if b.type == "openai":
            # Per agent: the key its upstream's host takes (none for a local server).
            from agent_image.protocol.providers import key_from_env, key_vars

            if docker:
                from .gateway import agent_upstream

                try:
                    found = agent_upstream(b.provider, b.base_url)[0] is not None
                except Exception as exc:  # noqa: BLE001 - a broken keys file, named
                    return [ConfigProblem(os.environ.get("MASSGEN_KEYS_FILE", "<keys file>"), "", None, str(exc))]
            else:
                found = (
                    not key_vars(b.provider, b.base_url) or key_from_env(b.provider, b.base_url, os.environ) is not None
                )
            if not found:
                names = key_vars(b.provider, b.base_url)
                where = f" for {b.base_url}" if b.base_url else ""
                problems.append(
                    ConfigProblem(
                        source,
                        f"agents.{i}.backend.type",
                        None,
                        f"backend {b.provider or b.type!r}{where} needs {' or '.join(names)} in the environment",
                    )
                )
            continue
        names = KEY_VARS.get(b.type, ())
        if b.type in configured:
            continue
        if names and not any(os.environ.get(n) for n in names):
            problems.append(
                ConfigProblem(
                    source,
                    f"agents.{i}.backend.type",
                    None,
                    f"backend {b.type!r} needs {' or '.join(names)} in the environment",
                )
            )
    return problems


def _context_paths(config: RunConfig, source: str) -> tuple[list[Path], list[ConfigProblem]]:
    return check_context_paths(config, source)


def _start_timeout(runtime: Any) -> float:
    """The start timeout of `runtime`'s sandboxes: its own setting where it has one (Kubernetes:
    MASSGEN_K8S_START_TIMEOUT, an image pull may take minutes), else START_TIMEOUT_S."""
    own = getattr(runtime, "start_timeout_for", None)
    return float(own(START_TIMEOUT_S)) if callable(own) else START_TIMEOUT_S


def _container_section(facts: Any) -> ContainerSection:
    return ContainerSection(
        id=facts.id,
        image=facts.image,
        runtime=facts.runtime,
        state=facts.state,
        exit_code=facts.exit_code,
        oom_killed=facts.oom_killed,
        cpu_percent=facts.cpu_percent,
        memory_bytes=facts.memory_bytes,
        pids=facts.pids,
    )


class RunExecution:
    """Executes one run; the owner of its sandbox from start until removal."""

    def __init__(
        self,
        req: RunRequest,
        runtime: Runtime,
        listener: Listener | None = None,
        control: RunControl | None = None,
        hooks: RunHooks | None = None,
    ) -> None:
        self.req = req
        self.runtime = runtime
        self.listener = listener or Listener()
        self.control = control or RunControl()
        self.hooks = hooks or RunHooks()
        self.paths: RunPaths | None = None
        self.mat: Materializer | None = None
        self.config: RunConfig | None = None
        self.deadline: float | None = None
        self.contexts: list[Path] = []
        self.write_copies: dict[Path, Any] = {}  # host path -> writeback.WriteCopy (permission: write)
        self.limits: Limits | None = None
        self.prepared = asyncio.Event()
        # The run's disk budget and charge; a nested run's is a child of its parent's (the
        # supervisor sets parent_execution before the run starts).
        self.disk: DiskAccount | None = None
        self.parent_execution: RunExecution | None = None
        self._disk_job: asyncio.Future[None] | None = None
        self._disk_checked = 0.0
        self._disk_over: str | None = None
        self._spec_json: str | None = None
        self._spec_given = False  # linked: the hub got the spec with its command and started the engine
        # Linked runtimes: the run's channel (docs/channel.md), opened once the sandbox runs.
        self.linked = req.sandbox == "docker" and not shares_filesystem(runtime)
        self.channel: Any = None  # supervisor.channel.ChannelSession
        self._host_socket: Path | None = None

    def _resolve(self) -> tuple[LoadedConfig, str]:
        req = self.req
        if req.config_error is not None:
            raise ConfigError([ConfigProblem(req.config_source, "", None, req.config_error)], Reason.CONFIG_MISSING)
        if req.config_text is not None:
            return parse_config(req.config_text, req.config_source), req.config_source
        return resolve_loaded(req.config_source)

    async def run(self) -> RunResult:
        req = self.req
        workspaces_root = req.workspaces_root or req.logs_root.parent / "workspaces"
        self.paths = paths = create_run_dirs(req.logs_root, workspaces_root)
        self.mat = mat = Materializer(paths)
        mat.accept_model_calls = req.sandbox == "none"
        mat.set_run(
            state=RunState.STARTING,
            sandbox=req.sandbox,
            parent_run_id=req.parent_run_id,
            depth=req.depth,
            supervisor_id=req.supervisor_id,
            supervisor_pid=os.getpid(),
        )
        mat.status.meta.question = req.question
        mat.log(f"run {paths.run_id} prepared: sandbox={req.sandbox} config={req.config_source}")
        try:
            try:
                # Parsing untrusted YAML (a nested run's config) must not stall the event loop.
                loaded, source = await asyncio.to_thread(self._resolve)
            except ConfigError as exc:
                self.prepared.set()
                self.listener.prepared(paths, None, req.question)
                for p in exc.problems:
                    mat.log(f"config error: {p}", "error")
                mat.set_config_notes(exc.notes)
                self.listener.config_notes(exc.notes)
                return self._end(Verdict(Reason(exc.reason), str(exc)))
            config, raw = loaded.config, loaded.data
            self.config = config
            mat.set_config_notes(loaded.notes)
            self.prepared.set()
            self.listener.prepared(paths, config, req.question)
            self.listener.config_notes(loaded.notes)
            # Writes with fsync go to a thread: a disk busy with another run's flood must not
            # stall the event loop (the daemon's, shared by every run and client).
            await asyncio.to_thread(atomic_write, paths.config, dump_config(raw))
            try:
                self.hooks.check(config, source)
                contexts = self.contexts = await self.hooks.context_paths(config, source)
            except PolicyError as exc:
                mat.log(f"refused: {exc}", "error")
                return self._end(Verdict(Reason(exc.reason), exc.detail))
            raw, tool_problems = resolve_custom_tools(config, raw, contexts, source)
            if tool_problems:
                return self._end(Verdict(Reason.CONFIG_INVALID, str(ConfigError(tool_problems))))
            key_problems = _key_problems(config, source, req.sandbox)
            if key_problems:
                return self._end(Verdict(Reason.KEY_MISSING, str(ConfigError(key_problems))))
            try:
                unpriced = price_problems(config, source)
            except ValueError as exc:  # a broken MASSGEN_PRICING_FILE: named
                unpriced = [ConfigProblem(os.environ.get("MASSGEN_PRICING_FILE", "<pricing file>"), "", None, str(exc))]
            if unpriced:
                for p in unpriced:
                    mat.log(f"config error: {p}", "error")
                return self._end(Verdict(Reason.PRICE_MISSING, str(ConfigError(unpriced))))
            refused = self._prepare_writes(config, contexts)
            if refused is not None:
                return self._end(refused)
            return await self._execute(config, raw, contexts)
        except Detached:
            mat.log("supervisor detached; the sandbox keeps running and will be re-adopted", "warning")
            mat.write_status(force=True)
            raise
        except asyncio.CancelledError:
            self._end(Verdict(Reason.INTERRUPTED, "cancelled before the run finished"))
            raise
        except Exception as exc:
            # Every exit path ends in result.json, our own bugs included.
            log.exception("run_id=%s supervisor error", paths.run_id)
            mat.log(f"supervisor error: {type(exc).__name__}: {exc}", "error")
            return self._end(Verdict(Reason.SUPERVISOR_ERROR, f"{type(exc).__name__}: {exc}"[:500]))
        finally:
            mat.close()

    def _prepare_writes(self, config: RunConfig, contexts: list[Path]) -> Verdict | None:
        """Private copies of the `permission: write` folders (Docker runs only); a refusal verdict, or None."""
        from .errors import SnapshotError
        from .writeback import prepare

        paths, mat = self.paths, self.mat
        assert paths is not None and mat is not None
        for i, cp in enumerate(config.orchestrator.context_paths):
            if cp.permission != "write" or i >= len(contexts):
                continue
            host = contexts[i]
            if self.req.sandbox != "docker":
                mat.log(f"context path {host}: permission: write needs the docker sandbox; read-only here", "warning")
                continue
            copy = paths.workspace.parent / f"{paths.run_id}.context" / str(i)
            uid = SANDBOX_UID if os.getuid() == 0 else None
            try:
                self.write_copies[host] = prepare(host, copy, i, cp.protected_paths, uid)
            except (SnapshotError, OSError) as exc:
                return Verdict(Reason.CONFIG_INVALID, f"orchestrator.context_paths.{i}: cannot copy {host}: {exc}")
            mat.log(f"context path {host}: permission write: the run writes a private copy ({copy})")
        return None

    def _keep_results(self, verdict: Verdict) -> None:
        """With a winner: its workspace in final/<winner>/workspace/, and the change set of each
        writable context path in final/<winner>/context/<n>/ (applied to the host on exit 0 only)."""
        from .errors import SnapshotError
        from .snapshot import snapshot_dir
        from .writeback import DEFAULT_MAX_BYTES, discard, record_and_apply

        paths, mat = self.paths, self.mat
        assert paths is not None and mat is not None
        winner = mat.status.results.winner
        try:
            if winner and (paths.workspace / winner).is_dir():
                final = paths.log_dir / "final" / winner
                try:
                    snapshot_dir(paths.workspace, winner, final / "workspace")
                except (SnapshotError, OSError) as exc:
                    mat.log(f"winner's workspace not kept in final/{winner}/workspace: {exc}", "warning")
            for wc in self.write_copies.values():
                if not winner:
                    continue
                apply = verdict.exit_code == 0
                try:
                    dest = paths.log_dir / "final" / winner / "context" / str(wc.index)
                    limit = self.disk.budget.bytes if self.disk is not None else DEFAULT_MAX_BYTES
                    doc = record_and_apply(wc, dest, apply, max_bytes=limit)
                except OSError as exc:
                    mat.log(f"context path {wc.host}: change set not recorded: {exc}", "error")
                    continue
                n = len(doc["added"]) + len(doc["changed"]) + len(doc["deleted"])
                what = f"applied {len(doc['applied'])}" if apply else "not applied (the run did not exit 0)"
                mat.log(f"context path {wc.host}: {n} change(s), {what}; refused {len(doc['refused'])}")
                for r in doc["refused"]:
                    mat.log(f"context path {wc.host}: refused {r['path']}: {r['why']}", "warning")
        finally:
            for wc in self.write_copies.values():
                discard(wc)

    def _end(self, verdict: Verdict, container_exit: int | None = None) -> RunResult:
        assert self.mat is not None
        return self.mat.finalize(verdict, container_exit=container_exit)

    def _sandbox_spec(
        self, config: RunConfig, raw: dict[str, Any], contexts: list[Path], deadline: float
    ) -> SandboxSpec:
        req, paths = self.req, self.paths
        assert paths is not None
        labels = {
            LABEL_OWNER: "1",
            LABEL_SUPERVISOR: req.supervisor_id,
            LABEL_RUN: paths.run_id,
            LABEL_PARENT: req.parent_run_id or "",
            LABEL_DEADLINE: f"{deadline:.3f}",
            LABEL_LOG_DIR: str(paths.log_dir),
            LABEL_WORKSPACE: str(paths.workspace),
        }
        sb = config.sandbox
        if req.sandbox == "none":
            spec = RunSpec(
                run_id=paths.run_id,
                question=req.question,
                config=raw,
                outbox=str(paths.sandbox),
                workspace=str(paths.workspace),
                context_paths=[str(p) for p in contexts],
                sandbox="none",
                deadline=deadline,
                parent_run_id=req.parent_run_id,
                depth=req.depth,
            )
            env = dict(os.environ)
            # so that `massgen-run` in the agents' shells is this installation's
            env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
            env["PYTHONPATH"] = os.pathsep.join(
                [str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH", "")]
            ).rstrip(os.pathsep)
            command: tuple[str, ...] = ("-m", "agent_image", "run-spec", str(paths.sandbox / "spec.json"))
            mounts: tuple[Mount, ...] = ()
            workdir = str(paths.workspace)
            user = f"{os.getuid()}:{os.getgid()}"
        else:
            spec = RunSpec(
                run_id=paths.run_id,
                question=req.question,
                config=raw,
                outbox=OUTBOX_IN_SANDBOX,
                workspace=WORKSPACE_IN_SANDBOX,
                context_paths=[str(p) for p in contexts],
                write_context_paths=[str(p) for p in self.write_copies],
                sandbox="docker",
                deadline=deadline,
                parent_run_id=req.parent_run_id,
                depth=req.depth,
            )
            env = {
                "MASSGEN_RUN_ID": paths.run_id,
                "MASSGEN_IN_SANDBOX": "1",
                "HOME": "/tmp",  # noqa: S108 - the sandbox's own private tmpfs
                "PYTHONUNBUFFERED": "1",
                "PYTHONDONTWRITEBYTECODE": "1",
            }
            command = ("python3", "-m", "agent_image", "run-spec", f"{OUTBOX_IN_SANDBOX}/spec.json")
            mounts = (
                Mount(paths.sandbox, OUTBOX_IN_SANDBOX, read_only=False),
                Mount(paths.workspace, WORKSPACE_IN_SANDBOX, read_only=False),
                Mount(paths.children, CHILDREN_IN_SANDBOX, read_only=True),
                # Two entries naming the same folder are one mount (the engine refuses duplicates);
                # permission: write -> the run's private copy, read-write at the same path.
                *(
                    Mount(self.write_copies[p].copy, str(p), read_only=False)
                    if p in self.write_copies
                    else Mount(p, str(p), read_only=True)
                    for p in dict.fromkeys(contexts)
                ),
            )
            workdir = WORKSPACE_IN_SANDBOX
            if self.linked:
                user = f"{SANDBOX_UID}:{SANDBOX_UID}"
            elif os.getuid() == 0:
                user = f"{SANDBOX_UID}:{SANDBOX_UID}"
                for d in (paths.sandbox, paths.workspace):
                    os.chown(d, SANDBOX_UID, SANDBOX_UID)
            else:
                user = f"{os.getuid()}:{os.getgid()}"
        # Written by _write_spec once the run's own filesystem is mounted over sandbox/.
        self._spec_json = spec.model_dump_json()
        if req.engine_command is not None:
            command = req.engine_command
        tmpfs_mounts: tuple[Tmpfs, ...] = ()
        if self.linked:
            # No host path in the sandbox: its folders are tmpfs (the kernel enforces the disk
            # budget), filled and emptied through the channel; the hub runs the engine.
            tmpfs_mounts = self._linked_folders(config, mounts)
            mounts = ()
            hub: tuple[str, ...] = (
                "python3",
                "-m",
                "agent_image.channel.hub",
                "--outbox",
                OUTBOX_IN_SANDBOX,
                "--api-socket",
                f"{API_DIR_IN_SANDBOX}/api.sock",
                "--link-socket",
                f"{HUB_DIR_IN_SANDBOX}/link.sock",
                "--deadline",
                f"{deadline:.3f}",
                "--grace",
                f"{sb.stop_grace_seconds:g}",
            )
            if not contexts and len(self._spec_json) <= SPEC_ON_COMMAND_LINE_BYTES:
                # Nothing to put in but the spec: the hub gets it with its command and starts the
                # engine at once, so the engine's start-up overlaps the link's (~0.2 s a run).
                command = (*hub, "--spec-b64", base64.b64encode(self._spec_json.encode()).decode(), "--", *command)
                self._spec_given = True
            else:
                command = (*hub, "--", *command)
        limits = Limits(sb.memory_bytes, int(sb.cpus * 1e9), sb.pids, sb.runtime)
        if req.limits_cap is not None:
            # A nested run's config is written by an agent: never more than its parent got.
            cap = req.limits_cap
            limits = Limits(
                min(limits.memory_bytes, cap.memory_bytes),
                min(limits.nano_cpus, cap.nano_cpus),
                min(limits.pids, cap.pids),
                "runsc" if cap.runtime == "runsc" else limits.runtime,
            )
        self.limits = limits
        return SandboxSpec(
            run_id=paths.run_id,
            image=self.image(config),
            command=command,
            mounts=mounts,
            env=env,
            labels=labels,
            workdir=workdir,
            user=user,
            memory_bytes=limits.memory_bytes,
            nano_cpus=limits.nano_cpus,
            pids_limit=limits.pids,
            network=sb.network,
            runtime=limits.runtime,
            tmpfs_mounts=tmpfs_mounts,
        )

    def _linked_folders(self, config: RunConfig, mounts: tuple[Mount, ...]) -> tuple[Tmpfs, ...]:
        """The tmpfs folders of a linked sandbox: one per folder a shared-filesystem run mounts."""
        sb = config.sandbox
        budget, inodes = sb.disk_bytes, sb.disk_inode_count
        if self.disk is not None:
            budget, inodes = self.disk.budget.bytes, self.disk.budget.inodes
        folders = [
            Tmpfs(OUTBOX_IN_SANDBOX, MAX_OUTBOX_BYTES + (16 << 20), 4096),
            Tmpfs(WORKSPACE_IN_SANDBOX, budget, inodes),
            Tmpfs(CHILDREN_IN_SANDBOX, budget, inodes),
            Tmpfs(API_DIR_IN_SANDBOX, 1 << 20, 64),
            Tmpfs(HUB_DIR_IN_SANDBOX, 1 << 20, 64),
        ]
        taken = {f.target for f in folders}
        for m in mounts:
            if m.target in taken:
                continue
            # A context folder: its copy, plus room for what the run may write into it.
            size, count = _tree_size(m.source)
            extra = budget if not m.read_only else 1 << 20
            folders.append(Tmpfs(m.target, size + extra, count + 1024))
            taken.add(m.target)
        return tuple(folders)

    def image(self, config: RunConfig) -> str:
        """The run's image: the config's `sandbox.image` (tools baked in), else the supervisor's."""
        return config.sandbox.image or self.req.image or ""

    async def _image_problem(self, image: str) -> str | None:
        # Only runtimes with images (Docker) can tell; a missing image is ImageMissing at start.
        labels_of = getattr(self.runtime, "image_labels", None)
        if self.req.sandbox != "docker" or labels_of is None or not image:
            return None
        labels = await asyncio.to_thread(labels_of, image)
        return engine_image_problem(labels, image, self.req.image)

    async def _execute(self, config: RunConfig, raw: dict[str, Any], contexts: list[Path]) -> RunResult:
        paths, mat = self.paths, self.mat
        assert paths is not None and mat is not None
        grace = config.sandbox.stop_grace_seconds
        detached = False
        try:
            try:
                async with self.hooks.admission():
                    # The clock starts when the run may start: time spent queued is not its time.
                    deadline = time.time() + config.effective_timeout()
                    if self.req.deadline_cap is not None:
                        deadline = min(deadline, self.req.deadline_cap)
                    self.deadline = deadline
                    refused = self._disk_account(config)
                    if refused is not None:
                        return self._end(Verdict(Reason.DISK_QUOTA_EXCEEDED, refused))
                    # Formatting and mounting the run's filesystem (~30 ms) overlaps the services'
                    # start, the status write and the image check.
                    disk_job = asyncio.ensure_future(asyncio.to_thread(self._create_disk))
                    try:
                        extra_mounts, extra_env = await self.hooks.start_services(self, config, deadline)
                        if self.linked:
                            # The channel reaches the run's socket on the host; the sandbox gets
                            # the hub's socket at the same path instead of a mount.
                            self._host_socket = next(
                                (m.source / "api.sock" for m in extra_mounts if m.target == API_DIR_IN_SANDBOX), None
                            )
                            extra_mounts = []
                        spec = self._sandbox_spec(config, raw, contexts, deadline)
                        spec = replace(spec, mounts=(*spec.mounts, *extra_mounts), env={**spec.env, **extra_env})
                        mat.set_run(deadline=deadline)
                        await mat.write_status_async(force=True)
                        problem = await self._image_problem(spec.image)
                    finally:
                        await asyncio.shield(disk_job)
                    if problem:
                        return self._end(Verdict(Reason.IMAGE_INVALID, problem))
                    self._write_spec()
                    try:
                        handle = await self._start_sandbox(spec)
                    except ImageMissing as exc:
                        return self._end(Verdict(Reason.IMAGE_MISSING, str(exc)))
                    except SandboxStartFailed as exc:
                        if self.control.interrupt.is_set():
                            why = self.control.interrupt_reason
                            return self._end(Verdict(Reason.INTERRUPTED, f"{why} while the sandbox was starting"))
                        failed = Reason.START_FAILED if self.linked else Reason.CONTAINER_CRASHED
                        return self._end(Verdict(failed, str(exc)))
                    except ContainerRuntimeError as exc:
                        return self._end(Verdict(Reason.CONTAINER_CRASHED, str(exc)))
                    if self.linked:
                        problem = await self._link_up(handle, spec, new=True)
                        if problem is not None:
                            await asyncio.shield(self._remove(handle))
                            await self._close_channel()
                            return self._end(Verdict(Reason.START_FAILED, problem))
                    try:
                        await self.hooks.services_ready(self)
                    except Exception as exc:
                        log.exception("run_id=%s the run's socket did not come up", paths.run_id)
                        mat.log(f"the run's socket did not come up ({exc}); nested runs and models fail", "error")
                    return await self._follow_and_remove(handle, deadline, grace)
            except InterruptedWhileQueued:
                reason = self.control.interrupt_reason
                return self._end(Verdict(Reason.INTERRUPTED, f"{reason} while queued"))
        except Detached:
            detached = True
            raise
        finally:
            if not detached:
                # Every other way out (no sandbox started, our own error, a cancellation): no
                # sandbox writes the folders any more, so they are given back (once; usually
                # the follower already did).
                await asyncio.shield(self._release_disk())
            await asyncio.shield(self.hooks.stop_services(self))

    async def _start_sandbox(self, spec: SandboxSpec) -> SandboxHandle:
        """`runtime.start` on a thread. A runtime whose start may wait long (a Kubernetes pod
        pulling its image) has `cancel_start`: an interrupt meanwhile cancels it (the start then
        raises SandboxStartFailed, after removing what it created)."""
        start = asyncio.ensure_future(asyncio.to_thread(self.runtime.start, spec))
        cancel = getattr(self.runtime, "cancel_start", None)
        if cancel is None:
            return await start
        interrupted = asyncio.ensure_future(self.control.interrupt.wait())
        try:
            await asyncio.wait([start, interrupted], return_when=asyncio.FIRST_COMPLETED)
        finally:
            interrupted.cancel()
        if not start.done():
            cancel(spec.run_id)
        handle: SandboxHandle = await start
        return handle

    def _write_spec(self) -> None:
        paths = self.paths
        assert paths is not None and self._spec_json is not None
        atomic_write(paths.sandbox / "spec.json", self._spec_json)
        if os.getuid() == 0 and self.req.sandbox == "docker":
            os.chown(paths.sandbox / "spec.json", SANDBOX_UID, SANDBOX_UID)

    # -- the disk budget ------------------------------------------------------------------------

    @property
    def disk_parent(self) -> DiskAccount | None:
        return self.parent_execution.disk if self.parent_execution is not None else None

    def _disk_account(self, config: RunConfig) -> str | None:
        """Set up the run's disk budget (capped by its parent's remaining); why it is refused, or None."""
        paths, mat = self.paths, self.mat
        assert paths is not None and mat is not None
        if self.req.sandbox == "none":
            return None  # no sandbox, no boundary to enforce (like memory and pids)
        if disk_quota_disabled():
            mat.log("disk budget off (MASSGEN_DISK_QUOTA=off): the sandbox can fill the host's disk", "warning")
            return None
        sb = config.sandbox
        budget = DiskUse(sb.disk_bytes, sb.disk_inode_count)
        parent = self.disk_parent
        if parent is not None:
            room = parent.remaining()
            budget = budget.cap(room)
            if budget.bytes < MIN_CHILD_DISK_BYTES or budget.inodes < 256:
                return f"the parent run has {room.describe()} of its disk budget left"
        self.disk = DiskAccount(paths.run_id, budget, parent)
        mat.listeners.append(self.disk.note_event)
        return None

    def _adopt_disk(self) -> None:
        """Re-use the filesystem an adopted run was given (found by its state file)."""
        paths, mat = self.paths, self.mat
        assert paths is not None and mat is not None
        disk = RunDisk.find(paths.run_id, paths.workspace)
        if disk is not None:
            disk.adopt()
        elif self.config is not None:
            sb = self.config.sandbox
            budget = DiskUse(sb.disk_bytes, sb.disk_inode_count)
            disk = RunDisk(paths.run_id, paths.log_dir, paths.workspace, paths.sandbox, budget, Mode.POLL)
            disk.detail = "the adopted run has no filesystem of its own"
        else:
            return
        self.disk = DiskAccount(paths.run_id, disk.budget, self.disk_parent)
        self.disk.disk = disk
        mat.listeners.append(self.disk.note_event)

    def _create_disk(self) -> None:
        acct, paths = self.disk, self.paths
        if acct is None or paths is None:
            return
        if self.linked:
            # The sandbox's folders are tmpfs on the remote side (the kernel enforces the budget
            # there); here only the log dir (and the folders once fetched) is charged, polled.
            disk = RunDisk(paths.run_id, paths.log_dir, paths.workspace, paths.sandbox, acct.budget, Mode.POLL)
            disk.detail = "the sandbox's folders are tmpfs of the budget's size on its engine; the log dir is polled"
            acct.disk = disk
            return
        owner = (SANDBOX_UID, SANDBOX_UID) if os.getuid() == 0 else (os.getuid(), os.getgid())
        acct.disk = RunDisk.create(paths.run_id, paths.log_dir, paths.workspace, paths.sandbox, acct.budget, owner)

    def _note_disk_mode(self) -> None:
        acct, mat = self.disk, self.mat
        if acct is None or acct.disk is None or mat is None:
            return
        disk = acct.disk
        if disk.mode == Mode.MOUNT:
            mat.log(f"disk budget: {acct.budget.describe()} on a filesystem of its own (writes past it: ENOSPC)")
        else:
            mat.log(
                f"disk budget: {acct.budget.describe()}, polled every {WALK_INTERVAL_S:g}s ({disk.detail}); a sandbox"
                f" can exceed it by what it writes in that time",
                "warning",
            )
        self._update_disk_status()

    def _update_disk_status(self) -> None:
        acct, mat = self.disk, self.mat
        if acct is None or mat is None:
            return
        total = acct.total()
        # Not marked dirty: the next coalesced write carries it (at least every 2 s).
        mat.status.disk = DiskSection(
            mode=acct.mode.value,
            detail=acct.disk.detail or None if acct.disk is not None else None,
            budget_bytes=acct.budget.bytes,
            budget_inodes=acct.budget.inodes,
            used_bytes=total.bytes,
            used_inodes=total.inodes,
        )

    def _check_disk(self) -> None:
        """Measure the run's charge in a worker thread; past the budget, stop the run at once."""
        acct, paths, ctl = self.disk, self.paths, self.control
        if acct is None or paths is None:
            return
        job = self._disk_job
        if job is not None:
            if not job.done():
                return
            self._disk_job = None
            if job.exception() is not None:
                log.warning("run_id=%s measuring its disk failed: %s", paths.run_id, job.exception())
            self._update_disk_status()
            detail = acct.over()
            if detail is not None and self._disk_over is None and not ctl.interrupt.is_set():
                self._disk_over = detail
                ctl.verdict = Verdict(Reason.DISK_QUOTA_EXCEEDED, detail)
                ctl.interrupt_reason = Reason.DISK_QUOTA_EXCEEDED.value
                ctl.interrupt.set()
        interval = DISK_CHECK_S if acct.mode == Mode.MOUNT else WALK_INTERVAL_S
        now = time.monotonic()
        if now - self._disk_checked >= interval:
            self._disk_checked = now
            self._disk_job = asyncio.ensure_future(asyncio.to_thread(acct.measure, paths.log_dir))

    async def _release_disk(self, *, teardown: bool = True) -> None:
        """Give the workspace and outbox back as plain folders (after the sandbox exited); once.

        With `teardown=False` the run's filesystem stays mounted, out of sight, for
        `_teardown_disk` to remove while the container is removed.
        """
        acct, paths, mat = self.disk, self.paths, self.mat
        if acct is None or acct.disk is None or paths is None:
            return
        if not acct.released:
            if self._disk_job is not None:
                with contextlib.suppress(Exception):
                    await self._disk_job
                self._disk_job = None
            acct.released = True
            try:
                acct.folders = await asyncio.to_thread(acct.disk.give_back)
            except DiskError as exc:
                acct.torn_down = True  # never unmount what could not be copied back: the image keeps it
                log.error("run_id=%s giving back its folders failed: %s", paths.run_id, exc)
                if mat is not None:
                    mat.log(f"releasing the run's disk failed ({exc}); the next supervisor start retries", "error")
                return
            with contextlib.suppress(OSError):
                await asyncio.to_thread(acct.refresh_logdir, paths.log_dir)
            self._update_disk_status()
        if teardown:
            await self._teardown_disk()

    async def _teardown_disk(self) -> None:
        """Unmount and delete the run's filesystem once its folders were given back."""
        acct, paths = self.disk, self.paths
        if acct is None or acct.disk is None or not acct.released or acct.torn_down or paths is None:
            return
        acct.torn_down = True
        try:
            await asyncio.to_thread(acct.disk.teardown)
        except DiskError as exc:
            log.error("run_id=%s unmounting its disk failed: %s", paths.run_id, exc)

    async def _follow_and_remove(
        self, handle: SandboxHandle, deadline: float, grace: float, offset: int = 0
    ) -> RunResult:
        detached = False
        try:
            return await self._follow(handle, deadline, grace, offset)
        except Detached:
            detached = True
            raise
        finally:
            if not detached:
                # Whoever created (or adopted) the sandbox removes it, whatever happened above.
                await asyncio.shield(asyncio.gather(self._remove(handle), self._teardown_disk()))
            await asyncio.shield(self._close_channel())

    async def adopt(self, paths: RunPaths, handle: SandboxHandle, deadline: float) -> RunResult:
        """Take over a sandbox left running (or exited) by a previous supervisor process.

        Raises:
            Detached: the supervisor is shutting down again.
        """
        self.paths = paths
        self.mat = mat = Materializer(paths, resume=True)
        mat.accept_model_calls = False  # only Docker runs are adopted: the gateway meters them
        self.deadline = deadline
        self.prepared.set()
        grace = 5.0
        try:
            config, _raw = parse_config_text(paths.config.read_text(encoding="utf-8"), str(paths.config))
            self.config = config
            grace = config.sandbox.stop_grace_seconds
        except (OSError, ConfigError) as exc:
            mat.log(f"adopted run has no usable config.yaml ({exc}); stop grace {grace:g}s", "warning")
        mat.log(f"adopted sandbox {handle.id[:12]} (deadline in {deadline - time.time():.1f}s)")
        self._adopt_disk()
        try:
            if self.config is not None:
                # Re-bind the run's socket inside the directory its sandbox has mounted.
                try:
                    await self.hooks.start_services(self, self.config, deadline)
                    await self.hooks.services_ready(self)
                except Exception as exc:
                    log.exception("run_id=%s could not restart the run's socket", paths.run_id)
                    mat.log(f"the run's socket could not be restarted ({exc}); nested runs and models fail", "error")
            if self.linked:
                problem = await self._link_up(handle, None, new=False)
                if problem is not None:
                    mat.log(f"adopted sandbox: {problem}; following it by its engine only", "warning")
            return await self._follow_and_remove(handle, deadline, grace, mat.resume_offset)
        except (Detached, asyncio.CancelledError):
            raise
        except Exception as exc:
            log.exception("run_id=%s supervisor error while following an adopted run", paths.run_id)
            return self._end(Verdict(Reason.SUPERVISOR_ERROR, f"{type(exc).__name__}: {exc}"[:500]))
        finally:
            await asyncio.shield(self.hooks.stop_services(self))
            mat.close()

    async def _remove(self, handle: SandboxHandle) -> None:
        end = time.monotonic() + REMOVE_TIMEOUT_S
        while True:
            try:
                await asyncio.wait_for(asyncio.to_thread(self.runtime.remove, handle), REMOVE_TIMEOUT_S)
                return
            except RuntimeUnavailable as exc:
                # A remote engine behind a cut link: keep trying for a while (then the sandbox's
                # own backstop ends it, and reconciliation reaps it by label).
                if not self.linked or time.monotonic() > end:
                    log.warning("run_id=%s remove failed: %s", self.paths.run_id if self.paths else "?", exc)
                    return
                await asyncio.sleep(1.0)
            except Exception as exc:  # noqa: BLE001 - log and move on; reconciliation reaps by label
                log.warning("run_id=%s remove failed: %s", self.paths.run_id if self.paths else "?", exc)
                return

    async def _follow(self, handle: SandboxHandle, deadline: float, grace: float, offset: int = 0) -> RunResult:
        paths, mat, runtime, ctl = self.paths, self.mat, self.runtime, self.control
        assert paths is not None and mat is not None
        facts = await asyncio.to_thread(runtime.facts, handle)
        # A sandbox created but never started (its supervisor died in between) is not started by
        # anyone: past the start timeout it is a start failure, not a run to follow to its deadline.
        limit = _start_timeout(runtime)
        start_by = time.monotonic() + limit if facts.state == "created" else None
        not_started: str | None = None
        mat.set_container(_container_section(facts))
        mat.set_run(state=RunState.RUNNING)
        verb = "following" if offset else "started"
        mat.log(f"sandbox {verb}: id={facts.id} image={facts.image} runtime={facts.runtime}")
        self._note_disk_mode()
        mat.listeners.append(self.listener.event)
        tailer = OutboxTailer(paths.sandbox / "events.jsonl", offset=offset, max_offset=MAX_OUTBOX_BYTES)
        wake = asyncio.Event()
        watch = OutboxWatch(paths.sandbox, wake)
        if not watch.start():
            mat.log(f"file watching unavailable; polling the outbox every {POLL_S:g}s", "warning")
        exit_task = asyncio.create_task(self._wait_exit_linked(handle) if self.linked else self._wait_exit(handle))
        stop_task: asyncio.Task[None] | None = None
        stop_started = 0.0
        killed_at = 0.0
        killed = False
        stopped_for: str | None = None
        flooded = False
        try:
            while not exit_task.done():
                waits: list[asyncio.Future[Any]] = [exit_task, asyncio.ensure_future(wake.wait())]
                if stop_task is None:
                    # Until we stop the sandbox, an interrupt or a detach must wake us at once;
                    # afterwards they are set for good and would make this loop spin.
                    waits += [asyncio.ensure_future(ctl.interrupt.wait()), asyncio.ensure_future(ctl.detach.wait())]
                    remaining = max(0.0, deadline - time.time())
                else:
                    remaining = POLL_S
                    if not killed:
                        waits.append(asyncio.ensure_future(ctl.force.wait()))
                # Wake for new events, or exactly when a coalesced status write falls due.
                timeout = min(POLL_S, remaining, max(mat.next_write_in(), 0.01))
                await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                for p in waits[1:]:
                    p.cancel()
                wake.clear()
                mat.drain(tailer)
                if tailer.more:
                    # The drain's time slice ran out with a backlog: rest as long as it worked
                    # before the next slice. A flood then takes at most about half of the
                    # process's CPU, and the daemon is idle often enough to be scheduled at
                    # once when a request or another run's timer comes in.
                    await asyncio.sleep(DRAIN_REST_S)
                    wake.set()
                if not watch.on_file and (fd := tailer.fileno()) is not None:
                    watch.watch_file(fd)
                flooded = self._check_outbox(tailer) or flooded
                self._check_disk()
                await mat.write_status_async()
                if ctl.detach.is_set() and stop_task is None:
                    raise Detached()
                if start_by is not None and stop_task is None and time.monotonic() >= start_by:
                    start_by = None
                    if (await asyncio.to_thread(runtime.facts, handle)).state == "created":
                        not_started = f"the sandbox was created but not started within {limit:g}s"
                        mat.log(not_started, "error")
                        ctl.verdict = Verdict(Reason.START_FAILED, not_started)
                        stopped_for = Reason.START_FAILED.value
                        break
                if stop_task is None:
                    if ctl.interrupt.is_set():
                        stopped_for = ctl.interrupt_reason
                    elif time.time() >= deadline:
                        stopped_for = "timeout"
                    if stopped_for is not None:
                        # A flooding sandbox, or one past its disk budget, gets no grace: it would
                        # spend it writing more (its own filesystem is full anyway).
                        stop_grace = 0.0 if flooded or self._disk_over is not None else grace
                        mat.log(f"stopping sandbox: {stopped_for} (grace {stop_grace:g}s)", "warning")
                        stop_started = time.monotonic()
                        if self.linked:
                            stop_task = asyncio.create_task(self._stop_linked(handle, stop_grace))
                        else:
                            stop_task = asyncio.create_task(asyncio.to_thread(runtime.stop, handle, stop_grace))
                elif not killed:
                    stop_failed = stop_task.done() and stop_task.exception() is not None
                    overdue = time.monotonic() - stop_started > grace + STOP_OVERDUE_S
                    if ctl.force.is_set() or stop_failed or overdue:
                        why = "stop failed" if stop_failed else "stop overdue"
                        why = "second signal" if ctl.force.is_set() else why
                        mat.log(f"killing sandbox: {why}", "warning")
                        killed = True
                        killed_at = time.monotonic()
                        with contextlib.suppress(Exception):
                            await asyncio.to_thread(runtime.kill, handle)
                    elif self.linked and killed and time.monotonic() - killed_at > UNREACHABLE_GIVE_UP_S:
                        # The engine cannot be reached (a cut link): the verdict is ours anyway;
                        # the sandbox's own backstop ends it, and removal is retried below.
                        mat.log("the sandbox's engine is unreachable; giving the sandbox up", "error")
                        exit_task.cancel()
                        break
            if exit_task.done() and not exit_task.cancelled():
                info = exit_task.result()
            else:
                info = ExitInfo(-1, error=not_started or "engine unreachable")
        finally:
            watch.close()
            if not exit_task.done():
                exit_task.cancel()
        if stop_task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(stop_task, grace + STOP_OVERDUE_S)
        # The sandbox may have flooded the outbox and exited before we got there.
        if self._check_outbox(tailer) and stopped_for is None:
            flooded, stopped_for = True, Reason.LIMIT_EXCEEDED.value
        if self._disk_over is None:
            # (past its disk budget, what is left would only add to a log dir already over it)
            budget_s = FINAL_DRAIN_S if stopped_for is None else FINAL_DRAIN_STOPPED_S
            await self._final_drain(tailer, FINAL_DRAIN_FLOODED_S if flooded else budget_s)
        tailer.close()
        disk_full_at_exit = await self._disk_at_exit()
        # The sandbox has exited: nothing writes its folders any more; give them back before
        # result.json says the run is over (the filesystem goes while the container is removed).
        await self._release_disk(teardown=False)
        try:
            output = await asyncio.to_thread(runtime.logs, handle)
        except RuntimeUnavailable as exc:
            output = b""
            mat.log(f"the sandbox's output is not available: {exc}", "warning")
        if output.strip():
            text = output[-MAX_OUTPUT_BYTES:].decode("utf-8", "replace").rstrip()
            cut = f" (the last {MAX_OUTPUT_BYTES >> 10} KiB)" if len(output) > MAX_OUTPUT_BYTES else ""
            mat.log(f"---- sandbox output{cut} ----\n{text}\n---- end of sandbox output ----")
        try:
            facts = await asyncio.to_thread(runtime.facts, handle)
        except RuntimeUnavailable:
            facts = SandboxFacts(id=handle.id, image="", runtime=runtime.name, state="unknown")
        mat.set_container(_container_section(facts))
        verdict = self._verdict(info, facts, stopped_for, disk_full_at_exit)
        await asyncio.to_thread(self._keep_results, verdict)
        return await mat.finalize_async(verdict, container_exit=info.exit_code)

    # -- linked runtimes: the run channel (docs/channel.md) -----------------------------------

    async def _link_up(self, handle: SandboxHandle, spec: SandboxSpec | None, *, new: bool) -> str | None:
        """Open the run's channel; for a new sandbox put its files in and START the engine.

        Returns why the sandbox cannot be used, or None.
        """
        from .channel import ChannelLost, ChannelSession, TransferError

        paths, mat = self.paths, self.mat
        assert paths is not None and mat is not None
        if self._host_socket is None:
            from .sockets import SOCKET_NAME, short_socket_dir

            self._host_socket = short_socket_dir(paths.run_id) / SOCKET_NAME
        link_runtime: Any = self.runtime

        def note(msg: str, level: str, *, sandbox: bool = False) -> None:
            mat.log(msg, level, sandbox=sandbox)

        self.channel = channel = ChannelSession(
            paths.run_id,
            lambda: link_runtime.open_link(handle, LINK_ARGV),
            paths.sandbox / "events.jsonl",
            self._host_socket,
            note=note,
            max_mirror_bytes=MAX_OUTBOX_BYTES + (1 << 20),
        )
        channel.start()
        started = time.monotonic()
        # A sandbox that is gone already (its hub failed, or found its deadline passed) is not
        # dialled until the start timeout: its exit ends the wait.
        ended = asyncio.create_task(self._exited_before_link(handle))
        try:
            link = asyncio.ensure_future(channel.wait_connected(spec.start_timeout if spec is not None else LINK_UP_S))
            await asyncio.wait([link, ended], return_when=asyncio.FIRST_COMPLETED)
            if not link.done():
                link.cancel()
                return f"the sandbox exited ({ended.result()}) before its run channel came up"
            link.result()
        except ChannelLost as exc:
            return f"the run channel did not come up: {exc}"
        finally:
            ended.cancel()
        if not new:
            state = (channel.welcome or {}).get("state")
            mat.log(f"run channel re-linked (engine {state}; the supervisor holds {channel.have} outbox bytes)")
            if state != "waiting":
                return None
        if self._spec_given:
            mat.log(f"run channel up in {time.monotonic() - started:.2f}s; the hub started the engine with its spec")
            return None
        try:
            assert self._spec_json is not None or not new
            spec_json = self._spec_json or (paths.sandbox / "spec.json").read_text(encoding="utf-8")
            await channel.put_tree(OUTBOX_IN_SANDBOX, files={"spec.json": spec_json.encode()})
            for host in dict.fromkeys(self.contexts):
                wc = self.write_copies.get(host)
                source = wc.copy if wc is not None else host
                await channel.put_tree(str(host), source=source, read_only=wc is None)
            channel.start_engine()
        except (ChannelLost, TransferError, OSError) as exc:
            return f"the sandbox's files could not be put in: {exc}"
        mat.log(f"run channel up in {time.monotonic() - started:.2f}s; files in; engine started")
        return None

    async def _exited_before_link(self, handle: SandboxHandle) -> int:
        """The sandbox's exit code once it has ended (never returns while it runs)."""
        while True:
            try:
                info = await asyncio.to_thread(self.runtime.wait, handle, 1.0)
            except ContainerRuntimeError:  # unreachable or refused: the link's own timeout decides
                info = None
            if info is not None:
                return int(info.exit_code)
            await asyncio.sleep(0.5)

    async def _close_channel(self) -> None:
        if self.channel is not None:
            channel, self.channel = self.channel, None
            await channel.close()

    async def _wait_exit_linked(self, handle: SandboxHandle) -> ExitInfo:
        """The sandbox's end, for a linked runtime: the engine's EXIT over the channel (then the
        outbox's last bytes, the workspace and BYE), or the container's own end, whichever first."""
        channel, mat = self.channel, self.mat
        assert mat is not None

        async def container() -> ExitInfo:
            while True:
                try:
                    info = await asyncio.to_thread(self.runtime.wait, handle, 2.0)
                except RuntimeUnavailable:
                    await asyncio.sleep(1.0)  # a cut link: the engine answers again once it is back
                    continue
                if info is not None:
                    return info

        ended = asyncio.create_task(container())
        if channel is None:
            return await ended
        engine = asyncio.ensure_future(channel.exited.wait())
        try:
            await asyncio.wait([ended, engine], return_when=asyncio.FIRST_COMPLETED)
        finally:
            engine.cancel()
        if ended.done():
            return ended.result()
        code = (channel.exit or {}).get("exit_code")
        want = channel.outbox_size_at_exit
        if want is None:
            want = (channel.welcome or {}).get("outbox_size") or channel.have
        if not await channel.wait_events(int(want), EXIT_EVENTS_S):
            mat.log(f"the outbox's last bytes did not arrive ({channel.have} of {want})", "warning")
        await self._fetch_outputs()
        channel.bye()
        try:
            return await asyncio.wait_for(ended, EXIT_EVENTS_S)
        except TimeoutError:
            pass
        # The EXIT is the sandbox's word (an agent can answer the link itself, docs/channel.md
        # "Trust"): a hub that said its engine exited then exits after BYE; a container still
        # running is killed, and its own end decides.
        mat.log(f"the sandbox did not end after BYE (its channel said exit {code!r}); killing it", "warning")
        with contextlib.suppress(RuntimeUnavailable):
            await asyncio.to_thread(self.runtime.kill, handle)
        try:
            return await asyncio.wait_for(ended, EXIT_EVENTS_S)
        except TimeoutError:
            return ExitInfo(-1, error="the sandbox's end could not be seen after BYE")

    async def _fetch_outputs(self) -> None:
        """Bring the workspace (and writable context folders) back from a linked sandbox."""
        from .channel import ChannelLost, TransferError

        channel, paths, mat = self.channel, self.paths, self.mat
        assert channel is not None and paths is not None and mat is not None
        cap = self.disk.budget.bytes * 2 if self.disk is not None else 4 << 30
        wanted: list[tuple[str, Path]] = [(WORKSPACE_IN_SANDBOX, paths.workspace)]
        for host, wc in self.write_copies.items():
            wanted.append((str(host), wc.copy))
        for where, dest in wanted:
            try:
                if dest != paths.workspace:
                    await asyncio.to_thread(_empty_dir, dest)  # the sandbox's copy replaces ours
                got = await asyncio.wait_for(channel.get_tree(where, dest, cap), FETCH_S)
                mat.log(f"fetched {where} from the sandbox ({got} bytes)")
            except (ChannelLost, TransferError, OSError, TimeoutError) as exc:
                mat.log(f"{where} not fetched from the sandbox: {exc}", "error")

    async def _stop_linked(self, handle: SandboxHandle, grace: float) -> None:
        """SIGTERM to the engine through the channel, SIGKILL after `grace` (the hub survives
        both, so events and the workspace still come back); the engine's stop without a link."""
        import signal as _signal

        channel = self.channel
        if channel is None or not channel.signal(_signal.SIGTERM):
            await asyncio.to_thread(self.runtime.stop, handle, grace)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(channel.exited.wait(), grace)
            return
        if channel.signal(_signal.SIGKILL):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(channel.exited.wait(), 2.0)
                return
        await asyncio.to_thread(self.runtime.kill, handle)

    async def _final_drain(self, tailer: OutboxTailer, budget_s: float) -> None:
        """What the sandbox wrote before it exited, in slices that yield, for at most `budget_s`."""
        mat = self.mat
        assert mat is not None
        end = time.monotonic() + budget_s
        while True:
            mat.drain(tailer)
            if not tailer.more:
                return
            if time.monotonic() >= end:
                mat.log(
                    f"outbox not read past byte {tailer.offset} of {tailer.size()}: {budget_s:g}s spent draining",
                    "warning",
                )
                return
            await asyncio.sleep(0)

    def _check_outbox(self, tailer: OutboxTailer) -> bool:
        """A sandbox flooding its outbox is stopped before it costs the host its disk or its CPU.

        Measured by the file's size (one fstat), not by how far the follower has read: a flood
        is caught as it happens, however far behind the follower is.
        """
        ctl, mat = self.control, self.mat
        assert mat is not None
        if ctl.verdict is not None and ctl.verdict.reason == Reason.LIMIT_EXCEEDED:
            return True
        size = tailer.size()
        if size > MAX_OUTBOX_BYTES:
            detail = f"the sandbox wrote more than {MAX_OUTBOX_BYTES >> 20} MiB of events ({size} bytes)"
        elif mat.ignored_lines > MAX_IGNORED_LINES:
            detail = f"the sandbox wrote more than {MAX_IGNORED_LINES} lines that are not acceptable events"
        else:
            return False
        if ctl.interrupt.is_set():
            return False  # already stopping for another reason: that verdict stands
        mat.log(f"outbox flood: {detail}", "error")
        ctl.verdict = Verdict(Reason.LIMIT_EXCEEDED, detail)
        ctl.interrupt_reason = Reason.LIMIT_EXCEEDED.value
        ctl.interrupt.set()
        return True

    async def _disk_at_exit(self) -> str | None:
        """Measure once more when the sandbox exits; why it is past its budget, or None."""
        acct, paths = self.disk, self.paths
        if acct is None or paths is None or acct.released:
            return None
        if self._disk_job is not None:
            with contextlib.suppress(Exception):
                await self._disk_job
            self._disk_job = None
        try:
            await asyncio.to_thread(acct.measure, paths.log_dir)
        except OSError as exc:
            log.warning("run_id=%s measuring its disk failed: %s", paths.run_id, exc)
            return None
        return acct.over()

    async def _wait_exit(self, handle: SandboxHandle) -> Any:
        while True:
            # Short waits so a detaching supervisor is not held up by a blocked thread.
            info = await asyncio.to_thread(self.runtime.wait, handle, 2.0)
            if info is not None:
                return info

    def _verdict(self, info: Any, facts: Any, stopped_for: str | None, disk_over: str | None = None) -> Verdict:
        """What the supervisor knows, handed to the one place that decides (supervisor/verdict.py)."""
        mat = self.mat
        assert mat is not None
        own: Verdict | None = None
        if stopped_for == "timeout":
            own = Verdict(Reason.TIMEOUT, "deadline passed; sandbox stopped by the supervisor")
        elif stopped_for is not None:
            own = self.control.verdict or Verdict(Reason.INTERRUPTED, f"stopped: {stopped_for}")
        elif disk_over is not None:
            # The sandbox hit its disk budget and ended before the supervisor stopped it (the
            # engine itself may have died of ENOSPC): the budget is the cause.
            own = Verdict(Reason.DISK_QUOTA_EXCEEDED, disk_over)
        elif getattr(info, "reason", None):
            # The runtime established it (a Job past its deadline, an evicted pod): a fact.
            own = Verdict(Reason(info.reason), info.error or info.reason)
        fin = mat.finished_event
        return decide(
            own=own,
            claim=EngineClaim(fin.reason, fin.detail) if fin is not None else None,
            container=ContainerExit(info.exit_code, bool(info.oom_killed or facts.oom_killed)),
            final_answer=mat.final_file is not None and mat.final_file.exists(),
        )


def _tree_size(root: Path) -> tuple[int, int]:
    """Bytes (rounded up to pages) and entries under `root`, not following symlinks."""
    size, count = 0, 0
    for dirpath, _dirnames, filenames in os.walk(root):
        count += 1 + len(filenames)
        for name in filenames:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(dirpath, name))
                size += (st.st_size + 4095) & ~4095
    return size, count


def _empty_dir(path: Path) -> None:
    import shutil

    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()

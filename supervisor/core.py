"""The supervisor: the registry of every run of this process, their tree, submission and adoption.

Both the daemon and the embedded supervisor of `massgen-run` are a `Supervisor`; a run's
identity on its own socket is the `RunRecord` that socket was opened for. What a nested run may
do is decided in `nested.py`; per-run sockets and budgets live in `services.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import posixpath
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent_image.protocol.api import RunInfo
from agent_image.protocol.result import RunResult
from agent_image.protocol.status import ChildEntry, RunState

from .lifecycle import (
    CHILDREN_IN_SANDBOX,
    WORKSPACE_IN_SANDBOX,
    Detached,
    Listener,
    RunControl,
    RunExecution,
    RunHooks,
    RunRequest,
)
from .logdir import RunPaths
from .nested import ChildHooks
from .runtime.base import Runtime

if TYPE_CHECKING:
    from .gateway import ChainMeter

log = logging.getLogger(__name__)

DEFAULT_MAX_TOTAL_CHILDREN = 16
STOP_SUBTREE_REASON = "parent run ended"


def size_thread_pool(loop: asyncio.AbstractEventLoop, workers: int = 128) -> None:
    """Blocking engine calls run in threads, and each live sandbox keeps one waiting on its exit:
    the default pool (cpus + 4) would starve start/stop/remove calls with a few runs alive."""
    from concurrent.futures import ThreadPoolExecutor

    loop.set_default_executor(ThreadPoolExecutor(max_workers=workers, thread_name_prefix="massgen"))


@dataclass
class RunRecord:
    """One run known to this supervisor."""

    execution: RunExecution
    parent: RunRecord | None
    control: RunControl
    task: asyncio.Task[RunResult | None] | None = None
    result: RunResult | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    children: list[RunRecord] = field(default_factory=list)
    delivered: set[str] = field(default_factory=set)  # children copied into a linked sandbox
    socket_dir: Path | None = None
    server: Any = None  # the per-run socket server (supervisor.api.RunSocketServer)
    seq: int = 0  # submission order within this supervisor
    meter: ChainMeter | None = None  # its gateway's budget meter (Docker runs); children charge it too

    @property
    def run_id(self) -> str:
        assert self.execution.paths is not None
        return self.execution.paths.run_id

    @property
    def paths(self) -> RunPaths:
        assert self.execution.paths is not None
        return self.execution.paths

    @property
    def depth(self) -> int:
        return self.execution.req.depth

    @property
    def sandbox(self) -> str:
        return self.execution.req.sandbox

    @property
    def live(self) -> bool:
        return not self.done.is_set()

    def ancestors(self) -> Iterator[RunRecord]:
        node = self.parent
        while node is not None:
            yield node
            node = node.parent

    def descendants(self) -> Iterator[RunRecord]:
        for c in self.children:
            yield c
            yield from c.descendants()

    # -- the run's view of the filesystem (for its children's paths) ---------------------------

    def view_roots(self) -> list[tuple[str, Path]]:
        """(path as this run's sandbox sees it, host path) for everything mounted in it."""
        paths = self.paths
        if self.sandbox == "none":
            roots = [(str(paths.workspace), paths.workspace), (str(paths.children), paths.children)]
        else:
            roots = [(WORKSPACE_IN_SANDBOX, paths.workspace), (CHILDREN_IN_SANDBOX, paths.children)]
        roots += [(str(p), p) for p in self.execution.contexts]
        return roots

    def view_of(self, host_path: Path) -> str:
        """A host path (inside this run's children/) as this run's sandbox sees it."""
        if self.sandbox == "none":
            return str(host_path)
        rel = host_path.relative_to(self.paths.children)
        return posixpath.join(CHILDREN_IN_SANDBOX, rel.as_posix())


class Supervisor:
    """Registry and policy for every run this process supervises."""

    def __init__(
        self,
        runtime: Runtime,
        *,
        supervisor_id: str = "embedded",
        image: str | None = None,
        max_total_children: int = DEFAULT_MAX_TOTAL_CHILDREN,
        services: Callable[[Supervisor, RunRecord], RunHooks] | None = None,
        gateway_available: bool = True,
        default_sandbox: str = "docker",
        max_concurrent: int | None = None,
    ) -> None:
        self.default_sandbox = default_sandbox
        # FIFO admission for top-level runs (nested runs are bounded by the tree limits instead:
        # a child queued behind its own parent's slot would deadlock until the deadline).
        self.slots = asyncio.Semaphore(max_concurrent) if max_concurrent else None
        self.max_concurrent = max_concurrent
        self.runtime = runtime
        self.supervisor_id = supervisor_id
        self.image = image
        self.max_total_children = max_total_children
        self.records: dict[str, RunRecord] = {}
        self._services = services
        self.gateway_available = gateway_available
        self._tasks: set[asyncio.Task[Any]] = set()
        self._seq = 0
        self.logs_roots: set[Path] = set()
        self.on_new_logs_root: Callable[[Path], None] | None = None
        # A budget every run of this supervisor also spends (a ChainMeter): a batch's, so the
        # gateway refuses calls once the whole batch is spent, not just one run.
        self.budget_root: Any = None
        # One 429 backoff per upstream host for all runs (their gateways share it).
        from .gateway.limiter import UpstreamLimiter

        self.upstream_limiter = UpstreamLimiter()

    def note_logs_root(self, root: Path) -> None:
        """Remember a logs root runs were started in (the daemon persists these for reconciliation)."""
        if root not in self.logs_roots:
            self.logs_roots.add(root)
            if self.on_new_logs_root is not None:
                self.on_new_logs_root(root)

    # -- submission -------------------------------------------------------------------------

    async def submit(
        self,
        req: RunRequest,
        *,
        parent: RunRecord | None = None,
        listener: Listener | None = None,
        control: RunControl | None = None,
    ) -> RunRecord:
        """Start a run; returns once its log dir exists and its config is resolved (or failed)."""
        control = control or RunControl()
        execution = RunExecution(req, self.runtime, listener, control)
        self._seq += 1
        record = RunRecord(execution=execution, parent=parent, control=control, seq=self._seq)
        services = self._services(self, record) if self._services is not None else RunHooks()
        if parent is not None:
            hooks = ChildHooks(self, parent, services)
            hooks.record_ref = record
            execution.hooks = hooks
            execution.parent_execution = parent.execution
            parent.children.append(record)
        else:
            execution.hooks = services
        record.task = asyncio.create_task(self._run(record), name="run")
        self._tasks.add(record.task)
        record.task.add_done_callback(self._tasks.discard)
        waiter = asyncio.ensure_future(execution.prepared.wait())
        await asyncio.wait([waiter, record.task], return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if execution.paths is None:  # failed before it had a log dir
            await record.task
        self.records[record.run_id] = record
        self._note_child(record)
        return record

    async def _run(self, record: RunRecord) -> RunResult | None:
        detached = False
        try:
            record.result = await record.execution.run()
            return record.result
        except Detached:
            detached = True
            return None
        finally:
            record.done.set()
            if not detached:
                await self._stop_subtree(record)
                self._note_child(record)

    async def _stop_subtree(self, record: RunRecord) -> None:
        live = [d for d in record.descendants() if d.live]
        for d in live:
            d.control.interrupt_reason = STOP_SUBTREE_REASON
            d.control.interrupt.set()
        if live:
            await asyncio.wait([d.task for d in live if d.task is not None], timeout=60)

    def _note_child(self, record: RunRecord) -> None:
        """Mirror a child's state into its parent's status.json `children`."""
        parent = record.parent
        if parent is None or parent.execution.mat is None or record.execution.paths is None:
            return
        mat = parent.execution.mat
        entry = ChildEntry(run_id=record.run_id, log_dir=parent.view_of(record.paths.log_dir))
        if record.result is not None:
            entry.state = RunState.FINISHED
            entry.exit_code = record.result.exit_code
            entry.reason = record.result.reason
        else:
            entry.state = RunState.RUNNING
        children = [c for c in mat.status.children if c.run_id != entry.run_id]
        mat.status.children = [*children, entry]
        with contextlib.suppress(Exception):
            mat.set_run()
            # Forced: a coalesced write may be skipped, and once the parent has finished (its
            # subtree is stopped after its verdict) no follow loop is left to write it later.
            mat.write_status(force=True)

    # -- queries and control ----------------------------------------------------------------

    def visible_to(self, caller: RunRecord | None) -> list[RunRecord]:
        if caller is None:
            return list(self.records.values())
        return list(caller.descendants())

    def lookup(self, caller: RunRecord | None, run_id: str) -> RunRecord | None:
        rec = self.records.get(run_id)
        if rec is None:
            return None
        if caller is not None and caller not in rec.ancestors():
            return None  # not a descendant: indistinguishable from not existing
        return rec

    def info(self, rec: RunRecord, caller: RunRecord | None) -> RunInfo:
        mat = rec.execution.mat
        st = mat.status if mat is not None else None
        log_dir = rec.paths.log_dir
        view_dir = caller.view_of(log_dir) if caller is not None else str(log_dir)
        cfg = rec.execution.config
        res = rec.result
        return RunInfo(
            run_id=rec.run_id,
            parent_run_id=rec.parent.run_id if rec.parent else None,
            depth=rec.depth,
            state=(res and "finished") or (st.run.state.value if st else "starting"),
            phase=st.coordination.phase.value if st else None,
            exit_code=res.exit_code if res else None,
            reason=res.reason if res else None,
            detail=res.detail if res else None,
            log_dir=view_dir,
            status_file=posixpath.join(view_dir, "status.json"),
            agents=cfg.agent_ids if cfg is not None else None,
            question=rec.execution.req.question,
            elapsed_s=st.meta.elapsed_seconds if st else None,
        )

    def view_path(self, caller: RunRecord | None, host_path: str | None) -> str | None:
        if host_path is None or caller is None:
            return host_path
        return caller.view_of(Path(host_path))

    async def deliver(self, caller: RunRecord | None, rec: RunRecord) -> None:
        """Make a finished child's log dir readable in a linked caller's sandbox (no shared files).

        A sandbox that shares this host's filesystem sees its children's log dirs through its
        read-only `children/` mount; a linked one gets a copy, put in through its run channel at
        the same path, once, before its result is answered.
        """
        channel = getattr(caller.execution, "channel", None) if caller is not None else None
        if caller is None or channel is None or rec.execution.paths is None or rec.run_id in caller.delivered:
            return
        log_dir = rec.execution.paths.log_dir
        try:
            await channel.put_tree(caller.view_of(log_dir), source=log_dir, read_only=True)
            caller.delivered.add(rec.run_id)
        except (OSError, ConnectionError, RuntimeError) as exc:
            log.warning("run_id=%s child %s not delivered to its sandbox: %s", caller.run_id, rec.run_id, exc)

    async def stop(self, rec: RunRecord, reason: str = "interrupted") -> None:
        rec.control.interrupt_reason = reason
        rec.control.interrupt.set()

    async def wait(self, rec: RunRecord, timeout: float | None = None) -> RunResult | None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await rec.done.wait()
        return rec.result

    async def adopt(
        self, execution: RunExecution, paths: RunPaths, handle: Any, deadline: float, parent: RunRecord | None
    ) -> RunRecord:
        """Register a run found running (or exited) after a restart and follow it to its end."""
        self._seq += 1
        record = RunRecord(execution=execution, parent=parent, control=execution.control, seq=self._seq)
        execution.paths = paths
        if parent is not None:
            execution.parent_execution = parent.execution
            parent.children.append(record)
        services = self._services(self, record) if self._services is not None else RunHooks()
        execution.hooks = services
        self.records[paths.run_id] = record

        async def follow() -> RunResult | None:
            try:
                record.result = await execution.adopt(paths, handle, deadline)
                return record.result
            except Detached:
                return None
            finally:
                record.done.set()
                await self._stop_subtree(record)
                self._note_child(record)

        record.task = asyncio.create_task(follow(), name=f"adopted-{paths.run_id}")
        self._tasks.add(record.task)
        record.task.add_done_callback(self._tasks.discard)
        return record

    async def detach_all(self, grace: float = 10) -> None:
        """Graceful daemon shutdown: stop following; sandboxes keep running for the next start."""
        live = [r for r in self.records.values() if r.live]
        for r in live:
            r.control.detach.set()
        tasks = [r.task for r in live if r.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=grace)

    async def shutdown(self, grace: float = 30) -> None:
        """Interrupt every live run and wait for them (bounded)."""
        live = [r for r in self.records.values() if r.live]
        for r in live:
            await self.stop(r, "supervisor shutting down")
        tasks = [r.task for r in live if r.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=grace)

"""Policy for nested runs: what a child may see (only its parent's view), its limits, its context.

A nested run's config is written by an agent: every limit here can be lowered by it for its
subtree but never raised, paths resolve only inside what the parent can see, and anything a
sandbox could write is mounted as a snapshot, never live.
"""

from __future__ import annotations

import asyncio
import os
import posixpath
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from agent_image.protocol.config import RunConfig

from .diskquota import DiskUse
from .errors import PolicyError, SnapshotError
from .lifecycle import WORKSPACE_IN_SANDBOX, RunExecution, RunHooks
from .runtime.base import Mount
from .snapshot import DEFAULT_LIMIT_BYTES, DEFAULT_LIMIT_ENTRIES, SnapshotBudget, snapshot_dir_async
from .sockets import socket_root

if TYPE_CHECKING:
    from .core import RunRecord, Supervisor


def translate_path(record: RunRecord, requested: str) -> Path:
    """Map a path from a run's view to the host path behind it, refusing escapes.

    Raises:
        PolicyError: path_not_allowed when it is not under anything the run can see (after
            resolving `..` and symlinks on the host), path_missing when it does not exist.
    """
    return resolve_view_path(record, requested)[0]


def resolve_view_path(record: RunRecord, requested: str) -> tuple[Path, Path, bool]:
    """(host path, host root it is under, whether a sandbox can write below that root).

    Raises:
        PolicyError: as translate_path.
    """
    if not posixpath.isabs(requested):
        raise PolicyError("path_not_allowed", f"{requested}: child context paths must be absolute")
    norm = posixpath.normpath(requested)
    for view, host in record.view_roots():
        if norm == view or norm.startswith(view.rstrip("/") + "/"):
            rel = posixpath.relpath(norm, view)
            candidate = host / rel if rel != "." else host
            real_root = Path(os.path.realpath(host))
            real = Path(os.path.realpath(candidate))
            if real != real_root and real_root not in real.parents:
                raise PolicyError("path_not_allowed", f"{requested}: resolves outside what this run can see")
            if not real.exists():
                raise PolicyError("path_missing", f"{requested}: does not exist")
            user_context = any(host == p for p in record.execution.contexts)
            # A user's context folder that contains our own trees (e.g. `.`, holding .massgen/)
            # can hold sandbox-writable folders: those are snapshotted like a workspace.
            managed = _managed_roots(record)
            inside_managed = any(real == m or m in real.parents for m in managed)
            return real, real_root, not user_context or inside_managed
    raise PolicyError("path_not_allowed", f"{requested}: not visible to the parent run")


def _managed_roots(record: RunRecord) -> list[Path]:
    top = record
    while top.parent is not None:
        top = top.parent
    roots = [top.execution.req.logs_root, top.paths.workspace.parent, socket_root()]
    return [Path(os.path.realpath(r)) for r in roots]


class ChildHooks(RunHooks):
    """Policy for a nested run: paths only from the parent's view, read-only; limits."""

    def __init__(self, sup: Supervisor, parent: RunRecord, services: RunHooks) -> None:
        self.sup = sup
        self.parent = parent
        self.services = services

    def check(self, config: RunConfig, source: str) -> None:
        parent = self.parent
        pcfg = parent.execution.config
        assert pcfg is not None
        # Depth is counted from the root, and a child's config is written by an agent: every
        # ancestor's max_depth binds, so a nested config can lower the limit but never raise it.
        max_depth = min(
            r.execution.config.sandbox.max_depth
            for r in (parent, *parent.ancestors())
            if r.execution.config is not None
        )
        if parent.depth + 1 > max_depth:
            raise PolicyError("max_depth_exceeded", f"nesting depth {parent.depth + 1} exceeds max_depth={max_depth}")
        me = self.record_ref
        assert me is not None
        # FIFO: only live children submitted before this one count against the limits.
        others = [c for c in parent.children if c.live and c.seq < me.seq]
        # Like depth: an agent-written config may lower the fan-out for its subtree, never raise it.
        max_children = min(
            r.execution.config.sandbox.max_children
            for r in (parent, *parent.ancestors())
            if r.execution.config is not None
        )
        if len(others) >= max_children:
            raise PolicyError(
                "max_children_exceeded", f"{len(others)} live children already; max_children={max_children}"
            )
        root = parent
        while root.parent is not None:
            root = root.parent
        total = sum(1 for d in root.descendants() if d.live and d.seq < me.seq)
        if total >= self.sup.max_total_children:
            raise PolicyError(
                "max_total_children_exceeded",
                f"{total} live nested runs in this tree; limit {self.sup.max_total_children}",
            )
        for i, cp in enumerate(config.orchestrator.context_paths):
            if cp.permission != "read":
                raise PolicyError(
                    "write_not_allowed", f"orchestrator.context_paths.{i}: nested runs get read-only context paths only"
                )
        # The gateway sends the host's real key to the upstream: a child (whose config an agent
        # wrote) may not point it anywhere its parent did not already use.
        parent_urls: dict[str, set[str]] = {}
        for a in pcfg.agents:
            if a.backend.base_url:
                parent_urls.setdefault(a.backend.type, set()).add(a.backend.base_url)
        for i, agent in enumerate(config.agents):
            url = agent.backend.base_url
            if url is not None and url not in parent_urls.get(agent.backend.type, set()):
                raise PolicyError(
                    "base_url_not_allowed",
                    f"agents.{i}.backend.base_url: nested runs may only use their parent's upstream",
                )
        if config.needs_models() and not self.sup.gateway_available:
            raise PolicyError("gateway_unavailable", "model backends need the gateway")

    record_ref: RunRecord | None = None

    async def context_paths(self, config: RunConfig, source: str) -> list[Path]:
        me = self.record_ref
        assert me is not None and me.execution.paths is not None
        out = []
        # One snapshot per distinct source folder, however often a config lists it.
        snapshots: dict[Path, Path] = {}
        for i, cp in enumerate(config.orchestrator.context_paths):
            in_sandbox = self._in_linked_workspace(cp.path)
            if in_sandbox is not None:
                # The parent's workspace is in its sandbox only (no shared filesystem): the
                # snapshot is fetched from there through the parent's run channel.
                dest = me.execution.paths.log_dir / "context" / str(i)
                await self._fetch(cp.path, in_sandbox, dest)
                out.append(dest)
                continue
            real, root, writable = resolve_view_path(self.parent, cp.path)
            if not writable:
                out.append(real)  # a user-given host folder, read-only everywhere: mount it
                continue
            if real in snapshots:
                out.append(snapshots[real])
                continue
            # Below a folder some sandbox can write: mount a snapshot, never the live folder.
            dest = me.execution.paths.log_dir / "context" / str(i)
            await self._snapshot(cp.path, root, real, dest)
            snapshots[real] = dest
            out.append(dest)
        return out

    def _in_linked_workspace(self, requested: str) -> str | None:
        """The sandbox path of `requested` when it is in a linked parent's workspace, else None."""
        if not self.parent.execution.linked or not posixpath.isabs(requested):
            return None
        norm = posixpath.normpath(requested)
        if norm == WORKSPACE_IN_SANDBOX or norm.startswith(WORKSPACE_IN_SANDBOX + "/"):
            return norm
        return None

    def _snapshot_budget(self) -> tuple[SnapshotBudget, DiskUse]:
        account = self.parent.execution.disk
        room = account.remaining() if account is not None else DiskUse(DEFAULT_LIMIT_BYTES, DEFAULT_LIMIT_ENTRIES)
        return SnapshotBudget(min(DEFAULT_LIMIT_BYTES, room.bytes), min(DEFAULT_LIMIT_ENTRIES, room.inodes)), room

    async def _fetch(self, requested: str, path: str, dest: Path) -> None:
        """Copy a folder of a linked parent's sandbox for the child, through the parent's channel.

        The tar is the sandbox's (untrusted): extracted under the data filter's rules, so links
        leaving the copy are left out; everything it can hold is the parent sandbox's own.

        Raises:
            PolicyError: path_missing when the sandbox has no such path, disk_quota_exceeded past
                the parent's budget (or the per-snapshot limit), path_not_allowed otherwise.
        """
        from .channel import ChannelLost, TransferError

        channel = self.parent.execution.channel
        budget, room = self._snapshot_budget()
        failure: PolicyError | None = None
        got = 0
        if channel is None:
            failure = PolicyError("path_not_allowed", f"{requested}: the parent's sandbox cannot be reached")
        else:
            try:
                got = await channel.get_tree(path, dest, budget.limit_bytes, budget.limit_entries)
            except TransferError as exc:
                text = str(exc)
                if "FileNotFoundError" in text:
                    failure = PolicyError("path_missing", f"{requested}: does not exist")
                elif "over max_bytes" in text or "entries" in text:
                    failure = PolicyError(
                        "disk_quota_exceeded",
                        f"{requested}: over {budget.limit_bytes} bytes or {budget.limit_entries} entries"
                        f" (the parent has {room.describe()} left)",
                    )
                else:
                    failure = PolicyError("path_not_allowed", f"{requested}: {text}")
            except (ChannelLost, OSError) as exc:
                failure = PolicyError("path_not_allowed", f"{requested}: cannot fetch it from the parent: {exc}")
        if failure is not None:
            await asyncio.to_thread(shutil.rmtree, dest, True)
            raise failure
        entries = await asyncio.to_thread(lambda: sum(1 for _ in dest.rglob("*")))
        if entries > budget.limit_entries:
            await asyncio.to_thread(shutil.rmtree, dest, True)
            raise PolicyError(
                "disk_quota_exceeded",
                f"{requested}: more than {budget.limit_entries} entries (the parent run has {room.describe()} left)",
            )
        account = self.parent.execution.disk
        if account is not None:
            account.charge_snapshot(DiskUse(got, entries + 1))

    async def _snapshot(self, requested: str, root: Path, real: Path, dest: Path) -> None:
        """Copy a folder for the child, charged to the parent's disk budget (and so its tree's).

        Raises:
            PolicyError: disk_quota_exceeded past the parent's budget, path_not_allowed when the
                folder cannot be copied safely or passes the per-snapshot limits.
        """
        account = self.parent.execution.disk
        room = account.remaining() if account is not None else DiskUse(DEFAULT_LIMIT_BYTES, DEFAULT_LIMIT_ENTRIES)
        budget = SnapshotBudget(min(DEFAULT_LIMIT_BYTES, room.bytes), min(DEFAULT_LIMIT_ENTRIES, room.inodes))
        failure: PolicyError | None = None
        try:
            rel = os.path.relpath(real, root)  # noqa: ASYNC240 - string arithmetic on two absolute paths
            await snapshot_dir_async(root, rel, dest, budget=budget)
        except SnapshotError as exc:
            by_disk = (exc.limit == "bytes" and room.bytes < DEFAULT_LIMIT_BYTES) or (
                exc.limit == "entries" and room.inodes < DEFAULT_LIMIT_ENTRIES
            )
            if by_disk:
                detail = f"{requested}: snapshot {exc}: the parent run has {room.describe()} of its disk budget left"
                failure = PolicyError("disk_quota_exceeded", detail)
            else:
                failure = PolicyError("path_not_allowed", f"{requested}: {exc}")
        except OSError as exc:
            failure = PolicyError("path_not_allowed", f"{requested}: cannot snapshot: {exc.strerror}")
        if failure is not None:
            # A refused child keeps its log dir; a partial copy in it would only use the disk.
            await asyncio.to_thread(shutil.rmtree, dest, True)
            raise failure
        if account is not None:
            account.charge_snapshot(DiskUse(budget.bytes + 4096 * (budget.dirs + 1), budget.entries + 1))

    async def start_services(
        self, execution: RunExecution, config: RunConfig, deadline: float
    ) -> tuple[list[Mount], dict[str, str]]:
        return await self.services.start_services(execution, config, deadline)

    async def services_ready(self, execution: RunExecution) -> None:
        await self.services.services_ready(execution)

    async def stop_services(self, execution: RunExecution) -> None:
        await self.services.stop_services(execution)

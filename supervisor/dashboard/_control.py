"""Stopping a run from the dashboard: through the daemon that owns it, or like `massgen-run stop`."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any, Protocol

from ..logdir import read_json
from ..runrows import RunRow
from ..sockets import daemon_client

__all__ = ["Control", "LocalControl", "StopRefused", "SupervisorControl"]


class StopRefused(Exception):
    """The run cannot be stopped from here; `detail` says why (shown to the operator)."""

    def __init__(self, run_id: str, detail: str, status: int = 409) -> None:
        self.run_id = run_id
        self.detail = detail
        self.status = status
        super().__init__(f"{run_id}: {detail}")


class Control(Protocol):
    def can_stop(self, row: RunRow) -> bool: ...

    async def stop(self, row: RunRow) -> str:
        """Ask the run to stop (it ends with exit 4); returns what was done.

        Raises:
            StopRefused: the run is over or no one here can stop it.
        """
        ...


class SupervisorControl:
    """In the daemon: its own runs' records are right here, stopping one is setting its interrupt.

    Runs in the same logs roots that another `massgen-run` supervises are stopped as
    `massgen-run stop` would (SIGTERM to that process).
    """

    def __init__(self, sup: Any) -> None:
        self.sup = sup
        self._local = LocalControl(use_daemon=False)

    def can_stop(self, row: RunRow) -> bool:
        rec = self.sup.records.get(row.run_id)
        return rec.live if rec is not None else self._local.can_stop(row)

    async def stop(self, row: RunRow) -> str:
        rec = self.sup.lookup(None, row.run_id)
        if rec is None:
            return await self._local.stop(row)
        if not rec.live:
            raise StopRefused(row.run_id, "the run already finished")
        await self.sup.stop(rec, "interrupted from the dashboard")
        return "stopping"


class LocalControl:
    """Standalone: ask the daemon when one answers, else signal the run's own `massgen-run`.

    The same as `massgen-run stop` (supervisor/cli.py): the embedded supervisor treats SIGTERM
    like Ctrl+C, stops the sandbox gracefully and records exit 4.
    """

    def __init__(self, *, use_daemon: bool = True) -> None:
        self.use_daemon = use_daemon

    def can_stop(self, row: RunRow) -> bool:
        return row.live

    async def stop(self, row: RunRow) -> str:
        return await asyncio.to_thread(self._stop, row)

    def _stop(self, row: RunRow) -> str:
        st = read_json(row.log_dir / "status.json") or {}
        run = st.get("run") if isinstance(st.get("run"), dict) else {}
        assert isinstance(run, dict)
        if run.get("state") == "finished":
            raise StopRefused(row.run_id, f"the run already finished (exit {run.get('exit_code')})")
        daemon = daemon_client() if self.use_daemon else None
        if daemon is not None:
            from agent_image.client import ClientError

            try:
                daemon.request("POST", f"/v1/runs/{row.run_id}/stop")
                return "stopping (via the daemon)"
            except ClientError as exc:
                if exc.status != 404:
                    raise StopRefused(row.run_id, f"the daemon refused: {exc}", 502) from exc
            finally:
                daemon.close()
        owner = str(run.get("supervisor_id") or "")
        if owner.startswith("daemon-"):
            # SIGTERM would detach that whole daemon (every run it supervises), not stop this run.
            raise StopRefused(row.run_id, f"the run belongs to daemon {owner}; stop it through that daemon")
        if int(run.get("depth") or 0) > 0:
            # Its supervisor is the whole tree's massgen-run: a signal would stop the top-level run too.
            raise StopRefused(row.run_id, "a nested run without a daemon stops with its top-level run")
        pid = run.get("supervisor_pid")
        if not isinstance(pid, int) or pid <= 1 or pid == os.getpid():
            raise StopRefused(row.run_id, "no supervisor is known for this run")
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError as exc:
            raise StopRefused(row.run_id, f"its supervising process {pid} is gone") from exc
        except PermissionError as exc:
            raise StopRefused(row.run_id, f"not allowed to signal its supervising process {pid}", 403) from exc
        return "stopping"

"""Where a batch's runs execute: the daemon when it answers, else a supervisor embedded in the batch.

Both give the same four things: start a run (a log dir under the item's folder), wait for it
to end, stop it, and re-adopt runs a previous batch process left in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Any

from ..errors import SupervisorError

log = logging.getLogger(__name__)

RESULT_WAIT_S = 30.0
RECONNECT_S = 60.0


class BackendError(SupervisorError):
    """A run could not be submitted or followed; `transient` says whether another attempt may help."""

    def __init__(self, detail: str, *, transient: bool = True) -> None:
        self.detail = detail
        self.transient = transient
        super().__init__(detail)


class RunLost(BackendError):
    """The supervisor following a run is gone and the run has no result.json."""


class EmbeddedBackend:
    """A `Supervisor` in this process, like `massgen-run` without a daemon.

    Its supervisor id is the batch's own (never `embedded`), so the orphan reaper of other
    `massgen-run` processes leaves a killed batch's sandboxes alone and the next batch process
    re-adopts them by label.
    """

    kind = "embedded"

    def __init__(self, runtime: Any, image: str | None, supervisor_id: str) -> None:
        self.runtime = runtime
        self.image = image
        self.supervisor_id = supervisor_id
        self.sup: Any = None

    async def open(self) -> None:
        from ..core import Supervisor, size_thread_pool
        from ..services import SocketServices

        size_thread_pool(asyncio.get_running_loop())
        self.sup = Supervisor(
            self.runtime,
            supervisor_id=self.supervisor_id,
            image=self.image,
            services=SocketServices,
            default_sandbox="docker",
        )

    async def start(self, question: str, config_path: Path, logs_root: Path) -> tuple[str, Path]:
        from ..lifecycle import RunRequest

        req = RunRequest(
            question=question,
            config_source=str(config_path),
            logs_root=logs_root,
            sandbox="docker",
            image=self.image,
            supervisor_id=self.supervisor_id,
        )
        try:
            rec = await self.sup.submit(req)
        except OSError as exc:
            raise BackendError(f"cannot create the run's directories: {exc}") from exc
        return rec.run_id, rec.paths.log_dir

    async def wait(self, run_id: str, log_dir: Path) -> None:
        rec = self.sup.records.get(run_id)
        if rec is None:
            if (log_dir / "result.json").exists():
                return
            raise RunLost(f"run {run_id} is not followed by this batch")
        await rec.done.wait()

    async def stop(self, run_id: str, reason: str, *, force: bool = False) -> None:
        rec = self.sup.records.get(run_id)
        if rec is None:
            return
        rec.control.interrupt_reason = reason
        rec.control.interrupt.set()
        if force:
            rec.control.force.set()

    async def adopt(self, runs_root: Path, item_dirs: list[Path]) -> set[str]:
        """Re-adopt this batch's sandboxes still running; finish those whose container vanished."""
        from ..daemon import reconcile
        from ..runtime.base import LABEL_SUPERVISOR

        # A batch killed between creating a container and starting it leaves one in state
        # `created`: it will never run (and could not be stopped or killed), so following it
        # would wait for its deadline. Removing it makes reconcile record the run lost.
        found = await asyncio.to_thread(self.runtime.list_owned, {LABEL_SUPERVISOR: self.supervisor_id})
        for facts in found:
            if facts.state == "created":
                handle = type("Handle", (), {"id": facts.id})()
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(self.runtime.remove, handle)
        counts = await reconcile(self.sup, self.runtime, runs_root, extra_roots=item_dirs)
        if counts["adopted"] or counts["lost"]:
            log.info("batch reconcile adopted=%d lost=%d", counts["adopted"], counts["lost"])
        return set(self.sup.records)

    async def close(self, grace: float = 30) -> None:
        if self.sup is not None:
            await self.sup.shutdown(grace=grace)


class DaemonBackend:
    """Runs submitted to `massgen-supervisor` over its unix socket; it owns and follows them."""

    kind = "daemon"

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self.session: Any = None

    async def open(self) -> None:
        import aiohttp

        self.session = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=str(self.socket_path), limit=0),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=RESULT_WAIT_S + 30),
        )

    async def _request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        import aiohttp

        try:
            async with self.session.request(method, f"http://daemon{path}", json=body) as resp:
                try:
                    data = await resp.json(content_type=None)
                except ValueError:
                    data = None
                return resp.status, data
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise BackendError(f"the daemon at {self.socket_path} did not answer: {exc}") from exc

    async def start(self, question: str, config_path: Path, logs_root: Path) -> tuple[str, Path]:
        body = {"question": question, "config_path": str(config_path), "logs_root": str(logs_root)}
        status, data = await self._request("POST", "/v1/runs", body)
        if status != 201 or not isinstance(data, dict):
            detail = data.get("detail") if isinstance(data, dict) else None
            raise BackendError(
                f"the daemon refused the run: HTTP {status} {detail or ''}".strip(), transient=status >= 500
            )
        return str(data["run_id"]), Path(data["log_dir"])

    async def wait(self, run_id: str, log_dir: Path) -> None:
        lost_since: float | None = None
        while True:
            if (log_dir / "result.json").exists():
                return
            try:
                status, _data = await self._request("GET", f"/v1/runs/{run_id}/result?wait={RESULT_WAIT_S:g}")
            except BackendError:
                # The daemon restarting re-adopts its runs; give it the CLI's reconnect window.
                lost_since = lost_since or time.monotonic()
                if time.monotonic() - lost_since > RECONNECT_S:
                    raise RunLost(f"the daemon has not answered for {RECONNECT_S:g}s") from None
                await asyncio.sleep(1.0)
                continue
            lost_since = None
            if status == 200:
                return
            if status == 404:
                if (log_dir / "result.json").exists():
                    return
                raise RunLost(f"the daemon does not know run {run_id}")
            if status != 202:
                await asyncio.sleep(1.0)

    async def stop(self, run_id: str, reason: str, *, force: bool = False) -> None:
        # The daemon's stop is graceful (stop grace, then kill): there is no harder stop to ask for.
        with contextlib.suppress(BackendError):
            await self._request("POST", f"/v1/runs/{run_id}/stop")

    async def adopt(self, runs_root: Path, item_dirs: list[Path]) -> set[str]:
        status, data = await self._request("GET", "/v1/runs")
        if status != 200 or not isinstance(data, list):
            return set()
        return {str(r.get("run_id")) for r in data if isinstance(r, dict) and r.get("state") != "finished"}

    async def close(self, grace: float = 30) -> None:
        if self.session is not None:
            await self.session.close()


def daemon_socket() -> Path | None:
    """The daemon's socket when a daemon answers its health check (and MASSGEN_NO_DAEMON is unset)."""
    import os

    if os.environ.get("MASSGEN_NO_DAEMON"):
        return None
    from agent_image.client import ClientError, SupervisorClient

    from ..sockets import default_socket

    sock = default_socket()
    if not sock.exists():
        return None
    client = SupervisorClient(str(sock), timeout=10)
    try:
        client.request("GET", "/v1/health", reconnect=False)
    except ClientError:
        return None
    finally:
        client.close()
    return sock

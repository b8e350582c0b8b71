"""Runs whose supervisor is gone: `finish_lost_run` (the one way to end one), and the reaper.

An embedded supervisor is the `massgen-run` process that started the run; its pid is in the
run's status.json. When that process is gone (SIGKILL, power loss), nobody will ever remove the
container or write the result, so the next `massgen-run` on the host does: by label, never by
name. The daemon's restart scan finishes the runs it lost with `finish_lost_run` too.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from agent_image.protocol.result import Reason

from .diskquota import recover, sweep
from .logdir import RUN_ID_RE, RunPaths, read_status
from .materializer import Materializer
from .runtime.base import LABEL_LOG_DIR, LABEL_RUN, LABEL_SUPERVISOR, LABEL_WORKSPACE
from .verdict import Verdict

log = logging.getLogger(__name__)

EMBEDDED = "embedded"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: not ours to judge
    return True


def finish_lost_run(paths: RunPaths, detail: str) -> bool:
    """End a run nobody supervises any more with the verdict ``supervisor_lost``.

    Returns:
        False when the run already has its result.json (nothing is written then).
    """
    if paths.result.exists():
        return False
    mat = Materializer(paths, resume=True)
    try:
        mat.finalize(Verdict(Reason.SUPERVISOR_LOST, detail))
    finally:
        mat.close()
    return True


def reap_orphans(runtime: Any) -> int:
    """Finish and remove sandboxes whose embedded supervisor process no longer exists.

    Returns:
        How many sandboxes were reaped.
    """
    reaped = 0
    for facts in runtime.list_owned({LABEL_SUPERVISOR: EMBEDDED}):
        labels = facts.labels
        run_id = labels.get(LABEL_RUN, "")
        log_dir = Path(labels.get(LABEL_LOG_DIR, ""))
        if not RUN_ID_RE.fullmatch(run_id) or log_dir.name != run_id:
            continue
        st = read_status(log_dir)
        run = st.get("run") if st is not None else None
        if not isinstance(run, dict):
            continue  # another host's run, or not ours to interpret
        pid = run.get("supervisor_pid")
        if not isinstance(pid, int) or pid <= 0 or _alive(pid):
            continue
        handle = type("Handle", (), {"id": facts.id})()
        try:
            runtime.kill(handle)
            if labels.get(LABEL_WORKSPACE):
                # Killed: nothing writes its folders any more; give them back before result.json.
                recover(run_id, Path(labels[LABEL_WORKSPACE]))
            finish_lost_run(
                RunPaths(run_id, log_dir, Path(labels.get(LABEL_WORKSPACE) or log_dir)),
                f"the massgen-run process (pid {pid}) that supervised this run is gone",
            )
            runtime.remove(handle)
            reaped += 1
            log.warning("reaped orphaned sandbox %s of run %s", facts.id[:12], run_id)
        except Exception:
            log.exception("could not reap sandbox %s", facts.id[:12])
    return reaped


def reap_disks(runtime: Any, workspaces_root: Path, *, reclaim_own: bool = False) -> int:
    """Release run disks under `workspaces_root` left by supervisors that died before their sandbox started.

    Returns:
        How many disks were released.
    """

    def live(run_id: str) -> bool:
        return bool(runtime.list_owned({LABEL_RUN: run_id}))

    try:
        return sweep(workspaces_root, live, reclaim_own=reclaim_own)
    except Exception:
        log.exception("could not sweep the run disks under %s", workspaces_root)
        return 0

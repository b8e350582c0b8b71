"""The daemon's restart scan finishes the runs it lost, and only those (no engine: an empty runtime)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from agent_image.protocol.status import RunState
from supervisor.daemon import reconcile
from supervisor.logdir import RunPaths, create_run_dirs
from supervisor.materializer import Materializer


class _NoSandboxes:
    def list_owned(self, labels: Any) -> list[Any]:
        return []


def _run(parent: Path, supervisor_id: str, state: RunState = RunState.RUNNING) -> RunPaths:
    paths = create_run_dirs(parent, parent.parent / "ws")
    mat = Materializer(paths)
    mat.set_run(state=state, supervisor_id=supervisor_id)
    mat.write_status(force=True)
    mat.close()
    return paths


def test_restart_scan_finishes_its_own_lost_runs_nested_ones_too(tmp_path: Path) -> None:
    """Running runs of this supervisor without a container end supervisor_lost; others' runs are untouched."""
    root = tmp_path / "runs"
    mine = _run(root, "daemon-a")
    child = _run(mine.children, "daemon-a")
    other = _run(root, "daemon-b")
    sup = SimpleNamespace(supervisor_id="daemon-a")
    counts = asyncio.run(reconcile(sup, _NoSandboxes(), root))
    assert counts == {"adopted": 0, "lost": 2}
    for paths in (mine, child):
        res = json.loads(paths.result.read_text())
        assert (res["exit_code"], res["reason"]) == (2, "supervisor_lost"), paths
    assert not other.result.exists()
    assert asyncio.run(reconcile(sup, _NoSandboxes(), root)) == {"adopted": 0, "lost": 0}

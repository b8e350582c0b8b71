"""Nested runs on the remote engine whose context path is in the parent's workspace.

The parent's workspace exists only in its sandbox (a tmpfs on the remote engine): the child's
snapshot of it is fetched through the parent's run channel, not read from this host.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisor.runtime.base import LABEL_RUN
from supervisor.runtime.docker import RemoteDockerRuntime
from tests.docker.test_nested import (
    CHILD_CONFIGS,
    ONE_CHILD,
    REFUSED_CHILD,
    _children_by_id,
    _parent_config,
    _run,
    _subst,
)
from tests.docker.test_nested import ctx as ctx

pytestmark = pytest.mark.docker


def _remote(remote_engine: dict[str, str]) -> dict[str, str]:
    return {**remote_engine, "MASSGEN_RUNTIME": "remote-docker"}


def test_child_context_path_in_the_parents_workspace_is_fetched_through_the_channel(
    remote_engine: dict[str, str], remote_agent_image: str, tmp_path: Path, ctx: Path
) -> None:
    """The parent writes /workspace/agent_a/data/note.txt in its remote sandbox and starts a child
    reading that folder: the child sees a read-only snapshot (in its log dir) holding the note."""
    (ctx / "child.yaml").write_text(_subst(CHILD_CONFIGS["reader.yaml"], CTX=ctx))
    script = "mkdir -p data && echo hello > data/note.txt\n" + ONE_CHILD
    run = _run(tmp_path, remote_agent_image, _parent_config(tmp_path, script), env=_remote(remote_engine), timeout=240)
    assert run.proc.returncode == 0, run.describe()
    [child_id] = _children_by_id(run.status)
    child_answer = (run.child(child_id) / "final" / "c" / "answer.txt").read_text().strip()
    seen_as, note, write = child_answer.split("|")
    snapshot = run.child(child_id) / "context" / "0"
    assert Path(seen_as) == snapshot
    assert (snapshot / "note.txt").read_text().strip() == "hello"
    assert (note, write) == ("hello", "DENIED")
    remote = RemoteDockerRuntime(environment=remote_engine)
    assert remote.list_owned({LABEL_RUN: child_id}) == [] and remote.list_owned({LABEL_RUN: run.run_id}) == []


def test_missing_path_in_the_parents_workspace_is_path_missing(
    remote_engine: dict[str, str], remote_agent_image: str, tmp_path: Path, ctx: Path
) -> None:
    """A child asking for a folder the parent's sandbox does not have: refused, path_missing (exit 1)."""
    (ctx / "child.yaml").write_text(_subst(REFUSED_CHILD, PATH="/workspace/agent_a/nothing-here", PERM="read", CTX=ctx))
    run = _run(
        tmp_path, remote_agent_image, _parent_config(tmp_path, ONE_CHILD), env=_remote(remote_engine), timeout=240
    )
    assert run.proc.returncode == 0, run.describe()
    assert "FAILED: path_missing: /workspace/agent_a/nothing-here: does not exist" in run.answer, run.answer

"""The Supervisor's registry and nested-run policy over the fake runtime: limits, visibility, subtrees."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from supervisor.core import STOP_SUBTREE_REASON, RunRecord, Supervisor
from supervisor.lifecycle import RunRequest
from tests.fakes.runtime import FakeRuntime, by_question, engine, hang

T = TypeVar("T")

PARENT = """\
agents:
  - id: agent_a
    backend: {type: scripted, steps: [{answer: "x"}, {vote: auto}]}
sandbox: {max_depth: 1, max_children: 1, stop_grace_seconds: 0.2}
"""
CHILD = """\
agents:
  - id: agent_c
    backend: {type: scripted, steps: [{answer: "child"}, {vote: auto}]}
"""


def _top(tmp_path: Path, question: str, config: str = PARENT) -> RunRequest:
    path = tmp_path / f"{question}.yaml"
    path.write_text(config)
    return RunRequest(question=question, config_source=str(path), logs_root=tmp_path / "runs", sandbox="none")


def _child(parent: RunRecord, question: str, config: str = CHILD) -> RunRequest:
    return RunRequest(
        question=question,
        config_source="<submitted>",
        config_text=config,
        logs_root=parent.paths.children,
        workspaces_root=parent.paths.workspace.parent,
        sandbox="none",
        parent_run_id=parent.run_id,
        depth=parent.depth + 1,
        deadline_cap=parent.execution.deadline,
    )


async def _until(cond: Callable[[], bool], timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)


def _go(body: Callable[[Supervisor, FakeRuntime], Awaitable[T]], runtime: FakeRuntime) -> T:
    async def main() -> T:
        sup = Supervisor(runtime, default_sandbox="none")
        try:
            return await asyncio.wait_for(body(sup, runtime), 30)
        finally:
            await sup.shutdown(grace=10)

    return asyncio.run(main())


def test_nested_limits_refuse_a_second_child_and_a_grandchild(tmp_path: Path) -> None:
    """max_children=1 refuses a second live child; max_depth=1 refuses a grandchild; both exit 2, never started."""

    async def body(sup: Supervisor, runtime: FakeRuntime) -> None:
        parent = await sup.submit(_top(tmp_path, "parent"))
        await _until(lambda: len(runtime.sandboxes) == 1)
        first = await sup.submit(_child(parent, "child"), parent=parent)
        await _until(lambda: len(runtime.sandboxes) == 2)
        second = await sup.submit(_child(parent, "second"), parent=parent)
        second_res = await sup.wait(second, 10)
        assert second_res is not None
        assert (second_res.exit_code, second_res.reason) == (2, "max_children_exceeded")
        grandchild = await sup.submit(_child(first, "grandchild"), parent=first)
        grand_res = await sup.wait(grandchild, 10)
        assert grand_res is not None
        assert (grand_res.exit_code, grand_res.reason) == (2, "max_depth_exceeded")
        assert len(runtime.sandboxes) == 2  # neither refused run got a sandbox
        assert parent.children == [first, second] and first.children == [grandchild]

    _go(body, FakeRuntime(hang))


def test_a_child_sees_only_its_subtree(tmp_path: Path) -> None:
    """lookup/visible_to: a run sees its descendants, never itself, its parent or another top-level run."""

    async def body(sup: Supervisor, runtime: FakeRuntime) -> None:
        parent = await sup.submit(_top(tmp_path, "parent"))
        other = await sup.submit(_top(tmp_path, "other"))
        await _until(lambda: len(runtime.sandboxes) == 2)
        child = await sup.submit(_child(parent, "child"), parent=parent)
        assert sup.visible_to(parent) == [child]
        assert sup.visible_to(child) == []
        assert sup.lookup(parent, child.run_id) is child
        for hidden in (parent, other):
            assert sup.lookup(child, hidden.run_id) is None
        assert sup.lookup(parent, other.run_id) is None
        assert {r.run_id for r in sup.visible_to(None)} == {parent.run_id, other.run_id, child.run_id}
        info = sup.info(child, parent)
        assert (info.parent_run_id, info.depth) == (parent.run_id, 1)
        assert info.log_dir == str(child.paths.log_dir)  # --sandbox none: host paths are the parent's view

    _go(body, FakeRuntime(hang))


def test_a_parent_that_ends_stops_its_subtree(tmp_path: Path) -> None:
    """When a parent run finishes, its live children are interrupted ('parent run ended') and removed."""

    async def body(sup: Supervisor, runtime: FakeRuntime) -> None:
        parent = await sup.submit(_top(tmp_path, "parent"))
        await _until(lambda: len(runtime.sandboxes) == 1)
        child = await sup.submit(_child(parent, "child"), parent=parent)
        await _until(lambda: len(runtime.sandboxes) == 2)
        await sup.stop(parent)
        res = await sup.wait(child, 15)
        assert res is not None
        assert (res.exit_code, res.reason) == (4, "interrupted")
        assert child.control.interrupt_reason == STOP_SUBTREE_REASON
        assert all(box.removed for box in runtime.sandboxes.values())

    _go(body, FakeRuntime(by_question({"parent": hang, "child": hang})))


def test_a_completed_child_is_mirrored_in_its_parents_status(tmp_path: Path) -> None:
    """A finished child appears in the parent's status `children` with its exit code and reason."""

    async def body(sup: Supervisor, runtime: FakeRuntime) -> None:
        parent = await sup.submit(_top(tmp_path, "parent"))
        await _until(lambda: len(runtime.sandboxes) == 1)
        child = await sup.submit(_child(parent, "child"), parent=parent)
        res = await sup.wait(child, 15)
        assert res is not None and res.exit_code == 0
        mat = parent.execution.mat
        assert mat is not None
        [entry] = mat.status.children
        assert (entry.run_id, entry.exit_code, entry.reason) == (child.run_id, 0, "completed")

    _go(body, FakeRuntime(by_question({"parent": hang}, default=engine)))

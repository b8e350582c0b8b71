"""The runs API as a run's own socket serves it (scoped to that run), over the fake runtime."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from supervisor.api import RunsApi, make_app
from supervisor.core import RunRecord, Supervisor
from supervisor.lifecycle import RunRequest
from tests.fakes.runtime import FakeRuntime, by_question, engine, hang

PARENT = """\
agents:
  - id: agent_a
    backend: {type: scripted, steps: [{answer: "x"}, {vote: auto}]}
sandbox: {max_children: 8, stop_grace_seconds: 0.2}
"""
CHILD = """\
agents:
  - id: agent_c
    backend: {type: scripted, steps: [{answer: "child"}, {vote: auto}]}
"""

Body = Callable[[TestClient[Any, Any], Supervisor, RunRecord, RunRecord], Awaitable[None]]


def _serve(tmp_path: Path, body: Body) -> None:
    """A running parent and another top-level run; `body` gets a client of the parent's runs API."""
    config = tmp_path / "parent.yaml"
    config.write_text(PARENT)

    async def main() -> None:
        runtime = FakeRuntime(by_question({"parent": hang, "other": hang}, default=engine))
        sup = Supervisor(runtime, default_sandbox="none")

        def top(question: str) -> RunRequest:
            return RunRequest(question=question, config_source=str(config), logs_root=tmp_path / "runs", sandbox="none")

        try:
            parent = await sup.submit(top("parent"))
            other = await sup.submit(top("other"))
            async with asyncio.timeout(10):
                while len(runtime.sandboxes) < 2 or parent.execution.deadline is None:
                    await asyncio.sleep(0.01)
            async with TestClient(TestServer(make_app(RunsApi(sup, parent).routes()))) as client:
                await asyncio.wait_for(body(client, sup, parent, other), 30)
        finally:
            await sup.shutdown(grace=10)

    asyncio.run(main())


def test_a_child_submitted_on_the_parents_socket_runs_and_is_visible_only_there(tmp_path: Path) -> None:
    """POST /v1/runs starts a child (201, depth 1); the list holds it alone; another top-level run is 404."""

    async def body(client: TestClient[Any, Any], sup: Supervisor, parent: RunRecord, other: RunRecord) -> None:
        resp = await client.post("/v1/runs", json={"question": "child", "config_text": CHILD})
        assert resp.status == 201, await resp.text()
        info = await resp.json()
        assert (info["parent_run_id"], info["depth"]) == (parent.run_id, 1)
        listed = await (await client.get("/v1/runs")).json()
        assert [r["run_id"] for r in listed] == [info["run_id"]]
        assert (await client.get(f"/v1/runs/{other.run_id}")).status == 404
        assert (await client.get(f"/v1/runs/{parent.run_id}")).status == 404
        assert (await client.get("/v1/runs/..%2F..%2Fetc")).status in (400, 404)
        result = await (await client.get(f"/v1/runs/{info['run_id']}/result", params={"wait": "20"})).json()
        assert (result["exit_code"], result["reason"]) == (0, "completed")

    _serve(tmp_path, body)


def test_stop_over_the_socket_interrupts_the_child(tmp_path: Path) -> None:
    """POST /v1/runs/ID/stop answers 202 and the child ends with exit 4 (its result says so)."""

    async def body(client: TestClient[Any, Any], sup: Supervisor, parent: RunRecord, other: RunRecord) -> None:
        forever = CHILD.replace('[{answer: "child"}, {vote: auto}]', "[{sleep: 60}]")
        info = await (await client.post("/v1/runs", json={"question": "child", "config_text": forever})).json()
        run_id = info["run_id"]
        assert (await client.post(f"/v1/runs/{run_id}/stop")).status == 202
        result = await (await client.get(f"/v1/runs/{run_id}/result", params={"wait": "20"})).json()
        assert (result["exit_code"], result["reason"]) == (4, "interrupted")

    _serve(tmp_path, body)


def test_bad_submissions_are_refused_with_json_errors(tmp_path: Path) -> None:
    """A host path or logs_root from a run, two config sources, a bad body: 400 with an error name."""

    async def body(client: TestClient[Any, Any], sup: Supervisor, parent: RunRecord, other: RunRecord) -> None:
        cases = [
            {"question": "q", "config_path": "/etc/passwd"},
            {"question": "q", "config_text": CHILD, "logs_root": "/tmp"},
            {"question": "q", "config_text": CHILD, "example": "quickstart"},
            {"question": "", "config_text": CHILD},
            {"question": "q", "config_text": CHILD, "unknown": 1},
        ]
        for case in cases:
            resp = await client.post("/v1/runs", json=case)
            assert resp.status == 400, case
            assert (await resp.json())["error"] == "invalid_body", case
        assert parent.children == []

    _serve(tmp_path, body)

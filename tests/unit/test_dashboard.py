"""The dashboard without a browser: what it reads, what it renders, who may use it, live updates."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import html
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent_image.protocol.status import RunState
from supervisor.dashboard import CSP, Dashboard, StopRefused, render_report
from supervisor.dashboard._data import JsonLines, Redactor, RunIndex, load_detail, read_row
from supervisor.dashboard._live import MAX_SUBSCRIBERS, QUEUE_MAX, Subscriber
from supervisor.dashboard._markdown import render_markdown
from supervisor.dashboard._render import run_page_body
from tests.dashboard_helpers import XSS_ANSWER, FakeRun, counts_in_events


def _run_with_calls(root: Path) -> FakeRun:
    run = FakeRun(root, question="What is <b>2+2</b>?")
    run.answer("a", XSS_ANSWER)
    for i, cost in enumerate((0.1, 0.2, 0.3, 1e-7, 0.000123456789)):
        run.model_call("a" if i % 2 else "b", 100 + i, 10 * i, cost)
    run.vote("b", "a")
    run.answer("a", "another")  # clears b's standing vote: b starts over (a restart)
    run.vote("a", "a")
    run.vote("b", "a")
    run.write()
    return run


# -- reading and rendering ---------------------------------------------------------------------


def test_markdown_renders_hostile_html_as_text_and_drops_javascript_links() -> None:
    """<script>, <img onerror> and javascript: links never become markup; ordinary Markdown does."""
    out = render_markdown(XSS_ANSWER)
    assert "<script" not in out and "<img" not in out and "javascript:" not in out.replace("(javascript:", "")
    assert 'href="javascript' not in out
    assert "&lt;script&gt;" in out
    assert "<strong>4</strong>" in out and "<h1>Result</h1>" in out
    assert '<a href="https://example.invalid/docs" rel="noopener noreferrer nofollow">docs</a>' in out


def test_detail_has_one_mark_per_answer_and_vote_and_the_cost_line_ends_at_status_totals(tmp_path: Path) -> None:
    """Timeline marks match events.jsonl; the cumulative usage's last point is status.json's telemetry totals."""
    run = _run_with_calls(tmp_path / "runs")
    detail = load_detail(read_row(run.log_dir), None, Redactor({}))
    counts = counts_in_events(run.log_dir)
    kinds = [m.kind for m in detail.marks]
    assert kinds.count("answer") == counts["answer"] == 2
    assert kinds.count("vote") == counts["vote"] == 3
    assert [m.agent for m in detail.marks if m.kind == "restart"] == ["b"]
    assert kinds.count("model") == 5
    totals = json.loads((run.log_dir / "status.json").read_text())["telemetry"]["totals"]
    last = detail.usage_total[-1]
    assert last.cost_usd == totals["cost_usd"]
    assert last.tokens == totals["total_tokens"]
    html = run_page_body(detail)
    assert html.count('class="mark m-answer') == 2 and html.count('class="mark m-vote') == 3
    assert f'data-last-cost="{totals["cost_usd"]!r}"' in html
    assert "<b>2+2</b>" not in html and "&lt;b&gt;2+2&lt;/b&gt;" in html


def test_a_vote_the_engine_discarded_as_stale_is_a_restart(tmp_path: Path) -> None:
    """The engine's 'voted ... on a stale view' note marks a restart for that agent (not for strangers)."""
    run = FakeRun(tmp_path / "runs")
    run.event("log", level="info", message="b voted for agent1 on a stale view; it will look again")
    run.event("log", level="info", message="zed voted for agent1 on a stale view; it will look again")
    run.write()
    detail = load_detail(read_row(run.log_dir), None, Redactor({}))
    assert [(m.kind, m.agent) for m in detail.marks] == [("restart", "b")]


def test_events_are_parsed_incrementally_complete_lines_only(tmp_path: Path) -> None:
    """A followed run's events.jsonl is read from where the last read stopped; a torn line waits."""
    path = tmp_path / "events.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": 2}\n{"a"')
    lines = JsonLines(path, json.loads)
    assert lines.read() == [{"a": 1}, {"a": 2}]
    with path.open("ab") as fh:
        fh.write(b": 3}\nnot json\n")
    assert lines.read() == [{"a": 1}, {"a": 2}, {"a": 3}]
    assert lines.offset == path.stat().st_size
    path.write_bytes(b'{"b": 1}\n')  # replaced by a shorter file: start over
    assert lines.read() == [{"b": 1}]


def test_secret_environment_values_are_redacted_from_displayed_logs(tmp_path: Path) -> None:
    """A host key that reached massgen.log (or an answer) is shown as [redacted]."""
    run = FakeRun(tmp_path / "runs")
    run.mat.log("upstream said: bad key sk-live-abcdef123456")
    run.answer("a", "the key is sk-live-abcdef123456")
    run.write()
    detail = load_detail(
        read_row(run.log_dir), None, Redactor({"OPENAI_API_KEY": "sk-live-abcdef123456", "HOME": "/root"})
    )
    html = run_page_body(detail)
    assert "sk-live-abcdef123456" not in html
    assert html.count("[redacted]") >= 2


def test_index_keeps_to_the_log_dir_layout_and_builds_the_tree(tmp_path: Path) -> None:
    """Runs and nested runs are found; a run-like folder inside a sandbox outbox is not a run."""
    root = tmp_path / "runs"
    parent = FakeRun(root)
    child = FakeRun(parent.paths.children, depth=1)
    index = RunIndex([root])
    index.scan()
    assert [r.run_id for r in index.ordered()] == [parent.run_id, child.run_id]
    assert index.root_of(index.rows[child.log_dir]).run_id == parent.run_id
    assert not index.inside(parent.log_dir / "sandbox" / child.run_id)
    assert index.inside(child.log_dir)


def test_report_is_one_file_with_no_script_no_external_asset_and_a_hash_pinned_style(tmp_path: Path) -> None:
    """The report inlines its CSS (allowed by hash in its CSP), has no script and fetches nothing."""
    run = _run_with_calls(tmp_path / "runs")
    run.finish()
    text = render_report(run.log_dir)
    assert not re.search(r"<(script|link|img|iframe|object|embed)\b", text)
    assert not re.search(r"<[^>]*\s(src|srcset)=", text)
    style = re.search(r"<style>(.*?)</style>", text, re.S)
    assert style is not None
    digest = base64.b64encode(hashlib.sha256(style.group(1).encode()).digest()).decode()
    meta = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', text)
    assert meta is not None
    csp = html.unescape(meta.group(1))
    assert f"style-src 'sha256-{digest}'" in csp and "default-src 'none'" in csp
    assert "&lt;script&gt;" in text and run.run_id in text


def test_a_page_that_stops_reading_is_dropped_not_buffered() -> None:
    """A subscriber whose queue fills is closed (its browser reconnects), never grown without end."""

    async def main() -> None:
        sub = Subscriber()
        for _ in range(QUEUE_MAX):
            assert sub.push("row", "{}")
        assert not sub.push("row", "{}")
        assert sub.closed and sub.queue.get_nowait() is None

    asyncio.run(main())


# -- the server --------------------------------------------------------------------------------


class _Control:
    def __init__(self) -> None:
        self.stopped: list[str] = []

    def can_stop(self, row: Any) -> bool:
        return bool(row.live)

    async def stop(self, row: Any) -> str:
        if not row.live:
            raise StopRefused(row.run_id, "the run already finished")
        self.stopped.append(row.run_id)
        return "stopping"


@asynccontextmanager
async def serving(root: Path, control: Any = None, **kw: Any) -> AsyncIterator[tuple[Dashboard, aiohttp.ClientSession]]:
    dash = Dashboard(lambda: [root], control=control, port=0, fallback_s=0.5, **kw)
    await dash.start()
    jar = aiohttp.CookieJar(unsafe=True)  # cookies for a bare IP host
    conn = aiohttp.TCPConnector(limit=0)  # more streams than aiohttp's default 100 connections
    async with aiohttp.ClientSession(base_url=dash.base_url, cookie_jar=jar, connector=conn) as http:
        try:
            yield dash, http
        finally:
            await dash.close()


def run_async(fn: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(fn(), 60))


def test_without_the_token_pages_events_and_actions_are_401_and_a_wrong_token_403(tmp_path: Path) -> None:
    """No token: 401 everywhere; a wrong token in the URL or cookie: 403; every answer carries the CSP."""
    run = FakeRun(tmp_path / "runs")

    async def main() -> None:
        async with serving(tmp_path / "runs", _Control()) as (_dash, http):
            for method, path in (
                ("GET", "/"),
                ("GET", f"/run/{run.run_id}"),
                ("GET", "/events"),
                ("GET", "/api/runs"),
                ("POST", f"/run/{run.run_id}/stop"),
            ):
                async with http.request(method, path, allow_redirects=False) as r:
                    assert r.status == 401, (method, path)
                    assert r.headers["Content-Security-Policy"] == CSP
            async with http.get("/?token=nope", allow_redirects=False) as r:
                assert r.status == 403
            async with http.get("/", headers={"Authorization": "Bearer nope"}) as r:
                assert r.status == 403
            async with http.get("/", headers={"Host": "evil.example:80"}) as r:
                assert r.status == 403

    run_async(main)


def test_a_run_is_listed_from_its_first_log_line_before_its_status_exists(tmp_path: Path) -> None:
    """A log dir with massgen.log but no status.json yet (config being checked) is a starting run."""
    root = tmp_path / "runs"
    d = root / "log_20261202_000000_000000_abcdef"
    d.mkdir(parents=True)
    (d / "massgen.log").write_text("prepared\n")
    index = RunIndex([root])
    (row,) = index.scan()
    assert (row.run_id, row.state) == (d.name, "starting")


def test_the_token_url_sets_an_httponly_strict_cookie_and_drops_the_token_from_the_address(tmp_path: Path) -> None:
    """?token= once: a 303 to the same page without it, and a cookie that carries on."""
    run = FakeRun(tmp_path / "runs")

    async def main() -> None:
        async with serving(tmp_path / "runs") as (dash, http):
            async with http.get(f"/run/{run.run_id}?token={dash.token}", allow_redirects=False) as r:
                assert r.status == 303
                assert r.headers["Location"] == f"/run/{run.run_id}"
                cookie = r.headers["Set-Cookie"]
                assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
            async with http.get(f"/run/{run.run_id}") as r:
                assert r.status == 200
                text = await r.text()
                assert run.run_id in text and dash.token not in text
                assert r.headers["Content-Security-Policy"] == CSP
                assert r.headers["X-Frame-Options"] == "DENY"
            async with http.get("/static/dashboard.js") as r:
                assert r.status == 200 and r.content_type == "text/javascript"

    run_async(main)


def test_stop_needs_post_same_origin_and_the_csrf_token(tmp_path: Path) -> None:
    """A cross-origin POST (cookie and all) is refused, so is one without the CSRF token; the right one stops."""
    run = FakeRun(tmp_path / "runs")
    control = _Control()

    async def main() -> None:
        async with serving(tmp_path / "runs", control) as (dash, http):
            await http.get(f"/?token={dash.token}")
            path = f"/run/{run.run_id}/stop"
            foreign = {"Origin": "http://127.0.0.1:1", "X-CSRF-Token": dash.csrf}
            async with http.post(path, headers=foreign) as r:
                assert r.status == 403 and "cross-origin" in (await r.json())["detail"]
            async with http.post(path, headers={"Origin": dash.base_url}) as r:
                assert r.status == 403 and "CSRF" in (await r.json())["detail"]
            async with http.get(path) as r:
                assert r.status == 405
            assert control.stopped == []
            async with http.post(path, headers={"Origin": dash.base_url, "X-CSRF-Token": dash.csrf}) as r:
                assert r.status == 202
            assert control.stopped == [run.run_id]
            run.finish("interrupted")
            # finished: refused with a reason
            await _until(lambda: dash.hub.index.rows[run.log_dir].finished)
            async with http.post(path, headers={"Origin": dash.base_url, "X-CSRF-Token": dash.csrf}) as r:
                assert r.status == 409 and "finished" in (await r.json())["detail"]

    run_async(main)


async def _until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def _sse(resp: aiohttp.ClientResponse, want: str, timeout: float = 10.0) -> dict[str, Any]:
    """The next `want` event's JSON on an open event stream."""
    event = None
    async with asyncio.timeout(timeout):
        while True:
            line = (await resp.content.readline()).decode().rstrip("\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == want:
                data: dict[str, Any] = json.loads(line[6:])
                return data


def test_a_status_change_reaches_an_open_runs_page_and_a_new_run_appears(tmp_path: Path) -> None:
    """Events pushed by file changes (no client polling): a changed row and a new run's row."""
    root = tmp_path / "runs"
    run = FakeRun(root)

    async def main() -> None:
        async with serving(root) as (dash, http):
            await http.get(f"/?token={dash.token}")
            gen = dash.hub.gen
            async with http.get(f"/events?since={gen}", timeout=aiohttp.ClientTimeout(total=30)) as es:
                assert es.headers["Content-Type"] == "text/event-stream"
                await _until(lambda: len(dash.hub.subs) == 1)
                run.answer("a", "four")
                run.write()
                msg = await _sse(es, "row")
                assert (msg["id"] == run.run_id and "initial_answer" in msg["html"]) or "answer" in msg["html"]
                new = FakeRun(root)
                msg = await _sse(es, "row")
                while msg["id"] != new.run_id:
                    msg = await _sse(es, "row")
                assert msg["parent"] == ""

    run_async(main)


def test_an_open_run_page_gets_new_sections_and_log_lines(tmp_path: Path) -> None:
    """The run page's stream sends re-rendered sections when events arrive and massgen.log lines as they are written."""
    root = tmp_path / "runs"
    run = FakeRun(root)

    async def main() -> None:
        async with serving(root) as (dash, http):
            await http.get(f"/?token={dash.token}")
            async with http.get(f"/events?run={run.run_id}&log=0", timeout=aiohttp.ClientTimeout(total=30)) as es:
                first = await _sse(es, "sections")
                assert set(first) >= {"head", "timeline", "answers"}
                run.answer("a", "<script>x()</script> four")
                run.write()
                msg = await _sse(es, "sections")
                while "answers" not in msg:
                    msg = await _sse(es, "sections")
                assert "&lt;script&gt;x()&lt;/script&gt;" in msg["answers"]
                run.mat.log("a new line for the tail")
                msg = await _sse(es, "log")
                while "a new line for the tail" not in msg["text"]:
                    msg = await _sse(es, "log")

    run_async(main)


def test_closed_pages_leave_no_subscriber_behind_and_the_stream_limit_holds(tmp_path: Path) -> None:
    """A page that goes away is noticed by the heartbeat and forgotten; past the limit a stream is 503."""
    root = tmp_path / "runs"
    FakeRun(root)

    async def main() -> None:
        async with serving(root, heartbeat_s=0.1) as (dash, http):
            await http.get(f"/?token={dash.token}")
            for _ in range(5):
                es = await http.get("/events?since=0")
                assert es.status == 200
                es.close()
            await _until(lambda: not dash.hub.subs)
            opened = [await http.get("/events") for _ in range(MAX_SUBSCRIBERS)]
            await _until(lambda: len(dash.hub.subs) == MAX_SUBSCRIBERS)
            async with http.get("/events") as r:
                assert r.status == 503
            for es in opened:
                es.close()
            await _until(lambda: not dash.hub.subs)

    run_async(main)


def test_runs_page_lists_runs_as_a_tree_and_escapes_questions(tmp_path: Path) -> None:
    """The first load has every run, nested ones after their parent, and hostile text escaped."""
    root = tmp_path / "runs"
    parent = FakeRun(root, question="<script>alert(1)</script>")
    child = FakeRun(parent.paths.children, depth=1)
    FakeRun(root)

    async def main() -> None:
        async with serving(root) as (dash, http), http.get(f"/?token={dash.token}") as r:
            text = await r.text()
        assert "<script>alert" not in text
        rows = re.findall(r'<tr id="r-(log_[^"]+)"', text)
        assert len(rows) == 3 and rows.index(child.run_id) == rows.index(parent.run_id) + 1

    run_async(main)


@pytest.mark.parametrize("value", ["8080", "127.0.0.1:0", "[::1]:9000", "0.0.0.0:80"])
def test_web_option_takes_port_or_host_port(value: str) -> None:
    """--web PORT / HOST:PORT / [V6]:PORT."""
    from supervisor.dashboard._cli import parse_hostport

    host, port = parse_hostport(value)
    assert isinstance(port, int) and host


def test_web_option_refuses_garbage() -> None:
    """A port that is not a number or out of range is a usage error naming the value."""
    import argparse

    from supervisor.dashboard._cli import parse_hostport

    for bad in ("x", "host:", "1:99999"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_hostport(bad)


def test_standalone_stop_never_signals_a_daemon_or_itself(tmp_path: Path) -> None:
    """A run a daemon supervises, or one naming this process, is refused rather than signalled."""
    from supervisor.dashboard import LocalControl
    from supervisor.dashboard._data import read_row

    run = FakeRun(tmp_path / "runs")
    control = LocalControl(use_daemon=False)

    async def refused(detail: str) -> None:
        with pytest.raises(StopRefused, match=detail):
            await control.stop(read_row(run.log_dir))

    run.mat.set_run(state=RunState.RUNNING, supervisor_id="daemon-0123456789", supervisor_pid=1234)
    run.write()
    asyncio.run(refused("belongs to daemon"))
    import os

    run.mat.set_run(supervisor_id="embedded", supervisor_pid=os.getpid())
    run.write()
    asyncio.run(refused("no supervisor is known"))


def _batch_status(path: Path, counts: dict[str, int], state: str = "running", exit_code: int | None = None) -> None:
    """A batch dir's status.json as supervisor/batch/runner.py writes it (the fields the page reads)."""
    from supervisor.logdir import atomic_write_json

    atomic_write_json(
        path / "status.json",
        {"schema_version": 1, "batch": "nightly <b>evals</b>", "batch_dir": str(path), "state": state,
         "exit_code": exit_code, "stopping": None, "items": sum(counts.values()), "counts": counts,
         "elapsed_s": 12.5, "eta_s": 30.0, "spend": {"cost_usd": 0.0123, "tokens": 4567, "calls": 9}},
    )  # fmt: skip


def test_batches_show_progress_and_pass_fail_counts_live_with_their_runs(tmp_path: Path) -> None:
    """A batch dir next to the logs root: its progress and counts on the runs page, updated live; its runs listed."""
    root = tmp_path / "runs"
    FakeRun(root)
    bdir = tmp_path / "batches" / "nightly"
    bdir.mkdir(parents=True)
    _batch_status(bdir, {"pass": 1, "fail": 1, "error": 0, "skipped": 0, "interrupted": 0, "pending": 2, "running": 1})
    item = FakeRun(bdir / "runs")

    async def main() -> None:
        async with serving(root) as (dash, http):
            async with http.get(f"/?token={dash.token}") as r:
                text = await r.text()
            assert "nightly &lt;b&gt;evals&lt;/b&gt;" in text and "<b>evals" not in text
            assert '<progress max="5" value="2"></progress> 2/5' in text
            assert '<td class="n-pass">1</td><td class="n-fail">1</td>' in text
            assert f'id="r-{item.run_id}"' in text  # the batch's own runs are listed too
            async with http.get(f"/events?since={dash.hub.gen}", timeout=aiohttp.ClientTimeout(total=30)) as es:
                await _until(lambda: len(dash.hub.subs) == 1)
                counts = {"pass": 4, "fail": 1, "error": 0, "skipped": 0, "interrupted": 0, "pending": 0, "running": 0}
                _batch_status(bdir, counts, "finished", 10)
                msg = await _sse(es, "batch")
                assert "5/5" in msg["html"] and "finished (10)" in msg["html"]

    run_async(main)


def test_a_burst_of_changes_reaches_a_run_page_coalesced_and_complete(tmp_path: Path) -> None:
    """40 status writes in a burst: section pushes at most one per 0.25 s (not 40), the last one current."""
    root = tmp_path / "runs"
    run = FakeRun(root)

    async def main() -> None:
        async with serving(root) as (dash, http):
            await http.get(f"/?token={dash.token}")
            async with http.get(f"/events?run={run.run_id}", timeout=aiohttp.ClientTimeout(total=30)) as es:
                await _sse(es, "sections")  # the page's first full set
                t0 = time.monotonic()
                for i in range(40):
                    run.answer("a" if i % 2 else "b", f"answer number {i}")
                    run.write()
                    await asyncio.sleep(0.025)
                burst_s = time.monotonic() - t0
                pushes, last = 0, ""
                with contextlib.suppress(TimeoutError):
                    while "answer number 39" not in last:
                        msg = await _sse(es, "sections", timeout=5)
                        pushes += 1
                        last = msg.get("answers", last)
                span_s = time.monotonic() - t0
                assert "answer number 39" in last
                assert pushes <= span_s / 0.25 + 2, (pushes, burst_s, span_s)

    run_async(main)

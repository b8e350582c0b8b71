"""The dashboard in a real browser (Debian's headless chromium via Playwright), no Docker needed.

The real CLI makes the runs (`--sandbox none`, an OpenAI agent against the loopback fake whose
answer is hostile HTML) and serves `massgen-run dashboard`; the browser checks what a person
would see: the hostile answer renders as text and runs no script, the figures match the log
dir, the report opened with the network off shows the same, and no token means no page.
"""

from __future__ import annotations

import http.server
import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cli_helpers import massgen_run, parse_lines, start_cli, write_config
from tests.dashboard_helpers import (
    artifacts_dir,
    browser,
    counts_in_events,
    openai_agents,
    start_dashboard,
    xss_policy,
)
from tests.fakes import FakeOpenAI

KEY = "sk-dashboard-test-key-1"
QUESTION = "What is 2+2? <script>window.__xss = 'question'</script><img src=x onerror=\"window.__xss='q'\">"


@pytest.fixture(scope="module")
def xss_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run whose answers (and final answer) carry <script>, <img onerror> and a javascript: link."""
    tmp = tmp_path_factory.mktemp("xss")
    with FakeOpenAI(xss_policy, api_key=KEY) as oa:
        cfg = write_config(tmp, openai_agents(oa.base_url))
        p = massgen_run(
            ["--automation", "--sandbox", "none", "--logs-root", str(tmp / "runs"), "--config", str(cfg), QUESTION],
            tmp,
            OPENAI_API_KEY=KEY,
        )
    assert p.returncode == 0, p.stdout + p.stderr
    return Path(parse_lines(p.stdout)["LOG_DIR"])


@pytest.fixture(scope="module")
def dashboard(xss_run: Path) -> Iterator[str]:
    proc, url = start_dashboard(xss_run.parent, xss_run.parent.parent, OPENAI_API_KEY=KEY)
    try:
        yield url
    finally:
        proc.terminate()
        assert proc.wait(timeout=20) == 0


def _figures(page: Any) -> dict[str, Any]:
    """What the run page shows: mark counts by kind, the usage totals, the final answer's text."""
    figures: dict[str, Any] = page.evaluate(
        """() => {
            const n = (s) => document.querySelectorAll(s).length;
            const end = document.querySelector("circle.s-total-end[data-last-cost]");
            const tok = document.querySelector("circle.s-total-end[data-last-tokens]");
            return {
                answers: n("svg.timeline g.mark.m-answer"), votes: n("svg.timeline g.mark.m-vote"),
                models: n("svg.timeline g.mark.m-model"), restarts: n("svg.timeline g.mark.m-restart"),
                cost: end ? Number(end.dataset.lastCost) : null, tokens: tok ? Number(tok.dataset.lastTokens) : null,
                total: document.querySelector("#usage-total")?.textContent,
                final: document.querySelector("#final-answer .md")?.textContent,
            };
        }"""
    )
    return figures


def test_hostile_answer_renders_as_text_and_no_script_runs(dashboard: str, xss_run: Path) -> None:
    """<script>, <img onerror> and a javascript: link in an answer: shown as text, nothing executes."""
    shots = artifacts_dir("xss")
    with browser(shots) as ctx:
        page = ctx.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(dashboard)
        page.wait_for_selector(f"#r-{xss_run.name}")
        assert "token=" not in page.url  # the token left the address bar
        page.screenshot(path=str(shots / "runs.png"), full_page=True)
        assert page.evaluate("window.__xss") is None and page.locator("img").count() == 0
        page.click(f"#r-{xss_run.name} a")
        page.wait_for_selector("#final-answer")
        page.wait_for_selector("#live.on")
        page.screenshot(path=str(shots / "run.png"), full_page=True)
        assert page.evaluate("window.__xss") is None
        assert page.locator("#sec-head .question").inner_text() == QUESTION  # the question, as text
        assert page.evaluate("document.querySelectorAll('script').length") == 1  # dashboard.js only
        assert page.locator("img").count() == 0
        assert page.locator(".md img, .md script, .md [onerror]").count() == 0
        assert page.locator('a[href^="javascript"]').count() == 0
        text = page.locator("#final-answer .md").inner_text()
        assert "<script>window.__xss = 'script'</script>" in text
        assert '<img src="x" onerror=' in text
        assert page.locator("#final-answer .md strong").inner_text() == "4"  # real Markdown still works
        assert KEY not in page.content()
        assert errors == []


def test_figures_match_the_log_dir_and_the_offline_report_shows_the_same(
    dashboard: str, xss_run: Path, tmp_path: Path
) -> None:
    """Timeline marks = events.jsonl answers/votes; usage = status totals; the report offline shows the same."""
    shots = artifacts_dir("report")
    counts = counts_in_events(xss_run)
    totals = json.loads((xss_run / "status.json").read_text())["telemetry"]["totals"]
    out = tmp_path / "report.html"
    p = massgen_run(["report", str(xss_run), "-o", str(out)], tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"REPORT: {out}"
    with browser(shots) as ctx:
        page = ctx.new_page()
        page.goto(dashboard)
        page.goto(dashboard.split("/?")[0] + f"/run/{xss_run.name}")
        page.wait_for_selector("svg.timeline")
        live = _figures(page)
        assert live["answers"] == counts["answer"] and live["votes"] == counts["vote"]
        assert live["models"] == counts["model_call"] == totals["calls"]
        assert live["cost"] == totals["cost_usd"] and live["tokens"] == totals["total_tokens"]

        ctx.set_offline(True)
        requests: list[str] = []
        offline = ctx.new_page()
        offline.on("request", lambda r: requests.append(r.url))
        offline.goto(out.as_uri())
        offline.wait_for_selector("svg.timeline")
        offline.screenshot(path=str(shots / "report-offline.png"), full_page=True)
        assert _figures(offline) == live
        assert requests == [out.as_uri()]  # the file itself, nothing else
        assert offline.evaluate("window.__xss") is None


class _Evil(http.server.BaseHTTPRequestHandler):
    """A page on another loopback port that tries to stop a run with the victim's cookie."""

    target = ""

    def do_GET(self) -> None:
        body = f"""<!doctype html><form id=f method=post action="{self.target}"></form>
<script>fetch("{self.target}", {{method: "POST", credentials: "include", mode: "no-cors"}})
  .finally(() => document.getElementById("f").submit());</script>""".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_no_token_is_401_wrong_token_403_and_a_cross_origin_post_is_refused(dashboard: str, xss_run: Path) -> None:
    """Pages without the token 401, with a wrong one 403; a foreign page's POST (cookie and all) gets 403."""
    shots = artifacts_dir("auth")
    base = dashboard.split("/?")[0]
    stop_url = f"{base}/run/{xss_run.name}/stop"
    with browser(shots) as ctx:
        page = ctx.new_page()
        r = page.goto(base + "/")
        assert r is not None and r.status == 401
        page.screenshot(path=str(shots / "no-token.png"))
        r = page.goto(base + "/?token=wrong")
        assert r is not None and r.status == 403
        assert ctx.request.post(stop_url).status == 401
        # Now logged in: the cookie is there, which is exactly what a cross-origin page would ride on.
        page.goto(dashboard)
        statuses: list[int] = []
        page.on("response", lambda resp: statuses.append(resp.status) if resp.url == stop_url else None)
        evil = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Evil)
        _Evil.target = stop_url
        threading.Thread(target=evil.serve_forever, daemon=True).start()
        try:
            page.goto(f"http://127.0.0.1:{evil.server_address[1]}/")
            page.wait_for_timeout(500)
            page.wait_for_load_state()
        finally:
            evil.shutdown()
            evil.server_close()
        assert statuses and set(statuses) == {403}, statuses
        # The same request from the dashboard's own page passes the guard (and is refused for being over).
        page.goto(f"{base}/run/{xss_run.name}")
        res = page.evaluate(
            """async (url) => {
                const csrf = document.querySelector('meta[name="csrf-token"]').content;
                const r = await fetch(url, {method: "POST", headers: {"X-CSRF-Token": csrf}});
                return [r.status, (await r.json()).detail];
            }""",
            stop_url,
        )
        assert res[0] == 409 and re.search("finished", res[1])


SLEEPER = """\
agents:
  - id: a
    backend: {type: scripted, steps: [{shell: "sleep 300", timeout: 600}, {answer: never}]}
"""


def test_stop_from_a_standalone_dashboard_then_no_reconnect_storm_when_it_goes(tmp_path: Path) -> None:
    """Stop on `massgen-run dashboard` ends an embedded run with exit 4; a vanished server gets backed-off retries."""
    shots = artifacts_dir("standalone-stop")
    root = tmp_path / "runs"
    cfg = write_config(tmp_path, SLEEPER)
    run, log_dir = start_cli(
        ["--automation", "--sandbox", "none", "--logs-root", str(root), "--config", str(cfg), "sleep?"], tmp_path
    )
    dash, url = start_dashboard(root, tmp_path)
    try:
        with browser(shots) as ctx:
            page = ctx.new_page()
            page.goto(url)
            page.click(f"#r-{log_dir.name} a")
            page.wait_for_selector("#stop")
            page.wait_for_selector("#live.on")
            page.once("dialog", lambda d: d.accept())
            page.click("#stop")
            assert run.wait(timeout=60) == 4
            page.wait_for_selector("#sec-head .badge.b-stopped", timeout=15_000)
            page.screenshot(path=str(shots / "stopped.png"), full_page=True)
            assert json.loads((log_dir / "result.json").read_text())["exit_code"] == 4

            attempts: list[float] = []
            page.on("request", lambda r: attempts.append(time.monotonic()) if "/events" in r.url else None)
            dash.terminate()
            assert dash.wait(timeout=20) == 0
            page.wait_for_selector("#live.down", timeout=10_000)
            t0 = time.monotonic()
            page.wait_for_timeout(8000)
            # Backoff 1 s, 2 s, 4 s (+-25%): at most 4 tries in 8 s, never a storm.
            assert 1 <= len(attempts) <= 4, [round(a - t0, 2) for a in attempts]
    finally:
        for p in (run, dash):
            if p.poll() is None:
                p.kill()
                p.wait(timeout=20)


def test_runs_page_filters_sorts_and_keeps_nested_runs_under_their_parent(tmp_path: Path) -> None:
    """State and text filters hide the rest; sorting moves whole trees unless 'flat' is ticked."""
    from tests.dashboard_helpers import FakeRun

    shots = artifacts_dir("runs-table")
    root = tmp_path / "runs"
    ok = FakeRun(root, question="the good one")
    ok.finish()
    bad = FakeRun(root, question="the bad one")
    bad.finish("agent_failed")
    parent = FakeRun(root, question="a parent")
    child = FakeRun(parent.paths.children, depth=1, question="its child")
    child.finish("timeout")
    live = FakeRun(root, question="still going")
    for r in (ok, bad, parent, child, live):
        r.close()
    dash, url = start_dashboard(root, tmp_path)
    try:
        with browser(shots) as ctx:
            page = ctx.new_page()
            page.goto(url)
            page.wait_for_selector(f"#r-{child.run_id}")

            def shown() -> list[str]:
                runs: list[str] = page.eval_on_selector_all(
                    "#runs-body tr:not([hidden])", "rs => rs.map(r => r.dataset.run)"
                )
                return runs

            assert shown() == [live.run_id, parent.run_id, child.run_id, bad.run_id, ok.run_id]
            page.select_option("#state", "bad")
            assert set(shown()) == {bad.run_id, child.run_id}
            page.select_option("#state", "")
            page.fill("#filter", "good")
            assert shown() == [ok.run_id]
            page.fill("#filter", "")
            page.click('th[data-col="6"]')  # Exit, ascending: the live run (no exit) first
            order = shown()
            assert order.index(child.run_id) == order.index(parent.run_id) + 1  # the tree moved as one
            assert order[-1] == bad.run_id  # exit 2 last among the top-level runs
            page.check("#flat")
            assert shown()[-1] == child.run_id  # exit 3: last once runs sort on their own
            page.screenshot(path=str(shots / "sorted-flat.png"), full_page=True)
    finally:
        dash.terminate()
        dash.wait(timeout=20)

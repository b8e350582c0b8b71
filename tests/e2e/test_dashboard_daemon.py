"""The daemon's web dashboard in a real browser while it runs six runs in Docker.

One nested, one failing, one timing out, one through the gateway with a hostile answer and
priced model calls, one to stop from the page. Checked as a person watching would: every run
shows up within a second of starting, states change without a reload, the timeline and the
cost chart match the log dir, and the Stop button ends a run with exit 4.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from supervisor.runtime.docker import DockerRuntime
from tests.cli_helpers import write_config
from tests.dashboard_helpers import artifacts_dir, browser, counts_in_events, openai_agents, xss_policy
from tests.docker.conftest import agent_image, runtime  # noqa: F401 - fixtures shared with the docker tests
from tests.e2e.test_daemon import START_TIMEOUT_S, Daemon
from tests.fakes import FakeOpenAI

pytestmark = pytest.mark.docker

KEY = "sk-dashboard-daemon-key-9"
APPEAR_S = 1.0  # the acceptance bound: a run is on the runs page within 1 s of its start

FAILING = """\
agents:
  - id: a
    backend: {type: scripted, steps: [{vote: auto}]}
"""
TIMING_OUT = """\
agents:
  - id: a
    backend: {type: scripted, steps: [{shell: "sleep 120", timeout: 600}, {answer: never}]}
timeout_settings: {orchestrator_timeout_seconds: 6}
"""
SLEEPER = """\
agents:
  - id: a
    backend: {type: scripted, steps: [{shell: "sleep 300", timeout: 600}, {answer: never}]}
timeout_settings: {orchestrator_timeout_seconds: 600}
"""

OBSERVE = """() => {
    window.__seen = {}; window.__states = {}; window.__same_document = true;
    const tb = document.getElementById("runs-body");
    const note = (tr) => {
        const id = tr.dataset.run;
        if (!(id in window.__seen)) window.__seen[id] = Date.now() / 1000;
        (window.__states[id] = window.__states[id] || []).push(tr.dataset.state + ":" + tr.dataset.exit);
    };
    for (const tr of tb.rows) note(tr);
    new MutationObserver((ms) => {
        for (const m of ms) for (const n of m.addedNodes) if (n.nodeType === 1 && n.tagName === "TR") note(n);
    }).observe(tb, {childList: true});
}"""


class WebDaemon(Daemon):
    """The e2e daemon with `--web 127.0.0.1:0`; `url` is its DASHBOARD line."""

    url = ""

    def start(self) -> float:
        self.starts += 1
        err = open(self.work / f"daemon-{self.starts}.log", "w")  # noqa: SIM115 - handed to the child
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "supervisor.daemon", "--socket", str(self.socket), "--logs-root",
             str(self.logs_root), "--image", self.image, "--max-concurrent", str(self.max_concurrent),
             "--web", "127.0.0.1:0"],
            cwd=self.dir, env={**self.env(), "OPENAI_API_KEY": KEY}, stdout=subprocess.PIPE, stderr=err, text=True,
        )  # fmt: skip
        err.close()
        lines: queue.Queue[str | None] = queue.Queue()
        proc = self.proc

        def reader() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=reader, daemon=True).start()
        while True:
            line = lines.get(timeout=START_TIMEOUT_S)
            assert line is not None, f"daemon exited before listening:\n{self.stderr_tail()}"
            if line.startswith("DASHBOARD: "):
                self.url = line.split(": ", 1)[1].strip()
            if line.startswith("SOCKET: "):
                assert self.url.startswith("http://127.0.0.1:"), "no DASHBOARD line before SOCKET"
                return t0


@pytest.fixture
def web_daemon(runtime: DockerRuntime, agent_image: str, tmp_path: Path) -> Iterator[WebDaemon]:  # noqa: F811
    d = WebDaemon(runtime, agent_image, tmp_path, max_concurrent=6)
    d.start()
    try:
        yield d
    finally:
        d.cleanup()
    assert d.containers() == []
    assert d.mounts() == []


class Births(threading.Thread):
    """Notes when each log dir (nested ones too) first exists: a run's start, as the test sees it."""

    def __init__(self, root: Path) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.seen: dict[str, float] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            now = time.time()
            for d in [*self.root.glob("log_*"), *self.root.glob("log_*/children/log_*")]:
                self.seen.setdefault(d.name, now)
            time.sleep(0.01)


def _wait(cond: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.1)


def _status(log_dir: Path) -> dict[str, Any]:
    try:
        status: dict[str, Any] = json.loads((log_dir / "status.json").read_text())
    except (OSError, ValueError):
        return {}
    return status


def test_six_runs_live_in_the_browser_then_stop_one_from_its_page(web_daemon: WebDaemon, tmp_path: Path) -> None:
    """Runs appear within 1 s, change state live, match their log dirs, and Stop ends one with exit 4."""
    shots = artifacts_dir("daemon")
    root = web_daemon.logs_root
    root.mkdir(parents=True, exist_ok=True)
    births = Births(root)
    births.start()
    base = web_daemon.url.split("/?")[0]
    procs: dict[str, subprocess.Popen[bytes]] = {}
    dirs: dict[str, Path] = {}
    with FakeOpenAI(xss_policy, api_key=KEY) as oa, browser(shots) as ctx:
        page = ctx.new_page()
        page.goto(web_daemon.url)
        page.wait_for_selector("#live.on")
        page.evaluate(OBSERVE)
        configs = {
            "quick": "@examples/quickstart",
            "nested": "@examples/meta/nested_quickstart",
            "failing": str(write_config(tmp_path, FAILING, "failing.yaml")),
            "timeout": str(write_config(tmp_path, TIMING_OUT, "timeout.yaml")),
            "xss": str(write_config(tmp_path, openai_agents(oa.base_url), "xss.yaml")),
            "sleeper": str(write_config(tmp_path, SLEEPER, "sleeper.yaml")),
        }
        for name, cfg in configs.items():
            p = web_daemon.cli(["--automation", "--config", cfg, f"question {name}?"], tmp_path)
            assert p.stdout is not None
            line = p.stdout.readline().decode()
            assert line.startswith("LOG_DIR: "), line + p.stderr.read().decode() if p.stderr else line
            procs[name] = p
            dirs[name] = Path(line.split(": ", 1)[1].strip())
        try:
            for name in ("quick", "nested", "failing", "timeout", "xss"):
                assert procs[name].wait(timeout=600) is not None, name
            sleeper = dirs["sleeper"]
            _wait(lambda: _status(sleeper).get("run", {}).get("state") == "running", 120, "the sleeper to run")
            page.wait_for_timeout(800)  # the last status writes reach the page
            births.done.set()
            page.screenshot(path=str(shots / "runs.png"), full_page=True)

            seen: dict[str, float] = page.evaluate("window.__seen")
            states: dict[str, list[str]] = page.evaluate("window.__states")
            assert page.evaluate("window.__same_document") is True  # never reloaded
            children = list((dirs["nested"] / "children").glob("log_*"))
            assert len(children) == 1, "the nested run started one child"
            expected = {d.name for d in dirs.values()} | {children[0].name}
            assert expected <= set(seen), f"runs never shown: {expected - set(seen)}"
            delays = {r: round(seen[r] - births.seen[r], 3) for r in expected}
            print(f"shown after its log dir appeared (s): {sorted(delays.values())}")
            late = {r: d for r, d in delays.items() if d > APPEAR_S}
            assert not late, f"runs shown later than {APPEAR_S}s after their log dir appeared: {late}"
            # States changed live, on the open page: first seen unfinished, then finished (the
            # quickstart takes about as long as one render, so it may be finished when first shown).
            assert states[dirs["quick"].name][-1].startswith("finished"), states[dirs["quick"].name]
            for name in ("failing", "timeout", "xss"):
                seq = states[dirs[name].name]
                assert not seq[0].startswith("finished") and seq[-1].startswith("finished"), (name, seq)
            exits = {name: int(procs[name].returncode) for name in ("quick", "nested", "failing", "timeout", "xss")}
            assert exits == {"quick": 0, "nested": 0, "failing": 2, "timeout": 3, "xss": 0}, exits
            for name, code in exits.items():
                badge = page.locator(f"#r-{dirs[name].name} .badge").inner_text()
                assert badge == f"finished ({code})", (name, badge)
            child_row = page.locator(f"#r-{children[0].name}")
            assert child_row.get_attribute("data-parent") == dirs["nested"].name
            assert child_row.get_attribute("data-depth") == "1"

            # The run page: one mark per answer and vote; the cost line ends at status.json's totals.
            xss = dirs["xss"]
            page.goto(f"{base}/run/{xss.name}")
            page.wait_for_selector("#final-answer")
            counts = counts_in_events(xss)
            totals = _status(xss)["telemetry"]["totals"]
            assert totals["cost_usd"] > 0 and totals["calls"] > 0
            assert page.locator("svg.timeline g.mark.m-answer").count() == counts["answer"]
            assert page.locator("svg.timeline g.mark.m-vote").count() == counts["vote"]
            assert page.locator("svg.timeline g.mark.m-model").count() == totals["calls"]
            end = page.locator("circle.s-total-end[data-last-cost]")
            assert float(end.get_attribute("data-last-cost") or "nan") == totals["cost_usd"]
            tokens = page.locator("circle.s-total-end[data-last-tokens]").get_attribute("data-last-tokens")
            assert int(tokens or -1) == totals["total_tokens"]
            assert page.evaluate("window.__xss") is None
            assert KEY not in page.content()
            page.screenshot(path=str(shots / "run-gateway.png"), full_page=True)

            page.goto(f"{base}/run/{dirs['nested'].name}")
            page.wait_for_selector(f'#sec-children a[href="/run/{children[0].name}"]')
            page.screenshot(path=str(shots / "run-nested.png"), full_page=True)

            # Stop from the page: the run ends with exit 4, and the page says so without a reload.
            page.goto(f"{base}/run/{sleeper.name}")
            page.wait_for_selector("#live.on")
            page.once("dialog", lambda d: d.accept())
            page.click("#stop")
            assert procs["sleeper"].wait(timeout=120) == 4
            result = json.loads((sleeper / "result.json").read_text())
            assert (result["exit_code"], result["reason"]) == (4, "interrupted")
            page.wait_for_selector("#sec-head .badge.b-stopped", timeout=15_000)
            assert page.locator("#stop").count() == 0
            page.screenshot(path=str(shots / "run-stopped.png"), full_page=True)
        finally:
            births.done.set()
            for p in procs.values():
                if p.poll() is None:
                    p.kill()
                    p.wait(timeout=30)

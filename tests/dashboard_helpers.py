"""Helpers for the dashboard tests: log dirs made by the real materializer, a hostile answer, a browser."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from agent_image.protocol.events import ModelCall
from supervisor.logdir import create_run_dirs
from supervisor.materializer import Materializer
from tests.fakes import FakeRequest, FakeToolCall, Reply

XSS_ANSWER = (
    "# Result\n\n2 + 2 = **4**\n\n"
    "<script>window.__xss = 'script'</script>\n\n"
    '<img src="x" onerror="window.__xss = \'img\'">\n\n'
    "[click me](javascript:window.__xss='link') and [docs](https://example.invalid/docs)\n\n"
    "```python\nprint(2 + 2)\n```\n"
)
OPENAI_MODEL = "gpt-4o-mini"  # priced in configs/pricing.json
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update", "--no-first-run"]


def xss_policy(req: FakeRequest) -> Reply:
    """agent1 answers with XSS_ANSWER, the others vote for it, the winner presents it."""
    text = req.prompt_text
    if "selected to present" in text:
        return Reply(text=XSS_ANSWER, prompt_tokens=900, completion_tokens=120, cached_tokens=100)
    if "(no answers available yet)" in text:
        answer = FakeToolCall("new_answer", {"content": XSS_ANSWER})
        return Reply(tool_calls=[answer], prompt_tokens=700, completion_tokens=90)
    vote = FakeToolCall("vote", {"agent_id": "agent1", "reason": "<b>bold</b> claim"})
    return Reply(tool_calls=[vote], prompt_tokens=800, completion_tokens=40, cached_tokens=200)


def openai_agents(base_url: str, n_agents: int = 2) -> str:
    return "agents:\n" + "".join(
        f'  - id: m{i}\n    backend: {{type: openai, model: {OPENAI_MODEL}, base_url: "{base_url}"}}\n'
        for i in range(1, n_agents + 1)
    )


class FakeRun:
    """A run's log dir written by the real Materializer from events we make up (no sandbox)."""

    def __init__(self, root: Path, agents: tuple[str, ...] = ("a", "b"), question: str = "Q?", depth: int = 0) -> None:
        self.paths = create_run_dirs(root, root.parent / f"ws-{root.name}")
        self.mat = Materializer(self.paths)
        self.agents = agents
        self.seq = 0
        self.t0 = time.time()
        self.mat.set_run(depth=depth)
        self.event(
            "run_started",
            run_id=self.paths.run_id,
            question=question,
            timeout_seconds=60,
            agents=[
                {"id": a, "anon": f"agent{i + 1}", "backend": "openai", "model": "m"} for i, a in enumerate(agents)
            ],
        )
        self.write()

    @property
    def log_dir(self) -> Path:
        return self.paths.log_dir

    @property
    def run_id(self) -> str:
        return self.paths.run_id

    def event(self, kind: str, **fields: Any) -> None:
        line = json.dumps({"v": 1, "seq": self.seq, "ts": time.time(), "type": kind, **fields})
        assert self.mat.feed(line.encode()) is not None, line
        self.seq += 1

    def answer(self, agent: str, content: str) -> None:
        n = (
            sum(1 for _ in (self.log_dir / "agents" / agent).glob("*"))
            if (self.log_dir / "agents" / agent).exists()
            else 0
        )
        self.event("answer", agent=agent, label=f"agent{self.agents.index(agent) + 1}.{n + 1}", content=content)

    def vote(self, agent: str, target: str, reason: str = "good") -> None:
        self.event("vote", agent=agent, target=target, reason=reason)

    def model_call(self, agent: str, prompt: int, completion: int, cost: float) -> None:
        self.mat.record_model_call(
            ModelCall(
                seq=0,
                ts=time.time(),
                agent=agent,
                provider="openai",
                model="m",
                prompt_tokens=prompt,
                completion_tokens=completion,
                cost_usd=cost,
            )
        )

    def finish(self, reason: str = "completed") -> None:
        from agent_image.protocol.result import Reason
        from supervisor.verdict import Verdict

        if reason == "completed":
            self.event("winner", winner=self.agents[0], votes={self.agents[0]: len(self.agents)})
            self.event("final_answer", agent=self.agents[0], content="final")
        self.mat.finalize(Verdict(Reason(reason)))

    def write(self) -> None:
        self.mat.write_status(force=True)

    def close(self) -> None:
        self.mat.close()


def counts_in_events(log_dir: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in (log_dir / "events.jsonl").read_text().splitlines():
        kind = json.loads(line)["type"]
        out[kind] = out.get(kind, 0) + 1
    return out


@contextmanager
def browser(artifacts: Path) -> Iterator[Any]:
    """Debian's chromium, headless, driven by Playwright (its own browser download is never used)."""
    from playwright.sync_api import sync_playwright

    assert shutil.which(CHROMIUM), "chromium is missing: bash scripts/setup.sh installs Debian's chromium"
    artifacts.mkdir(parents=True, exist_ok=True)
    profile = artifacts / "profile"
    with sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(
            str(profile),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 900},
        )
        try:
            yield ctx
        finally:
            ctx.close()
            shutil.rmtree(profile, ignore_errors=True)


def artifacts_dir(name: str) -> Path:
    """Where a browser test leaves its screenshots: $MASSGEN_TEST_ARTIFACTS or ./test-artifacts (git-ignored)."""
    import os

    from tests.cli_helpers import REPO

    base = Path(os.environ.get("MASSGEN_TEST_ARTIFACTS") or REPO / "test-artifacts")
    out = base / "dashboard" / name
    out.mkdir(parents=True, exist_ok=True)
    print(f"screenshots: {out}")
    return out


def start_dashboard(logs_root: Path, cwd: Path, **env: str) -> tuple[Any, str]:
    """`massgen-run dashboard --port 0` in the background; returns the process and its DASHBOARD url."""
    import subprocess
    import sys

    from tests.cli_helpers import cli_env

    proc = subprocess.Popen(
        [sys.executable, "-m", "supervisor.cli", "dashboard", "--port", "0", "--logs-root", str(logs_root)],
        cwd=cwd,
        env=cli_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("DASHBOARD: http://127.0.0.1:"), line + (
        proc.stderr.read() if proc.stderr is not None and proc.poll() is not None else ""
    )
    return proc, line.split(": ", 1)[1].strip()

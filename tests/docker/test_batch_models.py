"""Batches of model runs against loopback fake upstreams: 429s, an upstream that is down, the batch budget.

The batch embeds its supervisor (`--image`), so the gateway runs on this host next to the fakes.
"""

from __future__ import annotations

import json
import math
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.cli_helpers import load, massgen_run, parse_lines
from tests.fakes import FakeOpenAI, FakeRequest, FakeToolCall, Fault, Reply, closed

pytestmark = pytest.mark.docker

KEY = "sk-batch-host-secret"
MODEL = "gpt-4o-mini"  # priced in configs/pricing.json: $0.15 in, $0.60 out per 1M tokens


def policy(req: FakeRequest) -> Reply:
    """One agent: answer 4 when there is no answer, vote for itself, then present."""
    text = req.prompt_text
    if "selected to present" in text:
        return Reply(text="4", prompt_tokens=100_000, completion_tokens=10_000)
    if "(no answers available yet)" in text:
        return Reply(
            tool_calls=[FakeToolCall("new_answer", {"content": "4"})], prompt_tokens=100_000, completion_tokens=10_000
        )
    vote = FakeToolCall("vote", {"agent_id": "agent1", "reason": "correct"})
    return Reply(tool_calls=[vote], prompt_tokens=100_000, completion_tokens=10_000)


CALL_COST = (100_000 * 0.15 + 10_000 * 0.60) / 1e6  # $0.021


def _spec(tmp: Path, base_url: str, extra: str = "", n: int = 4) -> Path:
    (tmp / "model.yaml").write_text(
        "agents:\n"
        f'  - id: gpt\n    backend: {{type: openai, model: {MODEL}, base_url: "{base_url}", stream: false}}\n'
        "timeout_settings:\n  orchestrator_timeout_seconds: 60\n  agent_timeout_seconds: 30\n"
        "sandbox:\n  memory: 256m\n"
    )
    qs = "".join(json.dumps({"id": f"q{i}", "question": "What is 2+2?", "expected": 4}) + "\n" for i in range(n))
    (tmp / "qs.jsonl").write_text(qs)
    spec = tmp / "batch.yaml"
    spec.write_text("configs:\n  m: model.yaml\nquestions: qs.jsonl\nassert:\n  - type: number_close\n" + extra)
    return spec


def _run(spec: Path, d: Path, image: str, timeout: float = 400) -> subprocess.CompletedProcess[str]:
    return massgen_run(
        ["batch", str(spec), "--batch-dir", str(d), "--automation", "--image", image],
        spec.parent,
        timeout=timeout,
        OPENAI_API_KEY=KEY,
    )


def _ledger(d: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (d / "items.jsonl").read_text().splitlines()]


@pytest.mark.timeout(600)
def test_429_then_200_passes_and_a_down_upstream_is_retried_then_an_error(tmp_path: Path, agent_image: str) -> None:
    """Rate limited first (429 with Retry-After), then fine: every item passes on its first attempt (the
    gateway waited). An upstream that is down: each item is retried in a fresh run, then recorded an
    `error` (upstream_unavailable), and the batch exits 2 (item errors over max_item_errors)."""
    with FakeOpenAI(policy, faults=[Fault(429, "slow down", retry_after=0.3)] * 2, api_key=KEY) as oa:
        (tmp_path / "ok").mkdir()
        spec = _spec(tmp_path / "ok", oa.base_url, n=2)
        d = tmp_path / "ok-batch"
        res = _run(spec, d, agent_image)
        assert res.returncode == 0, res.stdout + res.stderr
        recs = _ledger(d)
        assert [(r["state"], r["attempt"]) for r in recs] == [("pass", 1), ("pass", 1)]
        assert sum(1 for r in oa.requests if r.path.endswith("/chat/completions")) == 2 + 2 * 3
    down = tmp_path / "down"
    down.mkdir()
    spec = _spec(down, f"http://127.0.0.1:{closed()}/v1", "retry:\n  max_attempts: 2\n  backoff_s: 0.1\n", n=2)
    d = tmp_path / "down-batch"
    res = _run(spec, d, agent_image)
    assert res.returncode == 2, res.stdout + res.stderr
    recs = _ledger(d)
    assert Counter((r["question"], r["attempt"]) for r in recs) == {
        ("q0", 1): 1,
        ("q0", 2): 1,
        ("q1", 1): 1,
        ("q1", 2): 1,
    }
    assert {(r["state"], r["reason"], r["retryable"]) for r in recs} == {("error", "upstream_unavailable", True)}
    assert len({r["run_id"] for r in recs}) == 4  # every attempt its own run
    s = load(d / "summary.json")
    assert s["counts"]["error"] == 2 and s["exit_code"] == 2
    assert parse_lines(res.stdout)["RESULTS"] == "0 pass, 0 fail, 2 error, 0 skipped"


@pytest.mark.timeout(600)
def test_batch_budget_exhausted_mid_batch_exits_3_with_partial_reports(tmp_path: Path, agent_image: str) -> None:
    """A $0.15 batch budget at $0.063 per item, one at a time: the batch stops during the third item,
    starts nothing after, skips the rest, writes the reports and exits 3; calls stop with the items."""
    with FakeOpenAI(policy, api_key=KEY) as oa:
        spec = _spec(tmp_path, oa.base_url, "budget:\n  max_cost_usd: 0.15\nmax_parallel: 1\n", n=6)
        d = tmp_path / "batch"
        res = _run(spec, d, agent_image)
        calls = sum(1 for r in oa.requests if r.path.endswith("/chat/completions"))
    assert res.returncode == 3, res.stdout + res.stderr
    assert res.stdout.splitlines()[-1].startswith("STOPPED: batch budget reached")
    s = load(d / "summary.json")
    assert s["state"] == "budget" and s["exit_code"] == 3
    started = [p for p in (d / "runs").iterdir() if p.name != "workspaces"]
    # Once spent, nothing starts: at most ceil(budget / item cost) items ever ran.
    assert len(started) <= math.ceil(0.15 / (3 * CALL_COST))
    assert s["counts"]["pass"] >= 2 and s["counts"]["skipped"] + s["counts"]["pass"] == 6
    # The batch is an ancestor in the gateway's budget tree: once spent, calls are refused at the
    # gateway; the overshoot is at most one call per agent calling at that moment (one here).
    assert calls <= 3 * len(started)
    assert calls * CALL_COST <= 0.15 + CALL_COST + 1e-9
    assert any(r["reason"] == "budget_exhausted" for r in _ledger(d)) or calls * CALL_COST >= 0.15
    assert s["cost_usd"] == pytest.approx(sum(r["cost_usd"] for r in _ledger(d)))
    assert s["cost_usd"] >= 0.15 - 1e-9 or any(r["state"] == "skipped" for r in _ledger(d))
    assert load(d / "status.json")["ending"] == "budget"
    assert (d / "junit.xml").exists() and (d / "summary.md").exists()


def rubric_policy(req: FakeRequest) -> Reply:
    """A grader: pass when the graded answer is 4."""
    answer = req.prompt_text.rsplit("Answer to grade:\n", 1)[-1].strip()
    verdict = {"pass": answer == "4", "score": 1.0 if answer == "4" else 0.0, "reason": f"the answer is {answer}"}
    return Reply(text=json.dumps(verdict), prompt_tokens=1000, completion_tokens=100)


@pytest.mark.timeout(600)
def test_llm_rubric_grades_through_a_gateway_with_its_own_budget(tmp_path: Path, agent_image: str) -> None:
    """llm_rubric calls go through a gateway (the host's key added there) metered by grading_budget:
    a right answer passes, a wrong one fails, and once the grading budget is spent the item is an
    `error` (grader_error), not a failure; grading spend is reported apart from the items'."""
    from tests.cli_helpers import REPO

    (tmp_path / "good.yaml").write_text((REPO / "tests" / "data" / "batch" / "good.yaml").read_text())
    with FakeOpenAI(rubric_policy, api_key=KEY) as oa:
        spec = tmp_path / "batch.yaml"
        spec.write_text(
            "configs:\n  good: good.yaml\n"
            "questions:\n"
            "  - {id: a, question: 2+2}\n  - {id: b, question: 2+3}\n  - {id: c, question: 1+3}\n"
            "assert:\n"
            f"  - {{type: llm_rubric, model: {MODEL}, base_url: '{oa.base_url}', rubric: 'The answer must be 4.'}}\n"
            "grading_budget:\n  max_calls: 2\nmax_parallel: 1\n"
        )
        d = tmp_path / "batch"
        res = _run(spec, d, agent_image)
        seen = [r for r in oa.requests if r.path.endswith("/chat/completions")]
    assert res.returncode == 2, res.stdout + res.stderr
    by_q = {r["question"]: r for r in _ledger(d)}
    assert (by_q["a"]["state"], by_q["b"]["state"], by_q["c"]["state"]) == ("pass", "fail", "error")
    assert by_q["c"]["reason"] == "grader_error" and "budget" in by_q["c"]["why"]
    assert len(seen) == 2 and all(r.headers.get("authorization") == f"Bearer {KEY}" for r in seen)
    s = load(d / "summary.json")
    assert s["cost_usd"] == 0.0 and s["grading_cost_usd"] == pytest.approx(2 * (1000 * 0.15 + 100 * 0.60) / 1e6)

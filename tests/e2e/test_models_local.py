"""Full coordination rounds with the openai and gemini backends (real SDKs) against fake upstreams."""

from __future__ import annotations

import time
from pathlib import Path

from tests.cli_helpers import load, massgen_run, parse_lines, write_config
from tests.fakes import FakeGemini, FakeOpenAI, FakeRequest, FakeToolCall, Fault, Reply, closed


def coordinating_policy(req: FakeRequest) -> Reply:
    """Answer when nobody has, present when selected, otherwise vote for agent1."""
    text = req.prompt_text
    if "selected to present" in text:
        return Reply(text="FINAL: 2 + 2 = 4", prompt_tokens=30, completion_tokens=5)
    if "(no answers available yet)" in text:
        return Reply(
            tool_calls=[FakeToolCall("new_answer", {"content": "2 + 2 = 4"})], prompt_tokens=20, completion_tokens=7
        )
    return Reply(
        tool_calls=[FakeToolCall("vote", {"agent_id": "agent1", "reason": "correct"})],
        prompt_tokens=25,
        completion_tokens=6,
    )


def _run(tmp_path: Path, config: str, *, timeout: float = 120, **env: str) -> tuple[int, dict[str, str], str]:
    cfg = write_config(tmp_path, config)
    p = massgen_run(
        ["--automation", "--sandbox", "none", "--config", str(cfg), "What is 2+2?"], tmp_path, timeout=timeout, **env
    )
    return p.returncode, parse_lines(p.stdout), p.stdout + p.stderr


def test_openai_and_gemini_agents_complete_a_round(tmp_path: Path) -> None:
    """An OpenAI (streaming) and a Gemini agent answer, vote and present; telemetry matches the fakes."""
    with FakeOpenAI(coordinating_policy) as oa, FakeGemini(coordinating_policy) as gm:
        code, f, out = _run(
            tmp_path,
            f"""\
            agents:
              - id: gpt
                backend: {{type: openai, model: gpt-test, base_url: "{oa.base_url}"}}
              - id: gem
                backend: {{type: gemini, model: gemini-test, base_url: "{gm.root_url}"}}
            """,
            OPENAI_API_KEY="sk-test",
            GEMINI_API_KEY="gm-test",
        )
        assert code == 0, out
        assert Path(f["ANSWER_FILE"]).read_text() == "FINAL: 2 + 2 = 4"
        assert any(r.get("stream") for r in oa.requests)
        st = load(f["STATUS_FILE"])
        t = st["telemetry"]
        assert t["by_model"]["openai/gpt-test"]["prompt_tokens"] == oa.usage.prompt_tokens
        assert t["by_model"]["gemini/gemini-test"]["completion_tokens"] == gm.usage.completion_tokens
        assert t["totals"]["calls"] == oa.usage.calls + gm.usage.calls
        assert set(t["by_agent"]) == {"gpt", "gem"}


def test_model_server_down_exits_2_quickly(tmp_path: Path) -> None:
    """An upstream where nothing listens: exit 2 (backend_error) well before any timeout."""
    t0 = time.monotonic()
    code, f, out = _run(
        tmp_path,
        f"""\
        agents:
          - id: gpt
            backend: {{type: openai, model: gpt-test, base_url: "http://127.0.0.1:{closed()}/v1"}}
        """,
        OPENAI_API_KEY="sk-test",
        MASSGEN_MODEL_MAX_RETRIES="1",
    )
    assert code == 2, out
    assert time.monotonic() - t0 < 30
    assert out.splitlines()[-1].startswith("FAILED: backend_error") or "backend_error" in out
    assert "127.0.0.1" in load(Path(f["LOG_DIR"]) / "result.json")["detail"]


def test_http_500_on_every_request_exits_2(tmp_path: Path) -> None:
    """An upstream answering 500 to everything: exit 2 within a bounded time, key not in the output."""
    with FakeGemini(lambda req: Fault(500, "boom")) as gm:
        t0 = time.monotonic()
        code, f, out = _run(
            tmp_path,
            f"""\
            agents:
              - id: gem
                backend: {{type: gemini, model: gemini-test, base_url: "{gm.root_url}"}}
            """,
            GEMINI_API_KEY="gm-secret-key",
            MASSGEN_MODEL_MAX_RETRIES="1",
        )
        assert code == 2, out
        assert time.monotonic() - t0 < 60
        assert "gm-secret-key" not in out
        assert "gm-secret-key" not in (Path(f["LOG_DIR"]) / "massgen.log").read_text()


def test_model_that_never_calls_a_tool_exits_2(tmp_path: Path) -> None:
    """A model that only chats is corrected, then failed; with no answer at all the run exits 2."""
    with FakeOpenAI(lambda req: Reply(text="I would say four.")) as oa:
        code, f, out = _run(
            tmp_path,
            f"""\
            agents:
              - id: gpt
                backend: {{type: openai, model: gpt-test, base_url: "{oa.base_url}"}}
            orchestrator: {{max_invalid_turns: 2}}
            """,
            OPENAI_API_KEY="sk-test",
        )
        assert code == 2, out
        assert "agent_failed" in out.splitlines()[-1] or "agent_failed" in out
        st = load(f["STATUS_FILE"])
        assert st["agents"]["gpt"]["status"] == "failed"

"""ClaudeBackend with the real anthropic SDK against the fake Messages API (streaming, tool use, usage),
directly and through the model gateway."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from typing import Any

import pytest

from agent_image.backends.base import BackendError, Completion, Message, ToolCall, ToolSpec
from agent_image.backends.claude_backend import ClaudeBackend
from agent_image.protocol.config import BackendConfig
from supervisor.gateway import BudgetMeter, CallRecord, Gateway, Upstream
from supervisor.pricing import DEFAULT_PRICING_FILE, Pricing
from tests.fakes import FakeAnthropic, FakeRequest, FakeToolCall, Fault, Reply

KEY = "sk-ant-test-0123456789SECRET"
MODEL = "claude-sonnet-4-5"
VOTE = ToolSpec(
    name="vote",
    description="Vote.",
    parameters={"type": "object", "properties": {"agent_id": {"type": "string"}}, "required": ["agent_id"]},
)
QUESTION = [Message(role="system", content="You are agent_a."), Message(role="user", content="What is 2+2?")]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL", "MASSGEN_MODEL_SOCKET", "MASSGEN_MODEL_MAX_RETRIES"):
        monkeypatch.delenv(name, raising=False)


def cfg(base_url: str | None, **kw: Any) -> BackendConfig:
    return BackendConfig(type="claude", model=MODEL, base_url=base_url, **kw)


def run(backend: ClaudeBackend, messages: list[Message], tools: list[ToolSpec] | None = None) -> Completion:
    async def go() -> Completion:
        try:
            return await backend.complete(messages, [VOTE] if tools is None else tools)
        finally:
            await backend.aclose()

    return asyncio.run(go())


@pytest.mark.parametrize("stream", [True, False])
def test_text_and_tool_use_with_usage(stream: bool) -> None:
    """Text and a tool_use block come back as text and a ToolCall; usage counts cache reads in the prompt."""
    reply = Reply(
        text="Voting now.",
        tool_calls=[FakeToolCall("vote", {"agent_id": "agent2"}, id="toolu_1")],
        prompt_tokens=120,
        completion_tokens=30,
        cached_tokens=20,
    )
    with FakeAnthropic(lambda r: reply, api_key=KEY) as f:
        c = run(ClaudeBackend(cfg(f.root_url, stream=stream, max_tokens=500), api_key=KEY), QUESTION)
    assert c.message.content == "Voting now."
    assert c.message.tool_calls == (ToolCall("toolu_1", "vote", {"agent_id": "agent2"}),)
    assert (c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.cached_tokens) == (120, 30, 20)
    body = f.requests[0]
    assert body["system"] == "You are agent_a." and body["max_tokens"] == 500
    assert body["tools"][0]["input_schema"]["required"] == ["agent_id"]
    assert f.requests[0].headers["authorization"] == f"Bearer {KEY}" and bool(body.get("stream")) == stream
    assert (c.ttft_s is not None) == stream


def test_tool_results_round_trip_as_user_blocks() -> None:
    """A tool call and its result replay as tool_use / tool_result blocks in alternating turns."""
    history = [
        *QUESTION,
        Message(role="assistant", content="", tool_calls=(ToolCall("toolu_9", "shell", {"command": "ls"}),)),
        Message(role="tool", content="a.txt", tool_call_id="toolu_9", name="shell"),
        Message(role="user", content="Now vote."),
    ]
    with FakeAnthropic(lambda r: Reply(text="ok"), api_key=KEY) as f:
        run(ClaudeBackend(cfg(f.root_url), api_key=KEY), history)
    msgs = f.requests[0]["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"]
    assert msgs[1]["content"] == [{"type": "tool_use", "id": "toolu_9", "name": "shell", "input": {"command": "ls"}}]
    assert msgs[2]["content"][0] == {"type": "tool_result", "tool_use_id": "toolu_9", "content": "a.txt"}
    assert msgs[2]["content"][1] == {"type": "text", "text": "Now vote."}


def test_errors_are_backend_errors_without_the_key() -> None:
    """A 401 (the fake echoes the key it got) is a BackendError naming the status, with keys redacted."""
    with FakeAnthropic(lambda r: Reply(text="x"), api_key="the-right-key") as f, pytest.raises(BackendError) as info:
        run(ClaudeBackend(cfg(f.root_url), api_key=KEY, max_retries=0), QUESTION)
    assert info.value.status == 401 and KEY not in str(info.value)
    with FakeAnthropic(faults=[Fault(529, "overloaded")] * 5) as f, pytest.raises(BackendError, match="529"):
        run(ClaudeBackend(cfg(f.root_url), api_key=KEY, max_retries=1), QUESTION)
    with pytest.raises(BackendError, match="ANTHROPIC_API_KEY"):
        ClaudeBackend(cfg(None))


@contextlib.asynccontextmanager
async def _gateway(fake: FakeAnthropic, seen: list[CallRecord]) -> AsyncIterator[str]:
    gateway = Gateway(
        {"claude": Upstream("claude", fake.root_url, KEY)},
        meter=BudgetMeter(on_record=seen.append),
        pricing=Pricing.load(DEFAULT_PRICING_FILE),
        allowed_models={"claude": {MODEL}},
    )
    folder = tempfile.mkdtemp(prefix="gw", dir="/tmp")
    sock = os.path.join(folder, "g.sock")
    runner = await gateway.serve_unix(sock)
    try:
        yield sock
    finally:
        await runner.cleanup()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("stream", [True, False])
def test_through_the_gateway_the_host_key_is_added_and_usage_metered(
    stream: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Behind the socket the sandbox sends a placeholder; the gateway adds x-api-key and meters
    message_start + message_delta usage, priced from configs/pricing.json."""
    seen: list[CallRecord] = []

    def policy(req: FakeRequest) -> Reply:
        return Reply(text="FINAL: 4", prompt_tokens=1000, completion_tokens=40, cached_tokens=300)

    async def go(fake: FakeAnthropic) -> Completion:
        async with _gateway(fake, seen) as sock:
            monkeypatch.setenv("MASSGEN_MODEL_SOCKET", sock)
            b = ClaudeBackend(cfg(None, stream=stream), agent_id="agent_a")
            try:
                return await b.complete(QUESTION, [VOTE])
            finally:
                await b.aclose()

    with FakeAnthropic(policy, api_key=KEY) as fake:
        c = asyncio.run(go(fake))
    assert c.message.content == "FINAL: 4"
    assert fake.requests[0].headers["authorization"] == f"Bearer {KEY}" and fake.requests[0].path == "/v1/messages"
    assert "x-api-key" not in fake.requests[0].headers
    assert len(seen) == 1
    rec = seen[0]
    assert (rec.agent, rec.provider, rec.model) == ("agent_a", "claude", MODEL)
    assert (rec.prompt_tokens, rec.completion_tokens, rec.cached_tokens) == (1000, 40, 300)
    assert (fake.usage.prompt_tokens, fake.usage.completion_tokens, fake.usage.cached_tokens) == (1000, 40, 300)
    assert rec.cost_usd == pytest.approx((700 * 3.0 + 300 * 0.30 + 40 * 15.0) / 1e6)

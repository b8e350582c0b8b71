"""OpenAIBackend with the real openai SDK against the fake Chat Completions upstream."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Any

import pytest

from agent_image.backends.base import BackendError, Completion, Message, ToolCall, ToolSpec
from agent_image.backends.openai_backend import OpenAIBackend
from agent_image.protocol.config import BackendConfig
from tests.fakes import FakeOpenAI, FakeRequest, FakeToolCall, Fault, Reply, closed, sequence

KEY = "sk-test-0123456789abcdefSECRET"
VOTE = ToolSpec(
    name="vote",
    description="Vote for the best answer.",
    parameters={
        "type": "object",
        "properties": {"agent_id": {"type": "string"}, "reason": {"type": "string"}},
        "required": ["agent_id"],
    },
)
NEW_ANSWER = ToolSpec(
    name="new_answer",
    description="Offer an answer.",
    parameters={"type": "object", "properties": {"content": {"type": "string"}}, "required": ["content"]},
)
TOOLS = [NEW_ANSWER, VOTE]
QUESTION = [Message(role="system", content="You are agent_a."), Message(role="user", content="What is 2+2?")]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "OPENAI_API_KEY",
        "OPENAI_BASE_URL",
        "MASSGEN_MODEL_SOCKET",
        "MASSGEN_MODEL_TIMEOUT",
        "MASSGEN_MODEL_MAX_RETRIES",
    ):
        monkeypatch.delenv(name, raising=False)


def cfg(base_url: str | None, **kw: Any) -> BackendConfig:
    return BackendConfig(type="openai", model="gpt-test", base_url=base_url, **kw)


def run(backend: OpenAIBackend, messages: list[Message], tools: list[ToolSpec] | None = None) -> Completion:
    async def go() -> Completion:
        try:
            return await backend.complete(messages, TOOLS if tools is None else tools)
        finally:
            await backend.aclose()

    return asyncio.run(go())


def fails(backend: OpenAIBackend, messages: list[Message] = QUESTION) -> tuple[BackendError, float]:
    t0 = time.monotonic()
    with pytest.raises(BackendError) as info:
        run(backend, messages)
    return info.value, time.monotonic() - t0


def test_import_does_not_load_sdk() -> None:
    """Importing the backend module leaves the openai SDK unimported."""
    code = (
        "import sys, agent_image.backends.openai_backend\n"
        "print(sorted(m for m in sys.modules if m == 'openai' or m.startswith(('openai.', 'httpx2'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_stream_text() -> None:
    """A streamed text reply is joined, with usage, model, latency and time to first token."""
    with FakeOpenAI(lambda r: Reply(text="The answer is four.", prompt_tokens=42, completion_tokens=7)) as f:
        c = run(OpenAIBackend(cfg(f.base_url), api_key=KEY), QUESTION)
    assert c.message == Message(role="assistant", content="The answer is four.")
    assert (c.usage.prompt_tokens, c.usage.completion_tokens) == (42, 7)
    assert c.model == "gpt-test"
    assert c.ttft_s is not None and 0 < c.ttft_s <= c.latency_s
    body = f.requests[0]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert f.requests[0].headers["authorization"] == f"Bearer {KEY}"


def test_non_stream_text() -> None:
    """With stream off the backend makes a plain JSON call and reports no time to first token."""
    with FakeOpenAI(lambda r: Reply(text="Four.", prompt_tokens=5, completion_tokens=2)) as f:
        c = run(OpenAIBackend(cfg(f.base_url, stream=False), api_key=KEY), QUESTION)
    assert c.message.content == "Four."
    assert (c.usage.prompt_tokens, c.usage.completion_tokens) == (5, 2)
    assert c.ttft_s is None and c.latency_s > 0
    assert not f.requests[0].get("stream")


def test_stream_tool_call_arguments_split_across_deltas() -> None:
    """Tool-call arguments streamed a few characters per delta are reassembled into a dict."""
    answer = {"content": "2+2 is 4, because adding two and two gives four."}
    reply = Reply(tool_calls=[FakeToolCall("new_answer", answer, id="call_abc")], chunk_size=3)
    with FakeOpenAI(lambda r: reply) as f:
        c = run(OpenAIBackend(cfg(f.base_url), api_key=KEY), QUESTION)
    assert c.message.tool_calls == (ToolCall("call_abc", "new_answer", answer),)
    assert c.ttft_s is not None


@pytest.mark.parametrize("stream", [True, False])
def test_two_tool_calls_in_one_reply(stream: bool) -> None:
    """Two tool calls in one reply come back in order, each with its own id and arguments."""
    calls = [
        FakeToolCall("vote", {"agent_id": "agent1", "reason": "clear"}, id="call_1"),
        FakeToolCall("new_answer", {"content": "4"}, id="call_2"),
    ]
    with FakeOpenAI(lambda r: Reply(text="Thinking...", tool_calls=calls, chunk_size=4)) as f:
        c = run(OpenAIBackend(cfg(f.base_url, stream=stream), api_key=KEY), QUESTION)
    assert c.message.content == "Thinking..."
    assert c.message.tool_calls == (
        ToolCall("call_1", "vote", {"agent_id": "agent1", "reason": "clear"}),
        ToolCall("call_2", "new_answer", {"content": "4"}),
    )


@pytest.mark.parametrize("stream", [True, False])
def test_malformed_arguments_come_back_raw(stream: bool) -> None:
    """Arguments that are not a JSON object are passed on as {"__raw__": text}, not raised."""
    calls = [FakeToolCall("vote", '{"agent_id": "agent1', id="c1"), FakeToolCall("vote", "[1, 2]", id="c2")]
    with FakeOpenAI(lambda r: Reply(tool_calls=calls)) as f:
        c = run(OpenAIBackend(cfg(f.base_url, stream=stream), api_key=KEY), QUESTION)
    assert [tc.arguments for tc in c.message.tool_calls] == [
        {"__raw__": '{"agent_id": "agent1'},
        {"__raw__": "[1, 2]"},
    ]


def test_conversation_round_trip() -> None:
    """Tools, assistant tool calls and tool results reach the wire in Chat Completions form."""

    def policy(req: FakeRequest) -> Reply:
        if "<answers>" not in req.prompt_text:
            return Reply(tool_calls=[FakeToolCall("new_answer", {"content": "4"}, id="call_na")])
        return Reply(tool_calls=[FakeToolCall("vote", {"agent_id": "agent1", "reason": "ok"}, id="call_v")])

    with FakeOpenAI(policy) as f:
        backend = OpenAIBackend(cfg(f.base_url), api_key=KEY)

        async def go() -> tuple[Completion, Completion]:
            first = await backend.complete(QUESTION, TOOLS)
            history = [
                *QUESTION,
                first.message,
                Message(role="tool", content="recorded", tool_call_id="call_na", name="new_answer"),
                Message(role="user", content="<answers>agent1: 4</answers> Vote now."),
            ]
            second = await backend.complete(history, TOOLS)
            await backend.aclose()
            return first, second

        first, second = asyncio.run(go())
    assert first.message.tool_calls[0].name == "new_answer"
    assert second.message.tool_calls == (ToolCall("call_v", "vote", {"agent_id": "agent1", "reason": "ok"}),)
    sent = f.requests[1]
    assert sent["messages"] == [
        {"role": "system", "content": "You are agent_a."},
        {"role": "user", "content": "What is 2+2?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_na",
                    "type": "function",
                    "function": {"name": "new_answer", "arguments": json.dumps({"content": "4"})},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_na", "content": "recorded"},
        {"role": "user", "content": "<answers>agent1: 4</answers> Vote now."},
    ]
    assert sent["tools"][1] == {
        "type": "function",
        "function": {"name": "vote", "description": VOTE.description, "parameters": VOTE.parameters},
    }
    assert sent["model"] == "gpt-test"


def test_usage_matches_what_the_fake_reported() -> None:
    """Summed Completion usage, cached tokens included, equals what the upstream reported."""
    replies = sequence(
        Reply(text="a", prompt_tokens=100, completion_tokens=10, cached_tokens=64),
        Reply(text="b", prompt_tokens=120, completion_tokens=20, cached_tokens=96),
        Reply(text="c"),
    )
    with FakeOpenAI(replies) as f:
        backend = OpenAIBackend(cfg(f.base_url), api_key=KEY)
        slow = OpenAIBackend(cfg(f.base_url, stream=False), api_key=KEY)

        async def go() -> list[Completion]:
            out = [await backend.complete(QUESTION, TOOLS), await slow.complete(QUESTION, TOOLS)]
            out.append(await backend.complete(QUESTION, []))
            await backend.aclose()
            await slow.aclose()
            return out

        done = asyncio.run(go())
    assert [c.usage.cached_tokens for c in done[:2]] == [64, 96]
    assert f.usage.calls == 3
    assert sum(c.usage.prompt_tokens for c in done) == f.usage.prompt_tokens
    assert sum(c.usage.completion_tokens for c in done) == f.usage.completion_tokens
    assert sum(c.usage.cached_tokens for c in done) == f.usage.cached_tokens == 160
    assert "tools" not in f.requests[2]


def test_rate_limit_then_success_honours_retry_after() -> None:
    """A 429 with Retry-After: 1 is retried after about a second and the call then succeeds."""
    with FakeOpenAI(lambda r: Reply(text="ok"), faults=[Fault(429, "slow down", retry_after=1)]) as f:
        t0 = time.monotonic()
        c = run(OpenAIBackend(cfg(f.base_url), api_key=KEY), QUESTION)
        took = time.monotonic() - t0
    assert c.message.content == "ok"
    assert len(f.requests) == 2
    # The SDK's own first backoff is at most 0.5 s: waiting longer means it obeyed the header.
    assert 0.95 <= took < 5


def test_always_500_fails_naming_the_upstream() -> None:
    """A server that always answers 500 yields BackendError(status=500) naming its host, quickly."""
    with FakeOpenAI(lambda r: Fault(500, "The server had an error")) as f:
        err, took = fails(OpenAIBackend(cfg(f.base_url), api_key=KEY, max_retries=1))
        host = f"127.0.0.1:{f.port}"
    assert err.status == 500 and err.provider == "openai"
    assert host in str(err) and "The server had an error" in str(err)
    assert "\n" not in str(err)
    assert len(f.requests) == 2
    assert took < 4


def test_retry_budget_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """MASSGEN_MODEL_MAX_RETRIES=0 makes a 503 fail on the first attempt."""
    monkeypatch.setenv("MASSGEN_MODEL_MAX_RETRIES", "0")
    with FakeOpenAI(lambda r: Fault(503, "overloaded")) as f:
        err, _ = fails(OpenAIBackend(cfg(f.base_url), api_key=KEY))
    assert err.status == 503 and len(f.requests) == 1


def test_server_down_fails_fast() -> None:
    """Nothing listening at the base URL gives BackendError naming the host within seconds."""
    port = closed()
    err, took = fails(OpenAIBackend(cfg(f"http://127.0.0.1:{port}/v1"), api_key=KEY, max_retries=1))
    assert f"127.0.0.1:{port}" in str(err) and "cannot reach" in str(err)
    assert err.status is None
    assert took < 4


def test_timeout_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """MASSGEN_MODEL_TIMEOUT bounds how long a silent upstream is waited for."""
    monkeypatch.setenv("MASSGEN_MODEL_TIMEOUT", "0.3")
    with FakeOpenAI(lambda r: Reply(text="late", delay_s=3)) as f:
        err, took = fails(OpenAIBackend(cfg(f.base_url), api_key=KEY, max_retries=0))
    assert "timed out" in str(err) and f"127.0.0.1:{f.port}" in str(err)
    assert took < 2


def test_api_key_never_in_error_text(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 401 whose body echoes the key (from the ctor or OPENAI_API_KEY) shows no key in the error."""
    wrong = "sk-proj-WRONGwrongWRONG0123456789"
    with FakeOpenAI(api_key="sk-the-right-one-0000000000") as f:
        err, _ = fails(OpenAIBackend(cfg(f.base_url), api_key=wrong))
        monkeypatch.setenv("OPENAI_API_KEY", "plainsecretvalue42")
        err_env, _ = fails(OpenAIBackend(cfg(f.base_url)))
    assert err.status == 401 and err_env.status == 401
    for e in (err, err_env):
        text = f"{e} {e.args}"
        assert "Incorrect API key provided" in text
        assert wrong not in text and "plainsecretvalue42" not in text and "sk-proj" not in text
    assert f.requests[1].headers["authorization"] == "Bearer plainsecretvalue42"


def test_missing_key_is_a_backend_error() -> None:
    """Without a key from the ctor or OPENAI_API_KEY, construction raises BackendError."""
    with pytest.raises(BackendError, match=re.escape("api.openai.com")):
        OpenAIBackend(cfg(None))


def test_base_url_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    """backend.base_url beats the ctor's base_url, which beats OPENAI_BASE_URL."""
    dead = f"http://127.0.0.1:{closed()}/v1"
    with FakeOpenAI() as f:
        run(OpenAIBackend(cfg(f.base_url), api_key=KEY, base_url=dead, max_retries=0), QUESTION)
        monkeypatch.setenv("OPENAI_BASE_URL", dead)
        run(OpenAIBackend(cfg(None), api_key=KEY, base_url=f.base_url, max_retries=0), QUESTION)
        monkeypatch.setenv("OPENAI_BASE_URL", f.base_url)
        run(OpenAIBackend(cfg(None), api_key=KEY, max_retries=0), QUESTION)
    assert len(f.requests) == 3


def test_sampling_settings_reach_the_wire() -> None:
    """temperature and max_tokens are sent; api.openai.com gets max_completion_tokens instead."""
    with FakeOpenAI() as f:
        run(OpenAIBackend(cfg(f.base_url, temperature=0.2, max_tokens=256), api_key=KEY), QUESTION)
    assert f.requests[0]["temperature"] == 0.2 and f.requests[0]["max_tokens"] == 256
    public = OpenAIBackend(cfg(None, max_tokens=256), api_key=KEY)
    params = public._params(QUESTION, [], stream=False)
    assert params["max_completion_tokens"] == 256 and "max_tokens" not in params
    assert "temperature" not in params


def test_gateway_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    """With MASSGEN_MODEL_SOCKET the call goes over that unix socket with the placeholder key."""
    with tempfile.TemporaryDirectory() as d:
        sock = os.path.join(d, "model.sock")
        monkeypatch.setenv("MASSGEN_MODEL_SOCKET", sock)
        monkeypatch.setenv("OPENAI_API_KEY", KEY)
        with FakeOpenAI(lambda r: Reply(text="via gateway"), uds=sock) as f:
            backend = OpenAIBackend(cfg(f"http://127.0.0.1:{closed()}/v1"))
            c = run(backend, QUESTION)
    assert c.message.content == "via gateway"
    req = f.requests[0]
    assert req.path == "/openai/v1/chat/completions"
    assert req.headers["authorization"] == "Bearer sandbox"
    assert req.headers["host"] == "massgen-gateway"


def test_fake_lists_models() -> None:
    """The fake answers GET /v1/models in the shape the SDK parses."""
    import openai

    async def go(url: str) -> list[str]:
        async with openai.AsyncOpenAI(api_key=KEY, base_url=url) as client:
            return [m.id async for m in client.models.list()]

    with FakeOpenAI() as f:
        assert asyncio.run(go(f.base_url)) == ["fake-model"]


def test_massgen_sampling_and_reasoning_params_reach_the_wire() -> None:
    """top_p, verbosity (MassGen text.verbosity), reasoning_effort (reasoning.effort) and extra_body are sent."""
    extra = {"chat_template_kwargs": {"enable_thinking": True}, "top_k": 50}
    with FakeOpenAI(lambda r: Reply(text="ok")) as f:
        run(
            OpenAIBackend(
                cfg(f.base_url, top_p=0.7, verbosity="low", reasoning_effort="high", extra_body=extra), api_key=KEY
            ),
            QUESTION,
        )
    body = f.requests[0]
    assert (body["top_p"], body["verbosity"], body["reasoning_effort"]) == (0.7, "low", "high")
    assert body["chat_template_kwargs"] == {"enable_thinking": True} and body["top_k"] == 50

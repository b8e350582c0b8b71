"""GeminiBackend with the real google-genai SDK against the fake Gemini REST upstream."""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import pytest

from agent_image.backends.base import BackendError, Completion, Message, ToolCall, ToolSpec
from agent_image.backends.gemini_backend import GeminiBackend
from agent_image.protocol.config import BackendConfig
from tests.fakes import FakeGemini, FakeRequest, FakeToolCall, Fault, Reply, closed, sequence

KEY = "AIzaSyTEST-0123456789abcdefghijklmnop"
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
SIGNATURE = base64.b64encode(b"opaque-thought-state").decode()


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "GEMINI_API_KEY",
        "GOOGLE_API_KEY",
        "GOOGLE_GEMINI_BASE_URL",
        "GOOGLE_GENAI_USE_VERTEXAI",
        "GOOGLE_GENAI_USE_ENTERPRISE",
        "MASSGEN_MODEL_SOCKET",
        "MASSGEN_MODEL_TIMEOUT",
        "MASSGEN_MODEL_MAX_RETRIES",
    ):
        monkeypatch.delenv(name, raising=False)


def cfg(base_url: str | None, **kw: Any) -> BackendConfig:
    return BackendConfig(type="gemini", model="gemini-test", base_url=base_url, **kw)


def backend(cfg_url: str | None, *, api_key: str | None = KEY, **kw: Any) -> GeminiBackend:
    """A backend with `cfg_url` as backend.base_url and a short backoff; `kw` go to the ctor."""
    stream = kw.pop("stream", True)
    kw.setdefault("retry_base_delay", 0.05)
    return GeminiBackend(cfg(cfg_url, stream=stream), api_key=api_key, **kw)


def run(b: GeminiBackend, messages: list[Message], tools: list[ToolSpec] | None = None) -> Completion:
    async def go() -> Completion:
        try:
            return await b.complete(messages, TOOLS if tools is None else tools)
        finally:
            await b.aclose()

    return asyncio.run(go())


def run_many(b: GeminiBackend, conversations: list[list[Message]]) -> list[Completion]:
    async def go() -> list[Completion]:
        try:
            return [await b.complete(m, TOOLS) for m in conversations]
        finally:
            await b.aclose()

    return asyncio.run(go())


def fails(b: GeminiBackend, messages: list[Message] = QUESTION) -> tuple[BackendError, float]:
    t0 = time.monotonic()
    with pytest.raises(BackendError) as info:
        run(b, messages)
    return info.value, time.monotonic() - t0


def parts(req: FakeRequest) -> list[tuple[str, list[dict[str, Any]]]]:
    return [(c["role"], c["parts"]) for c in req["contents"]]


def test_import_does_not_load_sdk() -> None:
    """Importing the backend module leaves google.genai unimported."""
    code = (
        "import sys, agent_image.backends.gemini_backend\n"
        "print(sorted(m for m in sys.modules if m.startswith(('google.genai', 'httpx2'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_stream_text() -> None:
    """A streamed reply is joined; usage is the final chunk's, not the sum of running counts."""
    reply = Reply(text="The answer is four, as two and two make four.", prompt_tokens=42, completion_tokens=9)
    with FakeGemini(lambda r: reply) as f:
        c = run(backend(f.base_url), QUESTION)
    assert c.message == Message(role="assistant", content=reply.text)
    assert (c.usage.prompt_tokens, c.usage.completion_tokens) == (42, 9)
    assert c.model == "gemini-test"
    assert c.ttft_s is not None and 0 < c.ttft_s <= c.latency_s
    req = f.requests[0]
    assert req.path.endswith("/models/gemini-test:streamGenerateContent") and req.query["alt"] == "sse"
    assert req.headers["x-goog-api-key"] == KEY


def test_non_stream_text() -> None:
    """With stream off the backend calls generateContent and reports no time to first token."""
    with FakeGemini(lambda r: Reply(text="Four.", prompt_tokens=5, completion_tokens=2)) as f:
        c = run(backend(f.base_url, stream=False), QUESTION)
    assert c.message.content == "Four."
    assert (c.usage.prompt_tokens, c.usage.completion_tokens) == (5, 2)
    assert c.ttft_s is None
    assert f.requests[0].path.endswith(":generateContent")


@pytest.mark.parametrize("stream", [True, False])
def test_two_tool_calls_in_one_reply(stream: bool) -> None:
    """Two function calls come back in order with stable synthesized ids; Gemini's own ids are kept."""
    calls = [
        FakeToolCall("vote", {"agent_id": "agent1", "reason": "clear"}),
        FakeToolCall("new_answer", {"content": "4"}),
        FakeToolCall("vote", {"agent_id": "agent2"}, id="gem-id-7"),
    ]
    with FakeGemini(lambda r: Reply(text="Deciding.", tool_calls=calls)) as f:
        first, again = run_many(backend(f.base_url, stream=stream), [QUESTION, QUESTION])
    got = first.message.tool_calls
    assert first.message.content == "Deciding."
    assert [(tc.name, tc.arguments) for tc in got] == [
        ("vote", {"agent_id": "agent1", "reason": "clear"}),
        ("new_answer", {"content": "4"}),
        ("vote", {"agent_id": "agent2"}),
    ]
    assert got[2].id == "gem-id-7"
    assert len({tc.id for tc in got}) == 3
    assert [tc.id for tc in again.message.tool_calls] == [tc.id for tc in got]


def test_conversation_round_trip() -> None:
    """System, model function calls and tool results reach the wire as Gemini contents."""

    def policy(req: FakeRequest) -> Reply:
        if "<answers>" not in req.prompt_text:
            return Reply(tool_calls=[FakeToolCall("new_answer", {"content": "4"})], signature=SIGNATURE)
        return Reply(tool_calls=[FakeToolCall("vote", {"agent_id": "agent1", "reason": "ok"})])

    with FakeGemini(policy) as f:
        b = backend(f.base_url)

        async def go() -> tuple[Completion, Completion]:
            first = await b.complete(QUESTION, TOOLS)
            call = first.message.tool_calls[0]
            history = [
                *QUESTION,
                first.message,
                # No name: the backend finds it from the call id.
                Message(role="tool", content="recorded", tool_call_id=call.id),
                Message(role="user", content="<answers>agent1: 4</answers> Vote now."),
            ]
            second = await b.complete(history, TOOLS)
            await b.aclose()
            return first, second

        first, second = asyncio.run(go())
    assert second.message.tool_calls[0].arguments == {"agent_id": "agent1", "reason": "ok"}
    req = f.requests[1]
    assert req["systemInstruction"]["parts"] == [{"text": "You are agent_a."}]
    assert parts(req) == [
        ("user", [{"text": "What is 2+2?"}]),
        ("model", [{"functionCall": {"name": "new_answer", "args": {"content": "4"}}, "thoughtSignature": SIGNATURE}]),
        (
            "user",
            [
                {"functionResponse": {"name": "new_answer", "response": {"output": "recorded"}}},
                {"text": "<answers>agent1: 4</answers> Vote now."},
            ],
        ),
    ]
    decls = req["tools"][0]["functionDeclarations"]
    assert [d["name"] for d in decls] == ["new_answer", "vote"]
    schema = decls[1].get("parametersJsonSchema", decls[1].get("parameters_json_schema"))
    assert schema == VOTE.parameters
    assert first.message.tool_calls[0].id.startswith("gcall_")


def test_gemini_ids_and_foreign_calls_round_trip() -> None:
    """A Gemini-given id is echoed on call and response; a call never seen gets the skip signature."""
    foreign = Message(role="assistant", tool_calls=(ToolCall("call_x", "vote", {"agent_id": "agent2"}),))
    history = [
        *QUESTION,
        Message(role="assistant", content="Voting.", tool_calls=(ToolCall("gid-1", "vote", {"agent_id": "agent1"}),)),
        Message(role="tool", content="ERROR: not yet", tool_call_id="gid-1", name="vote"),
        foreign,
        Message(role="tool", content="ok", tool_call_id="call_x", name="vote"),
        Message(role="system", content="Late instruction."),
    ]
    with FakeGemini() as f:
        run(backend(f.base_url), history)
    skip = "skip_thought_signature_validator"
    assert parts(f.requests[0])[1:] == [
        (
            "model",
            [
                {"text": "Voting."},
                {
                    "functionCall": {"id": "gid-1", "name": "vote", "args": {"agent_id": "agent1"}},
                    "thoughtSignature": skip,
                },
            ],
        ),
        ("user", [{"functionResponse": {"id": "gid-1", "name": "vote", "response": {"error": "ERROR: not yet"}}}]),
        (
            "model",
            [
                {
                    "functionCall": {"id": "call_x", "name": "vote", "args": {"agent_id": "agent2"}},
                    "thoughtSignature": skip,
                }
            ],
        ),
        (
            "user",
            [
                {"functionResponse": {"id": "call_x", "name": "vote", "response": {"output": "ok"}}},
                {"text": "Late instruction."},
            ],
        ),
    ]


def test_call_without_signature_is_replayed_without_one() -> None:
    """A call the model made without a signature goes back without one (no skip value)."""
    with FakeGemini(sequence(Reply(tool_calls=[FakeToolCall("vote", {"agent_id": "a"})]), Reply(text="ok"))) as f:
        b = backend(f.base_url)

        async def go() -> None:
            first = await b.complete(QUESTION, TOOLS)
            call = first.message.tool_calls[0]
            tool = Message(role="tool", content="done", tool_call_id=call.id, name="vote")
            await b.complete([*QUESTION, first.message, tool], TOOLS)
            await b.aclose()

        asyncio.run(go())
    model_turn = parts(f.requests[1])[1]
    assert model_turn == ("model", [{"functionCall": {"name": "vote", "args": {"agent_id": "a"}}}])


def test_usage_matches_what_the_fake_reported() -> None:
    """Summed usage (thinking and cached tokens included) equals what the upstream reported."""
    replies = sequence(
        Reply(text="a", prompt_tokens=100, completion_tokens=10, cached_tokens=64, thoughts_tokens=30),
        Reply(text="bb", prompt_tokens=120, completion_tokens=20),
        Reply(text="a longer third answer for the running counts"),
    )
    with FakeGemini(replies) as f:
        streamed = backend(f.base_url)
        plain = backend(f.base_url, stream=False)

        async def go() -> list[Completion]:
            out = [await streamed.complete(QUESTION, TOOLS), await plain.complete(QUESTION, TOOLS)]
            out.append(await streamed.complete(QUESTION, []))
            await streamed.aclose()
            await plain.aclose()
            return out

        done = asyncio.run(go())
    assert (done[0].usage.completion_tokens, done[0].usage.cached_tokens) == (40, 64)
    assert f.usage.calls == 3
    assert sum(c.usage.prompt_tokens for c in done) == f.usage.prompt_tokens
    assert sum(c.usage.completion_tokens for c in done) == f.usage.completion_tokens
    assert sum(c.usage.cached_tokens for c in done) == f.usage.cached_tokens == 64
    assert "tools" not in f.requests[2]


@pytest.mark.parametrize("header", [True, False])
def test_rate_limit_then_success_honours_retry_after(header: bool) -> None:
    """A 429 asking for a 1 s wait (Retry-After header or RetryInfo) is retried after it."""
    fault = Fault(429, "Resource has been exhausted", retry_after=1, retry_header=header)
    with FakeGemini(lambda r: Reply(text="ok"), faults=[fault]) as f:
        t0 = time.monotonic()
        c = run(backend(f.base_url), QUESTION)
        took = time.monotonic() - t0
    assert c.message.content == "ok" and len(f.requests) == 2
    assert 0.95 <= took < 3  # the backoff alone would be 0.05 s


def test_always_500_fails_naming_the_upstream() -> None:
    """A server that always answers 500 yields BackendError(status=500) after bounded retries."""
    with FakeGemini(lambda r: Fault(500, "An internal error has occurred")) as f:
        err, took = fails(backend(f.base_url, max_retries=2))
        host = f"127.0.0.1:{f.port}"
    assert err.status == 500 and err.provider == "gemini"
    assert host in str(err) and "after 3 attempts" in str(err) and "internal error" in str(err)
    assert len(f.requests) == 3
    assert took < 2


def test_too_long_retry_after_fails_at_once() -> None:
    """A 429 asking for more than the longest allowed wait fails without waiting."""
    with FakeGemini(lambda r: Fault(429, "quota", retry_after=3600)) as f:
        err, took = fails(backend(f.base_url))
    assert err.status == 429 and len(f.requests) == 1 and took < 1


def test_client_errors_are_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 400 fails on the first attempt, even with retries allowed by MASSGEN_MODEL_MAX_RETRIES."""
    monkeypatch.setenv("MASSGEN_MODEL_MAX_RETRIES", "5")
    with FakeGemini(lambda r: Fault(400, "Invalid JSON payload")) as f:
        err, _ = fails(GeminiBackend(cfg(f.base_url), api_key=KEY))
    assert err.status == 400 and len(f.requests) == 1


def test_server_down_fails_fast() -> None:
    """Nothing listening at the base URL gives BackendError naming the host, without retries."""
    port = closed()
    err, took = fails(backend(f"http://127.0.0.1:{port}"))
    assert f"127.0.0.1:{port}" in str(err) and "cannot reach" in str(err)
    assert err.status is None and took < 2


def test_timeout_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """MASSGEN_MODEL_TIMEOUT bounds how long a silent upstream is waited for."""
    monkeypatch.setenv("MASSGEN_MODEL_TIMEOUT", "0.3")
    with FakeGemini(lambda r: Reply(text="late", delay_s=3)) as f:
        err, took = fails(GeminiBackend(cfg(f.base_url), api_key=KEY))
    assert "timed out" in str(err) and f"127.0.0.1:{f.port}" in str(err)
    assert took < 3


def test_api_key_never_in_error_text(monkeypatch: pytest.MonkeyPatch) -> None:
    """An error body echoing the key (from the ctor or GEMINI_API_KEY) shows no key in the error."""
    wrong = "AIzaSyWRONG-wrong-WRONG-0123456789abc"
    with FakeGemini(api_key="AIzaSyRIGHT-000000000000000000000000") as f:
        err, _ = fails(backend(f.base_url, api_key=wrong))
        monkeypatch.setenv("GEMINI_API_KEY", "plainsecretvalue42")
        err_env, _ = fails(backend(f.base_url, api_key=None))
    for e in (err, err_env):
        text = f"{e} {e.args}"
        assert e.status == 400 and "API key not valid" in text
        assert wrong not in text and "plainsecretvalue42" not in text and "AIza" not in text
    assert f.requests[1].headers["x-goog-api-key"] == "plainsecretvalue42"


def test_missing_key_is_a_backend_error() -> None:
    """Without a key from the ctor, GEMINI_API_KEY or GOOGLE_API_KEY, construction fails clearly."""
    with pytest.raises(BackendError, match="GEMINI_API_KEY"):
        GeminiBackend(cfg(None))


def test_base_url_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    """backend.base_url beats the ctor's base_url, which beats GOOGLE_GEMINI_BASE_URL."""
    dead = f"http://127.0.0.1:{closed()}"
    with FakeGemini() as f:
        run(backend(f.base_url, base_url=dead), QUESTION)
        monkeypatch.setenv("GOOGLE_GEMINI_BASE_URL", dead)
        run(backend(None, base_url=f.base_url), QUESTION)
        monkeypatch.setenv("GOOGLE_GEMINI_BASE_URL", f.base_url)
        run(backend(None), QUESTION)
    assert len(f.requests) == 3


def test_sampling_settings_reach_the_wire() -> None:
    """temperature and max_tokens become generationConfig fields; AFC never calls anything."""
    with FakeGemini() as f:
        run(GeminiBackend(cfg(f.base_url, temperature=0.3, max_tokens=128), api_key=KEY), QUESTION)
    gen = f.requests[0]["generationConfig"]
    assert gen.get("temperature") == 0.3
    assert gen.get("maxOutputTokens", gen.get("max_output_tokens")) == 128


def test_gateway_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    """With MASSGEN_MODEL_SOCKET the call goes over that unix socket with the placeholder key."""
    with tempfile.TemporaryDirectory() as d:
        sock = os.path.join(d, "model.sock")
        monkeypatch.setenv("MASSGEN_MODEL_SOCKET", sock)
        monkeypatch.setenv("GEMINI_API_KEY", KEY)
        with FakeGemini(lambda r: Reply(text="via gateway"), uds=sock) as f:
            c = run(GeminiBackend(cfg(f"http://127.0.0.1:{closed()}")), QUESTION)
    assert c.message.content == "via gateway"
    req = f.requests[0]
    assert req.path.startswith("/gemini/v1") and req.path.endswith("/models/gemini-test:streamGenerateContent")
    assert req.headers["x-goog-api-key"] == "sandbox"
    assert req.headers["host"] == "massgen-gateway"


def test_web_search_and_sampling_params_reach_the_wire() -> None:
    """enable_web_search adds the provider-side google_search tool next to the functions; top_p/top_k are sent."""
    with FakeGemini(lambda r: Reply(text="ok")) as f:
        run(GeminiBackend(cfg(f.base_url, enable_web_search=True, top_p=0.5, top_k=20), api_key=KEY), QUESTION)
    body = f.requests[0]
    tools = body["tools"]
    assert any("googleSearch" in t or "google_search" in t for t in tools), tools
    assert any("functionDeclarations" in t or "function_declarations" in t for t in tools)
    gen = body.get("generationConfig") or body.get("generation_config")
    assert gen is not None, body
    assert gen["topP"] == 0.5 and gen["topK"] == 20

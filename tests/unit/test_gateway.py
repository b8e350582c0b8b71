"""The model gateway on a real unix socket, in front of the fake upstreams, driven by the real SDKs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
from aiohttp import web
from google import genai
from google.genai import errors as genai_errors
from google.genai import types
from openai.types.chat import ChatCompletionMessageFunctionToolCall, ChatCompletionMessageParam

from agent_image.backends.base import Message, ToolSpec
from agent_image.protocol.config import BackendConfig
from supervisor.errors import DataFileError
from supervisor.gateway import (
    BudgetMeter,
    CallRecord,
    ChainMeter,
    Gateway,
    Upstream,
    missing_key_message,
    seed_from_telemetry,
    upstreams_from_env,
    usage_from,
)
from supervisor.pricing import DEFAULT_PRICING_FILE, Pricing
from tests.fakes import FakeGemini, FakeOpenAI, FakeServer, FakeToolCall, Fault, Reply, closed, sequence

OPENAI_KEY = "sk-host-real-0123456789abcdefSECRET"
GEMINI_KEY = "AIzaHostReal0123456789abcdefSECRET"
PLACEHOLDER = "sandbox"
OPENAI_URL = "http://massgen-gateway/openai/v1"
GEMINI_URL = "http://massgen-gateway/gemini"
TABLE: dict[str, dict[str, dict[str, float]]] = json.loads(DEFAULT_PRICING_FILE.read_text())


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


class Harness:
    """A gateway on a short unix socket path, with SDK clients pointed at it."""

    def __init__(self, gateway: Gateway, meter: BudgetMeter, sock: str) -> None:
        self.gateway = gateway
        self.meter = meter
        self.sock = sock
        self._clients: list[httpx2.AsyncClient] = []

    def http(self) -> httpx2.AsyncClient:
        client = httpx2.AsyncClient(
            transport=httpx2.AsyncHTTPTransport(uds=self.sock), base_url="http://massgen-gateway"
        )
        self._clients.append(client)
        return client

    def openai(self, agent: str | None = None, max_retries: int = 0) -> openai.AsyncOpenAI:
        headers = {"X-Massgen-Agent": agent} if agent else None
        return openai.AsyncOpenAI(
            base_url=OPENAI_URL,
            api_key=PLACEHOLDER,
            http_client=self.http(),
            max_retries=max_retries,
            default_headers=headers,
        )

    def gemini(self, agent: str | None = None) -> genai.Client:
        options = types.HttpOptions(
            base_url=GEMINI_URL,
            httpx_async_client=self.http(),
            headers={"X-Massgen-Agent": agent} if agent else None,
            retry_options=types.HttpRetryOptions(attempts=1),
        )
        return genai.Client(api_key=PLACEHOLDER, vertexai=False, http_options=options)

    async def aclose(self) -> None:
        for client in self._clients:
            await client.aclose()


@contextlib.asynccontextmanager
async def serving(
    fake_openai: FakeServer | None = None,
    fake_gemini: FakeServer | None = None,
    *,
    meter: BudgetMeter | None = None,
    upstreams: dict[str, Upstream] | None = None,
    **options: Any,
) -> AsyncIterator[Harness]:
    if upstreams is None:
        upstreams = {}
        if fake_openai is not None:
            upstreams["openai"] = Upstream("openai", fake_openai.base_url, OPENAI_KEY)
        if fake_gemini is not None:
            upstreams["gemini"] = Upstream("gemini", fake_gemini.base_url, GEMINI_KEY)
    meter = meter or BudgetMeter()
    options.setdefault("retry_base_s", 0.05)
    gateway = Gateway(upstreams, meter=meter, pricing=Pricing.load(DEFAULT_PRICING_FILE), **options)
    folder = tempfile.mkdtemp(prefix="gw", dir="/tmp")
    sock = os.path.join(folder, "g.sock")
    runner = await gateway.serve_unix(sock)
    harness = Harness(gateway, meter, sock)
    try:
        yield harness
    finally:
        await harness.aclose()
        await runner.cleanup()
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.asynccontextmanager
async def aiohttp_upstream(path: str, handler: Any, provider: str = "openai") -> AsyncIterator[dict[str, Upstream]]:
    """A one-route upstream on loopback, for behaviours the fakes do not script."""
    app = web.Application()
    app.router.add_post(path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    try:
        if provider == "openai":
            yield {"openai": Upstream("openai", f"http://127.0.0.1:{port}/v1", OPENAI_KEY)}
        else:
            yield {"gemini": Upstream("gemini", f"http://127.0.0.1:{port}", GEMINI_KEY)}
    finally:
        await runner.cleanup()


def expected_cost(provider: str, model: str, prompt: int, completion: int, cached: int) -> float:
    p = TABLE[provider][model]
    return ((prompt - cached) * p["input"] + cached * p["cached_input"] + completion * p["output"]) / 1e6


USER: list[ChatCompletionMessageParam] = [{"role": "user", "content": "What is 2+2?"}]
VOTE = FakeToolCall("vote", {"agent_id": "agent_b", "reason": "clearer"}, id="call_vote_1")


# --- pass-through ---------------------------------------------------------------------------


def test_chat_completion_passes_through() -> None:
    """A non-streaming chat completion keeps its text and tool calls intact."""

    async def go() -> None:
        async with serving(fake) as h:
            resp = await h.openai().chat.completions.create(model="gpt-4o", messages=USER)
        msg = resp.choices[0].message
        assert msg.content == "Four, and I vote."
        assert msg.tool_calls is not None and len(msg.tool_calls) == 1
        call = msg.tool_calls[0]
        assert isinstance(call, ChatCompletionMessageFunctionToolCall)
        assert (call.id, call.function.name, json.loads(call.function.arguments)) == (
            "call_vote_1",
            "vote",
            {"agent_id": "agent_b", "reason": "clearer"},
        )
        assert resp.usage is not None and resp.usage.prompt_tokens == 12

    with FakeOpenAI(lambda _r: Reply("Four, and I vote.", [VOTE], prompt_tokens=12), api_key=OPENAI_KEY) as fake:
        run(go())
    assert fake.requests[0].path == "/v1/chat/completions"
    assert fake.requests[0]["messages"] == USER


def test_streaming_chat_completion_passes_through_with_usage_forced() -> None:
    """A streamed chat completion arrives chunk by chunk; usage is forced on and metered."""

    async def go() -> tuple[str, dict[str, Any], int, BudgetMeter]:
        async with serving(fake) as h:
            stream = await h.openai().chat.completions.create(model="gpt-4o-mini", messages=USER, stream=True)
            text, args, chunks = "", {"name": "", "arguments": ""}, 0
            async for chunk in stream:
                chunks += 1
                if not chunk.choices:
                    continue
                delta = chunk.choices[0].delta
                text += delta.content or ""
                for tc in delta.tool_calls or []:
                    assert tc.function is not None
                    args["name"] += tc.function.name or ""
                    args["arguments"] += tc.function.arguments or ""
            return text, args, chunks, h.meter

    reply = Reply("Four. " * 10, [VOTE], prompt_tokens=30, completion_tokens=25, cached_tokens=10, chunk_size=5)
    with FakeOpenAI(lambda _r: reply, api_key=OPENAI_KEY) as fake:
        text, call, chunks, meter = run(go())
    assert text == "Four. " * 10
    assert call["name"] == "vote" and json.loads(call["arguments"]) == VOTE.arguments
    assert chunks > 10
    assert fake.requests[0]["stream_options"] == {"include_usage": True}
    assert (meter.total.prompt_tokens, meter.total.completion_tokens, meter.total.cached_tokens) == (30, 25, 10)


def test_gemini_generate_content_passes_through() -> None:
    """generateContent keeps text and function calls, on the SDK's default API version."""

    async def go() -> types.GenerateContentResponse:
        async with serving(fake_gemini=fake) as h:
            return await h.gemini().aio.models.generate_content(model="gemini-2.5-flash", contents="What is 2+2?")

    reply = Reply("Four.", [FakeToolCall("vote", {"agent_id": "agent_b"})], prompt_tokens=7, completion_tokens=3)
    with FakeGemini(lambda _r: reply, api_key=GEMINI_KEY) as fake:
        resp = run(go())
    assert resp.text == "Four."
    assert resp.function_calls is not None and resp.function_calls[0].name == "vote"
    assert resp.function_calls[0].args == {"agent_id": "agent_b"}
    assert fake.requests[0].path.endswith("/models/gemini-2.5-flash:generateContent")


def test_gemini_stream_generate_content_passes_through() -> None:
    """streamGenerateContent (SSE) arrives in several chunks; the last usage counts, not the sum."""

    async def go() -> tuple[list[str], BudgetMeter]:
        async with serving(fake_gemini=fake) as h:
            client = h.gemini()
            stream = await client.aio.models.generate_content_stream(model="gemini-2.5-pro", contents="Count.")
            return [chunk.text or "" async for chunk in stream], h.meter

    reply = Reply("one two three four five six", prompt_tokens=9, completion_tokens=6, chunk_size=4)
    with FakeGemini(lambda _r: reply, api_key=GEMINI_KEY) as fake:
        texts, meter = run(go())
    assert "".join(texts) == "one two three four five six"
    assert len(texts) > 3
    assert fake.requests[0].query.get("alt") == "sse"
    assert (meter.total.prompt_tokens, meter.total.completion_tokens) == (9, 6)


def test_gemini_v1beta_route_is_served() -> None:
    """The v1beta API version (SDK option or GOOGLE_GENAI_API_VERSION) routes like v1."""

    async def go() -> str | None:
        async with serving(fake_gemini=fake) as h:
            options = types.HttpOptions(base_url=GEMINI_URL, api_version="v1beta", httpx_async_client=h.http())
            client = genai.Client(api_key=PLACEHOLDER, vertexai=False, http_options=options)
            resp = await client.aio.models.generate_content(model="gemini-2.5-flash", contents="hi")
            return resp.text

    with FakeGemini(lambda _r: "beta ok", api_key=GEMINI_KEY) as fake:
        assert run(go()) == "beta ok"
    assert fake.requests[0].path == "/v1beta/models/gemini-2.5-flash:generateContent"


def test_responses_api_passes_through_and_is_metered() -> None:
    """POST /openai/v1/responses forwards (JSON and SSE) and meters input/output tokens."""
    seen: list[dict[str, Any]] = []
    usage = {"input_tokens": 40, "output_tokens": 8, "input_tokens_details": {"cached_tokens": 16}}
    response = {
        "id": "resp_1",
        "object": "response",
        "created_at": 0,
        "model": "gpt-5-mini",
        "status": "completed",
        "output": [
            {
                "type": "message",
                "id": "msg_1",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "Four.", "annotations": []}],
            }
        ],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": usage,
    }

    async def responses(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        seen.append({"body": body, "auth": request.headers.get("Authorization")})
        if not body.get("stream"):
            return web.json_response(response)
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        events = [
            {"type": "response.created", "sequence_number": 0, "response": {**response, "usage": None}},
            {
                "type": "response.output_text.delta",
                "sequence_number": 1,
                "item_id": "msg_1",
                "output_index": 0,
                "content_index": 0,
                "delta": "Four.",
                "logprobs": [],
            },
            {"type": "response.completed", "sequence_number": 2, "response": response},
        ]
        for event in events:
            await out.write(f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode())
        await out.write_eof()
        return out

    async def go() -> tuple[str, list[str], BudgetMeter]:
        async with aiohttp_upstream("/v1/responses", responses) as upstreams, serving(upstreams=upstreams) as h:
            client = h.openai()
            once = await client.responses.create(model="gpt-5-mini", input="What is 2+2?")
            stream = await client.responses.create(model="gpt-5-mini", input="What is 2+2?", stream=True)
            kinds: list[str] = [event.type async for event in stream]
            return once.output_text, kinds, h.meter

    text, kinds, meter = run(go())
    assert text == "Four."
    assert kinds == ["response.created", "response.output_text.delta", "response.completed"]
    assert [s["auth"] for s in seen] == [f"Bearer {OPENAI_KEY}"] * 2
    totals = meter.by_model[("openai", "gpt-5-mini")]
    assert (totals.calls, totals.prompt_tokens, totals.completion_tokens, totals.cached_tokens) == (2, 80, 16, 32)
    assert totals.cost_usd == pytest.approx(2 * expected_cost("openai", "gpt-5-mini", 40, 8, 16))


# --- keys -------------------------------------------------------------------------------------


def test_upstream_sees_real_key_and_never_the_placeholder() -> None:
    """The host key replaces the sandbox's Authorization, x-goog-api-key and ?key= values."""

    async def go() -> None:
        async with serving(fo, fg) as h:
            await h.openai().chat.completions.create(model="gpt-4o", messages=USER)
            await h.gemini().aio.models.generate_content(model="gemini-2.5-flash", contents="hi")
            raw = h.http()
            resp = await raw.post(
                "/gemini/v1beta/models/gemini-2.5-flash:generateContent?key=sandbox&alt=json",
                headers={"Authorization": "Bearer sandbox", "api-key": "sandbox", "Cookie": "s=sandbox"},
                json={"contents": [{"role": "user", "parts": [{"text": "hi"}]}]},
            )
            assert resp.status_code == 200

    with FakeOpenAI(api_key=OPENAI_KEY) as fo, FakeGemini(api_key=GEMINI_KEY) as fg:
        run(go())
    assert fo.requests[0].headers["authorization"] == f"Bearer {OPENAI_KEY}"
    assert [r.headers["x-goog-api-key"] for r in fg.requests] == [GEMINI_KEY, GEMINI_KEY]
    assert fg.requests[1].query == {"alt": "json"}
    for req in [*fo.requests, *fg.requests]:
        assert PLACEHOLDER not in json.dumps(req.headers)
        assert "x-massgen-agent" not in req.headers


def test_real_key_is_not_retrievable_from_the_sandbox() -> None:
    """Model lists, echoed error bodies, echoed headers, streamed text and 502s never carry the key."""
    echo = {"X-Echo-Auth": f"Bearer {OPENAI_KEY}", "X-Echo-Goog": GEMINI_KEY}

    async def go() -> list[str]:
        seen: list[str] = []
        allowed = {"openai": {"gpt-4o"}, "gemini": {"gemini-2.5-flash"}}
        async with serving(fo, fg, allowed_models=allowed, max_retries=1) as h:
            raw = h.http()
            models = await raw.get("/openai/v1/models")
            assert [m["id"] for m in models.json()["data"]] == ["gpt-4o"]
            seen.append(models.text + json.dumps(dict(models.headers)))
            for _ in range(2):  # a 400 echoing the key in body and headers; then a 500 (-> 502)
                r = await raw.post("/openai/v1/chat/completions", json={"model": "gpt-4o", "messages": USER})
                seen.append(r.text + json.dumps(dict(r.headers)))
            r = await raw.post(
                "/openai/v1/chat/completions", json={"model": "gpt-4o", "messages": USER, "stream": True}
            )
            seen.append(r.text + json.dumps(dict(r.headers)))
            r = await raw.post("/gemini/v1/models/gemini-2.5-flash:generateContent", json={"contents": []})
            assert r.status_code == 400 and "API key not valid" in r.text
            seen.append(r.text + json.dumps(dict(r.headers)))
        return seen

    faults = [
        Fault(400, f"Incorrect API key provided: {OPENAI_KEY}.", headers=echo),
        Fault(500, f"backend saw Authorization: Bearer {OPENAI_KEY}", headers=echo),
        Fault(500, f"backend saw Authorization: Bearer {OPENAI_KEY}", headers=echo),
    ]
    # The Gemini fake expects another key, so it answers 400 echoing the (real) key it was given.
    with (
        FakeOpenAI(lambda _r: Reply(f"your key is {OPENAI_KEY}!", chunk_size=100), faults=faults) as fo,
        FakeGemini(api_key="AIzaSomeOtherKey") as fg,
    ):
        seen = run(go())
    assert [text.count("[redacted]") for text in seen[1:]] == [3, 1, 1, 1]
    for text in seen:
        assert OPENAI_KEY not in text and GEMINI_KEY not in text
    assert fo.requests[0].path == "/v1/chat/completions"  # /models never reaches the upstream
    assert all(r.path != "/v1/models" for r in fo.requests)


def test_missing_key_is_refused_naming_the_variable() -> None:
    """A provider the host has no key for answers 401 naming the environment variables."""

    async def go() -> None:
        async with serving() as h:
            with pytest.raises(openai.AuthenticationError, match="OPENAI_API_KEY"):
                await h.openai().chat.completions.create(model="gpt-4o", messages=USER)
            with pytest.raises(genai_errors.ClientError, match="GEMINI_API_KEY or GOOGLE_API_KEY"):
                await h.gemini().aio.models.generate_content(model="gemini-2.5-flash", contents="hi")

    run(go())


# --- metering, pricing, budgets ---------------------------------------------------------------


def test_metered_usage_matches_fake_per_model_and_agent() -> None:
    """Tokens per model and agent equal what the fakes reported; cost follows the pricing table."""
    records: list[CallRecord] = []

    async def go() -> BudgetMeter:
        meter = BudgetMeter(on_record=records.append)
        async with serving(fo, fg, meter=meter) as h:
            a, b = h.openai("agent_a"), h.openai("agent_b")
            await a.chat.completions.create(model="gpt-4o", messages=USER)
            for client, model in ((a, "gpt-4o-mini"), (b, "gpt-4o")):
                async for _ in await client.chat.completions.create(model=model, messages=USER, stream=True):
                    pass
            await h.gemini("agent_b").aio.models.generate_content(model="gemini-2.5-flash", contents="hi")
            await b.chat.completions.create(model="my-local-llama", messages=USER)
        return meter

    openai_reply = Reply("four", prompt_tokens=100, completion_tokens=20, cached_tokens=40)
    gemini_reply = Reply("four", prompt_tokens=50, completion_tokens=5, cached_tokens=10, thoughts_tokens=7)
    with (
        FakeOpenAI(lambda _r: openai_reply, api_key=OPENAI_KEY) as fo,
        FakeGemini(lambda _r: gemini_reply, api_key=GEMINI_KEY) as fg,
    ):
        meter = run(go())
    assert fo.usage.calls == 4
    tokens = (meter.total.prompt_tokens, meter.total.completion_tokens, meter.total.cached_tokens)
    assert tokens == (
        fo.usage.prompt_tokens + fg.usage.prompt_tokens,
        fo.usage.completion_tokens + fg.usage.completion_tokens,
        fo.usage.cached_tokens + fg.usage.cached_tokens,
    )
    assert meter.by_agent["agent_a"].calls == 2 and meter.by_agent["agent_b"].calls == 3
    assert meter.by_agent["agent_b"].prompt_tokens == 100 + 50 + 100
    gpt4o = meter.by_model[("openai", "gpt-4o")]
    assert (gpt4o.calls, gpt4o.prompt_tokens, gpt4o.completion_tokens, gpt4o.cached_tokens) == (2, 200, 40, 80)
    assert gpt4o.cost_usd == pytest.approx(2 * expected_cost("openai", "gpt-4o", 100, 20, 40))
    mini = meter.by_model[("openai", "gpt-4o-mini")]
    assert mini.cost_usd == pytest.approx(expected_cost("openai", "gpt-4o-mini", 100, 20, 40))
    flash = meter.by_model[("gemini", "gemini-2.5-flash")]
    assert (flash.prompt_tokens, flash.completion_tokens, flash.cached_tokens) == (50, 12, 10)
    assert flash.cost_usd == pytest.approx(expected_cost("gemini", "gemini-2.5-flash", 50, 12, 10))
    unpriced = meter.by_model[("openai", "my-local-llama")]
    assert unpriced.prompt_tokens == 100 and unpriced.cost_usd == 0
    assert all(r.ok and r.status == 200 and r.latency_s > 0 for r in records)
    assert all(r.ttft_s is not None and r.ttft_s <= r.latency_s for r in records)


def test_token_budget_stops_calls_and_fires_once() -> None:
    """With max_tokens=N calls stop once N is reached; refusals say budget_exceeded; spent <= N + one call."""
    fired: list[str] = []
    limit = 100

    async def go() -> tuple[int, list[str], BudgetMeter]:
        meter = BudgetMeter(max_tokens=limit, on_exceeded=fired.append)
        async with serving(fake, meter=meter) as h:
            client = h.openai(max_retries=2)  # a refusal must not be retried by the SDK either
            ok, refused = 0, []
            for _ in range(8):
                try:
                    await client.chat.completions.create(model="gpt-4o", messages=USER)
                    ok += 1
                except openai.PermissionDeniedError as exc:
                    refused.append(str(exc))
            return ok, refused, meter

    with FakeOpenAI(lambda _r: Reply("x", prompt_tokens=10, completion_tokens=20), api_key=OPENAI_KEY) as fake:
        ok, refused, meter = run(go())
    assert ok == 4  # 0, 30, 60, 90 are below 100; then 120 is not
    assert len(refused) == 4 and all("budget_exceeded" in r for r in refused)
    assert len(fake.requests) == 4
    assert len(fired) == 1 and "budget_exceeded" in fired[0]
    assert meter.total.tokens == fake.usage.prompt_tokens + fake.usage.completion_tokens
    assert meter.total.tokens <= limit + 30


def test_cost_and_call_budgets() -> None:
    """max_cost_usd and max_calls refuse once reached, in the Gemini error format too."""

    async def go() -> None:
        async with serving(fake_gemini=fake, meter=BudgetMeter(max_cost_usd=0.0001)) as h:
            client = h.gemini()
            await client.aio.models.generate_content(model="gemini-2.5-pro", contents="hi")  # $0.00011
            with pytest.raises(genai_errors.ClientError, match="budget_exceeded: cost_usd") as err:
                await client.aio.models.generate_content(model="gemini-2.5-pro", contents="hi")
            assert err.value.code == 403
        async with serving(fake_gemini=fake, meter=BudgetMeter(max_calls=1)) as h:
            await h.gemini().aio.models.generate_content(model="gemini-2.5-pro", contents="hi")
            with pytest.raises(genai_errors.ClientError, match="budget_exceeded: calls=1"):
                await h.gemini().aio.models.generate_content(model="gemini-2.5-pro", contents="hi")

    with FakeGemini(lambda _r: Reply("x", prompt_tokens=8, completion_tokens=10), api_key=GEMINI_KEY) as fake:
        run(go())
    assert len(fake.requests) == 2


# --- upstream failures ------------------------------------------------------------------------


def test_429_with_retry_after_then_success() -> None:
    """A 429 with Retry-After: 1 is waited out and retried; the sandbox sees only the 200."""

    async def go() -> tuple[str | None, float, BudgetMeter]:
        async with serving(fake) as h:
            t0 = time.monotonic()
            resp = await h.openai().chat.completions.create(model="gpt-4o", messages=USER)
            return resp.choices[0].message.content, time.monotonic() - t0, h.meter

    with FakeOpenAI(sequence(Fault(429, "slow down", retry_after=1), "after the wait"), api_key=OPENAI_KEY) as fake:
        text, elapsed, meter = run(go())
    assert text == "after the wait"
    assert len(fake.requests) == 2
    assert 0.9 <= elapsed < 3
    assert meter.total.calls == 1 and meter.total.failed == 0


def test_always_500_gives_502_naming_the_upstream_after_bounded_retries() -> None:
    """An upstream that always fails costs max_retries + 1 attempts, then a 502 naming its host."""

    async def go() -> None:
        async with serving(fo, fg, max_retries=2) as h:
            with pytest.raises(openai.APIStatusError) as err:
                await h.openai(max_retries=2).chat.completions.create(model="gpt-4o", messages=USER)
            assert err.value.status_code == 502
            assert f"127.0.0.1:{fo.port}" in err.value.message and "HTTP 500" in err.value.message
            with pytest.raises(genai_errors.ServerError) as gerr:
                await h.gemini().aio.models.generate_content(model="gemini-2.5-flash", contents="hi")
            assert gerr.value.code == 502 and f"127.0.0.1:{fg.port}" in str(gerr.value.message)
            record = h.meter.by_model[("openai", "gpt-4o")]
            assert (record.calls, record.failed) == (1, 1)

    with (
        FakeOpenAI(lambda _r: Fault(500, "boom"), api_key=OPENAI_KEY) as fo,
        FakeGemini(lambda _r: Fault(503, "overloaded"), api_key=GEMINI_KEY) as fg,
    ):
        run(go())
    # x-should-retry: false on the 502 keeps the SDK's own retries from multiplying ours
    assert len(fo.requests) == 3 and len(fg.requests) == 3


def test_upstream_down_fails_fast_naming_the_upstream() -> None:
    """A refused connection, with default retry settings on both sides, errors within 10 s."""
    port = closed()

    async def go() -> float:
        upstreams = {"openai": Upstream("openai", f"http://127.0.0.1:{port}/v1", OPENAI_KEY)}
        async with serving(upstreams=upstreams, retry_base_s=0.5) as h:
            client = openai.AsyncOpenAI(base_url=OPENAI_URL, api_key=PLACEHOLDER, http_client=h.http())
            t0 = time.monotonic()
            with pytest.raises(openai.APIStatusError) as err:
                await client.chat.completions.create(model="gpt-4o", messages=USER)
            elapsed = time.monotonic() - t0
            assert err.value.status_code == 502
            assert f"127.0.0.1:{port}" in err.value.message and "cannot reach" in err.value.message
            assert OPENAI_KEY not in err.value.message
            return elapsed

    assert run(go()) < 10


def test_upstream_timeout_is_retried_then_502() -> None:
    """An upstream slower than timeout_s counts as a failure and is retried."""

    async def go() -> None:
        async with serving(fake, timeout_s=0.3, max_retries=1) as h:
            with pytest.raises(openai.APIStatusError, match="timed out") as err:
                await h.openai().chat.completions.create(model="gpt-4o", messages=USER)
            assert err.value.status_code == 502

    with FakeOpenAI(lambda _r: Reply("late", delay_s=2), api_key=OPENAI_KEY) as fake:
        run(go())
    assert len(fake.requests) == 2


def test_non_retryable_upstream_error_passes_through() -> None:
    """A 400 from the upstream reaches the sandbox as that 400, once."""

    async def go() -> None:
        async with serving(fake) as h:
            with pytest.raises(openai.BadRequestError, match="bad tool schema"):
                await h.openai(max_retries=2).chat.completions.create(model="gpt-4o", messages=USER)

    with FakeOpenAI(lambda _r: Fault(400, "bad tool schema"), api_key=OPENAI_KEY) as fake:
        run(go())
    assert len(fake.requests) == 1


async def _chunks(
    request: web.Request, count: int, pause_s: float, then_break: bool, usage: dict[str, Any] | None = None
) -> web.StreamResponse:
    await request.read()
    out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await out.prepare(request)
    for i in range(count):
        delta = {"choices": [{"index": 0, "delta": {"content": f"part{i} "}, "finish_reason": None}]}
        chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "gpt-4o", **delta}
        await out.write(f"data: {json.dumps({**chunk, 'usage': None})}\n\n".encode())
        await asyncio.sleep(pause_s)
    if then_break:
        assert request.transport is not None
        request.transport.abort()
        return out
    if usage is not None:
        last = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "gpt-4o", "choices": []}
        await out.write(f"data: {json.dumps({**last, 'usage': usage})}\n\n".encode())
    await out.write(b"data: [DONE]\n\n")
    await out.write_eof()
    return out


async def _leave_after_first_chunk(h: Harness, path: str, body: bytes) -> None:
    """A sandbox that reads the first bytes of a stream and hangs up."""
    async with h.http().stream("POST", path, content=body, headers={"Content-Type": "application/json"}) as resp:
        assert resp.status_code == 200
        async for _ in resp.aiter_raw():
            break


async def _wait_for(condition: Any, timeout_s: float = 5) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.02)


def _stream_body(**extra: Any) -> bytes:
    """A chat stream request that already asks for usage, so the gateway forwards it byte for byte."""
    body = {"model": "gpt-4o", "messages": USER, "stream": True, "stream_options": {"include_usage": True}}
    return json.dumps({**body, **extra}).encode()


def test_upstream_breaking_mid_stream_is_reported_in_band() -> None:
    """An upstream that drops the connection mid-stream gives the SDK an error event, and a failed record."""

    async def upstream(request: web.Request) -> web.StreamResponse:
        return await _chunks(request, 2, 0.01, then_break=True)

    async def go() -> tuple[list[str], BudgetMeter]:
        texts: list[str] = []
        async with aiohttp_upstream("/v1/chat/completions", upstream) as ups, serving(upstreams=ups) as h:
            stream = await h.openai().chat.completions.create(model="gpt-4o", messages=USER, stream=True)
            with pytest.raises(openai.APIError, match="broke off its stream"):
                async for chunk in stream:
                    texts.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
            return texts, h.meter

    texts, meter = run(go())
    assert "".join(texts) == "part0 part1 "
    assert (meter.total.calls, meter.total.failed) == (1, 1)
    # No usage came before the break: the call is charged an estimate, not $0.
    assert meter.total.prompt_tokens > 0 and meter.total.completion_tokens > 0


def test_sandbox_leaving_mid_stream_is_drained_for_its_usage() -> None:
    """A sandbox hanging up mid-stream does not skip metering: the rest is drained and its usage charged."""
    finished: list[bool] = []
    usage = {"prompt_tokens": 1234, "completion_tokens": 567, "prompt_tokens_details": {"cached_tokens": 34}}

    async def upstream(request: web.Request) -> web.StreamResponse:
        out = await _chunks(request, 30, 0.02, then_break=False, usage=usage)
        finished.append(True)
        return out

    async def go() -> tuple[list[CallRecord], BudgetMeter, str]:
        records: list[CallRecord] = []
        meter = BudgetMeter(max_tokens=1000, on_record=records.append)
        async with aiohttp_upstream("/v1/chat/completions", upstream) as ups, serving(upstreams=ups, meter=meter) as h:
            await _leave_after_first_chunk(h, "/openai/v1/chat/completions", _stream_body())
            assert not records  # still draining: recorded once the usage is in
            await _wait_for(lambda: records and finished)
            with pytest.raises(openai.PermissionDeniedError) as err:  # the drained usage counts for the budget
                await h.openai().chat.completions.create(model="gpt-4o", messages=USER)
            assert not h.gateway._drains
            return records, meter, str(err.value)

    records, meter, refusal = run(go())
    assert len(records) == 1
    record = records[0]
    assert (record.prompt_tokens, record.completion_tokens, record.cached_tokens) == (1234, 567, 34)
    assert record.cost_usd == pytest.approx(expected_cost("openai", "gpt-4o", 1234, 567, 34))
    assert not record.ok and record.error == "sandbox closed the stream"
    assert "budget_exceeded: tokens=1801" in refusal
    assert meter.total.calls == 1


def test_gemini_stream_left_early_is_drained_to_its_final_usage() -> None:
    """A Gemini stream's interim usage is not what is charged when the sandbox leaves: the final one is."""

    async def upstream(request: web.Request) -> web.StreamResponse:
        await request.read()
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        for i in range(1, 31):
            final = i == 30
            event = {
                "candidates": [{"content": {"parts": [{"text": f"w{i} "}], "role": "model"}, "index": 0}],
                "usageMetadata": {"promptTokenCount": 40, "candidatesTokenCount": 200 if final else i},
            }
            await out.write(f"data: {json.dumps(event)}\r\n\r\n".encode())
            await asyncio.sleep(0.02)
        await out.write_eof()
        return out

    async def go() -> list[CallRecord]:
        records: list[CallRecord] = []
        route = "/v1beta/models/gemini-2.5-flash:streamGenerateContent"
        async with (
            aiohttp_upstream(route, upstream, provider="gemini") as ups,
            serving(upstreams=ups, meter=BudgetMeter(on_record=records.append)) as h,
        ):
            body = json.dumps({"contents": [{"role": "user", "parts": [{"text": "count"}]}]}).encode()
            await _leave_after_first_chunk(h, f"/gemini{route}?alt=sse", body)
            await _wait_for(lambda: records)
        return records

    (record,) = run(go())
    assert (record.prompt_tokens, record.completion_tokens) == (40, 200)
    assert record.error == "sandbox closed the stream"


def test_drain_byte_bound_releases_upstream_and_charges_streamed_bytes() -> None:
    """Past drain_max_bytes the upstream is hung up on; with no max_tokens the estimate is bytes / 4."""
    finished: list[bool] = []
    seen: list[int] = []

    async def upstream(request: web.Request) -> web.StreamResponse:
        seen.append(len(await request.read()))
        try:
            return await _chunks(request, 400, 0.005, then_break=False)
        except (ConnectionError, asyncio.CancelledError):
            finished.append(False)
            raise

    async def go() -> CallRecord:
        records: list[CallRecord] = []
        meter = BudgetMeter(on_record=records.append)
        async with (
            aiohttp_upstream("/v1/chat/completions", upstream) as ups,
            serving(upstreams=ups, meter=meter, drain_max_bytes=4000) as h,
        ):
            await _leave_after_first_chunk(h, "/openai/v1/chat/completions", _stream_body())
            await _wait_for(lambda: records and finished)
            return records[0]

    record = run(go())
    assert finished == [False]  # hung up on long before its 400 chunks (about 2 s) were sent
    assert seen == [len(_stream_body())]
    assert record.prompt_tokens == len(_stream_body()) // 4
    one_chunk = 140  # bytes of one SSE chunk, roughly
    assert 4000 // 4 < record.completion_tokens < (4000 + 20 * one_chunk) // 4
    assert record.cost_usd == pytest.approx(
        expected_cost("openai", "gpt-4o", record.prompt_tokens, record.completion_tokens, 0)
    )
    assert not record.ok and record.error is not None
    assert record.error.startswith("sandbox closed the stream; usage never arrived, charged an estimate")
    assert "completion=streamed_bytes/4" in record.error


def test_drain_time_bound_charges_the_requests_max_tokens() -> None:
    """Past drain_timeout_s the drain stops; a request's max_tokens is what its completion is charged."""
    finished: list[bool] = []

    async def upstream(request: web.Request) -> web.StreamResponse:
        try:
            return await _chunks(request, 200, 0.02, then_break=False)
        except (ConnectionError, asyncio.CancelledError):
            finished.append(False)
            raise

    async def go() -> tuple[CallRecord, float]:
        records: list[CallRecord] = []
        async with (
            aiohttp_upstream("/v1/chat/completions", upstream) as ups,
            serving(upstreams=ups, meter=BudgetMeter(on_record=records.append), drain_timeout_s=0.3) as h,
        ):
            t0 = time.monotonic()
            await _leave_after_first_chunk(h, "/openai/v1/chat/completions", _stream_body(max_tokens=777))
            await _wait_for(lambda: records and finished)
            return records[0], time.monotonic() - t0

    record, elapsed = run(go())
    assert elapsed < 2  # the upstream would have streamed for 4 s
    assert finished == [False]
    assert (record.prompt_tokens, record.completion_tokens) == (len(_stream_body(max_tokens=777)) // 4, 777)
    assert record.error is not None and "completion=request max output tokens=777" in record.error


def test_aclose_cancels_pending_drains_and_records_them() -> None:
    """Shutting the gateway down does not wait out a drain; the call is still recorded (estimated)."""

    async def upstream(request: web.Request) -> web.StreamResponse:
        return await _chunks(request, 500, 0.02, then_break=False)

    async def go() -> tuple[list[CallRecord], float, Gateway]:
        records: list[CallRecord] = []
        async with (
            aiohttp_upstream("/v1/chat/completions", upstream) as ups,
            serving(upstreams=ups, meter=BudgetMeter(on_record=records.append)) as h,
        ):
            await _leave_after_first_chunk(h, "/openai/v1/chat/completions", _stream_body())
            await _wait_for(lambda: h.gateway._drains)
            t0 = time.monotonic()
            gateway = h.gateway
        return records, time.monotonic() - t0, gateway  # serving's exit ran Gateway.aclose()

    records, elapsed, gateway = run(go())
    assert elapsed < 3 and not gateway._drains
    assert len(records) == 1 and records[0].completion_tokens > 0
    assert records[0].error is not None and "charged an estimate" in records[0].error


# --- allowlist --------------------------------------------------------------------------------


def test_model_outside_allowlist_is_refused_with_403() -> None:
    """A model not on the provider's allowlist gets a 403 naming it; allowed ones pass."""

    async def go() -> None:
        allowed = {"openai": {"gpt-4o-mini"}, "gemini": {"gemini-2.5-flash"}}
        async with serving(fo, fg, allowed_models=allowed) as h:
            await h.openai().chat.completions.create(model="gpt-4o-mini", messages=USER)
            with pytest.raises(openai.PermissionDeniedError, match="model=gpt-4o ") as err:
                await h.openai().chat.completions.create(model="gpt-4o", messages=USER)
            assert err.value.status_code == 403
            await h.gemini().aio.models.generate_content(model="gemini-2.5-flash", contents="hi")
            with pytest.raises(genai_errors.ClientError, match=re.escape("model=gemini-2.5-pro")) as gerr:
                await h.gemini().aio.models.generate_content(model="gemini-2.5-pro", contents="hi")
            assert gerr.value.code == 403

    with FakeOpenAI(api_key=OPENAI_KEY) as fo, FakeGemini(api_key=GEMINI_KEY) as fg:
        run(go())
    assert len(fo.requests) == 1 and len(fg.requests) == 1


def test_provider_left_out_of_allowlist_allows_no_model() -> None:
    """A Gemini-only run cannot call OpenAI with the host's key; allowed_models=None allows anything."""

    async def go() -> None:
        async with serving(fo, fg, allowed_models={"gemini": {"gemini-2.5-flash"}}) as h:
            await h.gemini().aio.models.generate_content(model="gemini-2.5-flash", contents="hi")
            for model in ("gpt-4o", "gpt-4o-mini"):
                with pytest.raises(openai.PermissionDeniedError) as err:
                    await h.openai(max_retries=2).chat.completions.create(model=model, messages=USER)
                assert f"model={model} " in err.value.message
                assert "this run's config does not use provider=openai" in err.value.message
            models = await h.http().get("/openai/v1/models")
            assert models.json()["data"] == []
        async with serving(fo, fg, allowed_models={}) as h:
            with pytest.raises(genai_errors.ClientError, match="does not use provider=gemini") as gerr:
                await h.gemini().aio.models.generate_content(model="gemini-2.5-flash", contents="hi")
            assert gerr.value.code == 403
        async with serving(fake_gemini=fg, allowed_models={"gemini": {"gemini-2.5-flash"}}) as h:
            # No OpenAI key on the host either: the run's config is the reason given, not the key.
            with pytest.raises(openai.PermissionDeniedError, match="does not use provider=openai"):
                await h.openai().chat.completions.create(model="gpt-4o", messages=USER)
        async with serving(fo, fg, allowed_models=None) as h:
            await h.openai().chat.completions.create(model="any-model-at-all", messages=USER)
            await h.gemini().aio.models.generate_content(model="gemini-2.5-pro", contents="hi")

    with FakeOpenAI(api_key=OPENAI_KEY) as fo, FakeGemini(api_key=GEMINI_KEY) as fg:
        run(go())
    assert [r["model"] for r in fo.requests] == ["any-model-at-all"]
    assert len(fg.requests) == 2


# --- re-adopted runs: seeding the meter -------------------------------------------------------


def _record(agent: str, model: str, prompt: int, completion: int, cost: float, ok: bool = True) -> CallRecord:
    return CallRecord(agent, "openai", model, prompt, completion, 0, 1.0, 0.1, cost, 200 if ok else 502, ok, None)


def test_budget_meter_seed_adds_to_totals_without_on_record() -> None:
    """seed() restores spent totals (overall, per agent and model) silently; limits apply to them."""
    recorded: list[CallRecord] = []
    meter = BudgetMeter(max_tokens=1000, on_record=recorded.append)
    n = meter.seed([_record("agent_a", "gpt-4o", 300, 100, 0.01), _record("agent_b", "gpt-4o", 400, 50, 0.02, False)])
    assert n == 2 and recorded == []
    assert (meter.total.calls, meter.total.failed, meter.total.tokens) == (2, 1, 850)
    assert meter.total.cost_usd == pytest.approx(0.03)
    assert meter.by_agent["agent_b"].prompt_tokens == 400
    assert meter.by_model[("openai", "gpt-4o")].calls == 2
    assert meter.budget_error() is None
    meter.record(_record("agent_a", "gpt-4o", 100, 60, 0.0))
    assert len(recorded) == 1
    assert meter.budget_error() == "budget_exceeded: tokens=1010 reached max_tokens=1000"
    assert meter.seed([]) == 0


def test_chain_meter_refuses_once_any_ancestors_budget_is_spent() -> None:
    """A nested run's meter records into its own totals but refuses once an ancestor's budget is spent."""
    exceeded: list[str] = []
    root = ChainMeter(BudgetMeter(max_calls=2))
    parent = ChainMeter(BudgetMeter(max_tokens=10_000), [root])
    child = ChainMeter(BudgetMeter(max_calls=5, on_exceeded=exceeded.append), [parent, root, None])
    child.record(_record("agent_a", "gpt-4o", 10, 5, 0.0))
    assert (child.own.total.calls, parent.own.total.calls, root.own.total.calls) == (1, 0, 0)
    assert child.budget_error() is None
    root.own.total.add(_record("agent_a", "gpt-4o", 10, 5, 0.0))
    root.own.total.add(_record("agent_a", "gpt-4o", 10, 5, 0.0))
    err = child.budget_error()
    assert err == "budget_exceeded: calls=2 reached max_calls=2"
    child.on_budget_exceeded(err)
    child.on_budget_exceeded(err)
    assert exceeded == [err] and root.own.exceeded is None


def test_seed_from_telemetry_reads_model_calls_and_skips_bad_lines(tmp_path: Path) -> None:
    """telemetry.jsonl lines (ModelCall JSON) seed the meter; torn, foreign or invalid lines are skipped."""
    from agent_image.protocol.events import ModelCall

    def line(**fields: Any) -> str:
        base = {"seq": 0, "ts": 1.0, "agent": "agent_a", "provider": "gemini", "model": "gemini-2.5-pro"}
        return ModelCall(**{**base, **fields}).model_dump_json()

    path = tmp_path / "telemetry.jsonl"
    good = [
        line(prompt_tokens=100, completion_tokens=20, cached_tokens=10, cost_usd=0.5),
        line(agent="agent_b", prompt_tokens=7, completion_tokens=3, cost_usd=0.25, ok=False),
        json.dumps({"agent": "agent_c", "provider": "openai", "model": "gpt-4o", "prompt_tokens": 1}),
    ]
    bad = [
        "",
        "not json",
        "[1, 2]",
        json.dumps({"type": "answer", "agent": "agent_a", "provider": "openai", "model": "gpt-4o"}),
        json.dumps({"agent": "agent_a", "provider": "openai", "model": "gpt-4o", "prompt_tokens": -5}),
        json.dumps({"agent": "agent_a", "provider": "openai", "model": "gpt-4o", "cost_usd": "1"}),
        json.dumps({"agent": "agent_a", "provider": "openai"}),
        '{"agent": "agent_a", "provider": "openai", "model": "gpt-4o", "cost_usd": NaN}',
        line(prompt_tokens=999)[:-10],  # torn by a crash mid-write
    ]
    path.write_text("\n".join([good[0], *bad[:5], good[1], *bad[5:], good[2]]) + "\n")
    recorded: list[CallRecord] = []
    meter = BudgetMeter(max_cost_usd=0.75, on_record=recorded.append)
    assert seed_from_telemetry(meter, path) == 3
    assert recorded == []
    t = meter.total
    assert (t.calls, t.failed, t.prompt_tokens, t.completion_tokens, t.cached_tokens) == (3, 1, 108, 23, 10)
    assert t.cost_usd == pytest.approx(0.75)
    assert meter.by_model[("gemini", "gemini-2.5-pro")].calls == 2
    assert meter.budget_error() is not None and "max_cost_usd=0.75" in (meter.budget_error() or "")
    assert seed_from_telemetry(BudgetMeter(), tmp_path / "absent.jsonl") == 0


def test_seeded_meter_refuses_a_readopted_runs_first_call(tmp_path: Path) -> None:
    """A run re-adopted after a supervisor restart keeps its spent budget: no fresh allowance."""
    path = tmp_path / "telemetry.jsonl"
    spent = {"agent": "agent_a", "provider": "openai", "model": "gpt-4o", "prompt_tokens": 90, "completion_tokens": 20}
    path.write_text(json.dumps(spent) + "\n")

    async def go() -> None:
        meter = BudgetMeter(max_tokens=100)
        assert seed_from_telemetry(meter, path) == 1
        async with serving(fake, meter=meter) as h:
            with pytest.raises(openai.PermissionDeniedError, match="budget_exceeded: tokens=110"):
                await h.openai().chat.completions.create(model="gpt-4o", messages=USER)

    with FakeOpenAI(api_key=OPENAI_KEY) as fake:
        run(go())
    assert fake.requests == []


# --- the project's own backends ----------------------------------------------------------------


def test_project_backends_work_through_the_gateway_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenAIBackend and GeminiBackend with MASSGEN_MODEL_SOCKET set complete through the gateway."""
    from agent_image.backends.gemini_backend import GeminiBackend
    from agent_image.backends.openai_backend import OpenAIBackend

    for name in ("OPENAI_API_KEY", "GEMINI_API_KEY", "GOOGLE_API_KEY", "OPENAI_BASE_URL", "GOOGLE_GEMINI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    vote = ToolSpec("vote", "Vote.", {"type": "object", "properties": {"agent_id": {"type": "string"}}})
    messages = [Message(role="system", content="You are agent_a."), Message(role="user", content="2+2?")]

    async def go() -> tuple[Any, Any, BudgetMeter]:
        async with serving(fo, fg) as h:
            monkeypatch.setenv("MASSGEN_MODEL_SOCKET", h.sock)
            ob = OpenAIBackend(BackendConfig(type="openai", model="gpt-4o"))
            gb = GeminiBackend(BackendConfig(type="gemini", model="gemini-2.5-flash"))
            try:
                return await ob.complete(messages, [vote]), await gb.complete(messages, [vote]), h.meter
            finally:
                await ob.aclose()
                await gb.aclose()

    reply = Reply("I vote.", [FakeToolCall("vote", {"agent_id": "agent_b"})], prompt_tokens=11, completion_tokens=4)
    with FakeOpenAI(lambda _r: reply, api_key=OPENAI_KEY) as fo, FakeGemini(lambda _r: reply, api_key=GEMINI_KEY) as fg:
        oc, gc, meter = run(go())
    for completion in (oc, gc):
        assert completion.message.content == "I vote."
        assert [(c.name, c.arguments) for c in completion.message.tool_calls] == [("vote", {"agent_id": "agent_b"})]
        assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (11, 4)
    assert meter.total.calls == 2 and meter.total.prompt_tokens == 22


# --- configuration pieces ---------------------------------------------------------------------


def test_upstreams_from_env_and_keys_file(tmp_path: Path) -> None:
    """Keys and base URLs come from the SDKs' variables; a keys file's entries win."""
    env = {"OPENAI_API_KEY": "sk-a ", "GEMINI_API_KEY": "g-1", "GOOGLE_API_KEY": "g-2"}
    ups = upstreams_from_env(env)
    assert ups["openai"] == Upstream("openai", "https://api.openai.com/v1", "sk-a")
    assert ups["gemini"] == Upstream("gemini", "https://generativelanguage.googleapis.com", "g-2")
    assert "sk-a" not in repr(ups)
    assert upstreams_from_env({"GEMINI_API_KEY": "g-1", "GOOGLE_GEMINI_BASE_URL": "http://x:1"})["gemini"].base_url == (
        "http://x:1"
    )
    keys = tmp_path / "keys.yaml"
    keys.write_text('# host keys\n{"openai": {"api_key": "sk-file", "base_url": "http://vllm:8000/v1"}}\n')
    ups = upstreams_from_env({"OPENAI_API_KEY": "sk-env", "MASSGEN_KEYS_FILE": str(keys)})
    assert ups == {"openai": Upstream("openai", "http://vllm:8000/v1", "sk-file")}
    keys.write_text('{"anthropic": {"api_key": "sk-secret-x"}}')
    with pytest.raises(DataFileError, match="unknown provider") as err:
        upstreams_from_env({"MASSGEN_KEYS_FILE": str(keys)})
    assert "sk-secret-x" not in str(err.value)
    assert upstreams_from_env({}) == {}
    assert "OPENAI_API_KEY" in missing_key_message("openai")
    assert "GEMINI_API_KEY or GOOGLE_API_KEY" in missing_key_message("gemini")


def test_pricing_lookup_override_and_unknown_models(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Dated snapshots price as their base model; unknown models cost 0 with one warning; env overrides."""
    pricing = Pricing.load(DEFAULT_PRICING_FILE)
    assert pricing.price("openai", "gpt-4o-2024-08-06") == pricing.price("openai", "gpt-4o")
    assert pricing.price("openai", "gpt-4o-mini") != pricing.price("openai", "gpt-4o")
    assert pricing.price("gemini", "models/gemini-2.5-flash") is not None
    assert pricing.cost("openai", "gpt-4o", 1_000_000, 1_000_000, 500_000) == pytest.approx(
        0.5 * 2.5 + 0.5 * 1.25 + 10.0
    )
    with caplog.at_level(logging.WARNING, logger="supervisor.pricing"):
        assert pricing.cost("openai", "mystery", 10, 10, 0) == 0
        assert pricing.cost("openai", "mystery", 10, 10, 0) == 0
    assert sum("mystery" in r.getMessage() for r in caplog.records) == 1
    custom = tmp_path / "p.yaml"
    custom.write_text('# mine\n{"openai": {"mystery": {"input": 1, "output": 2}}}\n')
    over = Pricing.load(env={"MASSGEN_PRICING_FILE": str(custom)})
    assert over.cost("openai", "mystery", 1_000_000, 1_000_000, 1_000_000) == pytest.approx(3.0)
    custom.write_text("openai:\n  mystery: {input: 1}\n")
    with pytest.raises(DataFileError, match="line 1"):
        Pricing.load(custom)


def test_usage_parsing_of_each_wire_format() -> None:
    """Chat, Responses (body and event) and Gemini usage shapes parse to (prompt, completion, cached)."""
    chat = {"usage": {"prompt_tokens": 5, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 1}}}
    assert usage_from("openai", chat) == (5, 2, 1)
    responses = {"usage": {"input_tokens": 7, "output_tokens": 3, "input_tokens_details": {"cached_tokens": 2}}}
    assert usage_from("openai", responses) == (7, 3, 2)
    assert usage_from("openai", {"type": "response.completed", "response": responses}) == (7, 3, 2)
    assert usage_from("openai", {"usage": None}) is None
    meta = {"promptTokenCount": 4, "candidatesTokenCount": 2, "thoughtsTokenCount": 3, "cachedContentTokenCount": 1}
    assert usage_from("gemini", {"usageMetadata": meta}) == (4, 5, 1)
    assert usage_from("gemini", [{"usageMetadata": {"promptTokenCount": 1}}, {"usageMetadata": meta}]) == (4, 5, 1)


def test_call_log_lines_never_carry_the_key(caplog: pytest.LogCaptureFixture) -> None:
    """One key=value log line per call, naming run, agent, provider, model, tokens, latency and status."""

    async def go() -> None:
        async with serving(fake, run_id="run-7") as h:
            await h.openai("agent_a").chat.completions.create(model="gpt-4o", messages=USER)
            with contextlib.suppress(openai.APIStatusError):
                await h.openai("agent_a").chat.completions.create(model="gpt-4o", messages=USER)

    fault = Fault(401, f"Incorrect API key provided: {OPENAI_KEY}")
    with FakeOpenAI(sequence("fine", fault), api_key=OPENAI_KEY) as fake, caplog.at_level(logging.DEBUG):
        run(go())
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("supervisor.gateway")]
    calls = [line for line in lines if line.startswith("model_call ")]
    assert len(calls) == 2
    assert lines and all(" run_id=run-7 " in line for line in lines)
    for part in ("agent=agent_a", "provider=openai", "model=gpt-4o", "prompt_tokens=", "latency_s=", "status=200"):
        assert part in calls[0]
    assert "status=401" in calls[1]
    assert all(OPENAI_KEY not in r.getMessage() for r in caplog.records)


def test_malformed_requests_are_refused_locally() -> None:
    """Bad JSON, a missing model and an unknown Gemini method get 4xx without reaching the upstream."""

    async def go() -> list[tuple[int, Any]]:
        async with serving(fo, fg) as h:
            raw = h.http()
            answers = [
                await raw.post("/openai/v1/chat/completions", content=b"{not json"),
                await raw.post("/openai/v1/chat/completions", json={"messages": USER}),
                await raw.post("/gemini/v1/models/gemini-2.5-flash:countTokens", json={}),
                await raw.post("/gemini/v1/models/gemini-2.5-flash", json={}),
                await raw.get("/openai/v1/files"),
            ]
            return [(r.status_code, r.json() if r.status_code != 404 or "error" in r.text else None) for r in answers]

    with FakeOpenAI(api_key=OPENAI_KEY) as fo, FakeGemini(api_key=GEMINI_KEY) as fg:
        answers = run(go())
    assert [status for status, _ in answers] == [400, 400, 404, 404, 404]
    assert answers[0][1]["error"]["type"] == "invalid_request_error"
    assert answers[2][1]["error"]["status"] == "NOT_FOUND"
    assert fo.requests == [] and fg.requests == []


def test_per_agent_routes_reach_each_agents_own_upstream_with_its_own_key() -> None:
    """/openai/agents/{id}/v1: each agent's upstream and key; a keyless local upstream gets no Authorization."""
    k1, k2 = "sk-route-one-aaaa", "sk-route-two-bbbb"

    async def go(one: FakeServer, two: FakeServer, local: FakeServer) -> None:
        routes = {
            "a": Upstream("openai", one.base_url, k1),
            "b.2": Upstream("openai", two.base_url, k2),
            "c": Upstream("openai", local.base_url, ""),
        }
        seen: list[str] = []
        meter = BudgetMeter(on_record=lambda call: seen.append(call.agent))
        async with serving(meter=meter, agent_upstreams=routes, allowed_models={"openai": {"m"}}) as h:
            for agent in routes:
                client = openai.AsyncOpenAI(
                    base_url=f"http://massgen-gateway/openai/agents/{agent}/v1",
                    api_key=PLACEHOLDER,
                    http_client=h.http(),
                    max_retries=0,
                    default_headers={"X-Massgen-Agent": agent},
                )
                resp = await client.chat.completions.create(model="m", messages=USER)
                assert resp.choices[0].message.content == "ok"
            with pytest.raises(openai.NotFoundError, match="no upstream for agent=zed"):
                stranger = openai.AsyncOpenAI(
                    base_url="http://massgen-gateway/openai/agents/zed/v1",
                    api_key=PLACEHOLDER,
                    http_client=h.http(),
                    max_retries=0,
                )
                await stranger.chat.completions.create(model="m", messages=USER)
        assert seen == ["a", "b.2", "c"]

    with (
        FakeOpenAI(lambda _r: Reply("ok"), api_key=k1) as one,
        FakeOpenAI(lambda _r: Reply("ok"), api_key=k2) as two,
        FakeOpenAI(lambda _r: Reply("ok")) as local,
    ):
        run(go(one, two, local))
    assert [r.headers.get("authorization") for r in one.requests] == [f"Bearer {k1}"]
    assert [r.headers.get("authorization") for r in two.requests] == [f"Bearer {k2}"]
    assert [r.headers.get("authorization") for r in local.requests] == [None]
    assert one.requests[0].path == "/v1/chat/completions"


def test_agent_upstream_picks_the_key_by_host_and_keys_file_url(tmp_path: Path) -> None:
    """agent_upstream: a URL entry in MASSGEN_KEYS_FILE wins; else the host's variable; local aliases need none."""
    from supervisor.gateway import agent_upstream

    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"http://127.0.0.1:9/v1/": {"api_key": "from-file"}}))
    env = {"MASSGEN_KEYS_FILE": str(keys), "CEREBRAS_API_KEY": "cb", "OPENAI_API_KEY": "oa"}
    up, _ = agent_upstream("chatcompletion", "http://127.0.0.1:9/v1", env)
    assert up is not None and up.api_key == "from-file"
    up, names = agent_upstream("chatcompletion", "https://api.cerebras.ai/v1", env)
    assert up is not None and up.api_key == "cb" and names == ("CEREBRAS_API_KEY",)
    up, names = agent_upstream("grok", "https://api.x.ai/v1", env)
    assert up is None and names == ("XAI_API_KEY",)  # needed and missing: never OPENAI_API_KEY instead
    up, names = agent_upstream("lmstudio", "http://localhost:1234/v1", env)
    assert up is not None and up.api_key == "" and names == ()
    up, _ = agent_upstream(None, None, env)
    assert up is not None and (up.base_url, up.api_key) == ("https://api.openai.com/v1", "oa")

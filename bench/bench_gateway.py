"""Latency the model gateway adds: the fake OpenAI upstream called directly vs through the gateway socket.

Run: ``python bench/bench_gateway.py [--calls 300]`` from the repository root. Prints the median
(and p90) wall time of a non-streaming chat completion and the streaming time to first chunk,
direct (host -> loopback fake) and through the gateway (host -> unix socket -> gateway ->
loopback fake), and the difference; the target is an added median below 5 ms for both. Exits 1
when a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx2  # after the path fix: the fakes live in the checkout's tests/

from supervisor.gateway import BudgetMeter, Gateway, Upstream
from supervisor.pricing import Pricing
from tests.fakes import FakeOpenAI, Reply
from tests.fakes._common import _Handler

TARGET_MS = 5.0
KEY = "sk-bench-0123456789abcdef"
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "What is 2+2? " * 20}]}
STREAM_BODY = {**BODY, "stream": True, "stream_options": {"include_usage": True}}


async def one_call(client: httpx2.AsyncClient, url: str) -> float:
    t0 = time.perf_counter()
    resp = await client.post(url, json=BODY)
    resp.raise_for_status()
    resp.json()
    return time.perf_counter() - t0


async def first_chunk(client: httpx2.AsyncClient, url: str) -> float:
    t0 = time.perf_counter()
    took = float("nan")
    async with client.stream("POST", url, json=STREAM_BODY) as resp:
        resp.raise_for_status()
        async for _chunk in resp.aiter_raw():
            if took != took:  # nan: the first chunk
                took = time.perf_counter() - t0
    return took


def summary(label: str, direct: list[float], via: list[float]) -> float:
    d, g = statistics.median(direct) * 1e3, statistics.median(via) * 1e3
    d90 = statistics.quantiles(direct, n=10)[-1] * 1e3
    g90 = statistics.quantiles(via, n=10)[-1] * 1e3
    added = g - d
    print(
        f"{label:<28} direct median={d:7.3f} ms p90={d90:7.3f} | gateway median={g:7.3f} ms p90={g90:7.3f}"
        f" | added={added:+.3f} ms ratio={g / d:.2f}x"
    )
    return added


async def bench(calls: int, warmup: int) -> int:
    reply = Reply("Four. " * 40, prompt_tokens=60, completion_tokens=80, chunk_size=16)
    # The fake is Python's http.server: without TCP_NODELAY its small SSE writes wait on delayed
    # ACKs (~40 ms) and would swamp what is measured here, for both paths alike.
    _Handler.disable_nagle_algorithm = True
    folder = tempfile.mkdtemp(prefix="gwb", dir="/tmp")
    sock = os.path.join(folder, "g.sock")
    with FakeOpenAI(lambda _r: reply, api_key=KEY) as fake:
        gateway = Gateway(
            {"openai": Upstream("openai", fake.base_url, KEY)}, meter=BudgetMeter(), pricing=Pricing.load()
        )
        runner = await gateway.serve_unix(sock)
        direct = httpx2.AsyncClient(headers={"Authorization": f"Bearer {KEY}"})
        via = httpx2.AsyncClient(transport=httpx2.AsyncHTTPTransport(uds=sock), headers={"Authorization": "Bearer x"})
        direct_url = f"{fake.base_url}/chat/completions"
        via_url = "http://massgen-gateway/openai/v1/chat/completions"
        try:
            results: dict[str, list[float]] = {k: [] for k in ("d_json", "g_json", "d_sse", "g_sse")}
            for i in range(warmup + calls):
                # Interleaved, so drift (CPU frequency, GC, the fake's threads) hits both alike.
                pairs = (
                    ("d_json", one_call(direct, direct_url)),
                    ("g_json", one_call(via, via_url)),
                    ("d_sse", first_chunk(direct, direct_url)),
                    ("g_sse", first_chunk(via, via_url)),
                )
                for key, coro in pairs:
                    took = await coro
                    if i >= warmup:
                        results[key].append(took)
        finally:
            await direct.aclose()
            await via.aclose()
            await runner.cleanup()
            shutil.rmtree(folder, ignore_errors=True)
    print(f"model gateway bench: {calls} calls per figure after {warmup} warm-up, fake upstream on loopback")
    added_json = summary("non-streaming call", results["d_json"], results["g_json"])
    added_sse = summary("streaming first chunk", results["d_sse"], results["g_sse"])
    ok = added_json < TARGET_MS and added_sse < TARGET_MS
    print(f"target: added median < {TARGET_MS:g} ms for both -> {'met' if ok else 'MISSED'}")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
    args = parser.parse_args()
    return asyncio.run(bench(args.calls, args.warmup))


if __name__ == "__main__":
    sys.exit(main())

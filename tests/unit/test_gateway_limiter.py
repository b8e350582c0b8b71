"""The per-upstream limiter: one run's 429 holds every run's calls to that upstream (Retry-After honoured)."""

from __future__ import annotations

import asyncio
import time

from supervisor.gateway import BudgetMeter, UpstreamLimiter
from tests.fakes import FakeOpenAI, Fault, sequence
from tests.unit.test_gateway import OPENAI_KEY, USER, run, serving


def test_pause_extends_never_shortens_and_is_capped() -> None:
    """pause() keeps the later of two pauses; waits end when the pause does."""
    lim = UpstreamLimiter()
    lim.pause("h", 0.3)
    lim.pause("h", 0.05)
    assert 0.2 < lim.remaining("h") <= 0.3
    assert lim.remaining("other") == 0.0
    t0 = time.monotonic()
    waited = asyncio.run(lim.wait("h"))
    assert 0.2 < time.monotonic() - t0 < 1.0 and waited > 0.2
    lim.pause("h", 10_000)
    assert lim.remaining("h") <= 60.0


def test_a_429_seen_by_one_gateway_holds_the_other_gateways_calls() -> None:
    """Two runs' gateways share a limiter: after run A's call gets 429 with Retry-After: 1, run B's call
    (sent while A waits) also waits out the pause before it reaches the upstream."""
    lim = UpstreamLimiter()

    async def go(fake: FakeOpenAI) -> tuple[float, float]:
        async with (
            serving(fake, meter=BudgetMeter(), limiter=lim) as a,
            serving(fake, meter=BudgetMeter(), limiter=lim) as b,
        ):
            t0 = time.monotonic()
            first = asyncio.create_task(a.openai().chat.completions.create(model="gpt-4o", messages=USER))
            while len(fake.requests) < 1:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)  # A has its 429 and is waiting
            await b.openai().chat.completions.create(model="gpt-4o", messages=USER)
            b_done = time.monotonic() - t0
            await first
            return b_done, time.monotonic() - t0

    with FakeOpenAI(sequence(Fault(429, "slow down", retry_after=1), "fine"), api_key=OPENAI_KEY) as fake:
        b_done, a_done = run(go(fake))
        assert len(fake.requests) == 3  # A's 429, then B's and A's calls after the pause
    assert b_done >= 0.9  # B never reached the upstream during the pause
    assert a_done < 3

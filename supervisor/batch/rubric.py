"""`llm_rubric`: a model grades an answer against a rubric, through a gateway with its own budget line.

The grader's calls go through an in-process `Gateway` (the host's key added there, like a run's)
metered by a `BudgetMeter` of the spec's `grading_budget`, kept apart from the items' spend.
The model is asked for JSON `{"pass": bool, "score": 0..1, "reason": "..."}`.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
from typing import Any

from .assertions import Outcome, RunFacts

GATEWAY_ORIGIN = "http://massgen-gateway"
SYSTEM = (
    "You grade an answer against a rubric. Reply with one JSON object only: "
    '{"pass": true or false, "score": a number from 0 to 1, "reason": "one sentence"}.'
)


class RubricGrader:
    """One gateway (unix socket in a private temp dir) for every rubric call of a batch."""

    def __init__(self, budget: Any) -> None:
        self.budget = budget
        self.meter: Any = None
        self._gateway: Any = None
        self._runner: Any = None
        self._dir: str | None = None
        self._lock = asyncio.Lock()

    async def _ensure(self, models: set[str], base_url: str | None) -> str:
        async with self._lock:
            if self._dir is not None:
                return os.path.join(self._dir, "g.sock")
            from ..gateway import BudgetMeter, Gateway, upstreams_from_env
            from ..pricing import Pricing

            b = self.budget
            self.meter = BudgetMeter(b.max_tokens, b.max_cost_usd, b.max_calls)
            upstreams = dict(upstreams_from_env())
            if "openai" in upstreams and base_url:
                up = upstreams["openai"]
                upstreams["openai"] = type(up)(up.provider, base_url.rstrip("/"), up.api_key)
            self._gateway = Gateway(
                upstreams, meter=self.meter, pricing=Pricing.load(), allowed_models={"openai": models}, run_id="rubric"
            )
            self._dir = tempfile.mkdtemp(prefix="mgr-", dir="/tmp")
            os.chmod(self._dir, 0o700)
            sock = os.path.join(self._dir, "g.sock")
            self._runner = await self._gateway.serve_unix(sock)
            return sock

    def spend(self) -> dict[str, Any]:
        if self.meter is None:
            return {"calls": 0, "tokens": 0, "cost_usd": 0.0}
        t = self.meter.total
        return {"calls": t.calls, "tokens": t.tokens, "cost_usd": round(t.cost_usd, 8)}

    def spend_of(self, label: str) -> float:
        """What the grader's calls for one item (its label) cost so far."""
        if self.meter is None or label not in self.meter.by_agent:
            return 0.0
        return float(self.meter.by_agent[label].cost_usd)

    async def grade(self, a: Any, facts: RunFacts, question: str, expected: Any, label: str) -> Outcome:
        import httpx2
        import openai

        sock = await self._ensure({a.model}, a.base_url)
        client = openai.AsyncOpenAI(
            base_url=f"{GATEWAY_ORIGIN}/openai/v1",
            api_key="rubric",  # the gateway drops it and adds the host's key
            http_client=httpx2.AsyncClient(transport=httpx2.AsyncHTTPTransport(uds=sock), timeout=120),
            max_retries=0,
            default_headers={"X-Massgen-Agent": label},  # the item: its grading spend, by agent
        )
        prompt = (
            f"Rubric:\n{a.rubric}\n\nQuestion:\n{question}\n\n"
            + (f"Reference answer:\n{expected}\n\n" if expected is not None else "")
            + f"Answer to grade:\n{facts.answer or ''}"
        )
        try:
            resp = await client.chat.completions.create(
                model=a.model,
                messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}],
                temperature=0,
            )
        except openai.APIStatusError as exc:
            code = "budget" if "budget_exceeded" in str(exc) else "error"
            return Outcome("llm_rubric", False, f"grader {code}: HTTP {exc.status_code}", harness_error=True)
        except openai.APIError as exc:
            return Outcome("llm_rubric", False, f"grader unavailable: {type(exc).__name__}", harness_error=True)
        finally:
            await client.close()
        text = (resp.choices[0].message.content or "").strip() if resp.choices else ""
        try:
            start, end = text.index("{"), text.rindex("}") + 1
            verdict = json.loads(text[start:end])
            score = float(verdict.get("score", 1.0 if verdict.get("pass") else 0.0))
            passed = bool(verdict.get("pass")) and score >= a.min_score
            reason = str(verdict.get("reason", ""))[:200]
        except (ValueError, TypeError, AttributeError):
            return Outcome(
                "llm_rubric", False, f"grader reply is not the JSON asked for: {text[:120]!r}", harness_error=True
            )
        return Outcome("llm_rubric", passed, f"score {score:.2f}: {reason}")

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._gateway is not None:
            await self._gateway.aclose()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

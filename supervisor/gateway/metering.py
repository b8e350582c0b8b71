"""Metering and budgets: what a model call cost, the totals per run, and the limits that refuse the next call.

`BudgetMeter` keeps one run's totals and limits; `ChainMeter` (the `Meter` a run's gateway gets,
kept on its `RunRecord`) adds every ancestor's limits, since nested runs spend their ancestors'
budgets too.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol


@dataclass(frozen=True)
class CallRecord:
    """One model call as the host saw it (retries included in its latency)."""

    agent: str
    provider: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    latency_s: float
    ttft_s: float | None
    cost_usd: float
    status: int
    ok: bool
    error: str | None


class SpentCall(Protocol):
    """What totals are made of: a `CallRecord`, or a past call read back (e.g. a telemetry line)."""

    @property
    def agent(self) -> str:
        """The agent that made the call (as the sandbox labelled it)."""
        ...

    @property
    def provider(self) -> str:
        """The provider the call went to."""
        ...

    @property
    def model(self) -> str:
        """The model called."""
        ...

    @property
    def prompt_tokens(self) -> int:
        """Prompt tokens billed (cached ones included)."""
        ...

    @property
    def completion_tokens(self) -> int:
        """Completion tokens billed (thinking included)."""
        ...

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens served from the provider's cache."""
        ...

    @property
    def cost_usd(self) -> float:
        """What the call cost, in US dollars."""
        ...

    @property
    def ok(self) -> bool:
        """Whether the call succeeded."""
        ...


class Meter(Protocol):
    """Where the gateway reports calls and asks whether the budget still allows one."""

    def record(self, call: CallRecord) -> None:
        """Count one finished call."""
        ...

    def budget_error(self) -> str | None:
        """Why the next call is refused (a budget is spent), or None."""
        ...

    def on_budget_exceeded(self, message: str) -> None:
        """A call was refused for `message`; called on every refusal."""
        ...


@dataclass
class Totals:
    """Sums over calls. `tokens` = prompt + completion (cached tokens are part of the prompt)."""

    calls: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cost_usd: float = 0.0

    @property
    def tokens(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens

    def add(self, call: SpentCall) -> None:
        """Add one call to the sums."""
        self.calls += 1
        self.failed += 0 if call.ok else 1
        self.prompt_tokens += call.prompt_tokens
        self.completion_tokens += call.completion_tokens
        self.cached_tokens += call.cached_tokens
        self.cost_usd += call.cost_usd


class BudgetMeter:
    """In-memory totals (overall, per agent, per provider/model) and limits.

    A call is allowed while every total is below its limit, so a run spends at most the limit
    plus one call per agent calling concurrently. `on_exceeded` fires once, on the first refusal.
    """

    def __init__(
        self,
        max_tokens: int | None = None,
        max_cost_usd: float | None = None,
        max_calls: int | None = None,
        on_record: Callable[[CallRecord], None] | None = None,
        on_exceeded: Callable[[str], None] | None = None,
    ) -> None:
        self.max_tokens = max_tokens
        self.max_cost_usd = max_cost_usd
        self.max_calls = max_calls
        self._on_record = on_record
        self._on_exceeded = on_exceeded
        self.total = Totals()
        self.by_agent: dict[str, Totals] = {}
        self.by_model: dict[tuple[str, str], Totals] = {}
        self.exceeded: str | None = None

    def record(self, call: CallRecord) -> None:
        """Add the call to the totals (overall, per agent, per model), then to `on_record`."""
        self.total.add(call)
        self.by_agent.setdefault(call.agent, Totals()).add(call)
        self.by_model.setdefault((call.provider, call.model), Totals()).add(call)
        if self._on_record is not None:
            self._on_record(call)

    def seed(self, calls: Iterable[SpentCall]) -> int:
        """Count calls spent before (by an earlier supervisor) into the totals; returns how many.

        Unlike `record`, `on_record` does not fire: the calls are already in the run's telemetry.
        Limits apply to the seeded totals from the next `budget_error` on.
        """
        n = 0
        for call in calls:
            self.total.add(call)
            self.by_agent.setdefault(call.agent, Totals()).add(call)
            self.by_model.setdefault((call.provider, call.model), Totals()).add(call)
            n += 1
        return n

    def budget_error(self) -> str | None:
        """The first limit the totals have reached, as a message, or None."""
        t = self.total
        if self.max_tokens is not None and t.tokens >= self.max_tokens:
            return f"budget_exceeded: tokens={t.tokens} reached max_tokens={self.max_tokens}"
        if self.max_cost_usd is not None and t.cost_usd >= self.max_cost_usd:
            return f"budget_exceeded: cost_usd={t.cost_usd:.6f} reached max_cost_usd={self.max_cost_usd:g}"
        if self.max_calls is not None and t.calls >= self.max_calls:
            return f"budget_exceeded: calls={t.calls} reached max_calls={self.max_calls}"
        return None

    def on_budget_exceeded(self, message: str) -> None:
        """Remember the first refusal and fire `on_exceeded` for it (once)."""
        if self.exceeded is not None:
            return
        self.exceeded = message
        if self._on_exceeded is not None:
            self._on_exceeded(message)


@dataclass(frozen=True)
class SeededCall:
    """A past call read back from telemetry (a `SpentCall`)."""

    agent: str
    provider: str
    model: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cost_usd: float = 0.0
    ok: bool = True


def _count(obj: dict[str, Any], name: str) -> int | None:
    value = obj.get(name, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def _seeded_call(line: bytes) -> SeededCall | None:
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    if not isinstance(obj, dict) or obj.get("type", "model_call") != "model_call":
        return None
    agent, provider, model = obj.get("agent"), obj.get("provider"), obj.get("model")
    if not (isinstance(agent, str) and isinstance(provider, str) and isinstance(model, str)):
        return None
    tokens = [_count(obj, k) for k in ("prompt_tokens", "completion_tokens", "cached_tokens")]
    cost, ok = obj.get("cost_usd", 0.0), obj.get("ok", True)
    if isinstance(cost, bool) or not isinstance(cost, int | float) or not 0 <= cost < float("inf"):
        return None
    if not isinstance(ok, bool) or any(t is None for t in tokens):
        return None
    prompt, completion, cached = (t or 0 for t in tokens)
    return SeededCall(agent, provider, model, prompt, completion, cached, float(cost), ok)


def seed_from_telemetry(meter: BudgetMeter, path: Path) -> int:
    """Seed `meter` with the calls in a run's telemetry.jsonl (``ModelCall`` JSON lines).

    Lines that are not such a call (bad JSON, another event type, negative counts) are skipped;
    a missing file seeds nothing. Returns the number of calls seeded.
    """
    try:
        with open(path, "rb") as fh:
            calls = [c for c in map(_seeded_call, fh) if c is not None]
    except FileNotFoundError:
        return 0
    return meter.seed(calls)


class ChainMeter:
    """A run's budget meter that also respects every ancestor's budget."""

    def __init__(self, own: BudgetMeter, ancestors: Iterable[ChainMeter | None] = ()) -> None:
        self.own = own
        self.ancestors = [a for a in ancestors if a is not None]

    def record(self, call: CallRecord) -> None:
        """Count the call into this run's own meter (ancestors are charged by its `on_record`)."""
        self.own.record(call)

    def budget_error(self) -> str | None:
        """This run's, else the nearest ancestor's, reached limit, or None."""
        for m in (self.own, *(a.own for a in self.ancestors)):
            err = m.budget_error()
            if err:
                return err
        return None

    def on_budget_exceeded(self, message: str) -> None:
        """Recorded by this run's own meter."""
        self.own.on_budget_exceeded(message)

"""Verdicts from a run's log dir: its facts (result/status/events), the classification, assertions.

Everything is read from `result.json`, `status.json` and `events.jsonl`, never from stdout.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent_image.protocol.result import Reason

from .ledger import ItemState

MAX_ANSWER_BYTES = 1 << 20
MAX_EVENTS_BYTES = 64 << 20
_NUMBER_RE = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
# What the gateway tells an agent when the upstream could not be had (gateway._forward).
_UPSTREAM_DOWN_RE = re.compile(r"cannot reach|HTTP (?:408|429|5\d\d) from|broke off its answer|upstream_failed", re.I)

# Reasons that are the behaviour under test: recorded, never retried.
FAIL_REASONS = frozenset(
    {
        Reason.TIMEOUT,
        Reason.NO_ANSWER,
        Reason.AGENT_FAILED,
        Reason.OOM,
        Reason.BUDGET_EXCEEDED,
        Reason.LIMIT_EXCEEDED,
        Reason.BACKEND_ERROR,
        Reason.MAX_DEPTH_EXCEEDED,
        Reason.MAX_CHILDREN_EXCEEDED,
        Reason.MAX_TOTAL_CHILDREN_EXCEEDED,
        Reason.PATH_NOT_ALLOWED,
        Reason.WRITE_NOT_ALLOWED,
        Reason.BASE_URL_NOT_ALLOWED,
    }
)
# The harness could not give the item a fair run, and another attempt may: retried.
TRANSIENT_REASONS = frozenset({Reason.SUPERVISOR_LOST, Reason.ENGINE_UNAVAILABLE, Reason.GATEWAY_UNAVAILABLE})


@dataclass
class RunFacts:
    """What one attempt's log dir says."""

    log_dir: str
    run_id: str
    exit_code: int
    reason: str
    detail: str = ""
    winner: str | None = None
    answer: str | None = None
    answers: int = 0
    agent_errors: list[str] = field(default_factory=list)
    failed_agents: int = 0
    votes: dict[str, int] = field(default_factory=dict)
    duration_s: float | None = None
    cost_usd: float = 0.0
    tokens: int = 0
    calls: int = 0
    events: int = 0
    container_started: bool = False


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as fh:
            data = json.loads(fh.read(8 << 20))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_facts(log_dir: Path) -> RunFacts | None:
    """The facts of a finished run, or None while it has no result.json."""
    res = _read_json(log_dir / "result.json")
    if res is None:
        return None
    st = _read_json(log_dir / "status.json") or {}
    facts = RunFacts(
        log_dir=str(log_dir),
        run_id=str(res.get("run_id") or log_dir.name),
        exit_code=int(res.get("exit_code", 2)),
        reason=str(res.get("reason", "")),
        detail=str(res.get("detail", ""))[:2000],
        winner=res.get("winner"),
        duration_s=res.get("duration_s"),
    )
    answer_file = res.get("answer_file")
    if facts.exit_code == 0 and isinstance(answer_file, str):
        p = Path(answer_file)
        # The answer is the sandbox's text: read it from our own log dir only, never via a symlink.
        if p.parent.parent == log_dir / "final" or log_dir in p.parents:
            try:
                fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW)
                with os.fdopen(fd, "rb") as fh:
                    facts.answer = fh.read(MAX_ANSWER_BYTES).decode("utf-8", "replace")
            except OSError:
                facts.answer = None
    tel = (st.get("telemetry") or {}).get("totals") or {}
    facts.cost_usd = float(tel.get("cost_usd") or 0.0)
    facts.tokens = int(tel.get("total_tokens") or 0)
    facts.calls = int(tel.get("calls") or 0)
    facts.container_started = bool((st.get("container") or {}).get("id"))
    try:
        fd = os.open(log_dir / "events.jsonl", os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as fh:
            lines = fh.read(MAX_EVENTS_BYTES).splitlines()
    except OSError:
        lines = []
    for raw in lines:
        try:
            ev = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(ev, dict):
            continue
        facts.events += 1
        kind = ev.get("type")
        if kind == "answer":
            facts.answers += 1
        elif kind == "agent_error":
            facts.agent_errors.append(str(ev.get("message", ""))[:300])
        elif kind == "agent_failed":
            facts.failed_agents += 1
            facts.agent_errors.append(str(ev.get("message", ""))[:300])
        elif kind == "winner" and isinstance(ev.get("votes"), dict):
            facts.votes = {str(k): int(v) for k, v in ev["votes"].items() if isinstance(v, int)}
    return facts


def classify(facts: RunFacts) -> tuple[ItemState, bool, str]:
    """(state before assertions, whether another attempt may help, why) for a run that did not succeed."""
    reason = facts.reason
    if reason == Reason.INTERRUPTED:
        return ItemState.INTERRUPTED, False, "interrupted"
    if reason in TRANSIENT_REASONS:
        return ItemState.ERROR, True, reason
    if reason == Reason.CONTAINER_CRASHED:
        # A sandbox that never came up is the harness's problem; one that crashed mid-run is not.
        if facts.events == 0:
            return ItemState.ERROR, True, "container_start_failed"
        return ItemState.ERROR, False, reason
    if (
        reason == Reason.BACKEND_ERROR
        and facts.agent_errors
        and all(_UPSTREAM_DOWN_RE.search(m) for m in facts.agent_errors)
    ):
        return ItemState.ERROR, True, "upstream_unavailable"
    if reason in FAIL_REASONS:
        return ItemState.FAIL, False, reason
    return ItemState.ERROR, False, reason or "unknown"


# -- assertions -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    type: str
    passed: bool
    detail: str
    harness_error: bool = False  # the grader itself could not judge (not the answer's fault)

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"type": self.type, "pass": self.passed, "detail": self.detail}
        if self.harness_error:
            d["error"] = True
        return d


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


def _text(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, sort_keys=True)


def _parse_json(answer: str) -> Any:
    """The answer as JSON: the whole text, else the first fenced block."""
    try:
        return json.loads(answer)
    except ValueError:
        m = re.search(r"```(?:json)?\s*\n(.*?)```", answer, re.S)
        if m:
            return json.loads(m.group(1))
        raise


def _number(answer: str, extract: str | None) -> float | None:
    if extract is not None:
        m = re.search(extract, answer)
        if not m:
            return None
        token = m.group(1) if m.groups() else m.group(0)
    else:
        stripped = answer.strip()
        try:
            return float(stripped)
        except ValueError:
            nums = _NUMBER_RE.findall(answer)
            if not nums:
                return None
            token = nums[-1]
    try:
        return float(token.replace(",", ""))
    except ValueError:
        return None


def check(a: Any, facts: RunFacts, expected: Any) -> Outcome:
    """One assertion (not a `command:` grader) against a successful run."""
    kind = a.type
    answer = facts.answer or ""
    if kind == "equals":
        want = _text(a.value if a.value is not None else expected)
        ok = _norm(answer) == _norm(want) if a.normalize else answer == want
        return Outcome(kind, ok, f"expected {want[:80]!r}")
    if kind == "contains":
        want = _text(a.value if a.value is not None else expected)
        ok = want.casefold() in answer.casefold() if a.ignore_case else want in answer
        return Outcome(kind, ok, f"{'contains' if ok else 'does not contain'} {want[:80]!r}")
    if kind == "regex":
        ok = re.search(a.pattern, answer, re.I if a.ignore_case else 0) is not None
        return Outcome(kind, ok, f"{'matches' if ok else 'does not match'} /{a.pattern[:80]}/")
    if kind == "json_schema":
        import jsonschema

        try:
            doc = _parse_json(answer)
        except ValueError:
            return Outcome(kind, False, "the answer is not JSON")
        err = jsonschema.exceptions.best_match(
            jsonschema.validators.validator_for(a.schema_)(a.schema_).iter_errors(doc)
        )
        if err is None:
            return Outcome(kind, True, "valid")
        where = "/".join(str(p) for p in err.absolute_path) or "(root)"
        return Outcome(kind, False, f"{where}: {err.message[:200]}")
    if kind == "number_close":
        want = a.value if a.value is not None else expected
        try:
            target = float(want)
        except (TypeError, ValueError):
            return Outcome(kind, False, f"expected value {want!r} is not a number")
        got = _number(answer, a.extract)
        if got is None:
            return Outcome(kind, False, "no number in the answer")
        ok = math.isclose(got, target, rel_tol=a.rel_tol, abs_tol=a.abs_tol)
        return Outcome(kind, ok, f"got {got:g}, expected {target:g}")
    if kind == "winner_in":
        ok = facts.winner in a.agents
        return Outcome(kind, ok, f"winner {facts.winner}")
    if kind == "consensus":
        total = sum(facts.votes.values())
        share = facts.votes.get(facts.winner or "", 0) / total if total else 0.0
        return Outcome(kind, share >= a.min_share - 1e-12, f"winner has {share:.0%} of {total} votes")
    if kind == "min_answers":
        return Outcome(kind, facts.answers >= a.count, f"{facts.answers} answers")
    if kind == "no_agent_errors":
        n = len(facts.agent_errors)
        return Outcome(kind, n == 0, f"{n} agent errors")
    if kind == "votes_for":
        n = facts.votes.get(a.agent, 0)
        return Outcome(kind, n >= a.min, f"{a.agent} has {n} votes")
    raise ValueError(f"unknown assertion {kind}")  # pragma: no cover - the spec model forbids it

"""The events -> status reducer: any order gives a valid status, replay is deterministic."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent_image.protocol.events import (
    AgentError,
    AgentFailed,
    AgentInfo,
    AnswerSubmitted,
    ErrorKind,
    Event,
    FinalAnswer,
    LogLine,
    ModelCall,
    RunFinished,
    RunStarted,
    ToolCalled,
    TurnStarted,
    VoteCast,
    WinnerSelected,
)
from agent_image.protocol.reducer import StatusReducer, reduce_events
from agent_image.protocol.status import AgentStatus, Phase, RunState, Status

PROPS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

AGENT_IDS = ["alpha", "bravo", "charlie", "delta"]
GHOST_IDS = ["ghost", "zulu"]
PROVIDERS = ["openai", "gemini"]
MODELS = ["m-large", "m-small"]

_text = st.text(max_size=30)
_ts_step = st.floats(min_value=0, max_value=5, allow_nan=False)


def _json(status: Status) -> str:
    return json.dumps(status.model_dump(mode="json"), sort_keys=True, allow_nan=False)


def _phase(r: StatusReducer) -> Phase:
    """The current phase, read afresh (a plain attribute read stays narrowed across apply())."""
    return r.status.coordination.phase


def _agent_status(r: StatusReducer, agent: str) -> AgentStatus:
    """An agent's current status, read afresh (see _phase)."""
    return r.status.agents[agent].status


# --- strategies ---------------------------------------------------------------------------


@st.composite
def model_calls(draw: st.DrawFn, agent: str, seq: int, ts: float) -> ModelCall:
    return ModelCall(
        seq=seq,
        ts=ts,
        agent=agent,
        provider=draw(st.sampled_from(PROVIDERS)),
        model=draw(st.sampled_from(MODELS)),
        prompt_tokens=draw(st.integers(0, 50_000)),
        completion_tokens=draw(st.integers(0, 5_000)),
        cached_tokens=draw(st.integers(0, 1_000)),
        latency_s=draw(st.floats(0, 60)),
        cost_usd=draw(st.floats(0, 2)),
        ok=draw(st.booleans()),
    )


BODY_KINDS = ["turn", "answer", "vote", "error", "failed", "model_call", "tool", "log"]
# valid runs mostly answer and vote; a failure is rarer, or few streams would get past one
_WEIGHTED_KINDS = BODY_KINDS + ["turn", "answer", "answer", "vote", "vote", "vote", "model_call"]


@st.composite
def valid_streams(draw: st.DrawFn) -> list[Event]:
    """A run_started with 1-4 agents, an interleaving of agent activity, optionally the end."""
    n = draw(st.integers(1, 4))
    ids = AGENT_IDS[:n]
    anon = {a: f"agent{i + 1}" for i, a in enumerate(ids)}
    ts = draw(st.floats(1.6e9, 1.9e9))
    events: list[Event] = [
        RunStarted(
            seq=0,
            ts=ts,
            run_id="log_run",
            question=draw(_text),
            agents=[AgentInfo(id=a, anon=anon[a], backend="scripted") for a in ids],
            timeout_seconds=600,
        )
    ]
    answers: Counter[str] = Counter()
    turns: Counter[str] = Counter()
    failed: set[str] = set()

    def nxt() -> tuple[int, float]:
        nonlocal ts
        ts += draw(_ts_step)
        return len(events), ts

    for _ in range(draw(st.integers(0, 40))):
        kind = draw(st.sampled_from(_WEIGHTED_KINDS))
        if kind == "failed" and draw(st.integers(0, 2)):
            kind = "error"
        live = [a for a in ids if a not in failed]
        if not live:
            kind = "log"
        agent = draw(st.sampled_from(live)) if live else ids[0]
        seq, now = nxt()
        if kind == "turn":
            turns[agent] += 1
            events.append(TurnStarted(seq=seq, ts=now, agent=agent, turn=turns[agent]))
        elif kind == "answer":
            answers[agent] += 1
            label = f"{anon[agent]}.{answers[agent]}"
            events.append(AnswerSubmitted(seq=seq, ts=now, agent=agent, label=label, content=draw(_text)))
        elif kind == "vote" and +answers:
            target = draw(st.sampled_from(sorted(+answers)))
            events.append(VoteCast(seq=seq, ts=now, agent=agent, target=target, reason=draw(_text)))
        elif kind == "error":
            kind_ = draw(st.sampled_from(list(ErrorKind)))
            events.append(AgentError(seq=seq, ts=now, agent=agent, kind=kind_, message=draw(_text)))
        elif kind == "failed":
            failed.add(agent)
            events.append(AgentFailed(seq=seq, ts=now, agent=agent, reason="backend_error", message=draw(_text)))
        elif kind == "model_call":
            events.append(draw(model_calls(agent, seq, now)))
        elif kind == "tool":
            events.append(ToolCalled(seq=seq, ts=now, agent=agent, tool="shell", summary=draw(_text)))
        else:
            events.append(LogLine(seq=seq, ts=now, message=draw(_text)))

    if bool(+answers) and draw(st.booleans()):
        winner = draw(st.sampled_from(sorted(+answers)))
        seq, now = nxt()
        events.append(WinnerSelected(seq=seq, ts=now, winner=winner, votes={winner: 1}))
        if draw(st.booleans()):
            seq, now = nxt()
            events.append(FinalAnswer(seq=seq, ts=now, agent=winner, content=draw(_text)))
    if draw(st.booleans()):
        seq, now = nxt()
        events.append(RunFinished(seq=seq, ts=now, exit_code=draw(st.integers(0, 4)), reason="completed"))
    return events


@st.composite
def any_event(draw: st.DrawFn) -> Event:
    """One event of any type about announced or never-announced agents, at any time."""
    who = st.sampled_from(AGENT_IDS + GHOST_IDS)
    seq = draw(st.integers(0, 1000))
    ts = draw(st.floats(0, 2e9))
    kind = draw(st.sampled_from(BODY_KINDS + ["run_started", "winner", "final", "finished"]))
    agent = draw(who)
    if kind == "run_started":
        ids = draw(st.lists(who, min_size=1, max_size=4, unique=True))
        infos = [AgentInfo(id=a, anon=f"agent{i + 1}", backend="openai", model="m") for i, a in enumerate(ids)]
        return RunStarted(seq=seq, ts=ts, run_id="r", question="q", agents=infos, timeout_seconds=1)
    if kind == "turn":
        return TurnStarted(seq=seq, ts=ts, agent=agent, turn=draw(st.integers(0, 5)))
    if kind == "answer":
        label = f"agent{draw(st.integers(1, 6))}.{draw(st.integers(1, 5))}"
        return AnswerSubmitted(seq=seq, ts=ts, agent=agent, label=label, content=draw(_text))
    if kind == "vote":
        return VoteCast(seq=seq, ts=ts, agent=agent, target=draw(who), reason=draw(_text))
    if kind == "error":
        return AgentError(seq=seq, ts=ts, agent=agent, kind=draw(st.sampled_from(list(ErrorKind))), message="x")
    if kind == "failed":
        return AgentFailed(seq=seq, ts=ts, agent=agent, reason="timeout", message="x")
    if kind == "model_call":
        return draw(model_calls(agent, seq, ts))
    if kind == "tool":
        return ToolCalled(seq=seq, ts=ts, agent=agent, tool="t", summary="s", ok=draw(st.booleans()))
    if kind == "winner":
        return WinnerSelected(seq=seq, ts=ts, winner=agent, votes={}, tie=draw(st.booleans()))
    if kind == "final":
        return FinalAnswer(seq=seq, ts=ts, agent=agent, content=draw(_text))
    if kind == "finished":
        return RunFinished(seq=seq, ts=ts, exit_code=draw(st.integers(0, 4)), reason="x", detail=draw(_text))
    return LogLine(seq=seq, ts=ts, level=draw(st.sampled_from(["debug", "info", "warning", "error"])), message="m")


def shuffled_streams() -> st.SearchStrategy[list[Event]]:
    """Valid streams with extra events about unknown agents, in any order."""
    return st.tuples(valid_streams(), st.lists(any_event(), max_size=8)).flatmap(
        lambda pair: st.permutations(pair[0] + pair[1])
    )


any_streams = st.one_of(valid_streams(), shuffled_streams(), st.lists(any_event(), max_size=40))


# --- the oracle -----------------------------------------------------------------------------


def _check_prefixes(events: list[Event]) -> StatusReducer:
    """Apply events one by one, checking every prefix against an independent model."""
    reducer = StatusReducer("run", "/logs/run")
    standing: dict[str, str] = {}
    latest: dict[str, str] = {}
    failed: set[str] = set()
    finished: RunFinished | None = None
    max_ts: float | None = None
    for ev in events:
        status = reducer.apply(ev)
        max_ts = ev.ts if max_ts is None else max(max_ts, ev.ts)
        if isinstance(ev, AnswerSubmitted):
            latest[ev.agent] = ev.label
            standing.clear()
        elif isinstance(ev, VoteCast):
            standing[ev.agent] = ev.target
        elif isinstance(ev, AgentFailed):
            standing.pop(ev.agent, None)
            failed.add(ev.agent)
        elif isinstance(ev, RunFinished):
            finished = ev

        again = Status.model_validate(status.model_dump(mode="json"))
        assert _json(again) == _json(status)
        pct = status.coordination.completion_percentage
        if finished is None:
            assert 0 <= pct <= 99
            assert status.run.state != RunState.FINISHED
        else:
            assert pct == 100
            assert status.run.state == RunState.FINISHED
            assert status.run.exit_code == finished.exit_code
            assert status.coordination.phase == (Phase.DONE if finished.exit_code == 0 else Phase.FAILED)
            assert status.coordination.active_agents == []
        expected_votes = Counter(latest[t] for t in standing.values() if t in latest)
        assert status.results.votes == dict(expected_votes)
        assert status.coordination.standing_votes == len(standing)
        if isinstance(ev, AnswerSubmitted):
            assert status.results.votes == {}
            assert all(a.vote_cast is None for a in status.agents.values())
        for agent_id in failed:
            assert status.agents[agent_id].status == AgentStatus.FAILED
            assert agent_id not in status.coordination.active_agents
        assert status.meta.last_updated == max_ts
    return reducer


# --- properties -------------------------------------------------------------------------------


@PROPS
@given(valid_streams())
def test_valid_stream_every_prefix_is_a_valid_status(events: list[Event]) -> None:
    """Every prefix of a valid stream reduces to a valid status consistent with a simple model."""
    reducer = _check_prefixes(events)
    status = reducer.status
    started = events[0]
    assert isinstance(started, RunStarted)
    assert [status.agents[a.id].anon for a in started.agents] == [a.anon for a in started.agents]
    assert list(status.agents) == [a.id for a in started.agents]


@PROPS
@given(any_streams)
def test_any_order_every_prefix_is_a_valid_status(events: list[Event]) -> None:
    """Shuffled streams and events about never-announced agents still give a valid status at every step."""
    _check_prefixes(events)


@PROPS
@given(any_streams)
def test_replay_is_deterministic_and_incremental_equals_batch(events: list[Event]) -> None:
    """Reducing the same events twice, or one at a time, gives byte-identical status JSON."""
    first = reduce_events(events, "run", "/logs/run")
    second = reduce_events(list(events), "run", "/logs/run")
    incremental = StatusReducer("run", "/logs/run")
    for ev in events:
        incremental.apply(ev)
    assert _json(first) == _json(second) == _json(incremental.snapshot())
    mid = len(events) // 2
    partial = StatusReducer("run", "/logs/run")
    for ev in events[:mid]:
        partial.apply(ev)
    assert _json(partial.status) == _json(reduce_events(events[:mid], "run", "/logs/run"))


@PROPS
@given(any_streams)
def test_telemetry_totals_are_sums_of_model_calls(events: list[Event]) -> None:
    """Telemetry totals, per provider/model and per agent, are the sums of the model_call events."""
    status = reduce_events(events)
    calls = [ev for ev in events if isinstance(ev, ModelCall)]
    groups: dict[str, dict[str, list[ModelCall]]] = {"totals": {"": calls}, "by_model": {}, "by_agent": {}}
    for ev in calls:
        groups["by_model"].setdefault(f"{ev.provider}/{ev.model}", []).append(ev)
        groups["by_agent"].setdefault(ev.agent, []).append(ev)
    t = status.telemetry
    assert set(t.by_model) == set(groups["by_model"])
    assert set(t.by_agent) == set(groups["by_agent"])
    pairs: list[tuple[Any, list[ModelCall]]] = [(t.totals, calls)]
    pairs += [(t.by_model[k], v) for k, v in groups["by_model"].items()]
    pairs += [(t.by_agent[k], v) for k, v in groups["by_agent"].items()]
    for usage, evs in pairs:
        assert usage.calls == len(evs)
        assert usage.failed_calls == sum(not e.ok for e in evs)
        assert usage.prompt_tokens == sum(e.prompt_tokens for e in evs)
        assert usage.completion_tokens == sum(e.completion_tokens for e in evs)
        assert usage.cached_tokens == sum(e.cached_tokens for e in evs)
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        assert usage.cost_usd == pytest.approx(sum(e.cost_usd for e in evs), abs=1e-9 * (len(evs) + 1))
        assert usage.latency_s == pytest.approx(sum(e.latency_s for e in evs), abs=1e-6 * (len(evs) + 1))


# --- examples -----------------------------------------------------------------------------------


def _started(*ids: str) -> RunStarted:
    agents = [AgentInfo(id=a, anon=f"agent{i + 1}", backend="scripted") for i, a in enumerate(ids)]
    return RunStarted(seq=0, ts=100.0, run_id="r1", question="2+2?", agents=agents, timeout_seconds=60)


def test_empty_reducer_is_starting() -> None:
    """Before any event the status is a valid 'starting' document at 0%."""
    status = StatusReducer("r1").snapshot()
    assert status.coordination.phase == Phase.STARTING
    assert status.run.state == RunState.STARTING
    assert status.coordination.completion_percentage == 0
    Status.model_validate(status.model_dump(mode="json"))


def test_phases_through_a_successful_run() -> None:
    """starting -> initial_answer -> voting -> presentation -> done, with completion rising to 100."""
    r = StatusReducer("r1")
    assert r.status.coordination.phase == Phase.STARTING
    r.apply(_started("a", "b"))
    assert (r.status.coordination.phase, r.status.run.state) == (Phase.INITIAL_ANSWER, RunState.RUNNING)
    r.apply(TurnStarted(seq=1, ts=101, agent="a", turn=1))
    assert r.status.coordination.active_agents == ["a"]
    assert r.status.agents["a"].status == AgentStatus.WORKING
    r.apply(AnswerSubmitted(seq=2, ts=102, agent="a", label="agent1.1", content="4"))
    r.apply(AnswerSubmitted(seq=3, ts=103, agent="b", label="agent2.1", content="four"))
    assert _phase(r) == Phase.INITIAL_ANSWER
    assert r.status.coordination.completion_percentage == 45
    r.apply(VoteCast(seq=4, ts=104, agent="a", target="b", reason="clearer"))
    assert _phase(r) == Phase.VOTING
    assert r.status.results.votes == {"agent2.1": 1}
    assert r.status.agents["a"].vote_cast is not None
    assert r.status.agents["a"].vote_cast.voted_for_label == "agent2.1"
    r.apply(VoteCast(seq=5, ts=105, agent="b", target="b", reason="mine"))
    assert r.status.coordination.completion_percentage == 90
    r.apply(WinnerSelected(seq=6, ts=106, winner="b", votes={"b": 2}))
    assert _phase(r) == Phase.PRESENTATION
    assert r.status.coordination.completion_percentage == 95
    assert r.status.agents["b"].status == AgentStatus.PRESENTING
    r.apply(FinalAnswer(seq=7, ts=107, agent="b", content="four"))
    assert _agent_status(r, "b") == AgentStatus.DONE
    assert r.status.results.final_answer_preview == "four"
    r.apply(RunFinished(seq=8, ts=108, exit_code=0, reason="completed"))
    st_ = r.status
    assert (st_.coordination.phase, st_.run.state, st_.coordination.completion_percentage) == (
        Phase.DONE,
        RunState.FINISHED,
        100,
    )
    assert st_.meta.elapsed_seconds == 8.0
    assert st_.results.winner == "b"


def test_new_answer_clears_votes_and_relabels() -> None:
    """An answer after votes drops every standing vote; new votes count on the latest label."""
    r = StatusReducer()
    r.apply(_started("a", "b"))
    r.apply(AnswerSubmitted(seq=1, ts=101, agent="a", label="agent1.1", content="x"))
    r.apply(VoteCast(seq=2, ts=102, agent="b", target="a", reason="ok"))
    assert r.status.agents["b"].status == AgentStatus.VOTED
    r.apply(AnswerSubmitted(seq=3, ts=103, agent="a", label="agent1.2", content="y"))
    assert r.status.results.votes == {}
    assert r.status.agents["b"].vote_cast is None
    assert _agent_status(r, "b") == AgentStatus.WAITING
    r.apply(VoteCast(seq=4, ts=104, agent="b", target="a", reason="ok"))
    assert r.status.results.votes == {"agent1.2": 1}


def test_failed_agent_and_failed_run() -> None:
    """An agent_failed drops that agent's vote and marks it failed; a nonzero run_finished ends in 'failed'."""
    r = StatusReducer()
    r.apply(_started("a", "b"))
    r.apply(AnswerSubmitted(seq=1, ts=101, agent="b", label="agent2.1", content="x"))
    r.apply(VoteCast(seq=2, ts=102, agent="a", target="b", reason="ok"))
    r.apply(AgentFailed(seq=3, ts=103, agent="a", reason="backend_error", message="boom"))
    assert r.status.results.votes == {}
    assert r.status.agents["a"].status == AgentStatus.FAILED
    assert r.status.agents["a"].error is not None and r.status.agents["a"].error.message == "boom"
    r.apply(TurnStarted(seq=4, ts=104, agent="a", turn=2))
    assert r.status.agents["a"].status == AgentStatus.FAILED
    r.apply(RunFinished(seq=5, ts=105, exit_code=2, reason="agent_failed", detail="all agents failed"))
    assert _phase(r) == Phase.FAILED
    assert (r.status.run.exit_code, r.status.run.reason, r.status.run.detail) == (
        2,
        "agent_failed",
        "all agents failed",
    )
    assert r.status.coordination.completion_percentage == 100


def test_finished_run_ignores_late_events_for_phase() -> None:
    """Events after run_finished (a late winner, a turn) leave the run finished at 100%."""
    r = StatusReducer()
    r.apply(_started("a"))
    r.apply(RunFinished(seq=1, ts=101, exit_code=3, reason="timeout"))
    r.apply(WinnerSelected(seq=2, ts=102, winner="a", votes={}))
    r.apply(TurnStarted(seq=3, ts=103, agent="a", turn=1))
    assert _phase(r) == Phase.FAILED
    assert r.status.coordination.active_agents == []
    assert r.status.coordination.completion_percentage == 100

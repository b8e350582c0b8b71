"""The pure events -> status reducer shared by the engine's host side and the supervisor.

`StatusReducer.apply` folds one event at a time; `reduce_events` folds a whole list. Any prefix
and any order of valid events gives a valid `Status`; the same events always give the same
status (time fields come from the events, never from the clock).
"""

from __future__ import annotations

from collections.abc import Iterable

from .events import (
    AgentError,
    AgentFailed,
    AnswerSubmitted,
    Event,
    FinalAnswer,
    ModelCall,
    RunFinished,
    RunStarted,
    ToolCalled,
    TurnStarted,
    VoteCast,
    WinnerSelected,
)
from .status import (
    AgentEntry,
    AgentErrorInfo,
    AgentStatus,
    Phase,
    RunState,
    Status,
    ToolStats,
    ToolUsage,
    Usage,
    VoteInfo,
)

PREVIEW_CHARS = 200


def _add_usage(u: Usage, ev: ModelCall) -> None:
    u.calls += 1
    u.failed_calls += 0 if ev.ok else 1
    u.prompt_tokens += ev.prompt_tokens
    u.completion_tokens += ev.completion_tokens
    u.cached_tokens += ev.cached_tokens
    u.total_tokens += ev.prompt_tokens + ev.completion_tokens
    u.cost_usd = round(u.cost_usd + ev.cost_usd, 10)
    u.latency_s = round(u.latency_s + ev.latency_s, 6)


def _add_tool(stats: ToolStats, ev: ToolCalled) -> None:
    ms = round(ev.duration_s * 1000, 3)
    stats.total_calls += 1
    stats.total_failures += 0 if ev.ok else 1
    stats.total_execution_time_ms = round(stats.total_execution_time_ms + ms, 3)
    by = stats.by_tool.setdefault(ev.tool, ToolUsage(kind=ev.kind))
    by.calls += 1
    by.failures += 0 if ev.ok else 1
    by.execution_time_ms = round(by.execution_time_ms + ms, 3)


class StatusReducer:
    """Incremental fold of events into a `Status`."""

    def __init__(self, run_id: str = "", log_dir: str = "") -> None:
        self.status = Status()
        self.status.meta.run_id = run_id
        self.status.meta.session_id = run_id
        self.status.meta.log_dir = log_dir
        self._order: list[str] = []  # agent ids in config order
        self._standing: dict[str, str] = {}  # voter -> target (real ids)
        self._latest_label: dict[str, str] = {}
        self._working: set[str] = set()
        self._failed: set[str] = set()
        self._finished = False
        self._last_ts: float | None = None

    # -- helpers -------------------------------------------------------------------------

    def _agent(self, agent_id: str) -> AgentEntry:
        agents = self.status.agents
        if agent_id not in agents:
            self._order.append(agent_id)
            agents[agent_id] = AgentEntry(anon=f"agent{len(self._order)}")
        return agents[agent_id]

    def _recompute(self) -> None:
        st = self.status
        n = max(1, len(self._order))
        live = [a for a in self._order if a not in self._failed]
        answered = sum(1 for a in self._order if st.agents[a].answer_count > 0)
        votes: dict[str, int] = {}
        for target in self._standing.values():
            label = self._latest_label.get(target)
            if label:
                votes[label] = votes.get(label, 0) + 1
        st.results.votes = dict(sorted(votes.items()))
        st.coordination.total_answers = sum(a.answer_count for a in st.agents.values())
        st.coordination.standing_votes = len(self._standing)
        st.coordination.active_agents = [a for a in self._order if a in self._working]
        st.coordination.active_agent = st.coordination.active_agents[0] if st.coordination.active_agents else None
        for entry in st.agents.values():
            entry.times_restarted = max(0, entry.turns - 1)
        totals = st.telemetry.totals
        st.costs.total_estimated_cost = totals.cost_usd
        st.costs.total_input_tokens = totals.prompt_tokens
        st.costs.total_output_tokens = totals.completion_tokens
        if self._finished:
            st.coordination.completion_percentage = 100
            return
        if st.coordination.phase in (Phase.PRESENTATION,):
            pct = 95
        else:
            # Answers from every live agent count half, standing votes the other half;
            # capped below 100 so 100 always means the run is over.
            denom = 2 * max(1, len(live)) if live else 2 * n
            pct = int(90 * min(1.0, (min(answered, len(live) or n) + len(self._standing)) / denom))
            if self._standing:  # (this branch never sees PRESENTATION)
                st.coordination.phase = Phase.VOTING
            elif st.coordination.phase == Phase.STARTING and self._order:
                st.coordination.phase = Phase.INITIAL_ANSWER
        st.coordination.completion_percentage = max(0, min(99, pct))

    def _touch(self, ts: float) -> None:
        self._last_ts = ts if self._last_ts is None else max(self._last_ts, ts)
        st = self.status
        st.meta.last_updated = self._last_ts
        if st.meta.start_time is not None:
            st.meta.elapsed_seconds = round(max(0.0, self._last_ts - st.meta.start_time), 3)

    # -- the fold ------------------------------------------------------------------------

    def apply(self, ev: Event) -> Status:
        st = self.status
        if isinstance(ev, RunStarted):
            st.meta.run_id = st.meta.run_id or ev.run_id
            st.meta.session_id = st.meta.run_id
            st.meta.question = ev.question
            st.meta.start_time = ev.ts
            st.run.started_at = ev.ts
            st.run.sandbox = ev.sandbox
            if not self._finished:
                st.run.state = RunState.RUNNING
            for info in ev.agents:
                entry = self._agent(info.id)
                entry.backend, entry.model = info.backend, info.model
            if st.coordination.phase == Phase.STARTING:
                st.coordination.phase = Phase.INITIAL_ANSWER
        elif isinstance(ev, TurnStarted):
            a = self._agent(ev.agent)
            a.turns = max(a.turns, ev.turn)
            a.last_activity = ev.ts
            if ev.agent not in self._failed and not self._finished:
                self._working.add(ev.agent)
                a.status = AgentStatus.WORKING
        elif isinstance(ev, ToolCalled):
            a = self._agent(ev.agent)
            a.last_activity = ev.ts
            _add_tool(a.tools, ev)
            _add_tool(st.tools, ev)
        elif isinstance(ev, AnswerSubmitted):
            a = self._agent(ev.agent)
            a.answer_count += 1
            a.latest_answer_label = ev.label
            a.last_activity = ev.ts
            self._latest_label[ev.agent] = ev.label
            # A new answer invalidates every standing vote: all agents must look again.
            self._standing.clear()
            for other in st.agents.values():
                other.vote_cast = None
                if other.status == AgentStatus.VOTED:
                    other.status = AgentStatus.ANSWERED if other.answer_count else AgentStatus.WAITING
            self._working.discard(ev.agent)
            if ev.agent not in self._failed:
                a.status = AgentStatus.ANSWERED
        elif isinstance(ev, VoteCast):
            a = self._agent(ev.agent)
            target = self._agent(ev.target)
            self._standing[ev.agent] = ev.target
            a.vote_cast = VoteInfo(
                voted_for_agent=ev.target,
                voted_for_anon=target.anon,
                voted_for_label=self._latest_label.get(ev.target),
                reason_preview=ev.reason[:100],
            )
            a.last_activity = ev.ts
            self._working.discard(ev.agent)
            if ev.agent not in self._failed:
                a.status = AgentStatus.VOTED
        elif isinstance(ev, AgentError):
            a = self._agent(ev.agent)
            a.errors += 1
            a.last_activity = ev.ts
            a.error = AgentErrorInfo(type=ev.kind.value, message=ev.message[:500], timestamp=ev.ts)
        elif isinstance(ev, AgentFailed):
            a = self._agent(ev.agent)
            self._failed.add(ev.agent)
            self._working.discard(ev.agent)
            self._standing.pop(ev.agent, None)
            a.vote_cast = None
            a.status = AgentStatus.FAILED
            a.last_activity = ev.ts
            a.error = AgentErrorInfo(type=ev.reason, message=ev.message[:500], timestamp=ev.ts)
        elif isinstance(ev, ModelCall):
            t = st.telemetry
            _add_usage(t.totals, ev)
            _add_usage(t.by_model.setdefault(f"{ev.provider}/{ev.model}", Usage()), ev)
            _add_usage(t.by_agent.setdefault(ev.agent, Usage()), ev)
        elif isinstance(ev, WinnerSelected):
            st.results.winner = ev.winner
            st.coordination.is_final_presentation = True
            if not self._finished:
                st.coordination.phase = Phase.PRESENTATION
                w = self._agent(ev.winner)
                if ev.winner not in self._failed:
                    w.status = AgentStatus.PRESENTING
            self._working.clear()
        elif isinstance(ev, FinalAnswer):
            st.results.final_answer_preview = ev.content[:PREVIEW_CHARS]
            st.results.winner = st.results.winner or ev.agent
            a = self._agent(ev.agent)
            if ev.agent not in self._failed:
                a.status = AgentStatus.DONE
        elif isinstance(ev, RunFinished):
            self._finished = True
            st.run.state = RunState.FINISHED
            st.run.exit_code = ev.exit_code
            st.run.reason = ev.reason
            st.run.detail = ev.detail or None
            st.run.finished_at = ev.ts
            st.coordination.phase = Phase.DONE if ev.exit_code == 0 else Phase.FAILED
            st.is_complete = True
            st.finish_reason = {0: "completed", 3: "timeout"}.get(ev.exit_code, "error")
            st.finish_reason_details = f"{ev.reason}: {ev.detail}" if ev.detail else ev.reason
            self._working.clear()
        self._touch(ev.ts)
        self._recompute()
        return st

    def snapshot(self) -> Status:
        return self.status.model_copy(deep=True)


def reduce_events(events: Iterable[Event], run_id: str = "", log_dir: str = "") -> Status:
    r = StatusReducer(run_id, log_dir)
    for ev in events:
        r.apply(ev)
    return r.snapshot()

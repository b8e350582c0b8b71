"""The coordination engine: agents answer and vote concurrently; the most-voted agent presents."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from ..backends.base import Backend, BackendError, Message
from ..protocol.config import RunConfig
from ..protocol.events import (
    AgentError,
    AgentFailed,
    AgentInfo,
    AnswerSubmitted,
    ErrorKind,
    FinalAnswer,
    RunStarted,
    TurnStarted,
    VoteCast,
    WinnerSelected,
)
from ..protocol.result import Reason, exit_code_for
from . import prompts
from .outbox import EventWriter
from .turn import AgentGaveUp, PriceFn, ToolRunner, TurnLimits, TurnRunner, Workflow

CANCEL_WAIT_S = 5.0


@dataclass
class AgentState:
    id: str
    anon: str
    system_message: str | None
    runner: TurnRunner
    answers: list[tuple[str, str]] = field(default_factory=list)  # (label, content)
    vote: str | None = None  # real id of the agent this one's standing vote is for
    failed: bool = False
    fail_reason: str = ""
    fail_message: str = ""
    turns: int = 0

    @property
    def latest(self) -> str | None:
        return self.answers[-1][1] if self.answers else None


@dataclass(frozen=True)
class Outcome:
    exit_code: int
    reason: str
    detail: str = ""
    winner: str | None = None
    final_answer: str | None = None


@dataclass(frozen=True)
class TurnView:
    """What a scripted agent may know about the run at the start of its turn."""

    phase: str  # "coordinate" | "present"
    question: str
    own_id: str
    own_anon: str
    anon_of: Mapping[str, str]  # real id -> anon
    answers: Mapping[str, str]  # anon -> latest answer


class Orchestrator:
    def __init__(
        self,
        config: RunConfig,
        question: str,
        run_id: str,
        writer: EventWriter,
        backends: Mapping[str, Backend],
        tools: Mapping[str, ToolRunner],
        *,
        sandbox: str = "none",
        price: PriceFn | None = None,
        timeout: float | None = None,
        write_paths: Sequence[str] = (),
        peers: Callable[[str, str], None] | None = None,
        peers_dir: str | None = None,
    ) -> None:
        self.config = config
        # share_workspaces: `peers(agent_id, anon)` snapshots an agent's workspace after its answer.
        self.peers = peers if config.orchestrator.share_workspaces else None
        self.peers_dir = peers_dir if self.peers is not None else None
        self.write_paths = list(write_paths)  # permission: write context paths: the presenter's only
        self.question = question
        self.run_id = run_id
        self.writer = writer
        self.sandbox = sandbox
        self.timeout = config.effective_timeout() if timeout is None else min(timeout, config.effective_timeout())
        orch = config.orchestrator
        limits = TurnLimits(max_invalid=orch.max_invalid_turns, max_tool_calls=orch.max_tool_calls_per_turn)
        self.agents: dict[str, AgentState] = {}
        for i, a in enumerate(config.agents, start=1):
            runner = TurnRunner(a.id, backends[a.id], tools[a.id], writer, limits, price)
            self.agents[a.id] = AgentState(a.id, f"agent{i}", a.system_message, runner)
        self.by_anon = {s.anon: s.id for s in self.agents.values()}
        self.version = 0  # bumps on every new answer; a vote cast on an older view is stale
        self.phase = "coordinate"

    # -- views -------------------------------------------------------------------------

    def answers_by_anon(self) -> dict[str, str]:
        return {s.anon: s.latest for s in self.agents.values() if s.latest is not None}

    def view(self, agent_id: str) -> TurnView:
        s = self.agents[agent_id]
        return TurnView(
            phase=self.phase,
            question=self.question,
            own_id=agent_id,
            own_anon=s.anon,
            anon_of={a.id: a.anon for a in self.agents.values()},
            answers=self.answers_by_anon(),
        )

    # -- the run -----------------------------------------------------------------------

    async def run(self) -> Outcome:
        """Coordinate and present under the whole-run timeout. Never raises except on cancel."""
        w = self.writer
        timeout = self.timeout
        w.emit(
            RunStarted,
            run_id=self.run_id,
            question=self.question,
            agents=[
                AgentInfo(id=a.id, anon=self.agents[a.id].anon, backend=a.backend.type, model=a.backend.model)
                for a in self.config.agents
            ],
            timeout_seconds=timeout,
            max_new_answers_per_agent=self.config.orchestrator.max_new_answers_per_agent,
            sandbox=self.sandbox,
        )
        w.log(f"run started: {len(self.agents)} agents, timeout {timeout:g}s, sandbox={self.sandbox}")
        try:
            async with asyncio.timeout(timeout):
                return await self._run()
        except TimeoutError:
            w.log(f"whole-run timeout after {timeout:g}s", "error")
            return Outcome(exit_code_for(Reason.TIMEOUT), Reason.TIMEOUT, f"run exceeded {timeout:g}s")

    async def _run(self) -> Outcome:
        await self._coordinate()
        live = [s for s in self.agents.values() if not s.failed]
        if not live:
            return self._all_failed()
        winner, votes, tie = self._pick_winner()
        if winner is None:
            return Outcome(exit_code_for(Reason.NO_ANSWER), Reason.NO_ANSWER, "no agent produced an answer")
        counts = {aid: n for aid, n in votes.items()}
        self.writer.emit(WinnerSelected, winner=winner, votes=counts, tie=tie)
        self.writer.log(
            f"winner {winner} ({self.agents[winner].anon}) with {votes.get(winner, 0)} vote(s)"
            + (" (tie broken by config order)" if tie else "")
        )
        final = await self._present(winner, votes.get(winner, 0))
        self.writer.emit(FinalAnswer, agent=winner, content=final)
        return Outcome(0, Reason.COMPLETED, "", winner, final)

    def _all_failed(self) -> Outcome:
        reasons = {s.fail_reason for s in self.agents.values()}
        reason = Reason.BACKEND_ERROR if reasons == {Reason.BACKEND_ERROR.value} else Reason.AGENT_FAILED
        detail = "; ".join(f"{s.id}: {s.fail_reason}: {s.fail_message}" for s in self.agents.values())
        return Outcome(exit_code_for(reason), reason, f"all agents failed ({detail})")

    def _pick_winner(self) -> tuple[str | None, dict[str, int], bool]:
        votes: dict[str, int] = {}
        for s in self.agents.values():
            if s.vote is not None and not s.failed:
                votes[s.vote] = votes.get(s.vote, 0) + 1
        order = [a.id for a in self.config.agents]
        if votes:
            best = max(votes.values())
            leaders = [a for a in order if votes.get(a) == best]
            return leaders[0], votes, len(leaders) > 1
        with_answers = [a for a in order if self.agents[a].answers]
        return (with_answers[0] if with_answers else None), votes, False

    async def _coordinate(self) -> None:
        running: dict[asyncio.Task[Workflow], tuple[str, int]] = {}
        try:
            while True:
                for s in self.agents.values():
                    busy = any(aid == s.id for aid, _ in running.values())
                    if not s.failed and s.vote is None and not busy:
                        s.turns += 1
                        self.writer.emit(TurnStarted, agent=s.id, turn=s.turns)
                        task = asyncio.create_task(self._turn(s), name=f"turn-{s.id}-{s.turns}")
                        running[task] = (s.id, self.version)
                if not running:
                    return
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                # Process in config order so simultaneous completions are handled deterministically.
                for task in sorted(done, key=lambda t: list(self.agents).index(running[t][0])):
                    agent_id, seen_version = running.pop(task)
                    self._handle(agent_id, seen_version, task)
        finally:
            for task in running:
                task.cancel()
            if running:
                with contextlib.suppress(Exception):
                    await asyncio.wait(running, timeout=CANCEL_WAIT_S)

    async def _turn(self, s: AgentState) -> Workflow:
        answers = self.answers_by_anon()
        messages = [
            Message(role="system", content=prompts.system_prompt(s.system_message, s.anon, self._tool_names(s))),
            Message(
                role="user",
                content=prompts.coordination_prompt(
                    self.question, answers, s.anon, self.config.orchestrator.voting_sensitivity, self.peers_dir
                ),
            ),
        ]
        cap = self.config.orchestrator.max_new_answers_per_agent

        def may_answer() -> str | None:
            if cap is not None and len(s.answers) >= cap:
                return f"You have reached the maximum of {cap} new answer(s). Vote for the best answer instead."
            return None

        async with asyncio.timeout(self.config.timeout_settings.agent_timeout_seconds):
            return await s.runner.coordinate(
                messages, prompts.workflow_specs(sorted(answers)), sorted(answers), may_answer
            )

    def _tool_names(self, s: AgentState) -> list[str]:
        return [t.name for t in s.runner.tools.specs()]

    def _fail(self, s: AgentState, reason: str, message: str) -> None:
        s.failed = True
        s.vote = None
        s.fail_reason = reason
        s.fail_message = " ".join(message.split())[:300]
        self.writer.emit(AgentFailed, agent=s.id, reason=reason, message=message[:4000])
        self.writer.log(f"agent {s.id} failed: {reason}: {message}", "error")

    def _handle(self, agent_id: str, seen_version: int, task: asyncio.Task[Workflow]) -> None:
        s = self.agents[agent_id]
        exc = task.exception() if not task.cancelled() else asyncio.CancelledError()
        if isinstance(exc, TimeoutError):
            limit = self.config.timeout_settings.agent_timeout_seconds
            self.writer.emit(AgentError, agent=s.id, kind=ErrorKind.TIMEOUT, message=f"turn exceeded {limit:g}s")
            self._fail(s, "timeout", f"turn {s.turns} exceeded {limit:g}s")
            return
        if isinstance(exc, BackendError):
            self.writer.emit(AgentError, agent=s.id, kind=ErrorKind.BACKEND, message=str(exc)[:4000])
            self._fail(s, Reason.BACKEND_ERROR.value, str(exc))
            return
        if isinstance(exc, AgentGaveUp):
            self._fail(s, "invalid_calls", str(exc))
            return
        if exc is not None:
            self._fail(s, Reason.AGENT_FAILED.value, f"{type(exc).__name__}: {exc}")
            return
        wf = task.result()
        if wf.kind == "answer":
            label = f"{s.anon}.{len(s.answers) + 1}"
            s.answers.append((label, wf.content))
            self.version += 1
            for other in self.agents.values():
                other.vote = None
            self.writer.emit(AnswerSubmitted, agent=s.id, label=label, content=wf.content)
            self.writer.log(f"{s.id} ({s.anon}) answered {label}; standing votes cleared")
            if self.peers is not None:
                try:
                    self.peers(s.id, s.anon)
                except OSError as exc:
                    self.writer.log(f"snapshot of {s.id}'s workspace for its peers failed: {exc}", "warning")
            return
        target = self.by_anon[wf.target_anon]
        if seen_version != self.version:
            # The answers changed while this agent was deciding; its vote judged an old view.
            self.writer.log(f"{s.id} voted for {wf.target_anon} on a stale view; it will look again")
            return
        s.vote = target
        self.writer.emit(VoteCast, agent=s.id, target=target, reason=wf.reason)
        self.writer.log(f"{s.id} ({s.anon}) voted for {wf.target_anon} ({target})")

    async def _present(self, winner: str, votes: int) -> str:
        s = self.agents[winner]
        stored = s.latest or ""
        if s.failed:
            self.writer.log(f"winner {winner} has failed; its latest answer is the final answer", "warning")
            return stored
        self.phase = "present"
        grant = getattr(s.runner.tools, "grant_writes", None)
        if self.write_paths and grant is not None:
            grant(self.write_paths)
            self.writer.log(f"{winner} presents and may write: {', '.join(self.write_paths)}")
        messages = [
            Message(role="system", content=prompts.system_prompt(s.system_message, s.anon, self._tool_names(s))),
            Message(
                role="user",
                content=prompts.presentation_prompt(
                    self.question, self.answers_by_anon(), s.anon, votes, writable=self.write_paths
                ),
            ),
        ]
        try:
            async with asyncio.timeout(self.config.timeout_settings.agent_timeout_seconds):
                text = await s.runner.present(messages)
        except (BackendError, AgentGaveUp, TimeoutError) as exc:
            detail = str(exc) or type(exc).__name__
            self.writer.emit(
                AgentError, agent=winner, kind=ErrorKind.BACKEND, message=f"presentation failed: {detail}"[:4000]
            )
            self.writer.log(f"presentation by {winner} failed ({detail}); using its latest answer", "warning")
            return stored
        if not text.strip():
            self.writer.log(f"presentation by {winner} was empty; using its latest answer", "warning")
            return stored
        return text

"""The coordination protocol, driven by scripted agents in-process (no subprocess, no Docker)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from agent_image.backends.base import BackendError, Completion, Message, ToolCall, ToolSpec
from agent_image.engine.clock import FakeClock, SystemClock
from agent_image.engine.main import run_engine
from agent_image.engine.orchestrator import Orchestrator
from agent_image.engine.outbox import EventWriter
from agent_image.protocol.config import RunConfig
from agent_image.protocol.reducer import reduce_events
from agent_image.protocol.spec import RunSpec
from agent_image.tools import ToolBox


def _cfg(agents: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"agents": agents, **extra}


def scripted(aid: str, *steps: dict[str, Any], final: str | None = None) -> dict[str, Any]:
    backend: dict[str, Any] = {"type": "scripted", "steps": list(steps)}
    if final is not None:
        backend["final"] = final
    return {"id": aid, "backend": backend}


def run(tmp_path: Path, config: dict[str, Any], question: str = "Q?") -> tuple[Any, EventWriter]:
    spec = RunSpec(
        run_id="log_test", question=question, config=config, outbox=str(tmp_path), workspace=str(tmp_path / "ws")
    )
    writer = EventWriter(tmp_path / "events.jsonl", SystemClock())
    outcome = asyncio.run(run_engine(spec, writer, SystemClock()))
    return outcome, writer


def types(writer: EventWriter) -> list[str]:
    return [e.type for e in writer.events]


def test_two_agents_answer_vote_and_the_winner_presents(tmp_path: Path) -> None:
    """Both answer, both vote for agent1; agent_a wins and its final answer is recorded."""
    cfg = _cfg(
        [
            scripted("agent_a", {"answer": "four"}, {"vote": "agent1"}, final="final: four"),
            scripted("agent_b", {"answer": "4"}, {"vote": "agent1"}),
        ]
    )
    outcome, w = run(tmp_path, cfg)
    assert (outcome.exit_code, outcome.reason, outcome.winner) == (0, "completed", "agent_a")
    assert outcome.final_answer == "final: four"
    st = reduce_events(w.events)
    assert st.results.winner == "agent_a"
    assert st.results.votes == {"agent1.1": 2}
    assert [a.anon for a in st.agents.values()] == ["agent1", "agent2"]


def test_labels_follow_config_order_and_count_per_agent(tmp_path: Path) -> None:
    """Answer labels are agent<N>.<k>: N the config position, k that agent's answer count."""
    cfg = _cfg(
        [
            scripted("zeta", {"answer": "a1"}, {"answer": "a2"}, {"vote": "zeta"}),
            scripted("alpha", {"sleep": 0.01}, {"answer": "b1"}, {"vote": "agent1"}),
        ]
    )
    outcome, w = run(tmp_path, cfg)
    assert outcome.exit_code == 0
    labels = [(e.agent, e.label) for e in w.events if e.type == "answer"]
    assert ("zeta", "agent1.1") in labels and ("zeta", "agent1.2") in labels and ("alpha", "agent2.1") in labels


def test_new_answer_clears_standing_votes(tmp_path: Path) -> None:
    """A vote cast before another agent's new answer does not count; the voter looks again."""
    cfg = _cfg(
        [
            scripted("agent_a", {"answer": "first"}, {"vote": "agent1"}),
            scripted("agent_b", {"sleep": 0.3}, {"answer": "second"}, {"vote": "agent2"}),
        ]
    )
    outcome, w = run(tmp_path, cfg)
    assert outcome.exit_code == 0
    votes_a = [e for e in w.events if e.type == "vote" and e.agent == "agent_a"]
    assert len(votes_a) >= 2, "agent_a must vote again after agent_b's answer"
    # tie 1-1 is broken by config order
    assert outcome.winner == "agent_a"
    winner_ev = next(e for e in w.events if e.type == "winner")
    assert winner_ev.tie is True


def test_vote_without_answers_is_corrected_then_agent_fails(tmp_path: Path) -> None:
    """Voting when no answers exist gets a corrective error; past the retry budget the agent fails."""
    cfg = _cfg(
        [
            scripted("agent_a", {"vote": "agent1"}, {"vote": "agent1"}, {"vote": "agent1"}),
            scripted("agent_b", {"sleep": 0.3}, {"answer": "late but fine"}, {"vote": "agent2"}),
        ],
        orchestrator={"max_invalid_turns": 3},
    )
    outcome, w = run(tmp_path, cfg)
    errors = [e for e in w.events if e.type == "agent_error" and e.agent == "agent_a"]
    assert len(errors) == 3 and all("no answers" in e.message for e in errors)
    assert any(e.type == "agent_failed" and e.agent == "agent_a" for e in w.events)
    assert (outcome.exit_code, outcome.winner) == (0, "agent_b")


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ([], "No workflow tool"),
        ([{"name": "vote", "arguments": {"agent_id": "agent9", "reason": "x"}}], "Invalid agent_id"),
        (
            [
                {"name": "new_answer", "arguments": {"content": "x"}},
                {"name": "vote", "arguments": {"agent_id": "agent1", "reason": "x"}},
            ],
            "both",
        ),
        ([{"name": "new_answer", "arguments": {"content": ""}}], "non-empty"),
        ([{"name": "new_answer", "arguments": {"__raw__": "{oops"}}], "not valid JSON"),
    ],
)
def test_invalid_workflow_calls_get_corrective_errors(tmp_path: Path, raw: list[dict[str, Any]], needle: str) -> None:
    """Each kind of invalid reply is answered with an error naming the problem, then the script goes on."""
    cfg = _cfg(
        [
            scripted("agent_a", {"answer": "base"}, {"vote": "agent1"}),
            scripted("agent_b", {"answer": "mine"}, {"raw_tool_calls": raw}, {"vote": "agent2"}),
        ]
    )
    outcome, w = run(tmp_path, cfg)
    assert outcome.exit_code == 0
    msgs = [e.message for e in w.events if e.type == "agent_error" and e.agent == "agent_b"]
    assert msgs and needle in msgs[0]


def test_agent_that_never_calls_a_tool_fails_and_run_exits_2(tmp_path: Path) -> None:
    """A lone agent that only talks is failed after its retries; no answer at all -> exit 2."""
    talk = {"raw_tool_calls": [], "text": "I think the answer is 4."}
    cfg = _cfg([scripted("agent_a", talk, talk, talk, talk)], orchestrator={"max_invalid_turns": 2})
    outcome, w = run(tmp_path, cfg)
    assert (outcome.exit_code, outcome.reason) == (2, "agent_failed")
    st = reduce_events(w.events)
    assert st.agents["agent_a"].status == "failed"


def test_max_new_answers_per_agent_is_enforced(tmp_path: Path) -> None:
    """Past max_new_answers_per_agent, new_answer is refused with a message telling the agent to vote."""
    cfg = _cfg(
        [scripted("agent_a", {"answer": "1"}, {"answer": "2"}, {"vote": "agent1"})],
        orchestrator={"max_new_answers_per_agent": 1},
    )
    outcome, w = run(tmp_path, cfg)
    assert outcome.exit_code == 0
    assert any("maximum of 1" in e.message for e in w.events if e.type == "agent_error")
    assert sum(1 for e in w.events if e.type == "answer") == 1


def test_whole_run_timeout_exits_3(tmp_path: Path) -> None:
    """The whole-run timeout ends the run with exit 3 even while a tool still runs."""
    cfg = _cfg(
        [scripted("agent_a", {"shell": "sleep 30", "timeout": 60}, {"answer": "late"})],
        timeout_settings={"orchestrator_timeout_seconds": 0.5},
    )
    outcome, _ = run(tmp_path, cfg)
    assert (outcome.exit_code, outcome.reason) == (3, "timeout")


def test_agent_turn_timeout_fails_only_that_agent(tmp_path: Path) -> None:
    """A turn that exceeds agent_timeout_seconds fails that agent; the others finish the run."""
    cfg = _cfg(
        [
            scripted("slow", {"shell": "sleep 30", "timeout": 60}, {"answer": "late"}),
            scripted("fast", {"answer": "quick"}, {"vote": "agent2"}),
        ],
        timeout_settings={"orchestrator_timeout_seconds": 30, "agent_timeout_seconds": 0.5},
    )
    outcome, w = run(tmp_path, cfg)
    assert (outcome.exit_code, outcome.winner) == (0, "fast")
    failed = [e for e in w.events if e.type == "agent_failed"]
    assert [(e.agent, e.reason) for e in failed] == [("slow", "timeout")]


def test_scripted_steps_use_earlier_outputs_and_files(tmp_path: Path) -> None:
    """Shell output saved with save_as and files written earlier feed later steps' templates."""
    cfg = _cfg(
        [
            scripted(
                "agent_a",
                {"shell": "echo 21", "save_as": "n"},
                {"write_file": "note.txt", "content": "half of {{n}}"},
                {"read_file": "note.txt", "save_as": "note"},
                {"shell": "echo $(( {{n}} * 2 ))", "save_as": "double"},
                {"answer": "{{note}} -> {{double}} for {{question}}"},
                {"vote": "auto"},
            )
        ]
    )
    outcome, _ = run(tmp_path, cfg, question="Q42")
    assert outcome.final_answer == "half of 21 -> 42 for Q42"
    assert (tmp_path / "ws" / "agent_a" / "note.txt").read_text() == "half of 21"


class _Broken:
    provider = "openai"

    async def complete(self, messages: list[Message], tools: list[ToolSpec]) -> Completion:
        raise BackendError("openai", "upstream http://127.0.0.1:9 unreachable")

    async def aclose(self) -> None:
        return None


class _Voter:
    """A fake model: answers on its first call, then votes for agent1."""

    provider = "openai"

    def __init__(self) -> None:
        self.calls = 0

    async def complete(self, messages: list[Message], tools: list[ToolSpec]) -> Completion:
        self.calls += 1
        if "(no answers available yet)" in messages[-1].content:
            call = ToolCall("c1", "new_answer", {"content": "model answer"})
        elif messages[-1].content.startswith("<ORIGINAL MESSAGE>") and "selected to present" in messages[-1].content:
            return Completion(Message(role="assistant", content="the final"), model="fake-1")
        else:
            call = ToolCall("c2", "vote", {"agent_id": "agent1", "reason": "ok"})
        return Completion(Message(role="assistant", tool_calls=(call,)), model="fake-1")

    async def aclose(self) -> None:
        return None


def _orch(tmp_path: Path, backends: dict[str, Any]) -> tuple[Orchestrator, EventWriter]:
    cfg = RunConfig.model_validate(
        {"agents": [{"id": a, "backend": {"type": "openai", "model": "fake-1"}} for a in backends]}
    )
    w = EventWriter(None, FakeClock())
    tools = {a: ToolBox(tmp_path) for a in backends}
    return Orchestrator(cfg, "Q", "log_x", w, backends, tools), w


def test_backend_error_fails_agent_and_all_failed_is_backend_error(tmp_path: Path) -> None:
    """When every agent's backend fails, the run ends with exit 2, reason backend_error."""
    orch, w = _orch(tmp_path, {"a": _Broken(), "b": _Broken()})
    outcome = asyncio.run(orch.run())
    assert (outcome.exit_code, outcome.reason) == (2, "backend_error")
    assert sum(1 for e in w.events if e.type == "agent_failed") == 2


def test_one_broken_backend_does_not_stop_the_others(tmp_path: Path) -> None:
    """A failed agent is excluded; the remaining agent answers, votes and presents."""
    orch, w = _orch(tmp_path, {"a": _Voter(), "b": _Broken()})
    outcome = asyncio.run(orch.run())
    assert (outcome.exit_code, outcome.winner, outcome.final_answer) == (0, "a", "the final")
    calls = [e for e in w.events if e.type == "model_call"]
    assert calls and all(e.model == "fake-1" for e in calls)


def test_voting_sensitivity_adds_its_sentence_to_the_voting_prompt() -> None:
    """orchestrator.voting_sensitivity (MassGen) is one sentence of the coordination prompt; none without it."""
    from agent_image.engine import prompts

    plain = prompts.coordination_prompt("Q", {"agent1": "A"}, "agent2")
    for level, sentence in prompts.VOTING_SENSITIVITY.items():
        text = prompts.coordination_prompt("Q", {"agent1": "A"}, "agent2", level)
        assert sentence in text and sentence not in plain
        assert text.endswith(prompts.ENFORCEMENT)


def test_the_engine_turns_the_collector_back_on_once_its_backends_are_built(tmp_path: Path) -> None:
    """`python -m agent_image run-spec` starts with gc off (start-up makes only long-lived objects):
    run_engine freezes them and re-enables collection before the run proper; a gc left on is left alone."""
    import gc

    (tmp_path / "off").mkdir()
    (tmp_path / "on").mkdir()
    gc.disable()
    try:
        outcome, _w = run(tmp_path / "off", _cfg([scripted("a", {"answer": "4"}, {"vote": "agent1"})]))
        assert outcome.exit_code == 0
        assert gc.isenabled()
        assert gc.get_freeze_count() > 0
        gc.unfreeze()
        outcome, _w = run(tmp_path / "on", _cfg([scripted("a", {"answer": "4"}, {"vote": "agent1"})]))
        assert outcome.exit_code == 0 and gc.isenabled() and gc.get_freeze_count() == 0
    finally:
        gc.enable()
        gc.unfreeze()

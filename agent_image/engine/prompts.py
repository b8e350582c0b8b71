"""Prompt text for coordination and presentation; one anonymous numbering (agent<N>, config order)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..backends.base import ToolSpec

NEW_ANSWER = "new_answer"
VOTE = "vote"
WORKFLOW_TOOLS = frozenset({NEW_ANSWER, VOTE})

ENFORCEMENT = (
    "Finish your turn by calling exactly one workflow tool: `new_answer` with a complete, "
    "improved answer, or `vote` for the best existing answer. Make sure you actually call the tool."
)


def system_prompt(own_message: str | None, anon: str, tool_names: list[str]) -> str:
    identity = (own_message or "You are a careful, capable assistant.").strip()
    tools = ", ".join(tool_names) if tool_names else "none"
    return (
        f"{identity}\n\n"
        "You are one of several agents answering the same question. Agents are named agent1, "
        f"agent2, ... (you are {anon}); the same names are used everywhere in this run.\n"
        "Each of your turns must end with exactly one workflow tool call:\n"
        "- new_answer(content): submit a complete answer that is better than every current one;\n"
        "- vote(agent_id, reason): if an existing answer is already the best, vote for its agent.\n"
        "Never call both in one reply. A new answer from anyone clears all votes, and every agent "
        "then looks again. When all agents' votes stand, the most-voted agent writes the final "
        f"answer.\nOther tools you can use while you work: {tools}."
    )


# orchestrator.voting_sensitivity (MassGen's key): how critical a vote should be.
VOTING_SENSITIVITY = {
    "lenient": "If an existing answer is reasonable and addresses the question, vote for it rather than "
    "writing another one.",
    "balanced": "Vote for an existing answer only when it is accurate, complete and well reasoned; "
    "otherwise submit a better one.",
    "strict": "Be highly critical: vote only for an answer that is correct, complete and clearly the best "
    "possible; if anything can be improved, submit an improved answer instead.",
}


def coordination_prompt(
    question: str,
    answers: Mapping[str, str],
    anon: str,
    voting_sensitivity: str | None = None,
    peers_dir: str | None = None,
) -> str:
    parts = ["<ORIGINAL MESSAGE>", question, "<END OF ORIGINAL MESSAGE>", "", "<CURRENT ANSWERS from the agents>"]
    if not answers:
        parts.append("(no answers available yet)")
    for name, content in answers.items():
        mine = " (your own latest answer)" if name == anon else ""
        parts += [f"<{name}>{mine}", content, f"<end of {name}>"]
    parts += ["<END OF CURRENT ANSWERS>", ""]
    others = [name for name in answers if name != anon]
    if peers_dir and others:
        parts.append(
            f"Snapshots of the other agents' workspaces, taken at their latest answers, are in {peers_dir}/<agent>/ "
            f"(read-only copies: {', '.join(f'{peers_dir}/{n}' for n in others)})."
        )
    if voting_sensitivity in VOTING_SENSITIVITY:
        parts.append(VOTING_SENSITIVITY[voting_sensitivity])
    parts.append(ENFORCEMENT)
    return "\n".join(parts)


def presentation_prompt(
    question: str, answers: Mapping[str, str], anon: str, votes: int, writable: Sequence[str] = ()
) -> str:
    parts = [
        "<ORIGINAL MESSAGE>",
        question,
        "<END OF ORIGINAL MESSAGE>",
        "",
        f"You ({anon}) were selected to present the final answer with {votes} vote(s).",
        "The answers of all agents:",
    ]
    for name, content in answers.items():
        parts += [f"<{name}>", content, f"<end of {name}>"]
    parts += [
        "",
        "Write the final answer to the original message now, as plain text in your reply. "
        "You may use your tools first; do not call new_answer or vote.",
    ]
    if writable:
        parts.append(
            "You may now write files in these context paths (the changes are applied when the run succeeds): "
            + ", ".join(writable)
        )
    return "\n".join(parts)


def workflow_specs(vote_targets: list[str]) -> list[ToolSpec]:
    return [
        ToolSpec(
            name=NEW_ANSWER,
            description="Submit a new, complete answer that improves on every current answer.",
            parameters={
                "type": "object",
                "properties": {"content": {"type": "string", "description": "The full answer."}},
                "required": ["content"],
            },
        ),
        ToolSpec(
            name=VOTE,
            description="Vote for the agent whose current answer is best.",
            parameters={
                "type": "object",
                "properties": {
                    "agent_id": {
                        "type": "string",
                        "description": "Anonymous id of the agent, e.g. agent1.",
                        **({"enum": vote_targets} if vote_targets else {}),
                    },
                    "reason": {"type": "string", "description": "Why this answer is best."},
                },
                "required": ["agent_id", "reason"],
            },
        ),
    ]

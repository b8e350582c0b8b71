"""Where a run's exit code is decided: one pure function over what the supervisor knows.

A `Verdict` is a reason and a detail; its exit code is derived from the reason
(`agent_image.protocol.result.REASON_EXIT`) and never carried beside it, so no input can
pair "completed" with exit 3 or "timeout" with exit 0.

`decide` weighs, in this order:

1. the supervisor's own verdict (deadline, interrupt, budget, outbox or disk limit, a refusal
   before start): it always wins, whatever the sandbox claims;
2. the container's exit facts: an OOM kill anywhere in the sandbox makes its results suspect;
3. the engine's claim (its `run_finished` event), checked: the agents share the engine's uid,
   so the claim may be forged. Its exit code is ignored (derived from the reason instead); a
   reason the engine never reports is refused; the code the claim implies must equal the
   container's exit code (the engine exits with its verdict's code); exit 0 needs a final
   answer on the host;
4. no claim at all: the container crashed.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent_image.protocol.result import REASON_EXIT, Reason

# What the engine itself may report in run_finished. Everything else (oom, limits, budgets,
# supervisor_lost, ...) is the supervisor's to say; a sandbox claiming it is lying.
ENGINE_REASONS: frozenset[Reason] = frozenset(
    {
        Reason.COMPLETED,
        Reason.NO_ANSWER,
        Reason.AGENT_FAILED,
        Reason.BACKEND_ERROR,
        Reason.CONFIG_INVALID,
        Reason.TOOL_UNAVAILABLE,  # a custom tool or MCP server could not be brought up in the sandbox
        Reason.TIMEOUT,
        Reason.INTERRUPTED,
    }
)

MAX_DETAIL_CHARS = 2000


@dataclass(frozen=True)
class Verdict:
    """A run's outcome: why it ended and a one-line detail; the exit code follows from the reason."""

    reason: Reason
    detail: str = ""

    def __post_init__(self) -> None:
        # Accept the enum's string value too (Reason is a StrEnum), but always store the enum.
        object.__setattr__(self, "reason", Reason(self.reason))
        if len(self.detail) > MAX_DETAIL_CHARS:
            object.__setattr__(self, "detail", self.detail[: MAX_DETAIL_CHARS - 3] + "...")

    @property
    def exit_code(self) -> int:
        """The exit code, derived from the reason."""
        return int(REASON_EXIT[self.reason])


@dataclass(frozen=True)
class EngineClaim:
    """What the sandbox's `run_finished` event said (untrusted)."""

    reason: str
    detail: str = ""


@dataclass(frozen=True)
class ContainerExit:
    """What the runtime says about the sandbox's end (trusted: it comes from the engine, not the sandbox)."""

    exit_code: int | None
    oom_killed: bool = False


def decide(
    *,
    own: Verdict | None = None,
    claim: EngineClaim | None = None,
    container: ContainerExit | None = None,
    final_answer: bool = False,
) -> Verdict:
    """The run's verdict from the supervisor's own stop reason, the container's end and the engine's claim."""
    if own is not None:
        return own
    if container is not None and container.oom_killed:
        return Verdict(
            Reason.OOM,
            f"a process in the sandbox was killed for exceeding the memory limit (exit {container.exit_code})",
        )
    code = container.exit_code if container is not None else None
    if claim is None:
        return Verdict(Reason.CONTAINER_CRASHED, f"sandbox exited with code {code} before the run finished")
    try:
        reason = Reason(claim.reason)
    except ValueError:
        return Verdict(Reason.AGENT_FAILED, f"unknown reason from the sandbox: {claim.reason[:80]!r}")
    if reason not in ENGINE_REASONS:
        return Verdict(Reason.AGENT_FAILED, f"the sandbox reported {reason.value!r}, which only the supervisor decides")
    claimed = int(REASON_EXIT[reason])
    if code is not None and code != claimed:
        if code == int(REASON_EXIT[Reason.TIMEOUT]):
            # The engine stops itself at its own deadline with exit 3: that exit is the fact.
            return Verdict(Reason.TIMEOUT, f"the engine timed out (exit {code}) but its events claim {reason.value!r}")
        return Verdict(
            Reason.CONTAINER_CRASHED,
            f"sandbox exited with code {code}, but its events claim {reason.value!r} (exit {claimed})",
        )
    if claimed == 0 and not final_answer:
        return Verdict(Reason.NO_ANSWER, "the run reported success without a final answer")
    return Verdict(reason, claim.detail)

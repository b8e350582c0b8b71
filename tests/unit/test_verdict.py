"""supervisor/verdict.py: every branch, and a row for every reason result.json can carry."""

from __future__ import annotations

from typing import NamedTuple, cast

import pytest

from agent_image.protocol.result import REASON_EXIT, ExitCode, Reason
from supervisor.verdict import MAX_DETAIL_CHARS, ContainerExit, EngineClaim, Verdict, decide


class Row(NamedTuple):
    name: str
    own: Verdict | None
    claim: EngineClaim | None
    container: ContainerExit | None
    final_answer: bool
    reason: Reason
    exit_code: int
    detail_has: str


def own(reason: Reason, detail: str = "the supervisor's words") -> Verdict:
    return Verdict(reason, detail)


ok = ContainerExit(0)
# The supervisor's own verdicts: refusals before start, limits it enforces, its own stops.
OWN_ONLY = [
    (Reason.CONFIG_INVALID, 1),
    (Reason.CONFIG_MISSING, 1),
    (Reason.PATH_MISSING, 1),
    (Reason.IMAGE_MISSING, 1),
    (Reason.KEY_MISSING, 1),
    (Reason.PRICE_MISSING, 1),
    (Reason.ENGINE_UNAVAILABLE, 1),
    (Reason.START_FAILED, 2),
    (Reason.IMAGE_INVALID, 1),
    (Reason.BUDGET_EXCEEDED, 2),
    (Reason.SUPERVISOR_LOST, 2),
    (Reason.LIMIT_EXCEEDED, 2),
    (Reason.DISK_QUOTA_EXCEEDED, 2),
    (Reason.MAX_DEPTH_EXCEEDED, 2),
    (Reason.MAX_CHILDREN_EXCEEDED, 2),
    (Reason.MAX_TOTAL_CHILDREN_EXCEEDED, 2),
    (Reason.PATH_NOT_ALLOWED, 2),
    (Reason.WRITE_NOT_ALLOWED, 2),
    (Reason.GATEWAY_UNAVAILABLE, 2),
    (Reason.BASE_URL_NOT_ALLOWED, 2),
    (Reason.SUPERVISOR_ERROR, 2),
]

ROWS = [
    *(Row(f"own {r.value}", own(r), None, None, False, r, code, "the supervisor's words") for r, code in OWN_ONLY),
    # The engine's honest claims, matching the container's exit code.
    Row("completed with an answer", None, EngineClaim("completed", "done"), ok, True, Reason.COMPLETED, 0, "done"),
    Row("no_answer", None, EngineClaim("no_answer", "none"), ContainerExit(2), False, Reason.NO_ANSWER, 2, "none"),
    Row("agent_failed", None, EngineClaim("agent_failed", "x"), ContainerExit(2), False, Reason.AGENT_FAILED, 2, "x"),
    Row(
        "backend_error", None, EngineClaim("backend_error", "y"), ContainerExit(2), False, Reason.BACKEND_ERROR, 2, "y"
    ),
    Row(
        "engine config_invalid",
        None,
        EngineClaim("config_invalid", "z"),
        ContainerExit(1),
        False,
        Reason.CONFIG_INVALID,
        1,
        "z",
    ),
    Row(
        "engine tool_unavailable",
        None,
        EngineClaim("tool_unavailable", "mcp server 'w': command 'npx' not found"),
        ContainerExit(1),
        False,
        Reason.TOOL_UNAVAILABLE,
        1,
        "'npx' not found",
    ),
    Row("engine timeout", None, EngineClaim("timeout", "t"), ContainerExit(3), False, Reason.TIMEOUT, 3, "t"),
    Row(
        "engine interrupted", None, EngineClaim("interrupted", "i"), ContainerExit(4), False, Reason.INTERRUPTED, 4, "i"
    ),
    # The supervisor's own stops win over whatever the sandbox claims (forgeries of issue 9.5).
    Row(
        "deadline beats a forged completed",
        own(Reason.TIMEOUT, "deadline passed"),
        EngineClaim("completed"),
        ok,
        True,
        Reason.TIMEOUT,
        3,
        "deadline passed",
    ),
    Row(
        "deadline beats a forged timeout with exit 0",
        own(Reason.TIMEOUT, "deadline passed"),
        EngineClaim("timeout"),
        ok,
        True,
        Reason.TIMEOUT,
        3,
        "deadline passed",
    ),
    Row(
        "interrupt beats completed",
        own(Reason.INTERRUPTED, "stopped: sigint"),
        EngineClaim("completed"),
        ok,
        True,
        Reason.INTERRUPTED,
        4,
        "stopped: sigint",
    ),
    Row(
        "budget beats completed",
        own(Reason.BUDGET_EXCEEDED, "spent"),
        EngineClaim("completed"),
        ok,
        True,
        Reason.BUDGET_EXCEEDED,
        2,
        "spent",
    ),
    Row(
        "own verdict beats an OOM",
        own(Reason.LIMIT_EXCEEDED, "flood"),
        None,
        ContainerExit(137, oom_killed=True),
        False,
        Reason.LIMIT_EXCEEDED,
        2,
        "flood",
    ),
    # Container facts.
    Row(
        "oom even when the engine completed",
        None,
        EngineClaim("completed"),
        ContainerExit(0, oom_killed=True),
        True,
        Reason.OOM,
        2,
        "memory limit",
    ),
    Row("no claim: crashed", None, None, ContainerExit(139), False, Reason.CONTAINER_CRASHED, 2, "code 139"),
    Row("no claim and no container facts", None, None, None, False, Reason.CONTAINER_CRASHED, 2, "code None"),
    # Checked claims.
    Row("unknown reason", None, EngineClaim("pwned"), ok, True, Reason.AGENT_FAILED, 2, "unknown reason"),
    Row(
        "a reason only the supervisor gives",
        None,
        EngineClaim("budget_exceeded"),
        ContainerExit(2),
        False,
        Reason.AGENT_FAILED,
        2,
        "only the supervisor",
    ),
    Row(
        "completed without a final answer",
        None,
        EngineClaim("completed"),
        ok,
        False,
        Reason.NO_ANSWER,
        2,
        "without a final answer",
    ),
    Row(
        "engine timed out, forged completed padded ahead",
        None,
        EngineClaim("completed"),
        ContainerExit(3),
        True,
        Reason.TIMEOUT,
        3,
        "timed out (exit 3)",
    ),
    Row(
        "claim disagrees with the exit code",
        None,
        EngineClaim("completed"),
        ContainerExit(137),
        True,
        Reason.CONTAINER_CRASHED,
        2,
        "code 137",
    ),
    Row(
        "failure claimed but exit 0",
        None,
        EngineClaim("agent_failed"),
        ok,
        False,
        Reason.CONTAINER_CRASHED,
        2,
        "exit 2",
    ),
    Row(
        "claim with unknown container exit",
        None,
        EngineClaim("completed", "ok"),
        ContainerExit(None),
        True,
        Reason.COMPLETED,
        0,
        "ok",
    ),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_decide(row: Row) -> None:
    v = decide(own=row.own, claim=row.claim, container=row.container, final_answer=row.final_answer)
    assert (v.reason, v.exit_code) == (row.reason, row.exit_code)
    assert row.detail_has in v.detail


def test_every_reason_has_a_row_and_its_exit_code() -> None:
    """The table covers result.json's whole vocabulary, each with the code REASON_EXIT gives it."""
    assert {r.reason for r in ROWS} == set(Reason)
    assert set(REASON_EXIT) == set(Reason)
    for r in ROWS:
        assert r.exit_code == int(REASON_EXIT[r.reason])


def test_exit_code_is_derived_never_carried() -> None:
    v = Verdict(cast(Reason, "timeout"), "x")  # the enum's value is accepted and normalised
    assert v.reason is Reason.TIMEOUT and v.exit_code == ExitCode.TIMEOUT
    with pytest.raises(ValueError):
        Verdict(cast(Reason, "not-a-reason"))
    assert not hasattr(Verdict, "__dataclass_fields__") or "exit_code" not in Verdict.__dataclass_fields__


def test_sandbox_details_are_bounded() -> None:
    v = decide(claim=EngineClaim("completed", "x" * 500_000), container=ok, final_answer=True)
    assert len(v.detail) == MAX_DETAIL_CHARS

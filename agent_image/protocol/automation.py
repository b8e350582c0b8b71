"""The `--automation` output contract, shared by the host CLI and the in-sandbox client."""

from __future__ import annotations

from collections.abc import Sequence

PROGRESS_LINE = "[Coordination in progress - monitor status.json for real-time updates]"


def ascii_line(text: str, limit: int | None = None) -> str:
    """One line, ASCII only: whitespace folded, non-ASCII escaped, optionally cut."""
    one = " ".join(text.split())
    if limit is not None and len(one) > limit:
        one = one[:limit] + "..."
    return one.encode("ascii", "backslashreplace").decode("ascii")


def ascii_path(path: object) -> str:
    """A path on one ASCII line, unchanged when it is plain ASCII (spaces kept, so it stays usable);
    otherwise control and non-ASCII characters are backslash-escaped."""
    text = str(path)
    if text.isascii() and text.isprintable():
        return text
    return text.encode("unicode_escape").decode("ascii")


def head_lines(log_dir: str, run_id: str, status_file: str, agents: Sequence[str] | None, question: str) -> list[str]:
    lines = [
        f"LOG_DIR: {ascii_path(log_dir)}",
        f"RUN_ID: {ascii_line(run_id)}",
        f"STATUS_FILE: {ascii_path(status_file)}",
    ]
    if agents is not None:
        lines += [f"AGENTS: {ascii_line(', '.join(agents))}", f"QUESTION: {ascii_line(question)}", PROGRESS_LINE]
    return lines


def tail_lines(
    *,
    exit_code: int,
    reason: str,
    detail: str,
    winner: str | None,
    duration_s: float | None,
    answer_file: str | None,
    answer_text: str,
    n_agents: int,
) -> list[str]:
    dur = duration_s or 0.0
    if exit_code == 0:
        return [
            f"WINNER: {ascii_line(str(winner))}",
            f"DURATION: {dur:.1f}s",
            f"ANSWER_FILE: {ascii_path(answer_file)}",
            f"ANSWER_PREVIEW: {ascii_line(answer_text[:200])}",
            f"COMPLETED: {n_agents} agents, {dur:.1f}s total",
        ]
    head = {3: "TIMEOUT", 4: "INTERRUPTED"}.get(exit_code, "FAILED")
    return [f"{head}: {ascii_line(reason, 60)}: {ascii_line(detail, 300)}"]

"""The `--automation` output contract, shared by the host CLI and the in-sandbox client."""

from __future__ import annotations

import os
from collections.abc import Sequence

PROGRESS_LINE = "[Coordination in progress - monitor status.json for real-time updates]"


def _escape(c: str) -> str:
    return c.encode("unicode_escape").decode("ascii")


def ascii_line(text: str, limit: int | None = None) -> str:
    """One line of printable ASCII: whitespace folded, everything else (ESC, BEL, BS, non-ASCII) escaped."""
    one = " ".join(text.split())
    if limit is not None and len(one) > limit:
        one = one[:limit] + "..."
    if one.isascii() and one.isprintable():
        return one
    return "".join(c if " " <= c <= "~" else _escape(c) for c in one)


def terminal_safe(text: str) -> str:
    """Text from a sandbox made harmless for a terminal: newlines and tabs kept, every other
    non-printable character (ESC and CSI/OSC sequences, BEL, BS, CR, C1 controls, bidi
    overrides) backslash-escaped, so it can neither move the cursor nor retitle the window."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c in "\n\t" else _escape(c) for c in text)


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
        f"STATUS: {ascii_path(status_file)}",  # MassGen's name for the same path
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
    output_file: str | None = None,
) -> list[str]:
    """The closing lines. FINAL_DIR is the winner's folder (answer.txt, workspace/); OUTPUT_FILE
    is printed when `--output-file` got a copy of the final answer."""
    dur = duration_s or 0.0
    if exit_code == 0:
        final_dir = os.path.dirname(answer_file) if answer_file else ""
        lines = [
            f"WINNER: {ascii_line(str(winner))}",
            f"DURATION: {dur:.1f}s",
            f"ANSWER_FILE: {ascii_path(answer_file)}",
            f"FINAL_DIR: {ascii_path(final_dir)}",
        ]
        if output_file:
            lines.append(f"OUTPUT_FILE: {ascii_path(output_file)}")
        return lines + [
            f"ANSWER_PREVIEW: {ascii_line(answer_text[:200])}",
            f"COMPLETED: {n_agents} agents, {dur:.1f}s total",
        ]
    head = {3: "TIMEOUT", 4: "INTERRUPTED"}.get(exit_code, "FAILED")
    return [f"{head}: {ascii_line(reason, 60)}: {ascii_line(detail, 300)}"]


def write_output_file(path: str, answer_text: str) -> str:
    """`--output-file PATH`: a copy of the final answer; returns the absolute path written.

    Written to a temporary file next to it and renamed, so a reader never sees half an answer.

    Raises:
        OSError: the file cannot be written.
    """
    target = os.path.abspath(os.path.expanduser(path))
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(target)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(answer_text)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target

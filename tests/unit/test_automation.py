"""The automation lines: LOG_DIR first, ASCII only, usable paths, bounded length."""

from __future__ import annotations

from agent_image.protocol.automation import PROGRESS_LINE, ascii_path, head_lines, tail_lines


def test_paths_keep_spaces_and_escape_only_non_ascii() -> None:
    """A plain ASCII path with spaces is printed as is; non-ASCII and control characters are escaped."""
    assert ascii_path("/tmp/my runs/log_x") == "/tmp/my runs/log_x"
    escaped = ascii_path("/tmp/r\u00e9sum\u00e9/\nx")
    assert escaped.isascii() and "\n" not in escaped and "\\xe9" in escaped


def test_head_and_tail_lines_follow_the_contract() -> None:
    """Head starts with LOG_DIR and ends with the progress line; success and failure tails are ASCII one-liners."""
    head = head_lines("/a b/log_1", "log_1", "/a b/log_1/status.json", ["x", "y"], "Wie viel ist 2+2? \u2713\nbitte")
    assert head[0] == "LOG_DIR: /a b/log_1" and head[-1] == PROGRESS_LINE
    ok = tail_lines(
        exit_code=0,
        reason="completed",
        detail="",
        winner="x",
        duration_s=1.25,
        answer_file="/a b/final/x/answer.txt",
        answer_text="4\n" * 300,
        n_agents=2,
    )
    fail = tail_lines(
        exit_code=3,
        reason="timeout",
        detail="d\u00e9tail " * 200,
        winner=None,
        duration_s=None,
        answer_file=None,
        answer_text="",
        n_agents=2,
    )
    lines = head + ok
    assert len(lines) <= 20 and all(line.isascii() and "\n" not in line for line in lines + fail)
    assert ok[2] == "ANSWER_FILE: /a b/final/x/answer.txt" and len(ok[4]) <= len("ANSWER_PREVIEW: ") + 203
    assert ok[3] == "FINAL_DIR: /a b/final/x"  # MassGen's line: the winner's folder (answer.txt, workspace/)
    assert head[3] == "STATUS: /a b/log_1/status.json"  # MassGen's name for STATUS_FILE
    assert fail == [fail[0]] and fail[0].startswith("TIMEOUT: timeout: ") and len(fail[0]) < 40 + 4 * 303


def test_output_file_line_follows_final_dir(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """With --output-file, the answer is copied there (atomically) and OUTPUT_FILE names its absolute path."""
    from agent_image.protocol.automation import write_output_file

    target = write_output_file(str(tmp_path / "sub" / "answer.md"), "the answer\n")
    assert target == str(tmp_path / "sub" / "answer.md")
    assert (tmp_path / "sub" / "answer.md").read_text() == "the answer\n"
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["answer.md"]  # no temp file left
    ok = tail_lines(
        exit_code=0,
        reason="completed",
        detail="",
        winner="x",
        duration_s=1.0,
        answer_file="/l/final/x/answer.txt",
        answer_text="a",
        n_agents=1,
        output_file=target,
    )
    assert [line.split(":", 1)[0] for line in ok] == [
        "WINNER",
        "DURATION",
        "ANSWER_FILE",
        "FINAL_DIR",
        "OUTPUT_FILE",
        "ANSWER_PREVIEW",
        "COMPLETED",
    ]
    assert ok[4] == f"OUTPUT_FILE: {target}"

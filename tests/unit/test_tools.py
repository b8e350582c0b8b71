"""The in-sandbox tools: shell, files, todo and the ToolBox front door."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent_image.backends.base import ToolSpec
from agent_image.tools import FileAccess, FileToolError, ToolBox, ToolResult

SECRET = "top secret\n"


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    path = tmp_path / "ws"
    path.mkdir()
    return path


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    path = tmp_path / "outside"
    path.mkdir()
    (path / "secret.txt").write_text(SECRET)
    return path


@pytest.fixture
def box(ws: Path) -> ToolBox:
    return ToolBox(ws, shell_timeout=5.0)


def call(box: ToolBox, name: str, arguments: Any) -> ToolResult:
    return asyncio.run(box.call(name, arguments))


def shell(box: ToolBox, command: str, **extra: Any) -> tuple[ToolResult, dict[str, Any]]:
    result = call(box, "shell", {"command": command, **extra})
    return result, json.loads(result.content)


def pid_gone(pid: int) -> bool:
    """No such process, or only a zombie waiting for a reaper."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return True
    return stat[stat.rfind(b")") + 2 :].split()[0] == b"Z"


def wait_until(condition: Callable[[], object], timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return bool(condition())


def read_pid(path: Path) -> int:
    assert wait_until(lambda: path.exists() and path.read_text().endswith("\n"))
    return int(path.read_text())


# --- shell ------------------------------------------------------------------------------


def test_shell_success_returns_stdout_and_exit_zero(box: ToolBox) -> None:
    """A succeeding command gives ok=True, exit_code 0 and its stdout in the JSON content."""
    result, data = shell(box, "echo hello")
    assert result.ok
    assert data["exit_code"] == 0
    assert data["stdout"] == "hello\n"
    assert data["stderr"] == ""
    assert data["truncated"] is False
    assert data["timed_out"] is False
    assert set(data) == {"exit_code", "stdout", "stderr", "truncated", "timed_out", "duration_s"}
    assert result.summary.startswith("shell exit=0 ")
    assert result.summary.endswith(": echo hello")


def test_shell_nonzero_exit_and_stderr_are_reported(box: ToolBox) -> None:
    """A failing command gives ok=False with its exit code and stderr kept apart from stdout."""
    result, data = shell(box, "echo out; echo oops >&2; exit 3")
    assert not result.ok
    assert data["exit_code"] == 3
    assert data["stdout"] == "out\n"
    assert data["stderr"] == "oops\n"
    assert "exit=3" in result.summary


def test_shell_runs_in_workspace_with_empty_stdin(box: ToolBox, ws: Path) -> None:
    """Commands run with cwd = workspace and stdin at EOF, so `cat` returns at once."""
    result, data = shell(box, "pwd; cat; echo done", timeout=3)
    assert result.ok
    assert data["stdout"] == f"{os.path.realpath(ws)}\ndone\n"


def test_shell_runs_in_its_own_session(box: ToolBox) -> None:
    """The shell leads a new session, so killing its group can never hit the agent."""
    _, data = shell(box, "cat /proc/$$/stat")
    stat = data["stdout"]
    pid = int(stat.split()[0])
    sid = int(stat[stat.rfind(")") + 2 :].split()[3])  # state ppid pgrp session
    assert sid == pid
    assert sid != os.getsid(0)


def test_default_env_keeps_basics_and_drops_secrets(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without `env`, commands see PATH and MASSGEN_* but not the agent's other variables."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-should-not-leak")
    monkeypatch.setenv("MASSGEN_SUPERVISOR_SOCKET", "/run/massgen/sock")
    _, data = shell(ToolBox(ws), "env")
    assert "sk-should-not-leak" not in data["stdout"]
    assert "MASSGEN_SUPERVISOR_SOCKET=/run/massgen/sock" in data["stdout"]
    assert "PATH=" in data["stdout"]


def test_explicit_env_is_used_as_given(ws: Path) -> None:
    """An `env` mapping passed to the ToolBox is exactly the command's environment."""
    _, data = shell(ToolBox(ws, env={"ONLY": "this", "PATH": "/usr/bin:/bin"}), "echo $ONLY")
    assert data["stdout"] == "this\n"


def test_timeout_kills_the_whole_group_including_grandchild(box: ToolBox, ws: Path) -> None:
    """On timeout the shell and a backgrounded grandchild are both killed; nothing survives."""
    started = time.monotonic()
    result, data = shell(box, "echo $$ > sh.pid; sleep 100 & echo $! > gc.pid; sleep 100", timeout=0.5)
    assert time.monotonic() - started < 3
    assert not result.ok
    assert data["timed_out"] is True
    assert result.summary.startswith("shell timeout 0.5s ")
    for name in ("sh.pid", "gc.pid"):
        pid = read_pid(ws / name)
        assert wait_until(functools.partial(pid_gone, pid)), f"{name} {pid} still alive"


def test_timeout_escalates_to_sigkill_for_processes_ignoring_sigterm(box: ToolBox, ws: Path) -> None:
    """A grandchild that ignores SIGTERM is SIGKILLed after the grace period."""
    started = time.monotonic()
    result, data = shell(box, "(trap '' TERM; exec sleep 100) & echo $! > gc.pid; wait", timeout=0.3)
    assert not result.ok
    assert data["timed_out"] is True
    pid = read_pid(ws / "gc.pid")
    assert wait_until(lambda: pid_gone(pid))
    assert time.monotonic() - started < 4


def test_cancelling_the_call_kills_the_group(box: ToolBox, ws: Path) -> None:
    """Cancelling `call` (e.g. the agent's turn timeout) kills shell and grandchild, then
    re-raises CancelledError."""

    async def scenario() -> None:
        task = asyncio.create_task(
            box.call("shell", {"command": "echo $$ > sh.pid; sleep 100 & echo $! > gc.pid; wait"})
        )
        deadline = time.monotonic() + 3
        while not (ws / "gc.pid").exists() or not (ws / "gc.pid").read_text().endswith("\n"):
            assert time.monotonic() < deadline, "command never started"
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    started = time.monotonic()
    asyncio.run(scenario())
    assert time.monotonic() - started < 3
    for name in ("sh.pid", "gc.pid"):
        pid = read_pid(ws / name)
        assert wait_until(functools.partial(pid_gone, pid)), f"{name} {pid} still alive"


def test_huge_output_is_capped_and_marked_truncated(ws: Path) -> None:
    """50 MB on stdout and 5 MB on stderr are cut to the cap each without blocking the child."""
    box = ToolBox(ws, max_output_bytes=1000)
    started = time.monotonic()
    result, data = shell(box, "yes | head -c 50000000; head -c 5000000 /dev/zero | tr '\\0' e >&2; echo end")
    assert time.monotonic() - started < 5
    assert result.ok
    assert data["truncated"] is True
    assert data["timed_out"] is False
    assert data["stdout"] == "y\n" * 500
    assert data["stderr"] == "e" * 1000
    assert "truncated" in result.summary


def test_background_job_holding_stdout_does_not_hang_the_call(box: ToolBox, ws: Path) -> None:
    """A job left running with our pipes open is not waited for; stderr says why output stops."""
    started = time.monotonic()
    try:
        result, data = shell(box, "sleep 30 & echo $! > bg.pid; echo started")
        assert time.monotonic() - started < 3
        assert result.ok
        assert data["stdout"] == "started\n"
        assert "background processes" in data["stderr"]
    finally:
        os.kill(read_pid(ws / "bg.pid"), signal.SIGKILL)


def test_shell_timeout_is_capped_at_ten_times_the_default(ws: Path) -> None:
    """A huge requested timeout is clamped, not refused."""
    box = ToolBox(ws, shell_timeout=0.05)
    result, data = shell(box, "sleep 5", timeout=1000)
    assert data["timed_out"] is True
    assert "timeout 0.5s" in result.summary


@pytest.mark.parametrize("timeout", [0, -1, float("nan")])
def test_shell_rejects_non_positive_timeout(box: ToolBox, timeout: float) -> None:
    """A timeout that is not a positive number gives ok=False naming `timeout`."""
    result = call(box, "shell", {"command": "true", "timeout": timeout})
    assert not result.ok
    assert "'timeout'" in result.content


def test_shell_rejects_empty_command(box: ToolBox) -> None:
    """A blank command is refused with a message naming `command`."""
    result = call(box, "shell", {"command": "   "})
    assert not result.ok
    assert "'command'" in result.content


def test_shell_summary_is_one_short_line(box: ToolBox) -> None:
    """The summary of a long multi-line command stays one line under 200 characters."""
    result, _ = shell(box, "echo a\n" + "echo " + "x" * 500)
    assert "\n" not in result.summary
    assert len(result.summary) < 200


def test_shell_reports_a_missing_workspace(tmp_path: Path) -> None:
    """If the shell cannot start, call returns ok=False instead of raising."""
    result = call(ToolBox(tmp_path / "nope"), "shell", {"command": "true"})
    assert not result.ok
    assert "could not start" in result.content


# --- files ------------------------------------------------------------------------------


def test_write_then_read_round_trip_creates_parents(box: ToolBox, ws: Path) -> None:
    """write_file creates missing parent directories; read_file returns the exact text."""
    written = call(box, "write_file", {"path": "a/b/note.txt", "content": "héllo\n"})
    assert written.ok, written.content
    assert written.content == "created a/b/note.txt (7 bytes)"
    assert (ws / "a" / "b" / "note.txt").read_text() == "héllo\n"
    read = call(box, "read_file", {"path": "a/b/note.txt"})
    assert read.ok
    assert read.content == "héllo\n"
    again = call(box, "write_file", {"path": "a/b/note.txt", "content": "x"})
    assert again.content == "overwrote a/b/note.txt (1 bytes)"


def test_absolute_path_inside_workspace_is_allowed(box: ToolBox, ws: Path) -> None:
    """An absolute path that lands in the workspace works like a relative one."""
    (ws / "f.txt").write_text("abs")
    assert call(box, "read_file", {"path": str(ws / "f.txt")}).content == "abs"


def test_list_files_lists_one_level_with_type_and_size(box: ToolBox, ws: Path) -> None:
    """list_files gives name, type and size of direct children only, sorted by name."""
    (ws / "sub" / "deep").mkdir(parents=True)
    (ws / "sub" / "deep" / "hidden.txt").write_text("x")
    (ws / "b.txt").write_text("12345")
    (ws / "link").symlink_to("b.txt")
    result = call(box, "list_files", {})
    assert result.ok
    data = json.loads(result.content)
    assert data == {
        "path": ".",
        "entries": [
            {"name": "b.txt", "type": "file", "size": 5},
            {"name": "link", "type": "symlink", "size": None},
            {"name": "sub", "type": "dir", "size": None},
        ],
        "total": 3,
        "truncated": False,
    }
    sub = json.loads(call(box, "list_files", {"path": "sub"}).content)
    assert sub["entries"] == [{"name": "deep", "type": "dir", "size": None}]


def test_list_files_caps_entries(box: ToolBox, ws: Path) -> None:
    """A directory with more than 500 entries lists the first 500 and says it truncated."""
    for i in range(600):
        (ws / f"f{i:03d}").touch()
    data = json.loads(call(box, "list_files", {"path": "."}).content)
    assert len(data["entries"]) == 500
    assert data["entries"][0]["name"] == "f000"
    assert data["total"] == 600
    assert data["truncated"] is True


def test_read_file_is_capped_at_max_file_bytes(ws: Path) -> None:
    """A file larger than max_file_bytes is cut and the content says so."""
    (ws / "big.txt").write_text("a" * 100)
    result = call(ToolBox(ws, max_file_bytes=10), "read_file", {"path": "big.txt"})
    assert result.ok
    assert result.content.startswith("a" * 10 + "\n[truncated")
    assert "100 bytes" in result.content
    assert "truncated" in result.summary


@pytest.mark.parametrize(
    ("path", "reason"),
    [("missing.txt", "no such file"), ("nodir/x.txt", "no such file"), (".", "is a directory")],
)
def test_read_file_errors_name_the_problem(box: ToolBox, path: str, reason: str) -> None:
    """Missing files and directories give ok=False with a clear reason."""
    result = call(box, "read_file", {"path": path})
    assert not result.ok
    assert reason in result.content


def test_read_file_refuses_a_fifo_without_hanging(box: ToolBox, ws: Path) -> None:
    """A FIFO is not opened for a blocking read; it is refused as not a regular file."""
    os.mkfifo(ws / "pipe")
    result = call(box, "read_file", {"path": "pipe"})
    assert not result.ok
    assert "not a regular file" in result.content


def test_dotdot_escape_is_refused(box: ToolBox, outside: Path) -> None:
    """`..` that climbs out of the workspace is refused for read, write and list."""
    assert not call(box, "read_file", {"path": "../outside/secret.txt"}).ok
    assert not call(box, "list_files", {"path": ".."}).ok
    result = call(box, "write_file", {"path": "sub/../../outside/new.txt", "content": "x"})
    assert not result.ok
    assert "outside the workspace" in result.content
    assert not (outside / "new.txt").exists()


def test_absolute_path_outside_is_refused(box: ToolBox, outside: Path) -> None:
    """An absolute path outside every root is refused."""
    result = call(box, "read_file", {"path": str(outside / "secret.txt")})
    assert not result.ok
    assert SECRET not in result.content
    assert not call(box, "read_file", {"path": "/etc/passwd"}).ok


def test_symlink_to_outside_file_is_refused(box: ToolBox, ws: Path, outside: Path) -> None:
    """A symlink in the workspace pointing outside can be neither read nor written through."""
    (ws / "leak").symlink_to(outside / "secret.txt")
    read = call(box, "read_file", {"path": "leak"})
    assert not read.ok
    assert SECRET not in read.content
    assert not call(box, "write_file", {"path": "leak", "content": "pwned"}).ok
    assert (outside / "secret.txt").read_text() == SECRET


def test_symlinked_directory_component_is_refused(box: ToolBox, ws: Path, outside: Path) -> None:
    """A symlinked parent directory pointing outside cannot be used to read, write or list."""
    (ws / "dir").symlink_to(outside)
    assert not call(box, "read_file", {"path": "dir/secret.txt"}).ok
    assert not call(box, "list_files", {"path": "dir"}).ok
    assert not call(box, "write_file", {"path": "dir/new.txt", "content": "x"}).ok
    assert not call(box, "write_file", {"path": "dir/sub/new.txt", "content": "x"}).ok
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]


def test_symlink_within_workspace_is_followed(box: ToolBox, ws: Path) -> None:
    """A symlink whose target stays inside the workspace works for read and write."""
    (ws / "real").mkdir()
    (ws / "real" / "f.txt").write_text("inside")
    (ws / "alias").symlink_to("real")
    assert call(box, "read_file", {"path": "alias/f.txt"}).content == "inside"
    assert call(box, "write_file", {"path": "alias/g.txt", "content": "ok"}).ok
    assert (ws / "real" / "g.txt").read_text() == "ok"


def test_symlink_swapped_in_after_check_is_not_followed(ws: Path, outside: Path) -> None:
    """If a file or parent directory becomes a symlink between check and open, the write
    fails instead of escaping (O_NOFOLLOW on every component)."""
    access = FileAccess(ws, max_file_bytes=1000)
    (ws / "f.txt").write_text("old")
    (ws / "d").mkdir()
    real_resolve = access.resolve

    def racing_resolve(raw: str, *, write: bool = False) -> Any:
        target = real_resolve(raw, write=write)
        if raw == "f.txt":
            (ws / "f.txt").unlink()
            (ws / "f.txt").symlink_to(outside / "secret.txt")
        else:
            (ws / "d").rmdir()
            (ws / "d").symlink_to(outside)
        return target

    access.resolve = racing_resolve  # type: ignore[method-assign]
    with pytest.raises(FileToolError, match="symlink"):
        access.write("f.txt", "pwned")
    with pytest.raises(FileToolError, match="not a directory"):
        access.write("d/new.txt", "pwned")
    assert (outside / "secret.txt").read_text() == SECRET
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]


def test_read_only_context_path_is_readable_not_writable(ws: Path, outside: Path) -> None:
    """A read-only context path can be read and listed by absolute path, never written."""
    box = ToolBox(ws, [(outside, False)])
    assert call(box, "read_file", {"path": str(outside / "secret.txt")}).content == SECRET
    listing = json.loads(call(box, "list_files", {"path": str(outside)}).content)
    assert listing["path"] == os.path.realpath(outside)
    assert [e["name"] for e in listing["entries"]] == ["secret.txt"]
    result = call(box, "write_file", {"path": str(outside / "secret.txt"), "content": "x"})
    assert not result.ok
    assert "read-only context path" in result.content
    assert (outside / "secret.txt").read_text() == SECRET
    assert "(read-only)" in {s.name: s for s in box.specs()}["read_file"].description


def test_writable_context_path_accepts_writes(ws: Path, outside: Path) -> None:
    """A context path passed as writable (final presentation) can be written."""
    box = ToolBox(ws, [(outside, True)])
    assert call(box, "write_file", {"path": str(outside / "out.txt"), "content": "hi"}).ok
    assert (outside / "out.txt").read_text() == "hi"


def test_read_only_context_nested_in_workspace_wins(ws: Path) -> None:
    """A read-only context path inside the workspace stays read-only (most specific root)."""
    (ws / "docs").mkdir()
    box = ToolBox(ws, [(ws / "docs", False)])
    assert not call(box, "write_file", {"path": "docs/x.txt", "content": "x"}).ok
    assert call(box, "write_file", {"path": "x.txt", "content": "x"}).ok


# --- arguments and dispatch -------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "arguments", "expected"),
    [
        ("read_file", {}, "missing required argument 'path'"),
        ("write_file", {"path": "a"}, "missing required argument 'content'"),
        ("read_file", {"path": 7}, "argument 'path' for read_file must be of type string"),
        ("shell", {"command": "true", "timeout": "5"}, "argument 'timeout'"),
        ("shell", {"command": "true", "cwd": "/"}, "unexpected argument 'cwd'"),
        ("todo", {"action": "remove"}, "argument 'action' for todo must be one of add, done"),
        ("todo", {"action": "done", "id": True}, "argument 'id'"),
        ("list_files", ["."], "must be a JSON object"),
        ("shell", {"__raw__": '{"command": "ls'}, "not valid JSON"),
    ],
)
def test_bad_arguments_give_a_corrective_message(box: ToolBox, name: str, arguments: Any, expected: str) -> None:
    """Wrong, missing, extra or unparseable arguments give ok=False naming the problem."""
    result = call(box, name, arguments)
    assert not result.ok
    assert expected in result.content
    assert result.summary.startswith(f"{name} error: ")


@pytest.mark.parametrize(
    ("name", "arguments"),
    [
        ("write_file", {"path": "a.txt", "content": "bad \ud800"}),
        ("read_file", {"path": "\ud800.txt"}),
        ("shell", {"command": "echo \ud800"}),
    ],
)
def test_unencodable_text_is_refused_not_raised(box: ToolBox, name: str, arguments: Any) -> None:
    """A lone surrogate (legal in JSON, not in UTF-8) gives ok=False instead of an exception."""
    result = call(box, name, arguments)
    assert not result.ok
    assert "cannot be encoded" in result.content


def test_unknown_tool_lists_the_available_ones(box: ToolBox) -> None:
    """An unknown tool name gives ok=False and the list of real tools."""
    result = call(box, "rm_rf", {})
    assert not result.ok
    assert "unknown tool 'rm_rf'" in result.content
    assert "read_file" in result.content


def test_null_optional_argument_counts_as_absent(box: ToolBox) -> None:
    """`"timeout": null`, as some providers send for unset options, uses the default."""
    result, data = shell(box, "echo ok", timeout=None)
    assert result.ok
    assert data["stdout"] == "ok\n"


def test_specs_match_names_and_are_json_schema_objects(box: ToolBox) -> None:
    """specs() offers the five tools, each with an object schema whose required keys exist."""
    specs = box.specs()
    assert all(isinstance(s, ToolSpec) for s in specs)
    assert {s.name for s in specs} == box.names
    assert box.names == {"shell", "read_file", "write_file", "list_files", "todo"}
    for spec in specs:
        schema = spec.parameters
        assert schema["type"] == "object"
        assert set(schema["required"]) <= set(schema["properties"])
        json.dumps(schema)


# --- todo -------------------------------------------------------------------------------


def test_todo_add_done_list(box: ToolBox) -> None:
    """add returns increasing ids, done marks an item, list shows every item's state."""
    assert call(box, "todo", {"action": "list"}).content == "0 open, 0 done\n(no todos)"
    assert call(box, "todo", {"action": "add", "text": "write tests"}).content == ("added #1: write tests")
    assert call(box, "todo", {"action": "add", "text": "ship"}).content == "added #2: ship"
    assert call(box, "todo", {"action": "done", "id": 1}).content == "done #1: write tests"
    listed = call(box, "todo", {"action": "list"})
    assert listed.content == "1 open, 1 done\n[x] #1 write tests\n[ ] #2 ship"
    assert listed.summary == "todo list 1 open 1 done"


def test_todo_accepts_integral_float_ids(box: ToolBox) -> None:
    """An id of 1.0 (Gemini sends every number as a double) means item 1."""
    call(box, "todo", {"action": "add", "text": "x"})
    assert call(box, "todo", {"action": "done", "id": 1.0}).ok


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ({"action": "add"}, "'text'"),
        ({"action": "add", "text": "  "}, "'text'"),
        ({"action": "done"}, "'id'"),
        ({"action": "done", "id": 9}, "no todo item with id 9"),
    ],
)
def test_todo_misuse_is_explained(box: ToolBox, arguments: dict[str, Any], expected: str) -> None:
    """add without text, done without a known id give ok=False saying what is missing."""
    result = call(box, "todo", arguments)
    assert not result.ok
    assert expected in result.content


def test_each_toolbox_has_its_own_todo_list(ws: Path) -> None:
    """Todo items are per ToolBox (per agent), never shared."""
    first, second = ToolBox(ws), ToolBox(ws)
    call(first, "todo", {"action": "add", "text": "mine"})
    assert "(no todos)" in call(second, "todo", {"action": "list"}).content


def test_allowed_and_blocked_commands_filter_the_shell(ws: Path) -> None:
    """MassGen's command_line_allowed/blocked_commands: re.match on the whole command; refusals run nothing."""
    box = ToolBox(ws, allowed_commands=[r"^(echo|touch) "], blocked_commands=[r".*forbidden"])
    ok, data = shell(box, "echo hi")
    assert ok.ok and data["stdout"] == "hi\n"
    refused = call(box, "shell", {"command": "rm -rf x"})
    assert not refused.ok and "not allowed" in refused.content and "^(echo|touch) " in refused.content
    blocked = call(box, "shell", {"command": "touch forbidden"})
    assert not blocked.ok and "blocked" in blocked.content
    assert not (ws / "forbidden").exists()

"""The tools an agent's model may call inside the sandbox: shell, files and a todo list."""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import math
import os
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from agent_image.backends.base import ToolSpec
from agent_image.tools.files import FileAccess, FileToolError
from agent_image.tools.shell import minimal_env, run_shell
from agent_image.tools.todo import TodoList

logger = logging.getLogger(__name__)

SUMMARY_MAX = 199
MAX_LIST_ENTRIES = 500
TIMEOUT_CAP_FACTOR = 10


@dataclass(frozen=True)
class ToolResult:
    """`content` goes to the model; `summary` is one line (< 200 chars) for logs and events."""

    content: str
    ok: bool
    summary: str
    kind: str = "builtin"  # builtin | custom | mcp: where the tool came from (accounting)


class ExtraTools(Protocol):
    """Tools from outside the toolbox (custom tools, MCP servers); `call` never raises."""

    kind: str

    @property
    def names(self) -> frozenset[str]: ...

    def specs(self) -> list[ToolSpec]: ...

    async def call(self, name: str, arguments: dict[str, Any]) -> Any: ...


class _BadArguments(Exception):
    """The model's arguments do not fit the tool's schema; the message says how to fix them."""


_Handler = Callable[[dict[str, Any]], Awaitable[ToolResult]]

_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "number": (int, float),
    "integer": (int,),
    "boolean": (bool,),
}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _one_line(text: str, limit: int = SUMMARY_MAX) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _check_arguments(tool: str, schema: Mapping[str, Any], arguments: Any) -> dict[str, Any]:
    """Validate `arguments` against the small JSON Schema subset our tools use.

    Raises:
        _BadArguments: with a message naming the offending argument.
    """
    props: Mapping[str, Any] = schema["properties"]
    required: Sequence[str] = schema.get("required", ())
    example = json.dumps({key: f"<{props[key]['type']}>" for key in required})
    if not isinstance(arguments, Mapping):
        raise _BadArguments(
            f"arguments for {tool} must be a JSON object, got {_json_type(arguments)}; for example {example}"
        )
    if "__raw__" in arguments:
        raw = _one_line(str(arguments["__raw__"]), 120)
        raise _BadArguments(
            f"arguments for {tool} were not valid JSON ({raw!r}); send one JSON object, for example {example}"
        )
    expected = ", ".join(props) or "none"
    for key in arguments:
        if key not in props:
            raise _BadArguments(f"unexpected argument {key!r} for {tool}; expected arguments: {expected}")
    checked: dict[str, Any] = {}
    for key, value in arguments.items():
        if value is None and key not in required:
            continue  # some providers send null for every optional parameter
        prop = props[key]
        kind = prop["type"]
        if kind == "integer" and isinstance(value, float) and value.is_integer():
            value = int(value)  # Gemini's Struct carries every number as a double
        if isinstance(value, bool) != (kind == "boolean") or not isinstance(value, _TYPES[kind]):
            raise _BadArguments(f"argument {key!r} for {tool} must be of type {kind}, got {_json_type(value)}")
        if "enum" in prop and value not in prop["enum"]:
            choices = ", ".join(map(str, prop["enum"]))
            raise _BadArguments(f"argument {key!r} for {tool} must be one of {choices}; got {value!r}")
        checked[key] = value
    for key in required:
        if key not in checked:
            raise _BadArguments(f"missing required argument {key!r} for {tool}")
    return checked


def _schema(properties: dict[str, Any], required: Sequence[str] = ()) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(required),
        "additionalProperties": False,
    }


class ToolBox:
    """One agent's tools, bound to its workspace and the run's context paths.

    `call` never raises for anything the model can send: an unknown tool, bad or unparseable
    arguments (`{"__raw__": text}` from the backend), a refused path or a failed command all
    come back as a `ToolResult` with `ok=False` and a message saying what to fix.
    """

    def __init__(
        self,
        workspace: Path,
        context_paths: Sequence[tuple[Path, bool]] = (),
        *,
        shell_timeout: float = 60.0,
        max_output_bytes: int = 64_000,
        max_file_bytes: int = 1_000_000,
        env: Mapping[str, str] | None = None,
        allowed_commands: Sequence[str] = (),
        blocked_commands: Sequence[str] = (),
        extra: Sequence[ExtraTools] = (),
    ) -> None:
        self.workspace = Path(workspace)
        # MassGen's command_line_allowed/blocked_commands: re.match on the whole command string.
        # Defence in depth only; the sandbox is the boundary.
        self.allowed_commands = tuple(re.compile(p) for p in allowed_commands)
        self.blocked_commands = tuple(re.compile(p) for p in blocked_commands)
        self.context_paths = tuple((Path(p), bool(w)) for p, w in context_paths)
        self.shell_timeout = shell_timeout
        self.max_shell_timeout = shell_timeout * TIMEOUT_CAP_FACTOR
        self.max_output_bytes = max_output_bytes
        self.max_file_bytes = max_file_bytes
        self.env = dict(env) if env is not None else minimal_env()
        self._files = FileAccess(
            self.workspace,
            self.context_paths,
            max_file_bytes=max_file_bytes,
            max_list_entries=MAX_LIST_ENTRIES,
        )
        self._todo = TodoList()
        self._specs = self._build_specs()
        self._handlers: dict[str, _Handler] = {
            "shell": self._shell,
            "read_file": self._read_file,
            "write_file": self._write_file,
            "list_files": self._list_files,
            "todo": self._todo_call,
        }
        self._extra: dict[str, ExtraTools] = {}
        self._extra_specs: dict[str, ToolSpec] = {}
        for source in extra:
            for spec in source.specs():
                if spec.name in self._handlers or spec.name in self._extra:
                    raise ValueError(f"tool name {spec.name!r} is offered twice")
                self._extra[spec.name] = source
                self._extra_specs[spec.name] = spec

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self._handlers) | frozenset(self._extra)

    def specs(self) -> list[ToolSpec]:
        """The tools to offer the model; copies, so a backend may rewrite the schemas."""
        return copy.deepcopy([*self._specs.values(), *self._extra_specs.values()])

    def _build_specs(self) -> dict[str, ToolSpec]:
        ws = self._files.workspace
        paths = "Paths are relative to the workspace, or absolute inside the workspace"
        if self.context_paths:
            listed = ", ".join(f"{p} ({'writable' if w else 'read-only'})" for p, w in self.context_paths)
            paths += f" or a context path: {listed}"
        paths += "."
        path_prop = {"type": "string", "description": "File path (see tool description)."}
        specs = [
            ToolSpec(
                "shell",
                f"Run a command with /bin/sh -c in the workspace ({ws}); stdin is empty. "
                f"stdout and stderr are each capped at {self.max_output_bytes} bytes. "
                f"Timeout {self.shell_timeout:g}s by default, at most "
                f"{self.max_shell_timeout:g}s; on timeout the command and every process it "
                "started are killed. Returns JSON {exit_code, stdout, stderr, truncated, "
                "timed_out, duration_s}. Redirect the output of background jobs (&) to a file.",
                _schema(
                    {
                        "command": {"type": "string", "description": "Shell command line."},
                        "timeout": {
                            "type": "number",
                            "description": f"Seconds (default {self.shell_timeout:g}).",
                        },
                    },
                    ["command"],
                ),
            ),
            ToolSpec(
                "read_file",
                f"Read a text file as UTF-8 (at most the first {self.max_file_bytes} bytes). " + paths,
                _schema({"path": path_prop}, ["path"]),
            ),
            ToolSpec(
                "write_file",
                "Create or overwrite a file with the given text; missing parent directories "
                "are created. Only the workspace"
                + (" and writable context paths are" if any(w for _, w in self.context_paths) else " is")
                + " writable. "
                + paths,
                _schema(
                    {"path": path_prop, "content": {"type": "string", "description": "Text."}},
                    ["path", "content"],
                ),
            ),
            ToolSpec(
                "list_files",
                f"List one directory level (default: the workspace), at most "
                f"{MAX_LIST_ENTRIES} entries sorted by name. Returns JSON {{path, entries: "
                "[{name, type: file|dir|symlink|other, size}], total, truncated}. " + paths,
                _schema({"path": {"type": "string", "description": "Directory path."}}),
            ),
            ToolSpec(
                "todo",
                "Your private todo list. action=add with text returns the new item's id; "
                "action=done with id marks that item done; action=list shows every item.",
                _schema(
                    {
                        "action": {"type": "string", "enum": ["add", "done", "list"]},
                        "text": {"type": "string", "description": "Item text (add)."},
                        "id": {"type": "integer", "description": "Item id (done)."},
                    },
                    ["action"],
                ),
            ),
        ]
        return {spec.name: spec for spec in specs}

    async def call(self, name: str, arguments: dict[str, Any]) -> ToolResult:
        """Run one tool call; every failure the model can cause comes back as `ok=False`."""
        if name in self._extra:
            return await self._call_extra(name, arguments)
        handler = self._handlers.get(name)
        if handler is None:
            available = ", ".join(sorted(self.names))
            return _failure(name, f"unknown tool {name!r}; available tools: {available}")
        try:
            args = _check_arguments(name, self._specs[name].parameters, arguments)
            return await handler(args)
        except (_BadArguments, FileToolError) as exc:
            return _failure(name, str(exc))
        except UnicodeEncodeError as exc:
            # JSON allows lone surrogates ("\ud800"); no file or argv can hold them.
            return _failure(name, f"argument text cannot be encoded as UTF-8: {exc.reason}")
        except OSError as exc:
            return _failure(name, str(exc))
        except Exception as exc:
            # A bug of ours, not the model's: log it with the trace, but keep the agent going.
            logger.exception("tool=%s internal error", name)
            return _failure(name, f"internal error: {type(exc).__name__}: {exc}")

    async def _call_extra(self, name: str, arguments: Any) -> ToolResult:
        source = self._extra[name]
        try:
            args = _check_open_arguments(name, self._extra_specs[name].parameters, arguments)
        except _BadArguments as exc:
            return _failure(name, str(exc), source.kind)
        try:
            out = await source.call(name, args)
        except Exception as exc:
            logger.exception("tool=%s internal error", name)
            return _failure(name, f"internal error: {type(exc).__name__}: {exc}", source.kind)
        return ToolResult(out.content, out.ok, _one_line(out.summary), source.kind)

    def grant_writes(self, paths: Sequence[Path | str]) -> None:
        """Let the file tools write these context paths too (the final presenter, for MassGen's
        `permission: write`)."""
        writable = {os.path.realpath(p) for p in paths}
        self.context_paths = tuple((p, w or os.path.realpath(p) in writable) for p, w in self.context_paths)
        self._files = FileAccess(
            self.workspace,
            self.context_paths,
            max_file_bytes=self.max_file_bytes,
            max_list_entries=MAX_LIST_ENTRIES,
        )

    async def _shell(self, args: dict[str, Any]) -> ToolResult:
        command: str = args["command"]
        if not command.strip():
            raise _BadArguments("argument 'command' for shell is empty")
        if "\0" in command:
            raise _BadArguments("argument 'command' for shell contains a NUL byte")
        timeout = float(args.get("timeout", self.shell_timeout))
        if not math.isfinite(timeout) or timeout <= 0:
            raise _BadArguments(
                f"argument 'timeout' for shell must be a positive number of seconds "
                f"(at most {self.max_shell_timeout:g}); got {args['timeout']!r}"
            )
        timeout = min(timeout, self.max_shell_timeout)
        if self.allowed_commands and not any(p.match(command) for p in self.allowed_commands):
            allowed = ", ".join(p.pattern for p in self.allowed_commands)
            return _failure("shell", f"command not allowed by this agent's config (allowed patterns: {allowed})")
        blocked = next((p for p in self.blocked_commands if p.match(command)), None)
        if blocked is not None:
            return _failure("shell", f"command blocked by this agent's config (pattern {blocked.pattern!r})")
        try:
            out = await run_shell(
                command,
                cwd=self.workspace,
                env=self.env,
                timeout=timeout,
                max_output_bytes=self.max_output_bytes,
            )
        except OSError as exc:
            return _failure("shell", f"could not start /bin/sh in {self.workspace}: {exc}")
        content = json.dumps(
            {
                "exit_code": out.exit_code,
                "stdout": out.stdout,
                "stderr": out.stderr,
                "truncated": out.truncated,
                "timed_out": out.timed_out,
                "duration_s": round(out.duration_s, 3),
            },
            ensure_ascii=False,
        )
        state = f"timeout {timeout:g}s" if out.timed_out else f"exit={out.exit_code}"
        head = f"shell {state} {out.duration_s:.1f}s{' truncated' if out.truncated else ''}: "
        return ToolResult(
            content=content,
            ok=out.exit_code == 0 and not out.timed_out,
            summary=head + _one_line(command, SUMMARY_MAX - len(head)),
        )

    async def _read_file(self, args: dict[str, Any]) -> ToolResult:
        read = await asyncio.to_thread(self._files.read, args["path"])
        content = read.text
        if read.truncated:
            content += f"\n[truncated: showing the first {self.max_file_bytes} of {read.size} bytes]"
        note = " (truncated)" if read.truncated else ""
        return ToolResult(content, True, _one_line(f"read_file {read.display} {read.size} bytes{note}"))

    async def _write_file(self, args: dict[str, Any]) -> ToolResult:
        written = await asyncio.to_thread(self._files.write, args["path"], args["content"])
        verb = "created" if written.created else "overwrote"
        return ToolResult(
            f"{verb} {written.display} ({written.size} bytes)",
            True,
            _one_line(f"write_file {written.display} {written.size} bytes ({verb})"),
        )

    async def _list_files(self, args: dict[str, Any]) -> ToolResult:
        listing = await asyncio.to_thread(self._files.list, args.get("path", "."))
        content = json.dumps(
            {
                "path": listing.display,
                "entries": [{"name": e.name, "type": e.type, "size": e.size} for e in listing.entries],
                "total": listing.total,
                "truncated": listing.total > len(listing.entries),
            },
            ensure_ascii=False,
        )
        return ToolResult(content, True, _one_line(f"list_files {listing.display} {listing.total} entries"))

    async def _todo_call(self, args: dict[str, Any]) -> ToolResult:
        action = args["action"]
        if action == "add":
            text = args.get("text", "").strip()
            if not text:
                raise _BadArguments("todo action 'add' needs a non-empty argument 'text'")
            item = self._todo.add(text)
            return ToolResult(
                f"added #{item.id}: {item.text}",
                True,
                _one_line(f"todo add #{item.id}: {item.text}"),
            )
        if action == "done":
            if "id" not in args:
                raise _BadArguments("todo action 'done' needs argument 'id' (an integer)")
            try:
                item = self._todo.done(args["id"])
            except KeyError:
                known = ", ".join(map(str, self._todo.ids())) or "none"
                raise _BadArguments(f"no todo item with id {args['id']}; existing ids: {known}") from None
            return ToolResult(f"done #{item.id}: {item.text}", True, f"todo done #{item.id}")
        open_, done = self._todo.counts()
        return ToolResult(
            f"{open_} open, {done} done\n{self._todo.render()}",
            True,
            f"todo list {open_} open {done} done",
        )


def _failure(tool: str, message: str, kind: str = "builtin") -> ToolResult:
    return ToolResult(message, False, _one_line(f"{tool} error: {message}"), kind)


def _check_open_arguments(tool: str, schema: Mapping[str, Any], arguments: Any) -> dict[str, Any]:
    """The checks worth doing before a custom or MCP tool sees the arguments (it validates the rest).

    Raises:
        _BadArguments: not an object, unparseable, an unknown or a missing required argument.
    """
    if not isinstance(arguments, Mapping):
        raise _BadArguments(f"arguments for {tool} must be a JSON object, got {_json_type(arguments)}")
    props: Mapping[str, Any] = schema.get("properties") or {}
    if "__raw__" in arguments:
        raw = _one_line(str(arguments["__raw__"]), 120)
        raise _BadArguments(f"arguments for {tool} were not valid JSON ({raw!r}); send one JSON object")
    if schema.get("additionalProperties") is False:
        for key in arguments:
            if key not in props:
                expected = ", ".join(props) or "none"
                raise _BadArguments(f"unexpected argument {key!r} for {tool}; expected arguments: {expected}")
    checked = {}
    for key, value in arguments.items():
        if value is None and key not in schema.get("required", ()) and props.get(key, {}).get("type") != "null":
            continue  # some providers send null for every optional parameter
        kind = props.get(key, {}).get("type")
        if kind == "integer" and isinstance(value, float) and value.is_integer():
            value = int(value)  # Gemini's Struct carries every number as a double
        checked[key] = value
    for key in schema.get("required", ()):
        if key not in checked:
            raise _BadArguments(f"missing required argument {key!r} for {tool}")
    return checked

"""A custom-tool worker: a child process of the engine that imports tool files and runs one call.

Run as a script (`python3 -I -B -u _custom_worker.py describe|serve COMPAT_DIR RESULT_FD`), never imported by the
engine: it must not load the engine's modules, and what the tool files do (print, hang,
`os._exit`, crash) stays in this process. Requests come as JSON lines on stdin; the answer is
one JSON document on the pipe RESULT_FD, so whatever the tool prints on stdout/stderr never mixes with it.

- `describe`: import every tool, derive each one's JSON schema from its signature and
  Google-style docstring the way MassGen does (pydantic model of the parameters, titles
  removed, preset arguments hidden), report import errors per tool.
- `serve`: import the tools at once (so the engine can keep one worker warm), then wait for
  one call `{tool, arguments}`, run it, answer, exit. One call per process: nothing a call
  does can leak into the next.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import inspect
import json
import os
import re
import sys
import time
import traceback
from collections.abc import AsyncIterator, Iterator
from typing import Any

_result_fd = -1
_ARGS_HEADER = re.compile(r"\A\s*(Args|Arguments|Parameters|Params)\s*:\s*\Z")
_SECTION = re.compile(r"\A\s*(Returns?|Yields?|Raises?|Examples?|Notes?|Attributes|See Also|Todo)\s*:\s*\Z")
_PARAM_LINE = re.compile(r"\A\s*\*{0,2}([A-Za-z_][A-Za-z0-9_]*)\s*(\([^)]*\))?\s*:\s*(.*)\Z")


def _answer(payload: dict[str, Any]) -> None:
    data = json.dumps(payload, ensure_ascii=False, default=str).encode("utf-8", "surrogatepass")
    view = memoryview(data)
    while view:
        n = os.write(_result_fd, view)
        view = view[n:]


def _short_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _tail_traceback(exc: BaseException, limit: int = 4000) -> str:
    # Leave out this worker's own frames: the tool's author needs only theirs.
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    text = "".join(traceback.format_exception(type(exc), exc, tb))
    return text[-limit:]


# -- loading ------------------------------------------------------------------------------


def _load(spec: dict[str, Any], cache: dict[str, Any]) -> Any:
    """The function named by `spec` (a file path or a dotted module)."""
    source = spec.get("path") or spec["module"]
    module = cache.get(source)
    if module is None:
        if spec.get("path"):
            path = spec["path"]
            folder = os.path.dirname(path)
            if folder not in sys.path:
                sys.path.append(folder)  # sibling helper modules of the tool file
            name = "massgen_custom_tool_" + re.sub(r"\W", "_", os.path.splitext(path)[0]).strip("_")
            loader_spec = importlib.util.spec_from_file_location(name, path)
            if loader_spec is None or loader_spec.loader is None:
                raise ImportError(f"cannot import {path} (not a Python file?)")
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[name] = module
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(spec["module"])
        cache[source] = module
    func = getattr(module, spec["function"], None)
    if func is None:
        raise AttributeError(f"{source} has no function {spec['function']!r}")
    if not callable(func):
        raise TypeError(f"{source}: {spec['function']!r} is not a function")
    return func


# -- schema -------------------------------------------------------------------------------


def _parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """(description, {param: description}) from a Google-style docstring."""
    if not doc:
        return "", {}
    lines = inspect.cleandoc(doc).splitlines()
    desc: list[str] = []
    params: dict[str, str] = {}
    section = "desc"
    current: str | None = None
    indent = 0
    for line in lines:
        if _ARGS_HEADER.match(line):
            section, current = "args", None
            continue
        if _SECTION.match(line):
            section, current = "other", None
            continue
        if section == "desc":
            desc.append(line)
        elif section == "args":
            m = _PARAM_LINE.match(line)
            line_indent = len(line) - len(line.lstrip())
            if m and (current is None or line_indent <= indent):
                current, indent = m.group(1), line_indent
                params[current] = m.group(3).strip()
            elif current is not None and line.strip():
                params[current] = (params[current] + " " + line.strip()).strip()
    # MassGen joins the short and the long description with a blank line.
    paragraphs = [" ".join(p.split()) for p in "\n".join(desc).strip().split("\n\n") if p.strip()]
    return "\n\n".join(paragraphs), params


def _strip_titles(obj: Any) -> None:
    if isinstance(obj, dict):
        obj.pop("title", None)
        for key, value in obj.items():
            if key != "properties":
                _strip_titles(value)
            else:
                for prop in value.values():
                    _strip_titles(prop)
    elif isinstance(obj, list):
        for item in obj:
            _strip_titles(item)


def _schema(func: Any, hidden: set[str], defaults: dict[str, Any]) -> tuple[str, dict[str, Any], bool]:
    from pydantic import ConfigDict, Field, create_model  # only describe needs pydantic

    description, docs = _parse_docstring(inspect.getdoc(func))
    fields: dict[str, Any] = {}
    takes_kwargs = False
    try:
        hints = __import__("typing").get_type_hints(func)
    except Exception:  # noqa: BLE001 - unresolvable annotations: fall back to the raw ones
        hints = {}
    for name, param in inspect.signature(func).parameters.items():
        if name in ("self", "cls") or name in hidden:
            continue
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            takes_kwargs = True
            continue
        if param.kind is inspect.Parameter.VAR_POSITIONAL:
            continue
        annotation = hints.get(name, param.annotation)
        if annotation is inspect.Parameter.empty:
            annotation = Any
        default = ... if param.default is inspect.Parameter.empty else param.default
        default = defaults.get(name, default)  # default_params make a parameter optional
        fields[name] = (annotation, Field(default=default, description=docs.get(name)))
    model = create_model("_ToolParameters", __config__=ConfigDict(arbitrary_types_allowed=True), **fields)
    schema = model.model_json_schema()
    _strip_titles(schema)
    schema.setdefault("properties", {})
    schema["type"] = "object"
    if not takes_kwargs:
        schema["additionalProperties"] = False
    return description, schema, takes_kwargs


def describe(request: dict[str, Any]) -> dict[str, Any]:
    cache: dict[str, Any] = {}
    tools, errors = [], []
    for spec in request["tools"]:
        try:
            func = _load(spec, cache)
            params = inspect.signature(func).parameters
            accepts_cwd = "agent_cwd" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
            hidden = set(spec.get("preset_args") or {}) | ({"agent_cwd"} if "agent_cwd" in params else set())
            description, schema, _ = _schema(func, hidden, dict(spec.get("default_params") or {}))
            tools.append(
                {
                    "tool": spec["tool"],
                    "description": spec.get("description") or description,
                    "parameters": schema,
                    "agent_cwd": accepts_cwd and "agent_cwd" in params,
                }
            )
        except BaseException as exc:  # noqa: BLE001 - a tool file may raise anything, SystemExit too
            errors.append({"tool": spec["tool"], "error": _short_error(exc), "traceback": _tail_traceback(exc)})
    return {"tools": tools, "errors": errors}


# -- calls --------------------------------------------------------------------------------


def _blocks_text(result: Any) -> tuple[str, bool]:
    """The model's text for one ExecutionResult-like object, and whether it was interrupted."""
    parts = []
    for block in getattr(result, "output_blocks", None) or []:
        kind = getattr(block, "block_type", "text")
        data = getattr(block, "data", "")
        if kind == "text":
            parts.append(str(data))
        else:
            parts.append(f"[{kind} block, {len(str(data))} base64 characters, not shown]")
    return "\n".join(parts), bool(getattr(result, "was_interrupted", False))


def _final(results: list[Any]) -> Any:
    finals = [r for r in results if getattr(r, "is_final", True)]
    return (finals or results)[-1] if results else None


async def _collect_async(gen: AsyncIterator[Any]) -> list[Any]:
    return [item async for item in gen]


def _render(value: Any) -> tuple[str, bool]:
    if value is None:
        return "", False
    if hasattr(value, "output_blocks"):
        return _blocks_text(value)
    if isinstance(value, str):
        return value, False
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace"), False
    try:
        return json.dumps(value, ensure_ascii=False, default=str), False
    except (TypeError, ValueError):
        return str(value), False


def call(func: Any, arguments: dict[str, Any]) -> tuple[str, bool]:
    if inspect.iscoroutinefunction(func):
        value = asyncio.run(func(**arguments))
    elif inspect.isasyncgenfunction(func):
        value = _final(asyncio.run(_collect_async(func(**arguments))))
    else:
        value = func(**arguments)
        if inspect.isawaitable(value):
            value = asyncio.run(_await(value))
        if isinstance(value, Iterator) and not isinstance(value, str | bytes):
            value = _final(list(value))
        elif inspect.isasyncgen(value):
            value = _final(asyncio.run(_collect_async(value)))
    return _render(value)


async def _await(value: Any) -> Any:
    return await value


def serve(request: dict[str, Any]) -> None:
    cache: dict[str, Any] = {}
    loaded: dict[str, Any] = {}
    failed: dict[str, BaseException] = {}
    for spec in request["tools"]:
        try:
            loaded[spec["tool"]] = (_load(spec, cache), spec)
        except BaseException as exc:  # noqa: BLE001 - reported only if this tool is called
            failed[spec["tool"]] = exc
    line = sys.stdin.readline()
    if not line:
        return  # the engine closed us unused (end of run)
    req = json.loads(line)
    name = req["tool"]
    if name in failed:
        error = _short_error(failed[name])
        _answer({"ok": False, "error": f"importing the tool failed: {error}", "own_s": 0.0})
        return
    func, spec = loaded[name]
    arguments = {**(spec.get("default_params") or {}), **(req.get("arguments") or {})}
    arguments.update(spec.get("preset_args") or {})
    if req.get("agent_cwd"):
        arguments["agent_cwd"] = req["agent_cwd"]
    limit = int(req.get("max_chars", 64_000))
    t0 = time.perf_counter()
    try:
        text, interrupted = call(func, arguments)
    except BaseException as exc:  # noqa: BLE001 - SystemExit and KeyboardInterrupt are tool errors too
        own = time.perf_counter() - t0
        _answer({"ok": False, "error": _short_error(exc), "traceback": _tail_traceback(exc), "own_s": own})
        return
    own = time.perf_counter() - t0
    truncated = len(text) > limit
    _answer(
        {
            "ok": not interrupted,
            "text": text[:limit],
            "truncated": truncated,
            "chars": len(text),
            "error": "the tool reports it was interrupted" if interrupted else None,
            "own_s": own,
        }
    )


def main() -> int:
    global _result_fd
    if len(sys.argv) != 4 or sys.argv[1] not in ("describe", "serve"):
        print(f"usage: {sys.argv[0]} describe|serve COMPAT_DIR RESULT_FD", file=sys.stderr)
        return 2
    mode, compat, _result_fd = sys.argv[1], sys.argv[2], int(sys.argv[3])
    os.set_inheritable(_result_fd, False)  # the tool's own children never hold our answer pipe
    if compat and compat not in sys.path:
        sys.path.append(compat)  # last: a real MassGen installed in the image wins
    header = sys.stdin.readline()
    request = json.loads(header)
    if mode == "describe":
        _answer(describe(request))
    else:
        serve(request)
    # One call per process: skip the interpreter's teardown (and the tool modules' atexit
    # hooks), which would otherwise be most of a quick call's cost.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())

"""MassGen custom tools: config format, schema from signature and docstring, calls in worker processes."""

from __future__ import annotations

import asyncio
import os
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from agent_image.engine.tooling import check_custom_paths
from agent_image.protocol.config import RunConfig
from agent_image.protocol.events import ToolCalled
from agent_image.protocol.reducer import reduce_events
from agent_image.protocol.tools_config import CustomToolEntry
from agent_image.tools import ToolBox
from agent_image.tools.custom import CustomTools, ToolSetupError, describe_tools
from agent_image.tools.shell import minimal_env

TOOLS = '''
import os, sys, time
from typing import List, Optional
from massgen.tool._result import ExecutionResult, TextContent
from massgen.tool import ImageContent

async def two_num_tool(x: int, y: int) -> ExecutionResult:
    """Add two numbers together.

    Adds them exactly.

    Args:
        x: First number
        y: Second number

    Returns:
        Sum of the two numbers
    """
    return ExecutionResult(output_blocks=[TextContent(data=f"The sum of {x} and {y} is {x + y}")])

def where(agent_cwd: str, api_key: str, tags: Optional[List[str]] = None) -> dict:
    """Where the call runs.

    Args:
        tags: Labels
            spanning two lines.
    """
    return {"pid": os.getpid(), "cwd": agent_cwd, "key": api_key, "tags": tags}

def sleepy(seconds: float) -> str:
    """Sleep."""
    time.sleep(seconds)
    return "woke"

def boom() -> str:
    """Raise."""
    raise ValueError("kaboom")

def flood() -> str:
    """Print 50 MB."""
    chunk = "x" * 1_000_000
    for _ in range(50):
        sys.stdout.write(chunk)
    return "done"

def die() -> str:
    """Exit without a result."""
    os._exit(3)

def picture() -> ExecutionResult:
    """Text and an image."""
    return ExecutionResult(output_blocks=[TextContent(data="see:"), ImageContent(data="aGVsbG8=")])

async def progress():
    """Streams two results; the final one counts."""
    yield ExecutionResult(output_blocks=[TextContent(data="10%")], is_streaming=True, is_final=False)
    yield ExecutionResult(output_blocks=[TextContent(data="all done")], is_streaming=True, is_final=True)
'''

FUNCTIONS = ["two_num_tool", "where", "sleepy", "boom", "flood", "die", "picture", "progress"]


@pytest.fixture(scope="module")
def tool_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ctx") / "tools.py"
    path.write_text(textwrap.dedent(TOOLS))
    return path


def _entry(path: Path, **extra: Any) -> CustomToolEntry:
    return CustomToolEntry(path=str(path), function=FUNCTIONS, **extra)


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _tools(path: Path, ws: Path, timeout: float = 3.0, **extra: Any) -> CustomTools:
    entry = _entry(path, preset_args=[{}, {"api_key": "preset"}, {}, {}, {}, {}, {}, {}], **extra)
    loaded = await describe_tools(entry.specs(), cwd=ws, env=minimal_env(), timeout=30, max_output_bytes=64_000)
    return CustomTools(loaded, workspace=ws, env=minimal_env(), timeout=timeout, max_output_bytes=64_000)


# -- config ---------------------------------------------------------------------------------


def test_massgen_list_form_pairs_names_descriptions_and_presets() -> None:
    """`name`/`description`/`preset_args` are shared when single and paired when lists; names get custom_tool__."""
    e = CustomToolEntry(
        path="t.py",
        function=["a", "b"],
        name=["sum", "custom_tool__b2"],
        description="shared",
        preset_args=[{"k": 1}, None],
    )
    specs = e.specs()
    assert [s.tool for s in specs] == ["custom_tool__sum", "custom_tool__b2"]
    assert [s.description for s in specs] == ["shared", "shared"]
    assert [s.preset_args for s in specs] == [{"k": 1}, {}]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"function": ["a", "b"], "path": "t.py", "name": ["x"]}, "name is a list of 1 but function lists 2"),
        ({"function": "run_python_script"}, "MassGen's built-in tools are not in the sandbox"),
        ({"function": "not valid", "path": "t.py"}, "not a Python identifier"),
        ({"function": "f", "path": "not a module!"}, "neither a .py file nor a dotted module"),
    ],
)
def test_bad_entries_say_what_to_fix(fields: dict[str, Any], message: str) -> None:
    """Mismatched lists, a missing path, bad function names and bad paths are config errors with the fix."""
    with pytest.raises(ValidationError, match=message):
        CustomToolEntry(**fields)


def test_module_path_is_a_module_and_auto_discovery_is_refused() -> None:
    """A dotted `path` names a module in the image; `auto_discover_custom_tools: true` is refused with the reason."""
    e = CustomToolEntry(path="mytools.math", function="add")
    assert e.specs()[0].module == "mytools.math" and e.specs()[0].path is None
    raw = {"agents": [{"id": "a", "backend": {"type": "scripted", "auto_discover_custom_tools": True}}]}
    with pytest.raises(
        ValidationError, match=r"host.s MassGen installation.*registry MCP servers.*none of that is in the sandbox"
    ):
        RunConfig.model_validate(raw)


def test_exclude_custom_tools_leaves_out_files_under_a_name_and_named_tools(tmp_path: Path) -> None:
    """MassGen's exclude_custom_tools: a folder or file name anywhere in a tool's path, or a tool/function name.

    Excluded tools are neither checked nor imported: one outside every context path is no error.
    """
    ctx = tmp_path / "ctx"
    (ctx / "_computer_use").mkdir(parents=True)
    (ctx / "_computer_use" / "cu.py").write_text("def click() -> str:\n    return 'x'\n")
    (ctx / "keep.py").write_text("def a() -> str:\n    return 'a'\n\ndef b() -> str:\n    return 'b'\n")
    backend = {
        "type": "scripted",
        "custom_tools": [
            {"path": str(ctx / "_computer_use" / "cu.py"), "function": "click"},
            {"path": str(ctx / "keep.py"), "function": ["a", "b"], "name": ["alpha", "beta"]},
            {"path": "/outside/nowhere.py", "function": "far"},
            {"path": "pkg._browser_automation.tools", "function": "browse"},
        ],
        "exclude_custom_tools": ["_computer_use", "custom_tool__beta", "nowhere.py", "_browser_automation"],
    }
    agent = RunConfig.model_validate({"agents": [{"id": "a", "backend": backend}]}).agents[0]
    assert [(j, s.tool) for j, s in agent.backend.custom_tool_specs()] == [(1, "custom_tool__alpha")]
    assert [s.tool for s in check_custom_paths(agent, [ctx])] == ["custom_tool__alpha"]
    by_function = {**backend, "exclude_custom_tools": ["b", "far", "browse", "click"]}
    agent = RunConfig.model_validate({"agents": [{"id": "a", "backend": by_function}]}).agents[0]
    assert [s.tool for s in check_custom_paths(agent, [ctx])] == ["custom_tool__alpha"]
    # Without the exclusions the outside file is the usual error, naming it.
    plain = {**backend, "exclude_custom_tools": []}
    agent = RunConfig.model_validate({"agents": [{"id": "a", "backend": plain}]}).agents[0]
    with pytest.raises(ToolSetupError, match=r"/outside/nowhere\.py is outside every"):
        check_custom_paths(agent, [ctx])


def test_duplicate_tool_names_are_refused() -> None:
    """Two entries offering the same model-facing name are a config error."""
    raw = {
        "agents": [
            {
                "id": "a",
                "backend": {
                    "type": "scripted",
                    "custom_tools": [{"path": "a.py", "function": "f"}, {"path": "b.py", "function": "f"}],
                },
            }
        ]
    }
    with pytest.raises(ValidationError, match="defined twice"):
        RunConfig.model_validate(raw)


# -- schema ---------------------------------------------------------------------------------


def test_schema_comes_from_signature_and_google_docstring(tool_file: Path, tmp_path: Path) -> None:
    """MassGen's schema: parameter types and descriptions, required list, no titles, presets and agent_cwd hidden."""
    entry = _entry(tool_file, preset_args=[{}, {"api_key": "k"}, {}, {}, {}, {}, {}, {}])
    loaded = _run(describe_tools(entry.specs(), cwd=tmp_path, env=minimal_env(), timeout=30, max_output_bytes=64_000))
    by = {t.name: t for t in loaded}
    two = by["custom_tool__two_num_tool"]
    assert two.description == "Add two numbers together.\n\nAdds them exactly."
    assert two.parameters == {
        "type": "object",
        "properties": {
            "x": {"type": "integer", "description": "First number"},
            "y": {"type": "integer", "description": "Second number"},
        },
        "required": ["x", "y"],
        "additionalProperties": False,
    }
    where = by["custom_tool__where"]
    assert set(where.parameters["properties"]) == {"tags"}  # api_key preset, agent_cwd filled in
    assert where.parameters["properties"]["tags"]["description"] == "Labels spanning two lines."
    assert "required" not in where.parameters and where.agent_cwd
    assert "title" not in str(where.parameters)


def test_import_errors_and_missing_functions_name_the_tool(tmp_path: Path) -> None:
    """A tool file that fails to import, or lacks the function, is a setup error naming tool, file and cause."""
    bad = tmp_path / "bad.py"
    bad.write_text("import no_such_module_here\n")
    good = tmp_path / "good.py"
    good.write_text("def f():\n    return 1\n")
    for entry, message in [
        (CustomToolEntry(path=str(bad), function="f"), "No module named 'no_such_module_here'"),
        (CustomToolEntry(path=str(good), function="g"), "has no function 'g'"),
    ]:
        with pytest.raises(ToolSetupError, match=message) as info:
            _run(describe_tools(entry.specs(), cwd=tmp_path, env=minimal_env(), timeout=30, max_output_bytes=1000))
        assert entry.specs()[0].tool in str(info.value)


# -- calls ----------------------------------------------------------------------------------


def test_calls_run_in_child_processes_with_massgen_results(tool_file: Path, tmp_path: Path) -> None:
    """ExecutionResult text, presets, agent_cwd, images and streaming map to the tool message; each call is a new process."""

    async def go() -> list[Any]:
        ct = await _tools(tool_file, tmp_path)
        try:
            out = [
                await ct.call("custom_tool__two_num_tool", {"x": 2, "y": 3}),
                await ct.call("custom_tool__where", {"tags": ["t"]}),
                await ct.call("custom_tool__where", {}),
                await ct.call("custom_tool__picture", {}),
                await ct.call("custom_tool__progress", {}),
            ]
        finally:
            await ct.aclose()
        return out

    two, w1, w2, pic, prog = _run(go())
    assert two.ok and two.content == "The sum of 2 and 3 is 5"
    import json

    d1, d2 = json.loads(w1.content), json.loads(w2.content)
    assert d1["cwd"] == str(tmp_path) and d1["key"] == "preset" and d1["tags"] == ["t"]
    assert d1["pid"] != d2["pid"] != os.getpid()
    assert pic.ok and pic.content.startswith("see:\n[image block")
    assert prog.ok and prog.content == "all done"


@pytest.mark.parametrize(
    ("tool", "arguments", "message"),
    [
        ("custom_tool__sleepy", {"seconds": 30}, "timed out after 1.5s"),
        ("custom_tool__boom", {}, "ValueError: kaboom"),
        ("custom_tool__flood", {}, "printed more than 64000 bytes"),
        ("custom_tool__die", {}, "exited with code 3 before returning a result"),
        ("custom_tool__two_num_tool", {"x": 1}, "missing 1 required positional argument"),
    ],
)
def test_failing_tools_end_the_call_with_a_tool_error(
    tool_file: Path, tmp_path: Path, tool: str, arguments: dict[str, Any], message: str
) -> None:
    """Hanging, raising, flooding, os._exit and bad arguments each give ok=False with a clear error; the next call works."""

    async def go() -> tuple[Any, Any, float]:
        ct = await _tools(tool_file, tmp_path, timeout=1.5)
        try:
            t0 = time.monotonic()
            bad = await ct.call(tool, arguments)
            took = time.monotonic() - t0
            good = await ct.call("custom_tool__two_num_tool", {"x": 1, "y": 1})
        finally:
            await ct.aclose()
        return bad, good, took

    bad, good, took = _run(go())
    assert not bad.ok and message in bad.content, bad.content
    assert took < 10
    assert good.ok and good.content == "The sum of 1 and 1 is 2"


def test_toolbox_offers_custom_tools_and_checks_arguments(tool_file: Path, tmp_path: Path) -> None:
    """The toolbox lists custom tools after its own, refuses unknown arguments before spawning, and tags kind=custom."""

    async def go() -> tuple[list[str], Any, Any]:
        ct = await _tools(tool_file, tmp_path)
        box = ToolBox(tmp_path, extra=[ct])
        try:
            names = [s.name for s in box.specs()]
            bad = await box.call("custom_tool__two_num_tool", {"x": 1, "y": 2, "z": 3})
            ok = await box.call("custom_tool__two_num_tool", {"x": 1.0, "y": 2})
        finally:
            await ct.aclose()
        return names, bad, ok

    names, bad, ok = _run(go())
    assert names[:5] == ["shell", "read_file", "write_file", "list_files", "todo"]
    assert "custom_tool__two_num_tool" in names
    assert not bad.ok and "unexpected argument 'z'" in bad.content and bad.kind == "custom"
    assert ok.ok and ok.kind == "custom" and ok.content == "The sum of 1 and 2 is 3"


def test_reducer_counts_tool_calls_per_agent_and_by_tool() -> None:
    """status.json `tools` (run and per agent): calls, failures and time by tool, from tool_called events only."""
    events = [
        ToolCalled(
            seq=0, ts=1.0, agent="a", tool="custom_tool__x", summary="", ok=True, duration_s=0.25, kind="custom"
        ),
        ToolCalled(seq=1, ts=2.0, agent="a", tool="mcp__s__t", summary="", ok=False, duration_s=0.5, kind="mcp"),
        ToolCalled(
            seq=2, ts=3.0, agent="b", tool="custom_tool__x", summary="", ok=True, duration_s=0.125, kind="custom"
        ),
    ]
    st = reduce_events(events)
    assert st.tools.total_calls == 3 and st.tools.total_failures == 1
    assert st.tools.total_execution_time_ms == 875.0
    assert st.tools.by_tool["custom_tool__x"].calls == 2 and st.tools.by_tool["custom_tool__x"].kind == "custom"
    a = st.agents["a"].tools
    assert (a.total_calls, a.total_failures) == (2, 1) and a.by_tool["mcp__s__t"].failures == 1
    assert st.agents["b"].tools.by_tool["custom_tool__x"].execution_time_ms == 125.0

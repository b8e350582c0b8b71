"""Host-side tool checks: custom tool files must lie in a context path; images must carry the engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent_image.protocol.config import RunConfig
from agent_image.protocol.loader import absolutize_context_paths
from agent_image.protocol.spec import ENGINE_LABEL, ENGINE_PROTOCOL
from supervisor.tools_policy import engine_image_problem, resolve_custom_tools


def _config(path: str) -> tuple[RunConfig, dict[str, Any]]:
    raw = {
        "agents": [{"id": "a", "backend": {"type": "scripted", "custom_tools": [{"path": path, "function": "f"}]}}],
    }
    return RunConfig.model_validate(raw), raw


def test_relative_tool_file_inside_a_context_path_is_resolved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A relative path is resolved against the cwd and handed to the sandbox absolute; the user's raw config is kept."""
    (tmp_path / "ctx").mkdir()
    (tmp_path / "ctx" / "t.py").write_text("def f():\n    return 1\n")
    monkeypatch.chdir(tmp_path)
    config, raw = _config("ctx/t.py")
    out, problems = resolve_custom_tools(config, raw, [(tmp_path / "ctx").resolve()], "run.yaml")
    assert problems == []
    assert out["agents"][0]["backend"]["custom_tools"][0]["path"] == str((tmp_path / "ctx" / "t.py").resolve())
    assert raw["agents"][0]["backend"]["custom_tools"][0]["path"] == "ctx/t.py"


def test_tool_file_outside_every_context_path_is_named(tmp_path: Path) -> None:
    """A file outside the context paths (or missing) is a problem naming the file, the key and the fix."""
    (tmp_path / "ctx").mkdir()
    (tmp_path / "elsewhere.py").write_text("def f():\n    return 1\n")
    config, raw = _config(str(tmp_path / "elsewhere.py"))
    _, problems = resolve_custom_tools(config, raw, [tmp_path / "ctx"], "run.yaml")
    assert len(problems) == 1
    text = str(problems[0])
    assert str(tmp_path / "elsewhere.py") in text and "outside every orchestrator.context_paths" in text
    assert "agents.0.backend.custom_tools.0.path" in text
    config, raw = _config(str(tmp_path / "ctx" / "nope.py"))
    _, problems = resolve_custom_tools(config, raw, [tmp_path / "ctx"], "run.yaml")
    assert "does not exist" in str(problems[0])


def test_tools_left_out_by_exclude_custom_tools_are_not_checked(tmp_path: Path) -> None:
    """An entry exclude_custom_tools leaves out (a folder name in its path) needs no file in a context path."""
    (tmp_path / "ctx").mkdir()
    backend: dict[str, Any] = {
        "type": "scripted",
        "custom_tools": [{"path": str(tmp_path / "_computer_use" / "cu.py"), "function": "f"}],
        "exclude_custom_tools": ["_computer_use"],
    }
    raw: dict[str, Any] = {"agents": [{"id": "a", "backend": backend}]}
    _, problems = resolve_custom_tools(RunConfig.model_validate(raw), raw, [tmp_path / "ctx"], "run.yaml")
    assert problems == []
    backend["exclude_custom_tools"] = []
    _, problems = resolve_custom_tools(RunConfig.model_validate(raw), raw, [tmp_path / "ctx"], "run.yaml")
    assert len(problems) == 1 and "does not exist" in str(problems[0])


def test_nested_clients_send_custom_tool_files_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The in-sandbox client makes custom tool file paths absolute like context paths; module names stay."""
    monkeypatch.chdir(tmp_path)
    text = "agents:\n  - id: a\n    backend:\n      type: scripted\n      custom_tools:\n        - {path: t/x.py, function: f}\n        - {path: pkg.mod, function: g}\n"
    out = absolutize_context_paths(text)
    assert f"path: {tmp_path}/t/x.py" in out and "path: pkg.mod" in out


def test_engine_label_decides_whether_an_image_can_run_the_engine() -> None:
    """Images without the engine label (or with another protocol) are refused with the FROM line to use."""
    assert engine_image_problem({ENGINE_LABEL: ENGINE_PROTOCOL}, "mine:1", "massgen-sandbox/agent:abc") is None
    assert engine_image_problem(None, "mine:1", None) is None  # missing: the runtime says image_missing
    msg = engine_image_problem({}, "debian:12", "massgen-sandbox/agent:abc")
    assert msg is not None and "does not carry the sandbox engine" in msg and "FROM massgen-sandbox/agent:abc" in msg
    old = engine_image_problem({ENGINE_LABEL: "0"}, "mine:1", "massgen-sandbox/agent:abc")
    assert old is not None and "rebuild it" in old


def test_validate_checks_custom_tool_files_like_a_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`massgen-run validate` refuses a custom tool file outside the context paths, naming it."""
    from supervisor import validate

    (tmp_path / "ctx").mkdir()
    (tmp_path / "tool.py").write_text("def f():\n    return 1\n")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "agents:\n  - id: a\n    backend:\n      type: scripted\n      custom_tools:\n"
        "        - {path: tool.py, function: f}\norchestrator:\n  context_paths:\n    - path: ctx\n"
    )
    monkeypatch.chdir(tmp_path)
    errors, _notes, _path = validate.validate(str(cfg))
    assert len(errors) == 1 and "outside every orchestrator.context_paths" in str(errors[0])
    (tmp_path / "ctx" / "tool.py").write_text("def f():\n    return 1\n")
    cfg.write_text(cfg.read_text().replace("path: tool.py", "path: ctx/tool.py"))
    assert validate.validate(str(cfg))[0] == []

"""Host-side checks for in-sandbox tools: custom tool files in context paths, images that carry the engine."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent_image.protocol.config import RunConfig
from agent_image.protocol.loader import ConfigProblem
from agent_image.protocol.spec import ENGINE_LABEL, ENGINE_PROTOCOL


def _raw_agents(raw: dict[str, Any]) -> list[Any]:
    agents = raw.get("agents")
    return agents if isinstance(agents, list) else [raw.get("agent")]


def _raw_entry(raw_agents: list[Any], i: int, j: int) -> dict[str, Any] | None:
    agent = raw_agents[i] if i < len(raw_agents) else None
    backend = agent.get("backend") if isinstance(agent, dict) else None
    tools = backend.get("custom_tools") if isinstance(backend, dict) else None
    entry = tools[j] if isinstance(tools, list) and j < len(tools) else None
    return entry if isinstance(entry, dict) else None


def resolve_custom_tools(
    config: RunConfig, raw: dict[str, Any], contexts: Sequence[Path], source: str
) -> tuple[dict[str, Any], list[ConfigProblem]]:
    """Resolve each custom tool file against the current directory (as context paths are).

    The file must lie inside a context path: only those are mounted (read-only) into the
    sandbox, where the engine imports it. Returns the raw config with the resolved paths (what
    the sandbox is given) and the problems found.
    """
    problems: list[ConfigProblem] = []
    out = copy.deepcopy(raw)
    raw_agents = _raw_agents(out)
    for i, agent in enumerate(config.agents):
        offered = {j for j, _ in agent.backend.custom_tool_specs()}  # exclude_custom_tools may leave some out
        for j, entry in enumerate(agent.backend.custom_tools):
            if not entry.is_file or entry.path is None or j not in offered:
                continue
            key = f"agents.{i}.backend.custom_tools.{j}.path"
            p = Path(entry.path).expanduser()
            p = p if p.is_absolute() else Path.cwd() / p
            if not p.is_file():
                problems.append(
                    ConfigProblem(
                        source,
                        key,
                        None,
                        f"custom tool file does not exist: {p} (paths are relative to the current directory; "
                        "the file must lie inside an orchestrator.context_paths entry)",
                    )
                )
                continue
            resolved = p.resolve()
            if not any(resolved == c or resolved.is_relative_to(c) for c in contexts):
                listed = ", ".join(map(str, contexts)) or "none"
                problems.append(
                    ConfigProblem(
                        source,
                        key,
                        None,
                        f"custom tool file {resolved} is outside every orchestrator.context_paths entry "
                        f"({listed}); only context paths are mounted in the sandbox: add its folder as one",
                    )
                )
                continue
            raw_entry = _raw_entry(raw_agents, i, j)
            if raw_entry is not None:
                raw_entry["path"] = str(resolved)
    return out, problems


def engine_image_problem(labels: dict[str, str] | None, image: str, default_image: str | None) -> str | None:
    """Why `image` cannot run the engine, or None when it can (a missing image is the runtime's call)."""
    if labels is None:
        return None
    build_from = f"FROM {default_image}" if default_image else "FROM the agent image"
    found = labels.get(ENGINE_LABEL)
    if found is None:
        return (
            f"image {image} does not carry the sandbox engine (no {ENGINE_LABEL} label); "
            f"build it {build_from} (see docs/tools.md) and set sandbox.image to it"
        )
    if found != ENGINE_PROTOCOL:
        return (
            f"image {image} carries engine protocol {found}, this supervisor speaks {ENGINE_PROTOCOL}; "
            f"rebuild it {build_from}"
        )
    return None

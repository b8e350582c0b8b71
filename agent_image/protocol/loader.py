"""Load a run config from YAML with errors that name the file, the key and the line."""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ValidationError

from . import compat
from .config import (
    AgentConfig,
    BackendConfig,
    Budget,
    ContextPath,
    OrchestratorConfig,
    RunConfig,
    SandboxConfig,
    TimeoutSettings,
    UiConfig,
)
from .tools_config import is_file_path

_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
MAX_CONFIG_BYTES = 1 << 20
# Nodes in a document once every alias is expanded. Real configs have a few hundred; nested
# aliases ("billion laughs") reach billions from a few hundred bytes, and the validated data
# would be walked and serialized in that expanded form.
MAX_EXPANDED_NODES = 200_000


@dataclass(frozen=True)
class ConfigProblem:
    """One finding about a config file: an error (the run cannot start), a warning (it runs,
    differently from MassGen or with a key ignored) or an info note (a MassGen key mapped)."""

    file: str
    key: str
    line: int | None
    message: str
    severity: Literal["error", "warning", "info"] = "error"

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        key = f" key={self.key}" if self.key else ""
        return _one_line(f"{where}:{key} {self.message}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "severity": self.severity,
            "file": self.file,
            "key": self.key,
            "line": self.line,
            "message": _one_line(self.message),
        }


@dataclass(frozen=True)
class LoadedConfig:
    """A valid config, in this project's own terms, and what loading it had to say."""

    config: RunConfig
    data: dict[str, Any]  # the translated document: what config.yaml records and the engine runs
    notes: tuple[ConfigProblem, ...] = field(default=())  # warnings and info notes, in file order

    @property
    def warnings(self) -> tuple[ConfigProblem, ...]:
        return tuple(n for n in self.notes if n.severity == "warning")


def _one_line(text: str) -> str:
    # Keys and values come from the user's file; a newline in one must not split the message.
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


class ConfigError(ValueError):
    """A config that cannot be run; `problems` lists every finding, the first is the headline."""

    def __init__(
        self, problems: list[ConfigProblem], reason: str = "config_invalid", notes: tuple[ConfigProblem, ...] = ()
    ) -> None:
        self.problems = problems
        self.reason = reason
        self.notes = notes  # warnings and info notes found next to the errors (for `validate`)
        super().__init__(str(problems[0]) + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""))


def _line_index(root: yaml.Node) -> dict[tuple[Any, ...], int]:
    """Map each path in the document to the line it starts on.

    A node reached again through an alias is never entered again: its subtree is indexed once,
    under its anchor's path, and the alias's path gets only the line of its key (or item). Each
    node is visited once, so the cost is linear in the text however aliases are nested.
    """
    out: dict[tuple[Any, ...], int] = {(): root.start_mark.line + 1}
    seen: set[int] = set()

    def visit(node: yaml.Node, path: tuple[Any, ...]) -> None:
        if id(node) in seen:
            return
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                p = path + (k.value,)
                out[p] = k.start_mark.line + 1
                visit(v, p)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                p = path + (i,)
                out[p] = v.start_mark.line + 1
                visit(v, p)

    visit(root, ())
    return out


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _expanded_size(root: yaml.Node, budget: int) -> tuple[int, yaml.Node | None]:
    """Count the nodes of the document with every alias expanded, without expanding anything.

    Sizes are memoized by node identity, so this is O(distinct nodes) even when aliases nest
    to an exponential expansion. Stops as soon as a subtree exceeds `budget`.

    Returns:
        (size, None), a size above `budget` meaning "at least that many"; or (0, node) when an
        alias refers to one of its own ancestors (`node`), which would expand without end.
    """
    sizes: dict[int, int] = {}
    open_: set[int] = set()  # entered but not finished: the current path from the root
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        nid = id(node)
        if finished:
            open_.discard(nid)
            size = 1 + sum(sizes[id(c)] for c in _children(node))
            sizes[nid] = size
            if size > budget:
                return size, None
        elif nid in open_:
            return 0, node  # a node still on the path from the root: an alias to an ancestor
        elif nid not in sizes:
            open_.add(nid)
            stack.append((node, True))
            stack.extend((c, False) for c in reversed(_children(node)))
    return sizes[id(root)], None


def _nearest_line(index: dict[tuple[Any, ...], int], loc: tuple[Any, ...]) -> int | None:
    while True:
        if loc in index:
            return index[loc]
        if not loc:
            return None
        loc = loc[:-1]


def _clean_loc(loc: tuple[Any, ...], data: Any) -> tuple[Any, ...]:
    # pydantic inserts union-member tags ('ShellStep', 'str') into locations; drop every part
    # that is not a key in the document, except a last one under a mapping (a missing or
    # unknown key). Matching against the data keeps user keys such as 'Agents' intact.
    out: list[Any] = []
    node = data
    for i, part in enumerate(loc):
        in_dict = isinstance(node, dict) and part in node
        in_list = isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
        if in_dict or in_list:
            node = node[part]
        elif not (isinstance(node, dict) and i == len(loc) - 1):
            continue
        out.append(part)
    return tuple(out)


# The schema's mappings by the key that holds them, for "did you mean" on unknown keys.
_MODELS: dict[str, type[BaseModel]] = {
    "": RunConfig,
    "agents": AgentConfig,
    "agent": AgentConfig,
    "backend": BackendConfig,
    "orchestrator": OrchestratorConfig,
    "context_paths": ContextPath,
    "timeout_settings": TimeoutSettings,
    "sandbox": SandboxConfig,
    "budget": Budget,
    "ui": UiConfig,
}


def _known_keys(parent: tuple[Any, ...]) -> list[str]:
    names = [p for p in parent if isinstance(p, str)]
    kind = names[-1] if names else ""
    known: set[str] = set(compat.KNOWN_KEYS.get(kind, ()))
    model = _MODELS.get(kind)
    if model is not None:
        known |= set(model.model_fields)
    if kind == "":
        known.add("agent")
    return sorted(known)


def did_you_mean(loc: tuple[Any, ...]) -> str | None:
    """The known key closest to an unknown one at the same place, if any is close."""
    if not loc or not isinstance(loc[-1], str):
        return None
    close = difflib.get_close_matches(loc[-1], _known_keys(loc[:-1]), n=1, cutoff=0.75)
    return close[0] if close else None


def parse_config_text(text: str, file: str = "<config>") -> tuple[RunConfig, dict[str, Any]]:
    """Parse and validate YAML text (see `parse_config`); the translated document is returned.

    Raises:
        ConfigError: syntax errors, schema errors, refused keys, or a document that is not a mapping.
    """
    loaded = parse_config(text, file)
    return loaded.config, loaded.data


def parse_config(text: str, file: str = "<config>") -> LoadedConfig:
    """Parse YAML text, translate MassGen keys (`compat`) and validate strictly.

    Raises:
        ConfigError: syntax errors, schema errors, refused keys, or a document that is not a mapping;
            every error is listed (refusals first), and the warnings found so far ride along.
    """
    # One parse (libyaml's when built in): the node tree is checked, then constructed.
    ld = _LOADER(text)
    try:
        node = ld.get_single_node()
        if node is not None:
            # before constructing, validating or indexing anything: all of those see the expansion
            size, cyclic = _expanded_size(node, MAX_EXPANDED_NODES)
            if cyclic is not None:
                line = cyclic.start_mark.line + 1
                raise ConfigError([ConfigProblem(file, "", line, "YAML alias refers to a node that contains it")])
            if size > MAX_EXPANDED_NODES:
                raise ConfigError(
                    [ConfigProblem(file, "", None, f"YAML aliases expand to more than {MAX_EXPANDED_NODES} nodes")]
                )
        data = ld.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        if "nesting depth" in problem:  # libyaml's own limit
            raise ConfigError([ConfigProblem(file, "", line, "YAML nested too deeply")]) from exc
        raise ConfigError([ConfigProblem(file, "", line, f"YAML syntax error: {problem}")]) from exc
    except RecursionError as exc:  # PyYAML composes and constructs recursively
        raise ConfigError([ConfigProblem(file, "", None, "YAML nested too deeply")]) from exc
    finally:
        ld.dispose()
    if not isinstance(data, dict):
        raise ConfigError([ConfigProblem(file, "", 1, "config must be a YAML mapping with an 'agents' list")])
    index = _line_index(node) if node is not None else {}
    tr = compat.translate(data)
    notes = [ConfigProblem(file, n.key, _nearest_line(index, n.loc), n.message, n.severity) for n in tr.notes]
    refusals = [n for n in notes if n.severity == "error"]
    kept = tuple(n for n in notes if n.severity != "error")
    data = tr.data
    alias = "agent" in data and "agents" not in data
    try:
        config = RunConfig.model_validate(data)
    except ValidationError as exc:
        validated = {**data, "agents": [data["agent"]]} if alias else data
        problems = []
        for err in exc.errors():
            loc = _clean_loc(tuple(err["loc"]), validated)
            if alias and loc[:2] == ("agents", 0):
                # name the key as the user wrote it: MassGen's single `agent:` mapping
                loc = ("agent",) + loc[2:]
            key = ".".join(str(p) for p in loc)
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
                suggestion = did_you_mean(loc)
                if suggestion:
                    msg += f"; did you mean {suggestion!r}?"
            elif err["type"] == "missing":
                msg = "required key is missing"
            elif err["type"] == "too_long" and loc == ("agents",):
                msg = (
                    f"at most 16 agents per run (got {len(validated.get('agents') or [])}); split the work into "
                    "several runs, or start nested runs from an agent's shell"
                )
            problems.append(ConfigProblem(file, key, _nearest_line(index, loc), msg))
        # union errors repeat per member; keep the first of each key
        unique: list[ConfigProblem] = list(refusals)
        for p in problems:
            if p.key not in {u.key for u in unique}:
                unique.append(p)
        raise ConfigError(unique, notes=kept) from exc
    if refusals:
        raise ConfigError(refusals, notes=kept)
    return LoadedConfig(config, data, kept)


def load_config(path: Path) -> tuple[RunConfig, dict[str, Any]]:
    """Read and validate a config file (see `read_config`).

    Raises:
        ConfigError: reason config_missing when the file cannot be read, config_invalid otherwise.
    """
    loaded = read_config(path)
    return loaded.config, loaded.data


def read_config(path: Path) -> LoadedConfig:
    """Read, translate and validate a config file.

    Raises:
        ConfigError: reason config_missing when the file cannot be read, config_invalid otherwise.
    """
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError([ConfigProblem(str(path), "", None, "config file larger than 1 MiB")])
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError([ConfigProblem(str(path), "", None, "config file not found")], "config_missing") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([ConfigProblem(str(path), "", None, f"cannot read config: {exc}")], "config_missing") from exc
    return parse_config(text, str(path))


def dump_config(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=False)


def absolutize_context_paths(text: str) -> str:
    """Make relative `orchestrator.context_paths` and custom tool files absolute (against the cwd).

    Relative paths mean "relative to where I am"; a config sent to a supervisor elsewhere needs
    them absolute. Text that does not parse is returned unchanged (the receiver reports errors).
    """
    try:
        data = yaml.safe_load(text)
    except Exception:  # noqa: BLE001 - anything odd: keep the text as written
        return text
    if not isinstance(data, dict):
        return text
    items: list[dict[str, Any]] = []
    orch = data.get("orchestrator")
    cps = orch.get("context_paths") if isinstance(orch, dict) else None
    items += [cp for cp in cps if isinstance(cp, dict)] if isinstance(cps, list) else []
    listed = data.get("agents")
    agents: list[Any] = listed if isinstance(listed, list) else [data.get("agent")]
    for agent in agents:
        backend = agent.get("backend") if isinstance(agent, dict) else None
        tools = backend.get("custom_tools") if isinstance(backend, dict) else None
        for tool in tools if isinstance(tools, list) else []:
            # Only file paths: a dotted module name is resolved in the sandbox image.
            if isinstance(tool, dict) and isinstance(tool.get("path"), str) and is_file_path(tool["path"]):
                items.append(tool)
    changed = False
    for item in items:
        if isinstance(item.get("path"), str) and not os.path.isabs(item["path"]):
            item["path"] = os.path.abspath(item["path"])
            changed = True
    return yaml.safe_dump(data, sort_keys=False) if changed else text


def parse_yaml_text(text: str, file: str = "<config>") -> tuple[Any, dict[tuple[Any, ...], int]]:
    """Parse another YAML document of ours (a batch spec) with the guards configs get.

    Returns the data and its line index by key path, for errors that name the line.

    Raises:
        ConfigError: syntax errors, aliases that expand without bound, nesting too deep.
    """
    ld = _LOADER(text)
    try:
        node = ld.get_single_node()
        if node is not None:
            size, cyclic = _expanded_size(node, MAX_EXPANDED_NODES)
            if cyclic is not None:
                line = cyclic.start_mark.line + 1
                raise ConfigError([ConfigProblem(file, "", line, "YAML alias refers to a node that contains it")])
            if size > MAX_EXPANDED_NODES:
                raise ConfigError(
                    [ConfigProblem(file, "", None, f"YAML aliases expand to more than {MAX_EXPANDED_NODES} nodes")]
                )
        data = ld.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError([ConfigProblem(file, "", line, f"YAML syntax error: {problem}")]) from exc
    except RecursionError as exc:
        raise ConfigError([ConfigProblem(file, "", None, "YAML nested too deeply")]) from exc
    finally:
        ld.dispose()
    return data, (_line_index(node) if node is not None else {})


def line_of(index: dict[tuple[Any, ...], int], loc: tuple[Any, ...]) -> int | None:
    """The line of `loc`, or of its nearest ancestor present in the document."""
    return _nearest_line(index, loc)

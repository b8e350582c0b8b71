"""Load a run config from YAML with errors that name the file, the key and the line."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .config import RunConfig

MAX_CONFIG_BYTES = 1 << 20


@dataclass(frozen=True)
class ConfigProblem:
    """One thing wrong with a config file."""

    file: str
    key: str
    line: int | None
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        key = f" key={self.key}" if self.key else ""
        return _one_line(f"{where}:{key} {self.message}")


def _one_line(text: str) -> str:
    # Keys and values come from the user's file; a newline in one must not split the message.
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


class ConfigError(ValueError):
    """A config that cannot be run; `problems` lists every finding, the first is the headline."""

    def __init__(self, problems: list[ConfigProblem], reason: str = "config_invalid") -> None:
        self.problems = problems
        self.reason = reason
        super().__init__(str(problems[0]) + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""))


def _line_index(node: yaml.Node, path: tuple[Any, ...] = ()) -> dict[tuple[Any, ...], int]:
    out: dict[tuple[Any, ...], int] = {path: node.start_mark.line + 1}
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = k.value
            out[path + (key,)] = k.start_mark.line + 1
            for p, line in _line_index(v, path + (key,)).items():
                out.setdefault(p, line)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            out.update(_line_index(v, path + (i,)))
    return out


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


def parse_config_text(text: str, file: str = "<config>") -> tuple[RunConfig, dict[str, Any]]:
    """Parse and validate YAML text.

    Raises:
        ConfigError: syntax errors, schema errors, or a document that is not a mapping.
    """
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError([ConfigProblem(file, "", line, f"YAML syntax error: {problem}")]) from exc
    if not isinstance(data, dict):
        raise ConfigError([ConfigProblem(file, "", 1, "config must be a YAML mapping with an 'agents' list")])
    index = _line_index(node) if node is not None else {}
    alias = "agent" in data and "agents" not in data
    try:
        return RunConfig.model_validate(data), data
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
            elif err["type"] == "missing":
                msg = "required key is missing"
            problems.append(ConfigProblem(file, key, _nearest_line(index, loc), msg))
        # union errors repeat per member; keep the first of each key
        unique: list[ConfigProblem] = []
        for p in problems:
            if p.key not in {u.key for u in unique}:
                unique.append(p)
        raise ConfigError(unique) from exc


def load_config(path: Path) -> tuple[RunConfig, dict[str, Any]]:
    """Read and validate a config file.

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
    return parse_config_text(text, str(path))


def dump_config(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=False)


def absolutize_context_paths(text: str) -> str:
    """Make relative `orchestrator.context_paths` absolute (against the current directory).

    Relative paths mean "relative to where I am"; a config sent to a supervisor elsewhere needs
    them absolute. Text that does not parse is returned unchanged (the receiver reports errors).
    """
    try:
        data = yaml.safe_load(text)
        cps = data["orchestrator"]["context_paths"]
    except Exception:  # noqa: BLE001 - anything odd: keep the text as written
        return text
    changed = False
    for cp in cps if isinstance(cps, list) else []:
        if isinstance(cp, dict) and isinstance(cp.get("path"), str) and not os.path.isabs(cp["path"]):
            cp["path"] = os.path.abspath(cp["path"])
            changed = True
    return yaml.safe_dump(data, sort_keys=False) if changed else text

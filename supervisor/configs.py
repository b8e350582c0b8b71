"""Find a run config: a file path or `@examples/NAME` from the bundled configs/ folder."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from agent_image.protocol.config import RunConfig
from agent_image.protocol.loader import ConfigError, ConfigProblem, LoadedConfig, read_config

_EXAMPLE_NAME = re.compile(r"\A[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*\Z")


def examples_dir() -> Path:
    env = os.environ.get("MASSGEN_EXAMPLES_DIR")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "configs"


def list_examples() -> dict[str, Path]:
    root = examples_dir()
    out: dict[str, Path] = {}
    for p in sorted(root.rglob("*.yaml")):
        rel = p.relative_to(root).with_suffix("").as_posix()
        out[rel] = p
        out.setdefault(p.stem, p)
    return out


def find_example(name: str) -> Path:
    """`@examples/quickstart` or `@examples/meta/self_analysis`: exact names, never substrings.

    Raises:
        ConfigError: no such example, or the short name is ambiguous.
    """
    root = examples_dir()
    name = name.removesuffix(".yaml")
    if not _EXAMPLE_NAME.fullmatch(name) or ".." in Path(name).parts:
        raise ConfigError(
            [ConfigProblem(f"@examples/{name}", "", None, "not an example name (letters, digits, _ - . and /)")],
            "config_missing",
        )
    exact = root / f"{name}.yaml"
    if exact.is_file():
        return exact
    matches = sorted(p for p in root.rglob(f"{Path(name).name}.yaml") if p.stem == Path(name).name)
    if len(matches) == 1:
        return matches[0]
    names = sorted({p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml")})
    why = "is ambiguous" if matches else "not found"
    raise ConfigError(
        [ConfigProblem(f"@examples/{name}", "", None, f"example {why}; available: {', '.join(names)}")],
        "config_missing",
    )


def config_path(source: str) -> Path:
    """The file a `--config` value names.

    Raises:
        ConfigError: an `@examples/` name that matches no example.
    """
    return find_example(source.split("/", 1)[1]) if source.startswith("@examples/") else Path(source).expanduser()


def resolve_loaded(source: str) -> tuple[LoadedConfig, str]:
    """Load, translate and validate a config; returns it with the path it came from.

    Raises:
        ConfigError: missing or invalid config (reason config_missing / config_invalid).
    """
    path = config_path(source)
    return read_config(path), str(path)


def resolve_config(source: str) -> tuple[RunConfig, dict[str, Any], str]:
    """Load and validate a config (see `resolve_loaded`).

    Raises:
        ConfigError: missing or invalid config (reason config_missing / config_invalid).
    """
    loaded, path = resolve_loaded(source)
    return loaded.config, loaded.data, path


def check_context_paths(config: RunConfig, source: str) -> tuple[list[Path], list[ConfigProblem]]:
    """Resolve `orchestrator.context_paths` against the current directory (as MassGen does).

    Returns:
        the resolved host paths, and one problem per path that does not exist.
    """
    paths, problems = [], []
    for i, cp in enumerate(config.orchestrator.context_paths):
        p = Path(cp.path).expanduser()
        p = (Path.cwd() / p) if not p.is_absolute() else p
        if not p.exists():
            problems.append(
                ConfigProblem(source, f"orchestrator.context_paths.{i}.path", None, f"path does not exist: {p}")
            )
            continue
        paths.append(p.resolve())
    return paths, problems


def price_problems(config: RunConfig, source: str, env: Any = None) -> list[ConfigProblem]:
    """A cost budget needs a price for every model it would meter; an unpriced one would count $0.

    Raises:
        DataFileError: ``MASSGEN_PRICING_FILE`` is unreadable or malformed.
    """
    if config.sandbox.budget.max_cost_usd is None:
        return []
    from .pricing import Pricing

    pricing = Pricing.load(env=env if env is not None else os.environ)
    problems = []
    for i, agent in enumerate(config.agents):
        b = agent.backend
        if b.type == "scripted" or not b.model or pricing.price(b.type, b.model) is not None:
            continue
        problems.append(
            ConfigProblem(
                source,
                f"agents.{i}.backend.model",
                None,
                f"no price for {b.type}/{b.model}, and sandbox.budget.max_cost_usd would count it as $0: add it to a "
                "copy of configs/pricing.json and set MASSGEN_PRICING_FILE, or use max_tokens / max_calls",
            )
        )
    return problems

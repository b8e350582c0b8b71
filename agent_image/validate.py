"""`massgen-run validate`'s output, shared by the host CLI and the in-sandbox client.

The host validates with `supervisor.validate.validate` (examples, pricing); inside a sandbox the
client validates a config file with the loader and checks its context paths in the sandbox.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .protocol.loader import ConfigError, ConfigProblem, read_config


def validate_here(source: str) -> tuple[list[ConfigProblem], list[ConfigProblem], str]:
    """In a sandbox: a config file (not an @examples name) and the context paths it names, as seen here."""
    if source.startswith("@examples/"):
        return [ConfigProblem(source, "", None, "validate @examples names on the host; here, give a file")], [], source
    path = Path(source).expanduser()
    try:
        loaded = read_config(path)
    except ConfigError as exc:
        return list(exc.problems), list(exc.notes), str(path)
    missing = []
    for i, cp in enumerate(loaded.config.orchestrator.context_paths):
        p = Path(cp.path).expanduser()
        if not (p if p.is_absolute() else Path(os.getcwd()) / p).exists():
            missing.append(
                ConfigProblem(str(path), f"orchestrator.context_paths.{i}.path", None, f"path does not exist: {p}")
            )
    return missing, list(loaded.notes), str(path)


def run_cli(
    argv: list[str],
    validate: Callable[[str], tuple[list[ConfigProblem], list[ConfigProblem], str]],
    parser_cls: type[argparse.ArgumentParser] = argparse.ArgumentParser,
) -> int:
    """Parse the arguments, validate, print the findings (or one JSON object); the exit code."""
    p = parser_cls(
        prog="massgen-run validate",
        description="Check a run config (MassGen keys included) without starting anything. "
        "Exit 0: it would run; 1: errors (or warnings, with --strict).",
    )
    p.add_argument("config", help="config file, or @examples/NAME")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.add_argument("--strict", action="store_true", help="warnings are errors too")
    args = p.parse_args(argv)
    errors, notes, path = validate(args.config)
    warnings = [n for n in notes if n.severity == "warning"]
    infos = [n for n in notes if n.severity == "info"]
    ok = not errors and not (args.strict and warnings)
    if args.json:
        doc: dict[str, Any] = {
            "config": path,
            "valid": ok,
            "strict": args.strict,
            "errors": [e.to_dict() for e in errors],
            "warnings": [w.to_dict() for w in warnings],
            "notes": [i.to_dict() for i in infos],
        }
        print(json.dumps(doc, indent=2))
        return 0 if ok else 1
    for e in errors:
        print(f"error: {e}")
    for w in warnings:
        print(f"warning: {w}")
    for i in infos:
        print(f"info: {i}")
    if ok:
        print(f"OK: {path} ({len(warnings)} warning(s), {len(infos)} note(s))")
    else:
        what = f"{len(errors)} error(s)" if errors else f"{len(warnings)} warning(s) with --strict"
        print(f"INVALID: {path}: {what}")
    return 0 if ok else 1

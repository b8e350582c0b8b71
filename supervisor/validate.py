"""`massgen-run validate CONFIG [--json] [--strict]`: check a config without starting anything.

Exit 0 when the config would run (warnings allowed), 1 on errors, or on warnings with
`--strict`. Imports only the config modules, so it answers in a fraction of a second.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from agent_image.protocol.loader import ConfigError, ConfigProblem

from .configs import check_context_paths, price_problems, resolve_loaded


def validate(source: str) -> tuple[list[ConfigProblem], list[ConfigProblem], str]:
    """Errors, then warnings and info notes, for one config; and the file it was read from."""
    try:
        loaded, path = resolve_loaded(source)
    except ConfigError as exc:
        return list(exc.problems), list(exc.notes), source
    _, missing = check_context_paths(loaded.config, path)
    try:
        unpriced = price_problems(loaded.config, path)
    except ValueError as exc:  # a broken MASSGEN_PRICING_FILE
        unpriced = [ConfigProblem(path, "", None, str(exc))]
    return missing + unpriced, list(loaded.notes), path


def main(argv: list[str], parser_cls: type[argparse.ArgumentParser] = argparse.ArgumentParser) -> int:
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

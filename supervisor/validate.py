"""`massgen-run validate CONFIG [--json] [--strict]`: check a config without starting anything.

Exit 0 when the config would run (warnings allowed), 1 on errors, or on warnings with
`--strict`. Imports only the config modules, so it answers in a fraction of a second.
"""

from __future__ import annotations

import argparse

from agent_image.protocol.loader import ConfigError, ConfigProblem

from .configs import check_context_paths, price_problems, resolve_loaded
from .tools_policy import resolve_custom_tools


def validate(source: str) -> tuple[list[ConfigProblem], list[ConfigProblem], str]:
    """Errors, then warnings and info notes, for one config; and the file it was read from."""
    try:
        loaded, path = resolve_loaded(source)
    except ConfigError as exc:
        return list(exc.problems), list(exc.notes), source
    contexts, missing = check_context_paths(loaded.config, path)
    if not missing:
        # Custom tool files must lie in a context path, as a run would check before starting.
        _, missing = resolve_custom_tools(loaded.config, {}, contexts, path)
    try:
        unpriced = price_problems(loaded.config, path)
    except ValueError as exc:  # a broken MASSGEN_PRICING_FILE
        unpriced = [ConfigProblem(path, "", None, str(exc))]
    return missing + unpriced, list(loaded.notes), path


def main(argv: list[str], parser_cls: type[argparse.ArgumentParser] = argparse.ArgumentParser) -> int:
    from agent_image.validate import run_cli

    return run_cli(argv, validate, parser_cls)

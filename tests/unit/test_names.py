"""Names are checked by full matches (issue 9.9): `$` matches before a trailing newline, `\\Z` does not."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from agent_image.protocol.config import RunConfig
from supervisor.api import EXAMPLE_RE
from supervisor.configs import resolve_config
from supervisor.logdir import LABEL_RE, RUN_ID_RE, SAFE_NAME_RE

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("pattern", "good"),
    [
        (RUN_ID_RE, "log_20261202_101010_123456_abcdef"),
        (SAFE_NAME_RE, "agent_a"),
        (LABEL_RE, "agent1.7"),
        (EXAMPLE_RE, "meta/self_analysis"),
    ],
)
def test_a_trailing_newline_is_not_a_name(pattern: re.Pattern[str], good: str) -> None:
    assert pattern.fullmatch(good) and pattern.match(good)
    for bad in (good + "\n", good + "\r\n", "\n" + good, good + "\n" + good):
        assert not pattern.match(bad) and not pattern.fullmatch(bad), repr(bad)


def test_an_agent_id_with_a_trailing_newline_is_a_config_error() -> None:
    base = {"backend": {"type": "scripted", "steps": [{"answer": "x"}]}}
    RunConfig.model_validate({"agents": [{"id": "agent_a", **base}]})
    with pytest.raises(ValueError, match="id"):
        RunConfig.model_validate({"agents": [{"id": "agent_a\n", **base}]})


def test_an_example_name_with_a_trailing_newline_is_refused() -> None:
    with pytest.raises(Exception, match="example"):
        resolve_config("@examples/quickstart\n")


def test_no_pattern_in_the_code_is_anchored_with_dollar() -> None:
    """Every re.compile pattern ends with \\Z, not $ (which also matches before a final newline)."""
    offenders = []
    for path in [*ROOT.glob("supervisor/**/*.py"), *ROOT.glob("agent_image/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("compile", "match", "search", "fullmatch")
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "re"
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
                and re.search(r"(?<!\\)\$\)*$", node.args[0].value)
            ):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []

"""YAML anchors and aliases in run configs: normal reuse works, expansion bombs and cycles are refused fast."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from agent_image.protocol import loader
from agent_image.protocol.loader import MAX_EXPANDED_NODES, ConfigError, load_config, parse_config_text

CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"


def _bomb(levels: int, fan_out: int = 10) -> str:
    """A valid-looking config whose `l{levels-1}` expands to fan_out**levels scalars."""
    lines = [
        "agents:",
        "  - id: a",
        "    backend:",
        "      type: openai",
        "      model: m",
        "      extra_body:",
        "        l0: &l0 [" + ", ".join(["x"] * fan_out) + "]",
    ]
    for i in range(1, levels):
        lines.append(f"        l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * fan_out) + "]")
    return "\n".join(lines) + "\n"


def test_alias_bomb_is_refused_fast() -> None:
    """A ~600-byte document whose aliases expand to 10**9 nodes is refused in well under a second."""
    text = _bomb(9)
    assert len(text) < 700
    start = time.monotonic()
    with pytest.raises(ConfigError) as info:
        parse_config_text(text, "bomb.yaml")
    assert time.monotonic() - start < 1.0
    assert str(info.value) == f"bomb.yaml: YAML aliases expand to more than {MAX_EXPANDED_NODES} nodes"
    assert info.value.reason == "config_invalid"


def test_alias_bomb_in_file_is_refused_fast(tmp_path: Path) -> None:
    """load_config refuses the same bomb read from a file, naming the file."""
    path = tmp_path / "bomb.yaml"
    path.write_text(_bomb(12, fan_out=20), encoding="utf-8")
    start = time.monotonic()
    with pytest.raises(ConfigError, match="YAML aliases expand to more than"):
        load_config(path)
    assert time.monotonic() - start < 1.0


def test_expansion_below_budget_is_accepted() -> None:
    """Aliases that expand to a moderate size are not refused (the budget counts expanded nodes)."""
    config, data = parse_config_text(_bomb(3), "ok.yaml")  # 10**3 scalars
    assert config.agents[0].id == "a"
    assert data["agents"][0]["backend"]["extra_body"]["l2"][9][9] == ["x"] * 10


def test_alias_cycle_is_refused() -> None:
    """An alias inside its own anchor (a recursive structure) is a ConfigError, not a RecursionError."""
    text = "agents:\n  - id: a\n    backend: {type: scripted}\nloop: &loop\n  - 1\n  - *loop\n"
    with pytest.raises(ConfigError, match="YAML alias refers to a node that contains it") as info:
        parse_config_text(text, "loop.yaml")
    assert info.value.problems[0].line == 4  # the anchor


def test_deep_nesting_is_a_config_error() -> None:
    """Nesting deep enough to exhaust PyYAML's recursion is a ConfigError, not a crash."""
    text = "agents: " + "[" * 2000 + "]" * 2000 + "\n"
    with pytest.raises(ConfigError, match="nested too deeply"):
        parse_config_text(text, "deep.yaml")


def test_self_analysis_anchor_config_loads() -> None:
    """configs/meta/self_analysis.yaml shares one system message through `&analyst` / `*analyst`."""
    config, _ = load_config(CONFIGS_DIR / "meta" / "self_analysis.yaml")
    a, b = config.agents
    assert a.system_message
    assert a.system_message == b.system_message
    assert a.system_message.startswith("You analyse the massgen-sandbox project")


def test_errors_in_anchored_config_have_correct_lines() -> None:
    """With a shared backend, each error names its own key and a line: the anchor's for the original,
    the alias's for the reuse, and lines after the alias are unaffected."""
    text = (
        "agents:\n"  # 1
        "  - id: a\n"  # 2
        "    backend: &be\n"  # 3
        "      type: scripted\n"  # 4
        "      bogus: 1\n"  # 5
        "  - id: b\n"  # 6
        "    backend: *be\n"  # 7
        "  - id: c\n"  # 8
        "    backend:\n"  # 9
        "      type: scripted\n"  # 10
        "      other: 2\n"  # 11
    )
    with pytest.raises(ConfigError) as info:
        parse_config_text(text, "x.yaml")
    found = [(p.key, p.line, p.message) for p in info.value.problems]
    assert found == [
        ("agents.0.backend.bogus", 5, "unknown key"),
        ("agents.1.backend.bogus", 7, "unknown key"),
        ("agents.2.backend.other", 11, "unknown key"),
    ]


def test_line_index_enters_each_node_once() -> None:
    """_line_index does not walk aliased subtrees again: the bomb's index stays as small as its text."""
    node = yaml.compose(_bomb(9), Loader=yaml.SafeLoader)
    assert node is not None
    start = time.monotonic()
    index = loader._line_index(node)
    assert time.monotonic() - start < 1.0
    assert len(index) < 200
    extra = ("agents", 0, "backend", "extra_body")
    assert index[extra + ("l0", 3)] == 7  # inside the anchor: indexed
    assert index[extra + ("l1",)] == 8  # a key holding aliases: its own line
    assert index[extra + ("l1", 3)] == 7  # an aliased item: PyYAML keeps only its anchor's line
    assert extra + ("l1", 3, 0) not in index  # not expanded below the alias

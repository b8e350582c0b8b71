"""Run config parsing: valid MassGen-style configs, one-line errors with key and line, round-trip."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent_image.protocol.config import Permission, RunConfig, SleepStep
from agent_image.protocol.loader import ConfigError, load_config, parse_config_text, read_config

CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


# --- valid configs ------------------------------------------------------------------------


def test_agents_list_parses(tmp_path: Path) -> None:
    """A two-agent `agents:` list with scripted steps validates and keeps config order."""
    path = _write(
        tmp_path,
        """
        agents:
          - id: agent_a
            system_message: You check arithmetic.
            backend:
              type: scripted
              steps:
                - shell: echo 4
                  save_as: sum
                - answer: "2 + 2 = {{sum}}"
                - vote: auto
                  reason: looks right
          - id: agent-b
            backend:
              type: openai
              model: gpt-4o-mini
              temperature: 0.2
        """,
    )
    config, raw = load_config(path)
    assert config.agent_ids == ["agent_a", "agent-b"]
    assert [type(s).__name__ for s in config.agents[0].backend.steps] == [
        "ShellStep",
        "AnswerStep",
        "VoteStep",
    ]
    assert config.needs_models() == {"openai"}
    assert raw["agents"][1]["backend"]["model"] == "gpt-4o-mini"


def test_single_agent_dict_and_massgen_keys_parse(tmp_path: Path) -> None:
    """MassGen's `agent:` dict and its orchestrator/timeout/ui keys are accepted."""
    path = _write(
        tmp_path,
        """
        agent:
          id: solo
          backend:
            type: gemini
            model: gemini-2.5-flash
        orchestrator:
          context_paths:
            - path: /data/in
              permission: read
            - path: /data/out
              permission: write
            - path: /data/default
          max_new_answers_per_agent: 2
          snapshot_storage: snapshots
          agent_temporary_workspace: temp_workspaces
        timeout_settings:
          orchestrator_timeout_seconds: 300
        ui:
          display_type: rich_terminal
          logging_enabled: true
        """,
    )
    loaded = read_config(path)
    config = loaded.config
    assert config.agent_ids == ["solo"]
    paths = config.orchestrator.context_paths
    assert [(p.path, p.permission) for p in paths] == [
        ("/data/in", Permission.READ),
        ("/data/out", Permission.WRITE),
        ("/data/default", Permission.READ),
    ]
    assert config.orchestrator.max_new_answers_per_agent == 2
    # MassGen's snapshot folders mean nothing here: translated away, each with a note saying so
    assert "snapshot_storage" not in loaded.data["orchestrator"]
    noted = {n.key: n.severity for n in loaded.notes}
    assert noted["orchestrator.snapshot_storage"] == "info"
    assert noted["orchestrator.agent_temporary_workspace"] == "info"  # peers read workspace snapshots
    assert config.orchestrator.share_workspaces is True
    assert noted["orchestrator.context_paths.1.permission"] == "info"  # a private copy, applied on exit 0
    assert config.timeout_settings.orchestrator_timeout_seconds == 300
    assert config.ui is not None and config.ui.display_type == "rich_terminal"


def test_sandbox_timeout_wins_when_shorter() -> None:
    """effective_timeout is the smaller of the orchestrator and sandbox deadlines."""
    base = {"agents": [{"id": "a", "backend": {"type": "scripted"}}]}
    config = RunConfig.model_validate(
        {**base, "timeout_settings": {"orchestrator_timeout_seconds": 300}, "sandbox": {"timeout_seconds": 60}}
    )
    assert config.effective_timeout() == 60
    assert RunConfig.model_validate(base).effective_timeout() == 1800


@pytest.mark.parametrize(
    ("value", "expected"), [("512m", 512 << 20), ("2g", 2 << 30), ("1GiB", 1 << 30), (1 << 30, 1 << 30)]
)
def test_memory_sizes(value: str | int, expected: int) -> None:
    """Sandbox memory accepts suffixed sizes and byte counts."""
    config = RunConfig.model_validate(
        {"agents": [{"id": "a", "backend": {"type": "scripted"}}], "sandbox": {"memory": value}}
    )
    assert config.sandbox.memory_bytes == expected


@pytest.mark.parametrize("path", sorted(CONFIGS_DIR.rglob("*.yaml")), ids=lambda p: p.name)
def test_bundled_example_configs_parse(path: Path) -> None:
    """Every config shipped under configs/ validates."""
    config, _ = load_config(path)
    assert config.agents


# --- bad configs ------------------------------------------------------------------------

_SCRIPTED = """agents:
  - id: a
    backend:
      type: scripted
"""

BAD_CONFIGS: list[tuple[str, str, str, int]] = [
    # (case id, yaml text, dotted key, line)
    (
        "yaml_syntax",
        """
        agents:
          - id: a
            backend: type: scripted
        """,
        "",
        3,
    ),
    (
        "yaml_tab",
        "agents:\n\t- id: a\n",
        "",
        2,
    ),
    ("not_a_mapping", "- id: a\n- id: b\n", "", 1),
    ("scalar_document", "just a string\n", "", 1),
    (
        "missing_agents",
        """
        orchestrator:
          max_new_answers_per_agent: 2
        """,
        "agents",
        1,
    ),
    (
        "empty_agents",
        """
        ui:
          display_type: rich_terminal
        agents: []
        """,
        "agents",
        3,
    ),
    (
        "agents_not_a_list",
        """
        # comment
        agents:
          id: a
        """,
        "agents",
        2,
    ),
    ("unknown_top_level_key", _SCRIPTED + "bogus: 1\n", "bogus", 5),
    (
        "unknown_backend_key",
        """
        agents:
          - id: a
            backend:
              type: scripted
              flavour: vanilla
        """,
        "agents.0.backend.flavour",
        5,
    ),
    (
        "bad_backend_type",
        """
        agents:
          - id: a
            backend:
              type: bard
        """,
        "agents.0.backend.type",
        4,
    ),
    (
        "openai_without_model",
        """
        agents:
          - id: a
            backend:
              type: scripted
          - id: b
            backend:
              type: openai
              temperature: 0.5
        """,
        "agents.1.backend",
        6,
    ),
    (
        "scripted_with_model",
        """
        agents:
          - id: a
            backend:
              type: scripted
              model: gpt-4o
        """,
        "agents.0.backend",
        3,
    ),
    (
        "openai_with_steps",
        """
        agents:
          - id: a
            backend:
              type: openai
              model: gpt-4o
              steps:
                - answer: hi
        """,
        "agents.0.backend",
        3,
    ),
    (
        "duplicate_agent_ids",
        """
        agents:
          - id: a
            backend:
              type: scripted
          - id: b
            backend:
              type: scripted
          - id: a
            backend:
              type: scripted
        """,
        "agents.2.id",
        8,
    ),
    (
        "bad_agent_id",
        """
        agents:
          - id: a
            backend:
              type: scripted
          - id: ../etc
            backend:
              type: scripted
        """,
        "agents.1.id",
        5,
    ),
    (
        "negative_timeout",
        _SCRIPTED + "timeout_settings:\n  orchestrator_timeout_seconds: -5\n",
        "timeout_settings.orchestrator_timeout_seconds",
        6,
    ),
    (
        "zero_agent_timeout",
        _SCRIPTED + "timeout_settings:\n  agent_timeout_seconds: 0\n",
        "timeout_settings.agent_timeout_seconds",
        6,
    ),
    (
        "unknown_step_kind",
        """
        agents:
          - id: a
            backend:
              type: scripted
              steps:
                - answer: hi
                - dance: now
        """,
        "agents.0.backend.steps.1",
        7,
    ),
    (
        "bad_shell_step_timeout",
        """
        agents:
          - id: a
            backend:
              type: scripted
              steps:
                - shell: ls
                  timeout: -1
        """,
        "agents.0.backend.steps.0.timeout",
        7,
    ),
    ("capitalised_unknown_key", _SCRIPTED + "Sandbox:\n  memory: 1g\n", "Sandbox", 5),
    ("unknown_nested_key", _SCRIPTED + "sandbox:\n  cpus: 2\n  Memory: 1g\n", "sandbox.Memory", 7),
    ("memory_wrong_type", _SCRIPTED + "sandbox:\n  memory: [1]\n", "sandbox.memory", 6),
    ("bad_memory_size", _SCRIPTED + "sandbox:\n  memory: lots\n", "sandbox.memory", 6),
    ("memory_too_small", _SCRIPTED + "sandbox:\n  memory: 1m\n", "sandbox.memory", 6),
    ("network_not_none", _SCRIPTED + "sandbox:\n  cpus: 2\n  network: bridge\n", "sandbox.network", 7),
    (
        "bad_permission",
        """
        orchestrator:
          context_paths:
            - path: /tmp
              permission: execute
        agents:
          - id: a
            backend:
              type: scripted
        """,
        "orchestrator.context_paths.0.permission",
        4,
    ),
    (
        "single_agent_alias_error",
        """
        agent:
          id: a
          backend:
            type: scripted
            model: x
        """,
        "agent.backend",
        3,
    ),
]


@pytest.mark.parametrize(("text", "key", "line"), [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_names_file_key_and_line(tmp_path: Path, text: str, key: str, line: int) -> None:
    """Each bad config raises ConfigError: one line naming the file, the dotted key and the line."""
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    err = info.value
    message = str(err)
    assert "\n" not in message
    assert err.reason == "config_invalid"
    headline = err.problems[0]
    assert (headline.file, headline.key, headline.line) == (str(path), key, line)
    prefix = f"{path}:{line}: key={key} " if key else f"{path}:{line}: "
    assert message.startswith(prefix), message


def test_unknown_step_kind_is_a_single_problem() -> None:
    """An unknown step kind is reported once, not once per possible step type."""
    text = "agents:\n  - id: a\n    backend:\n      type: scripted\n      steps:\n        - dance: now\n"
    with pytest.raises(ConfigError) as info:
        parse_config_text(text, "x.yaml")
    assert len(info.value.problems) == 1
    assert "(+" not in str(info.value)


def test_unknown_key_with_newline_stays_one_line() -> None:
    """A key containing a newline cannot split the error message over two lines."""
    text = 'agents:\n  - id: a\n    backend:\n      type: scripted\n"bad\\nkey": 1\n'
    with pytest.raises(ConfigError) as info:
        parse_config_text(text, "x.yaml")
    assert "\n" not in str(info.value)
    assert info.value.problems[0].line == 5


def test_missing_file_reason_config_missing(tmp_path: Path) -> None:
    """load_config on a path that does not exist gives reason config_missing."""
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.reason == "config_missing"
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_directory_instead_of_file_is_config_missing(tmp_path: Path) -> None:
    """A directory where the config should be cannot be read: reason config_missing."""
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert info.value.reason == "config_missing"


def test_oversized_file_is_refused(tmp_path: Path) -> None:
    """A config over 1 MiB is refused before it is parsed."""
    path = tmp_path / "big.yaml"
    path.write_text("# " + "x" * (1 << 20) + "\n" + _SCRIPTED)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "1 MiB" in str(info.value)


# --- round-trip ---------------------------------------------------------------------------

_ids = st.from_regex(r"\A[A-Za-z][A-Za-z0-9_-]{0,39}\Z")
_text = st.text(max_size=40)
_secs = st.floats(min_value=0.001, max_value=86400, allow_nan=False, allow_infinity=False)

_steps = st.one_of(
    st.builds(
        lambda cmd, t, save: {"shell": cmd, "timeout": t} | ({"save_as": save} if save else {}),
        _text,
        st.floats(min_value=0.001, max_value=3600),
        st.none() | _ids,
    ),
    st.builds(lambda p, c: {"write_file": p, "content": c}, _text, _text),
    st.builds(lambda p: {"read_file": p}, _text),
    st.builds(lambda s: {"sleep": s}, st.floats(min_value=0, max_value=86400)),
    st.builds(lambda a: {"answer": a}, _text),
    st.builds(lambda v, r: {"vote": v, "reason": r}, st.sampled_from(["auto", "agent1", "a"]), _text),
    st.builds(
        lambda calls, text: {"raw_tool_calls": calls, "text": text},
        st.lists(
            st.fixed_dictionaries({"name": _text, "arguments": st.dictionaries(_ids, _text, max_size=2)}), max_size=2
        ),
        _text,
    ),
)


@st.composite
def run_config_dicts(draw: st.DrawFn) -> dict[str, Any]:
    ids = draw(st.lists(_ids, min_size=1, max_size=4, unique=True))
    agents = []
    for agent_id in ids:
        backend: dict[str, Any] = {"type": "scripted", "steps": draw(st.lists(_steps, max_size=5))}
        if draw(st.booleans()):
            backend["final"] = draw(_text)
        agent: dict[str, Any] = {"id": agent_id, "backend": backend}
        if draw(st.booleans()):
            agent["system_message"] = draw(_text)
        agents.append(agent)
    data: dict[str, Any] = {"agents": agents}
    if len(agents) == 1 and draw(st.booleans()):
        data = {"agent": agents[0]}
    data["timeout_settings"] = {
        "orchestrator_timeout_seconds": draw(_secs),
        "agent_timeout_seconds": draw(_secs),
    }
    data["sandbox"] = {
        "runtime": draw(st.sampled_from(["runc", "runsc"])),
        "memory": draw(
            st.one_of(
                st.integers(min_value=32 << 20, max_value=1 << 40),
                st.builds(lambda n, u: f"{n}{u}", st.integers(1, 64), st.sampled_from(["g", "G", "gib", "GB"])),
                st.builds(lambda n: f"{n}m", st.integers(32, 100_000)),
            )
        ),
        "cpus": draw(st.floats(min_value=0.01, max_value=64)),
        "pids": draw(st.integers(16, 65536)),
        "timeout_seconds": draw(st.none() | _secs),
        "stop_grace_seconds": draw(st.floats(min_value=0, max_value=120)),
        "max_depth": draw(st.integers(0, 8)),
        "max_children": draw(st.integers(0, 64)),
    }
    if draw(st.booleans()):
        data["orchestrator"] = {
            "max_new_answers_per_agent": draw(st.none() | st.integers(1, 10)),
            "context_paths": draw(
                st.lists(
                    st.fixed_dictionaries({"path": _text, "permission": st.sampled_from(["read", "write"])}), max_size=3
                )
            ),
        }
    return data


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(run_config_dicts())
def test_config_round_trips_through_yaml(data: dict[str, Any]) -> None:
    """A RunConfig-shaped dict dumped with yaml.safe_dump parses back to the same model, twice."""
    expected = RunConfig.model_validate(data)
    parsed, raw = parse_config_text(yaml.safe_dump(data, sort_keys=False), "gen.yaml")
    assert parsed == expected
    assert raw == data
    again, _ = parse_config_text(yaml.safe_dump(parsed.model_dump(mode="json")), "gen.yaml")
    assert again == parsed


def test_sleep_step_keeps_its_type_after_round_trip() -> None:
    """A dumped and re-parsed sleep step is still a SleepStep (the step union picks by key)."""
    config = RunConfig.model_validate({"agent": {"id": "a", "backend": {"type": "scripted", "steps": [{"sleep": 1}]}}})
    again, _ = parse_config_text(yaml.safe_dump(config.model_dump(mode="json")))
    assert isinstance(again.agents[0].backend.steps[0], SleepStep)


_yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 10**6) | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(run_config_dicts(), st.data())
def test_mutated_config_fails_only_with_one_line_config_error(data: dict[str, Any], draw: st.DataObject) -> None:
    """Replacing any value of a valid config with junk either validates or gives a located one-line ConfigError."""
    node: Any = data
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        if not keys:
            break
        key = draw.draw(st.sampled_from(keys))
        if isinstance(node[key], dict | list) and node[key] and draw.draw(st.booleans()):
            node = node[key]
            continue
        node[key] = draw.draw(_yaml_values)
        break
    try:
        parse_config_text(yaml.safe_dump(data), "m.yaml")
    except ConfigError as exc:
        assert "\n" not in str(exc)
        assert exc.problems[0].line is not None


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_text_raises_only_config_error(text: str) -> None:
    """Any text either parses or raises ConfigError with a one-line message."""
    try:
        parse_config_text(text, "t.yaml")
    except ConfigError as exc:
        assert "\n" not in str(exc)

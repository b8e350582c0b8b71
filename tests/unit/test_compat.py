"""MassGen config keys, table-driven: each is mapped, warned and ignored, or refused naming the way forward."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from agent_image.protocol import compat
from agent_image.protocol.loader import ConfigError, LoadedConfig, parse_config


def _config(
    backend: dict[str, Any] | None = None,
    *,
    btype: str = "openai",
    agent: dict[str, Any] | None = None,
    orchestrator: dict[str, Any] | None = None,
    timeouts: dict[str, Any] | None = None,
    top: dict[str, Any] | None = None,
) -> str:
    model = {"openai": "gpt-5-mini", "gemini": "gemini-2.5-flash"}.get(btype, "some-model")
    doc: dict[str, Any] = {
        "agents": [{"id": "agent_a", "backend": {"type": btype, "model": model, **(backend or {})}, **(agent or {})}]
    }
    if orchestrator is not None:
        doc["orchestrator"] = orchestrator
    if timeouts is not None:
        doc["timeout_settings"] = timeouts
    doc.update(top or {})
    return yaml.safe_dump(doc, sort_keys=False)


B = "agents.0.backend."

# (case id, config text, key, severity, fragment of the message)
MAPPED = [
    ("cwd", _config({"cwd": "workspace1"}), B + "cwd", "info", "own per-run folder"),
    ("mcp_command_line_true", _config({"enable_mcp_command_line": True}), None, None, None),
    (
        "mcp_command_line_false",
        _config({"enable_mcp_command_line": False}),
        B + "enable_mcp_command_line",
        "warning",
        "always there",
    ),
    ("execution_mode_docker", _config({"command_line_execution_mode": "docker"}), None, None, None),
    (
        "execution_mode_local",
        _config({"command_line_execution_mode": "local"}),
        B + "command_line_execution_mode",
        "warning",
        "--sandbox none",
    ),
    ("network_none", _config({"command_line_docker_network_mode": "none"}), None, None, None),
    (
        "memory_limit",
        _config({"command_line_docker_memory_limit": "2g"}),
        B + "command_line_docker_memory_limit",
        "warning",
        "sandbox.memory=2048m",
    ),
    (
        "cpu_limit",
        _config({"command_line_docker_cpu_limit": 2}),
        B + "command_line_docker_cpu_limit",
        "warning",
        "sandbox.cpus=2",
    ),
    (
        "allowed_commands",
        _config({"command_line_allowed_commands": ["^ls"]}),
        B + "command_line_allowed_commands",
        "info",
        "enforced by the shell tool",
    ),
    (
        "blocked_commands",
        _config({"command_line_blocked_commands": ["^rm"]}),
        B + "command_line_blocked_commands",
        "info",
        "enforced by the shell tool",
    ),
    ("text_verbosity", _config({"text": {"verbosity": "medium"}}), B + "text.verbosity", "info", "verbosity"),
    ("reasoning_effort", _config({"reasoning": {"effort": "low"}}), B + "reasoning.effort", "info", "reasoning_effort"),
    ("top_p", _config({"top_p": 0.7}), None, None, None),
    ("top_k_gemini", _config({"top_k": 40}, btype="gemini"), None, None, None),
    ("top_k_openai", _config({"top_k": 50}), B + "top_k", "warning", "extra_body.top_k"),
    ("extra_body", _config({"extra_body": {"search_parameters": {"mode": "auto"}}}), None, None, None),
    (
        "chat_template_kwargs",
        _config({"chat_template_kwargs": {"enable_thinking": True}}),
        B + "chat_template_kwargs",
        "info",
        "extra_body",
    ),
    ("dotted_id", _config(agent={"id": "gemini2.5flash"}), None, None, None),
    (
        "protected_paths",
        _config(orchestrator={"context_paths": [{"path": "/tmp", "protected_paths": ["x"]}]}),
        "orchestrator.context_paths.0.protected_paths",
        "info",
        "read-only",
    ),
    (
        "task_planning",
        _config(orchestrator={"coordination": {"enable_agent_task_planning": True}}),
        "orchestrator.coordination.enable_agent_task_planning",
        "info",
        "`todo` tool",
    ),
    (
        "initial_round_timeout",
        _config(timeouts={"initial_round_timeout_seconds": 300}),
        "timeout_settings.initial_round_timeout_seconds",
        "warning",
        "agent_timeout_seconds=300",
    ),
    (
        "subsequent_round_timeout",
        _config(timeouts={"subsequent_round_timeout_seconds": 200}),
        "timeout_settings.subsequent_round_timeout_seconds",
        "warning",
        "agent_timeout_seconds=200",
    ),
    (
        "round_grace",
        _config(timeouts={"round_timeout_grace_seconds": 30}),
        "timeout_settings.round_timeout_grace_seconds",
        "warning",
        "no grace",
    ),
    (
        "voting_sensitivity",
        _config(orchestrator={"voting_sensitivity": "lenient"}),
        "orchestrator.voting_sensitivity",
        "info",
        "voting prompt",
    ),
    (
        "orchestrator_timeout_section",
        _config(orchestrator={"timeout": {"orchestrator_timeout_seconds": 60}}),
        "orchestrator.timeout",
        "info",
        "timeout_settings",
    ),
    ("web_search_gemini", _config({"enable_web_search": True}, btype="gemini"), None, None, None),
    (
        "agent_temporary_workspace",
        _config(orchestrator={"agent_temporary_workspace": "temp"}),
        "orchestrator.agent_temporary_workspace",
        "info",
        "snapshots of each other's workspaces",
    ),
    (
        "write_context_path",
        _config(orchestrator={"context_paths": [{"path": "/tmp", "permission": "write"}]}),
        "orchestrator.context_paths.0.permission",
        "info",
        "applied to the host path when the run exits 0",
    ),
    (
        "chatcompletion",
        _config({"base_url": "https://api.cerebras.ai/v1"}, btype="chatcompletion"),
        B + "type",
        "info",
        "CEREBRAS_API_KEY",
    ),
    ("grok", _config(btype="grok"), B + "type", "info", "XAI_API_KEY"),
    ("zai", _config(btype="zai"), B + "type", "info", "ZAI_API_KEY"),
    ("openrouter", _config(btype="openrouter"), B + "type", "info", "OPENROUTER_API_KEY"),
    ("vllm", _config(btype="vllm"), B + "type", "info", "no key is sent"),
    ("sglang", _config(btype="sglang"), B + "type", "info", "no key is sent"),
]

WARNED = [
    ("ui_type", _config(top={"ui": {"type": "rich_terminal"}}), "ui.type", "ui.display_type"),
    ("display", _config(top={"display": {"type": "rich_terminal"}}), "display", "ignored"),
    (
        "reasoning_summary",
        _config({"reasoning": {"effort": "low", "summary": "auto"}}),
        B + "reasoning.summary",
        "Responses API",
    ),
    (
        "debug_final_answer",
        _config(orchestrator={"debug_final_answer": "x"}),
        "orchestrator.debug_final_answer",
        "ignored",
    ),
    (
        "skip_coordination_rounds",
        _config(orchestrator={"skip_coordination_rounds": True}),
        "orchestrator.skip_coordination_rounds",
        "ignored",
    ),
    ("dspy", _config(orchestrator={"dspy": {"enabled": True}}), "orchestrator.dspy", "ignored"),
    (
        "answer_novelty_requirement",
        _config(orchestrator={"answer_novelty_requirement": "balanced"}),
        "orchestrator.answer_novelty_requirement",
        "ignored",
    ),
    ("code_interpreter", _config({"enable_code_interpreter": True}), B + "enable_code_interpreter", "`shell` tool"),
    (
        "code_execution",
        _config({"enable_code_execution": True}, btype="gemini"),
        B + "enable_code_execution",
        "`shell` tool",
    ),
    ("web_search_openai", _config({"enable_web_search": True}), B + "enable_web_search", "only gemini"),
    ("memory_disabled", _config(top={"memory": {"enabled": False}}), "memory", "ignored"),
    (
        "append_system_prompt",
        _config(agent={"append_system_prompt": "x"}),
        "agents.0.append_system_prompt",
        "system_message",
    ),
    ("betas", _config({"betas": ["x"]}), B + "betas", "ignored"),
    *[
        (
            f"coordination_{k}",
            _config(orchestrator={"coordination": {k: True}}),
            f"orchestrator.coordination.{k}",
            "ignored",
        )
        for k in (
            "enable_planning_mode",
            "planning_mode_instruction",
            "max_orchestration_restarts",
            "use_skills",
            "skills_directory",
            "enable_memory_filesystem_mode",
            "task_planning_filesystem_mode",
            "max_tasks_per_plan",
        )
    ],
    (
        "enable_subagents",
        _config(orchestrator={"coordination": {"enable_subagents": True}}),
        "orchestrator.coordination.enable_subagents",
        "massgen-run --automation",
    ),
]

REFUSED = [
    (
        "sudo",
        _config({"command_line_docker_enable_sudo": True}),
        B + "command_line_docker_enable_sudo",
        "sandbox.image",
    ),
    (
        "credentials",
        _config({"command_line_docker_credentials": {"mount": ["ssh"]}}),
        B + "command_line_docker_credentials",
        "gateway",
    ),
    (
        "packages",
        _config({"command_line_docker_packages": {"preinstall": {"python": ["x"]}}}),
        B + "command_line_docker_packages",
        "sandbox.image",
    ),
    (
        "bridge",
        _config({"command_line_docker_network_mode": "bridge"}),
        B + "command_line_docker_network_mode",
        "gateway",
    ),
    (
        "host_network",
        _config({"command_line_docker_network_mode": "host"}),
        B + "command_line_docker_network_mode",
        "sandbox.image",
    ),
    (
        "runtime_image",
        _config({"command_line_docker_image": "massgen/mcp-runtime:latest"}),
        B + "command_line_docker_image",
        "FROM the agent image",
    ),
    ("claude_code", _config(btype="claude_code"), B + "type", "type: openai"),
    ("codex", _config(btype="codex"), B + "type", "type: openai"),
    ("gemini_cli", _config(btype="gemini_cli"), B + "type", "type: openai"),
    ("copilot", _config(btype="copilot"), B + "type", "type: openai"),
    ("ag2", _config({"agent_config": {"type": "assistant"}}, btype="ag2"), B + "type", "type: openai"),
    ("azure_openai", _config(btype="azure_openai"), B + "type", "type: openai"),
    ("memory_enabled", _config(top={"memory": {"enabled": True}}), "memory", "context_paths"),
    ("upload_files", _config({"upload_files": [{"image_path": "x.jpg"}]}), B + "upload_files", "context_paths"),
    ("image_generation", _config({"enable_image_generation": True}), B + "enable_image_generation", "sandbox.image"),
    ("audio_generation", _config({"enable_audio_generation": True}), B + "enable_audio_generation", "sandbox.image"),
    ("video_generation", _config({"enable_video_generation": True}), B + "enable_video_generation", "sandbox.image"),
    ("file_generation", _config({"enable_file_generation": True}), B + "enable_file_generation", "shell"),
    ("api_key", _config({"api_key": "${OPENAI_API_KEY}"}), B + "api_key", "gateway"),
    ("chatcompletion_without_base_url", _config(btype="chatcompletion"), B + "base_url", "base_url"),
]


def _parse(text: str) -> LoadedConfig:
    return parse_config(text, "c.yaml")


@pytest.mark.parametrize(("case", "text", "key", "severity", "fragment"), MAPPED, ids=[m[0] for m in MAPPED])
def test_mapped_keys_run(case: str, text: str, key: str | None, severity: str | None, fragment: str | None) -> None:
    """Keys with an equivalent load without errors; a note says what they became (or nothing, when exact)."""
    loaded = _parse(text)
    notes = {n.key: n for n in loaded.notes}
    if key is None:
        assert not [n for n in loaded.notes if n.severity == "warning"], loaded.notes
    else:
        assert key in notes, (case, loaded.notes)
        assert notes[key].severity == severity
        assert fragment is not None and fragment in notes[key].message


@pytest.mark.parametrize(("case", "text", "key", "fragment"), WARNED, ids=[w[0] for w in WARNED])
def test_warned_keys_run_with_a_warning(case: str, text: str, key: str, fragment: str) -> None:
    """Cosmetic or dead keys load, and a warning names the key and says what happens instead."""
    loaded = _parse(text)
    warnings = {n.key: n for n in loaded.notes if n.severity == "warning"}
    assert key in warnings, (case, loaded.notes)
    assert fragment in warnings[key].message
    assert warnings[key].line is not None


@pytest.mark.parametrize(("case", "text", "key", "alternative"), REFUSED, ids=[r[0] for r in REFUSED])
def test_refused_keys_name_the_alternative(case: str, text: str, key: str, alternative: str) -> None:
    """Keys that would silently change behaviour are errors whose one line names the key and the way forward."""
    with pytest.raises(ConfigError) as info:
        _parse(text)
    first = info.value.problems[0]
    assert first.key == key, (case, info.value.problems)
    assert first.severity == "error"
    assert alternative in first.message
    assert "\n" not in str(first)
    assert str(info.value).startswith("c.yaml:")


def test_every_refusal_in_the_tables_is_covered() -> None:
    """Every backend key and type compat refuses has a row above (the tables cannot drift from the test)."""
    refused_keys = {r[2].removeprefix(B) for r in REFUSED}
    for k in compat._BACKEND_REFUSED:
        if k in ("agent_config", "group_config"):
            continue  # refused with their ag2 type, whose row is above
        assert k in refused_keys, k
    refused_types = {r[0] for r in REFUSED}
    for t in compat.REFUSED_TYPES:
        assert t in refused_types, t
    warned = {w[2].removeprefix(B) for w in WARNED}
    for k in ("enable_code_interpreter", "enable_code_execution", "betas"):
        assert k in warned


def test_mapped_values_reach_the_schema() -> None:
    """The translated document carries the mapped values, in this project's own keys."""
    text = _config(
        {
            "cwd": "ws",
            "text": {"verbosity": "high"},
            "reasoning": {"effort": "low", "summary": "auto"},
            "top_p": 0.5,
            "chat_template_kwargs": {"enable_thinking": True},
            "command_line_docker_memory_limit": "1g",
            "command_line_docker_cpu_limit": 1.5,
            "command_line_blocked_commands": ["^rm "],
        },
        timeouts={"initial_round_timeout_seconds": 120},
        orchestrator={"voting_sensitivity": "strict"},
    )
    loaded = _parse(text)
    b = loaded.config.agents[0].backend
    assert (b.verbosity, b.reasoning_effort, b.top_p) == ("high", "low", 0.5)
    assert b.extra_body == {"chat_template_kwargs": {"enable_thinking": True}}
    assert b.command_line_blocked_commands == ["^rm "]
    assert loaded.config.sandbox.memory_bytes == 1 << 30
    assert loaded.config.sandbox.cpus == 1.5
    assert loaded.config.timeout_settings.agent_timeout_seconds == 120
    assert loaded.config.orchestrator.voting_sensitivity == "strict"
    assert "cwd" not in loaded.data["agents"][0]["backend"]


def test_limits_of_several_agents_add_up_and_an_explicit_sandbox_wins() -> None:
    """Per-agent container limits become one per-run limit (the sum); sandbox.* when given wins, with a warning."""
    doc: dict[str, Any] = {
        "agents": [
            {"id": f"a{i}", "backend": {"type": "openai", "model": "m", "command_line_docker_memory_limit": "512m"}}
            for i in range(3)
        ]
    }
    loaded = _parse(yaml.safe_dump(doc))
    assert loaded.config.sandbox.memory_bytes == 3 * 512 << 20
    doc["sandbox"] = {"memory": "2g"}
    loaded = _parse(yaml.safe_dump(doc))
    assert loaded.config.sandbox.memory_bytes == 2 << 30
    assert any("sandbox.memory is set" in n.message for n in loaded.warnings)


def test_unknown_keys_stay_errors_with_did_you_mean() -> None:
    """A typo is an error, with the closest known key (ours or MassGen's) suggested."""
    cases = [
        (_config({"temprature": 0.5}), B + "temprature", "'temperature'"),
        (_config({"enable_mcp_comand_line": True}), B + "enable_mcp_comand_line", "'enable_mcp_command_line'"),
        (
            _config(orchestrator={"max_new_answer_per_agent": 2}),
            "orchestrator.max_new_answer_per_agent",
            "'max_new_answers_per_agent'",
        ),
        (_config(top={"timeout_setings": {}}), "timeout_setings", "'timeout_settings'"),
        (
            _config(orchestrator={"coordination": {"enable_planing_mode": True}}),
            "orchestrator.coordination.enable_planing_mode",
            "'enable_planning_mode'",
        ),
    ]
    for text, key, suggestion in cases:
        with pytest.raises(ConfigError) as info:
            _parse(text)
        p = info.value.problems[0]
        assert (p.key, p.severity) == (key, "error"), info.value.problems
        assert p.message.startswith("unknown key") and suggestion in p.message
    with pytest.raises(ConfigError) as info:
        _parse(_config({"zzzz": 1}))
    assert info.value.problems[0].message == "unknown key"


def test_refusal_lists_every_error_and_keeps_the_warnings() -> None:
    """A config with several problems lists them all, refusals first; its warnings ride along for `validate`."""
    text = _config(
        {"command_line_docker_enable_sudo": True, "bogus": 1, "command_line_execution_mode": "local"},
        top={"memory": {"enabled": True}},
    )
    with pytest.raises(ConfigError) as info:
        _parse(text)
    keys = [p.key for p in info.value.problems]
    assert keys[:2] == ["memory", B + "command_line_docker_enable_sudo"]
    assert B + "bogus" in keys
    assert [n.key for n in info.value.notes if n.severity == "warning"] == [B + "command_line_execution_mode"]


def test_translation_is_idempotent() -> None:
    """The translated document (config.yaml, the engine's spec) loads again to the same config with no notes."""
    text = _config({"cwd": "x", "text": {"verbosity": "low"}, "command_line_docker_cpu_limit": 2})
    first = _parse(text)
    second = _parse(yaml.safe_dump(first.data))
    assert second.config == first.config
    assert second.notes == ()


def test_openai_compatible_aliases_become_openai_with_their_upstream() -> None:
    """grok, lmstudio, chatcompletion...: the OpenAI-compatible backend, MassGen's default base_url, the alias kept."""
    cases = {
        "grok": "https://api.x.ai/v1",
        "lmstudio": "http://localhost:1234/v1",
        "vllm": "http://localhost:8000/v1",
        "sglang": "http://localhost:30000/v1",
        "zai": "https://api.z.ai/api/paas/v4/",
        "openrouter": "https://openrouter.ai/api/v1",
    }
    for alias, url in cases.items():
        b = _parse(_config(btype=alias)).config.agents[0].backend
        assert (b.type, b.provider, b.base_url) == ("openai", alias, url)
    lm = _parse(_config(btype="lmstudio"))
    assert any("LM Studio is not started" in n.message for n in lm.warnings)
    own = _parse(_config({"base_url": "http://gpu-box:9000/v1"}, btype="chatcompletion")).config.agents[0].backend
    assert own.base_url == "http://gpu-box:9000/v1"


def test_agents_of_one_kind_may_use_different_upstreams() -> None:
    """OpenAI-compatible agents route per agent (no more one base_url per provider); Gemini keeps one."""
    doc = {
        "agents": [
            {"id": "a", "backend": {"type": "chatcompletion", "model": "m", "base_url": "https://api.cerebras.ai/v1"}},
            {"id": "b", "backend": {"type": "grok", "model": "grok-4"}},
            {"id": "c", "backend": {"type": "openai", "model": "gpt-5"}},
        ]
    }
    assert len(_parse(yaml.safe_dump(doc)).config.agents) == 3
    gem = {
        "agents": [
            {"id": "a", "backend": {"type": "gemini", "model": "m", "base_url": "http://x"}},
            {"id": "b", "backend": {"type": "gemini", "model": "m", "base_url": "http://y"}},
        ]
    }
    with pytest.raises(ConfigError, match="same base_url"):
        _parse(yaml.safe_dump(gem))


def test_key_follows_the_upstream_host() -> None:
    """MassGen's table: the host picks the variable; `type: openai` elsewhere keeps OPENAI_API_KEY; local aliases none."""
    from agent_image.protocol.providers import key_from_env, key_vars

    assert key_vars("chatcompletion", "https://api.cerebras.ai/v1") == ("CEREBRAS_API_KEY",)
    assert key_vars("openai", "https://api.together.xyz/v1") == ("TOGETHER_API_KEY",)
    assert key_vars("chatcompletion", "https://api.fireworks.ai/inference/v1") == ("FIREWORKS_API_KEY",)
    assert key_vars("chatcompletion", "https://api.groq.com/openai/v1") == ("GROQ_API_KEY",)
    assert key_vars("chatcompletion", "https://api.studio.nebius.com/v1") == ("NEBIUS_API_KEY",)
    assert key_vars("chatcompletion", "https://api.moonshot.ai/v1") == ("MOONSHOT_API_KEY", "KIMI_API_KEY")
    assert key_vars("chatcompletion", "https://dashscope.aliyuncs.com/compatible-mode/v1")[0] == "QWEN_API_KEY"
    assert key_vars("grok", "https://api.x.ai/v1") == ("XAI_API_KEY",)
    assert key_vars(None, None) == ("OPENAI_API_KEY",)
    assert key_vars("openai", "http://127.0.0.1:9/v1") == ("OPENAI_API_KEY",)  # as before: the user pointed it there
    assert key_vars("lmstudio", "http://localhost:1234/v1") == ()
    assert key_vars("chatcompletion", "https://unknown.example/v1") == ()
    assert key_vars("chatcompletion", "https://evil-cerebras.ai.example/v1") == ()  # a suffix, not a substring
    env = {"MOONSHOT_API_KEY": "", "KIMI_API_KEY": "k2"}
    assert key_from_env("chatcompletion", "https://api.moonshot.cn/v1", env) == "k2"

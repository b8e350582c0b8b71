"""MassGen config keys: mapped to ours, warned and ignored, or refused with the way forward.

`translate` runs on the parsed YAML before the strict schema sees it. It returns the config in
this project's own terms (what `config.yaml` records and the engine runs) and one note per
MassGen key it handled:

- ``info``: mapped to an exact equivalent (recorded in massgen.log; never fatal);
- ``warning``: accepted, but the behaviour differs or the key does nothing here (fatal with
  ``--strict``);
- ``error``: refused, because running without it would silently change what the run does;
  the message names the alternative in this project.

Keys neither here nor in the schema stay errors ("unknown key", with a did-you-mean). The
tables below are the reference; docs/massgen-compat.md explains them for users.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from .providers import ALIASES, key_vars

Severity = Literal["error", "warning", "info"]
Loc = tuple[Any, ...]

# -- the ways forward, named once -------------------------------------------------------------

ALT_IMAGE = "preinstall what the agents need in `sandbox.image`, an image built FROM the agent image"
ALT_KEYS = "model keys stay on the host: the supervisor's gateway adds them from the host environment"
ALT_FILES = "put files in `orchestrator.context_paths` (mounted read-only) and read them with the shell"
ALT_SHELL = "every agent has a real sandboxed `shell` tool; run programs from it"
ALT_NESTED = 'nested runs work through the shell: `massgen-run --automation --config ... "Q"`'
ALT_BACKENDS = (
    "use `type: openai`, `gemini` or `claude` (any OpenAI-compatible server: `type: chatcompletion` with `base_url`)"
)
ALT_CONTEXT = "use `orchestrator.context_paths` for files the agents should see"

# backend.type values refused outright, with the reason and the way forward.
REFUSED_TYPES: dict[str, str] = {
    "claude_code": "CLI-agent backends run on the host with their own tools and cannot run in the sandbox",
    "codex": "CLI-agent backends run on the host with their own tools and cannot run in the sandbox",
    "gemini_cli": "CLI-agent backends run on the host with their own tools and cannot run in the sandbox",
    "copilot": "CLI-agent backends run on the host with their own tools and cannot run in the sandbox",
    "ag2": "AG2/AutoGen agents are a different runtime",
    "azure_openai": "Azure deployments use a different auth and URL scheme the gateway does not speak",
}


@dataclass(frozen=True)
class Note:
    """One MassGen key handled by `translate`; `loc` is the key's path as the user wrote it."""

    loc: Loc
    severity: Severity
    message: str

    @property
    def key(self) -> str:
        return ".".join(str(p) for p in self.loc)


@dataclass
class Translation:
    data: dict[str, Any]
    notes: list[Note] = field(default_factory=list)

    def add(self, loc: Loc, severity: Severity, message: str) -> None:
        self.notes.append(Note(tuple(loc), severity, message))


# -- top level and orchestrator ---------------------------------------------------------------

_ORCH_WARN = {
    "answer_novelty_requirement": "ignored: there is no novelty gate; every valid new answer counts",
    "debug_final_answer": "ignored: a debug override of the final answer; the winner writes it",
    "skip_coordination_rounds": "ignored: a debug switch; coordination always runs",
    "dspy": "ignored: there is no DSPy question paraphrasing",
    "session_storage": "ignored: there are no interactive sessions; every run has its own log dir",
    "snapshot_storage": "ignored: snapshots are per run, under the run's log dir",
}

# coordination sub-keys: (severity, message). Anything else under coordination is unknown.
_COORDINATION: dict[str, tuple[Severity, str]] = {
    "enable_agent_task_planning": ("info", "every agent always has the `todo` tool"),
    "max_tasks_per_plan": ("warning", "ignored: the todo list has no per-plan cap"),
    "task_planning_filesystem_mode": ("warning", "ignored: the todo list lives in the engine, not in files"),
    "enable_planning_mode": ("warning", "ignored: there is no planning mode; agents use their tools while they work"),
    "planning_mode_instruction": ("warning", "ignored: there is no planning mode"),
    "max_orchestration_restarts": ("warning", "ignored: runs do not restart; a failed agent is failed"),
    "use_skills": ("warning", f"ignored: there are no skills; {ALT_CONTEXT}"),
    "skills_directory": ("warning", f"ignored: there are no skills; {ALT_CONTEXT}"),
    "massgen_skills": ("warning", f"ignored: there are no skills; {ALT_CONTEXT}"),
    "load_previous_session_skills": ("warning", "ignored: there are no skills"),
    "enable_memory_filesystem_mode": ("warning", "ignored: there is no memory filesystem"),
    "enable_subagents": ("warning", f"ignored: there are no subagents; {ALT_NESTED}"),
    "subagent_default_timeout": ("warning", f"ignored: {ALT_NESTED}"),
    "subagent_max_concurrent": ("warning", f"ignored: {ALT_NESTED} (limits: `sandbox.max_children`)"),
    "subagent_orchestrator": ("warning", f"ignored: {ALT_NESTED}"),
    "write_mode": ("warning", "ignored: agents write only their own workspace"),
    "enable_persona_generator": ("warning", "ignored: there are no generated personas; use `system_message`"),
    "persona_generator": ("warning", "ignored: there are no generated personas; use `system_message`"),
    "broadcast": ("warning", "ignored: agents talk only through answers and votes"),
    "enable_broadcast": ("warning", "ignored: agents talk only through answers and votes"),
}

_VOTING_SENSITIVITY = ("lenient", "balanced", "strict")

# timeout_settings keys that map to the nearest real limit.
_ROUND_TIMEOUTS = ("initial_round_timeout_seconds", "subsequent_round_timeout_seconds", "round_timeout_grace_seconds")

# -- backend keys -----------------------------------------------------------------------------

_BACKEND_REFUSED: dict[str, str] = {
    "command_line_docker_enable_sudo": f"the sandbox is never root; {ALT_IMAGE}",
    "command_line_docker_credentials": "secrets never enter the sandbox; " + ALT_KEYS,
    "command_line_docker_packages": f"the sandbox has no network to install from; {ALT_IMAGE}",
    "command_line_docker_image": "a MassGen runtime image cannot run this engine; use `sandbox.image`, "
    "built FROM the agent image",
    "upload_files": f"there are no provider uploads; {ALT_FILES}",
    "enable_image_generation": "provider-hosted generation tools are not supported; generate files with a "
    "program from the shell (preinstalled in `sandbox.image`)",
    "enable_audio_generation": "provider-hosted generation tools are not supported; generate files with a "
    "program from the shell (preinstalled in `sandbox.image`)",
    "enable_video_generation": "provider-hosted generation tools are not supported; generate files with a "
    "program from the shell (preinstalled in `sandbox.image`)",
    "enable_file_generation": "provider-hosted generation tools are not supported; write files with the "
    "shell or the file tools",
    "api_key": "keys in configs are not accepted; " + ALT_KEYS,
    "agent_config": "AG2 agents are not supported; " + ALT_BACKENDS,
    "group_config": "AG2 groups are not supported; " + ALT_BACKENDS,
}

_BACKEND_WARN: dict[str, str] = {
    "enable_code_interpreter": f"ignored: provider-hosted code execution is not used; {ALT_SHELL}",
    "enable_code_execution": f"ignored: provider-hosted code execution is not used; {ALT_SHELL}",
    "betas": "ignored: no Anthropic beta headers are sent",
    "permission_mode": "ignored: a CLI-agent setting; tools here are always sandboxed",
    "allowed_tools": "ignored: a CLI-agent setting; every agent has shell, file and todo tools",
    "disallowed_tools": "ignored: a CLI-agent setting; use `command_line_blocked_commands` to restrict the shell",
    "max_thinking_tokens": "ignored: a CLI-agent setting",
    "system_prompt": "ignored: a CLI-agent setting; use the agent's `system_message`",
    "instance_id": "ignored: run ids isolate runs",
}

_SIZE = re.compile(r"\A\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*\Z", re.IGNORECASE)


def _size_bytes(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    m = _SIZE.match(str(value))
    if not m:
        return None
    return int(float(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()])


def _truthy(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.strip().lower() in ("true", "yes", "1"))


def _copy(value: Any) -> Any:
    # Not copy.deepcopy: YAML aliases share objects, and each use of an anchor is translated
    # (and noted) on its own. The loader has bounded the expanded size already.
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def translate(data: dict[str, Any]) -> Translation:
    """Turn a MassGen-style config into this project's schema; never raises.

    The input is not modified. Unknown keys are left in place for the schema to report.
    """
    out = _copy(data)
    tr = Translation(out)
    _top_level(tr, out)
    orch = out.get("orchestrator")
    if isinstance(orch, dict):
        _orchestrator(tr, orch)
    ts = out.get("timeout_settings")
    if isinstance(ts, dict):
        _timeouts(tr, ts)
    limits: dict[str, list[tuple[Loc, Any]]] = {"memory": [], "cpus": []}
    if isinstance(out.get("agents"), list):
        agents: list[tuple[Loc, Any]] = [(("agents", i), a) for i, a in enumerate(out["agents"])]
    elif "agents" not in out and isinstance(out.get("agent"), dict):
        agents = [(("agent",), out["agent"])]
    else:
        agents = []
    for loc, agent in agents:
        if isinstance(agent, dict):
            _agent(tr, loc, agent, limits)
    _sandbox_limits(tr, out, limits)
    return tr


def _top_level(tr: Translation, out: dict[str, Any]) -> None:
    ui = out.get("ui")
    if isinstance(ui, dict):
        for k in list(ui):
            if k in ("display_type", "logging_enabled"):
                continue
            hint = " (MassGen reads only ui.display_type too)" if k == "type" else ""
            tr.add(("ui", k), "warning", f"ignored: the CLI flags choose the display{hint}")
            del ui[k]
    if "display" in out:
        tr.add(("display",), "warning", "ignored: a dead key in MassGen too; the CLI flags choose the display")
        del out["display"]
    if "memory" in out:
        mem = out.pop("memory")
        enabled = mem.get("enabled", True) if isinstance(mem, dict) else mem
        if enabled is False:
            tr.add(("memory",), "warning", "ignored: memory is disabled, and there is no memory subsystem")
        else:
            tr.add(
                ("memory",),
                "error",
                "there is no memory subsystem (no mem0, Qdrant or compression); each run starts fresh: "
                "pass earlier results as files with `orchestrator.context_paths`, or set `memory.enabled: false`",
            )


def _orchestrator(tr: Translation, orch: dict[str, Any]) -> None:
    base: Loc = ("orchestrator",)
    for k, msg in _ORCH_WARN.items():
        if k in orch:
            tr.add(base + (k,), "warning" if k not in ("snapshot_storage", "session_storage") else "info", msg)
            del orch[k]
    if isinstance(orch.get("timeout"), dict):  # MassGen's docs show orchestrator.timeout.orchestrator_timeout_seconds
        moved = orch.pop("timeout")
        ts = tr.data.setdefault("timeout_settings", {})
        if isinstance(ts, dict):
            for k, v in moved.items():
                ts.setdefault(k, v)
        tr.add(base + ("timeout",), "info", "read as the top-level `timeout_settings` section")
    if "agent_temporary_workspace" in orch:
        orch.pop("agent_temporary_workspace")
        orch.setdefault("share_workspaces", True)
        tr.add(
            base + ("agent_temporary_workspace",),
            "info",
            "peers read snapshots of each other's workspaces, taken at each answer (/workspace/.peers/<agentN>/)",
        )
    vs = orch.get("voting_sensitivity")
    if vs is not None and vs in _VOTING_SENSITIVITY:
        tr.add(base + ("voting_sensitivity",), "info", f"{vs}: a sentence in the voting prompt")
    coord = orch.get("coordination")
    if isinstance(coord, dict):
        todo = False
        for k in list(coord):
            if k not in _COORDINATION:
                continue  # left in place: the schema reports it as unknown
            sev, msg = _COORDINATION[k]
            value = coord.pop(k)
            if k == "enable_agent_task_planning":
                todo = _truthy(value)
                if not todo:
                    sev, msg = "warning", "ignored: the `todo` tool is always there"
            elif k == "enable_subagents" and not _truthy(value):
                sev, msg = "info", "subagents are off; nested runs still work through the shell"
            tr.add(base + ("coordination", k), sev, msg)
        del todo
        for k in list(coord):
            close = difflib.get_close_matches(str(k), list(_COORDINATION), n=1, cutoff=0.75)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            tr.add(base + ("coordination", k), "error", f"unknown key{hint}")
        del orch["coordination"]
    cps = orch.get("context_paths")
    if isinstance(cps, list):
        for i, cp in enumerate(cps):
            if isinstance(cp, dict) and cp.get("permission") == "write":
                tr.add(
                    base + ("context_paths", i, "permission"),
                    "info",
                    "the final presenter writes a private copy; the change set is kept in "
                    f"final/<winner>/context/{i}/ and applied to the host path when the run exits 0",
                )
            if isinstance(cp, dict) and "protected_paths" in cp:
                perm = cp.get("permission", "read")
                tr.add(
                    base + ("context_paths", i, "protected_paths"),
                    "info",
                    "kept: the whole path is read-only anyway"
                    if perm != "write"
                    else "changes under these sub-paths are never applied to the host",
                )


def _timeouts(tr: Translation, ts: dict[str, Any]) -> None:
    base: Loc = ("timeout_settings",)
    initial = ts.pop("initial_round_timeout_seconds", None)
    subsequent = ts.pop("subsequent_round_timeout_seconds", None)
    grace = ts.pop("round_timeout_grace_seconds", None)
    if initial is not None or subsequent is not None:
        # The nearest real limit: one agent turn, hard. Take the longer so no round is cut short.
        values = [v for v in (initial, subsequent) if isinstance(v, int | float) and not isinstance(v, bool)]
        key = "initial_round_timeout_seconds" if initial is not None else "subsequent_round_timeout_seconds"
        if values and "agent_timeout_seconds" not in ts:
            ts["agent_timeout_seconds"] = max(values)
            tr.add(
                base + (key,),
                "warning",
                f"mapped to agent_timeout_seconds={max(values):g}: a hard limit per agent turn; "
                "there are no soft round timeouts",
            )
        else:
            tr.add(base + (key,), "warning", "ignored: agent_timeout_seconds (a hard limit per turn) is set")
        if initial is not None and subsequent is not None:
            tr.add(base + ("subsequent_round_timeout_seconds",), "warning", "folded into agent_timeout_seconds")
    if grace is not None:
        tr.add(base + ("round_timeout_grace_seconds",), "warning", "ignored: turn timeouts are hard, with no grace")


def _agent(tr: Translation, loc: Loc, agent: dict[str, Any], limits: dict[str, list[tuple[Loc, Any]]]) -> None:
    if "append_system_prompt" in agent:
        tr.add(loc + ("append_system_prompt",), "warning", "ignored: a dead key in MassGen too; use system_message")
        del agent["append_system_prompt"]
    backend = agent.get("backend")
    if isinstance(backend, dict):
        _backend(tr, loc + ("backend",), backend, limits)


def _backend(tr: Translation, loc: Loc, b: dict[str, Any], limits: dict[str, list[tuple[Loc, Any]]]) -> None:
    btype = b.get("type")
    if isinstance(btype, str) and btype in REFUSED_TYPES:
        why = REFUSED_TYPES[btype]
        tr.add(loc + ("type",), "error", f"backend type {btype!r} is not supported: {why}; {ALT_BACKENDS}")
    elif isinstance(btype, str) and btype in ALIASES:
        _openai_alias(tr, loc, b, btype)
        btype = "openai"

    for k, why in _BACKEND_REFUSED.items():
        if k not in b:
            continue
        value = b.pop(k)
        if k == "command_line_docker_enable_sudo" and not _truthy(value):
            continue
        if k.startswith("enable_") and not _truthy(value):
            continue
        if k in ("agent_config", "group_config") and btype in REFUSED_TYPES:
            continue  # the type's refusal says it already
        tr.add(loc + (k,), "error", why)

    for k, why in _BACKEND_WARN.items():
        if k in b:
            value = b.pop(k)
            if k.startswith("enable_") and not _truthy(value):
                continue
            if btype in REFUSED_TYPES:
                continue
            tr.add(loc + (k,), "warning", why)

    _command_line(tr, loc, b, limits)
    _model_params(tr, loc, b, btype)

    if "cwd" in b:
        b.pop("cwd")
        tr.add(loc + ("cwd",), "info", "every agent works in its own per-run folder (/workspace/<agent id>)")


def _openai_alias(tr: Translation, loc: Loc, b: dict[str, Any], btype: str) -> None:
    # The OpenAI-compatible backend with MassGen's default upstream; the gateway picks the key
    # by the upstream's host (agent_image/protocol/providers.py).
    default_url = ALIASES[btype]
    b["type"] = "openai"
    b["provider"] = btype
    if not b.get("base_url"):
        if default_url is None:
            tr.add(loc + ("base_url",), "error", f"backend type {btype!r} needs a base_url (an OpenAI-compatible URL)")
            return
        b["base_url"] = default_url
    url = b["base_url"]
    names = key_vars(btype, url)
    key = f"the gateway sends {' or '.join(names)} from the host" if names else "no key is sent"
    tr.add(loc + ("type",), "info", f"OpenAI-compatible upstream {url}; {key}")
    if btype == "lmstudio":
        tr.add(loc + ("type",), "warning", "LM Studio is not started, no model downloaded: start its server")


def _command_line(tr: Translation, loc: Loc, b: dict[str, Any], limits: dict[str, list[tuple[Loc, Any]]]) -> None:
    if "enable_mcp_command_line" in b:
        value = b.pop("enable_mcp_command_line")
        if not _truthy(value):
            tr.add(loc + ("enable_mcp_command_line",), "warning", "ignored: the sandboxed `shell` tool is always there")
    if "command_line_execution_mode" in b:
        mode = b.pop("command_line_execution_mode")
        if mode == "local":
            tr.add(
                loc + ("command_line_execution_mode",),
                "warning",
                "commands always run in the run's sandbox, not on the host; use `--sandbox none` to run on the host",
            )
        elif mode not in ("docker", "srt"):
            tr.add(loc + ("command_line_execution_mode",), "error", "must be docker, srt or local")
    if "command_line_docker_network_mode" in b:
        mode = b.pop("command_line_docker_network_mode")
        if mode != "none":
            tr.add(
                loc + ("command_line_docker_network_mode",),
                "error",
                f"network {mode!r}: the sandbox has no network by design; model calls go through the supervisor's "
                f"gateway; {ALT_IMAGE}",
            )
    for src, dst in (("command_line_docker_memory_limit", "memory"), ("command_line_docker_cpu_limit", "cpus")):
        if src in b:
            limits[dst].append((loc + (src,), b.pop(src)))
    for k in ("command_line_allowed_commands", "command_line_blocked_commands"):
        if k in b:
            tr.add(loc + (k,), "info", "enforced by the shell tool (re.match on the whole command)")


def _model_params(tr: Translation, loc: Loc, b: dict[str, Any], btype: Any) -> None:
    text = b.get("text")
    if isinstance(text, dict) and set(text) <= {"verbosity"}:
        b.pop("text")
        if "verbosity" in text:
            if btype == "openai":
                b.setdefault("verbosity", text["verbosity"])
                tr.add(loc + ("text", "verbosity"), "info", "sent as Chat Completions `verbosity`")
            else:
                tr.add(loc + ("text", "verbosity"), "warning", f"ignored: an OpenAI setting; {btype} has none")
    reasoning = b.get("reasoning")
    if isinstance(reasoning, dict) and set(reasoning) <= {"effort", "summary"}:
        b.pop("reasoning")
        if "effort" in reasoning:
            if btype == "openai":
                b.setdefault("reasoning_effort", reasoning["effort"])
                tr.add(loc + ("reasoning", "effort"), "info", "sent as Chat Completions `reasoning_effort`")
            else:
                tr.add(loc + ("reasoning", "effort"), "warning", f"ignored: an OpenAI setting; {btype} has none")
        if "summary" in reasoning:
            tr.add(
                loc + ("reasoning", "summary"),
                "warning",
                "ignored: reasoning summaries are a Responses API feature; Chat Completions has none",
            )
    if "chat_template_kwargs" in b:
        kwargs = b.pop("chat_template_kwargs")
        extra = b.setdefault("extra_body", {})
        if isinstance(extra, dict):
            extra.setdefault("chat_template_kwargs", kwargs)
        tr.add(loc + ("chat_template_kwargs",), "info", "sent in extra_body.chat_template_kwargs")
    if "top_k" in b and btype == "openai":
        tr.add(loc + ("top_k",), "warning", "sent in extra_body.top_k (OpenAI-compatible servers that take it)")
        extra = b.setdefault("extra_body", {})
        if isinstance(extra, dict):
            extra.setdefault("top_k", b.pop("top_k"))
    if b.get("enable_web_search") is not None:
        value = b["enable_web_search"]
        if btype == "gemini":
            return  # a real field: Gemini's provider-side google_search tool
        b.pop("enable_web_search")
        if _truthy(value):
            tr.add(
                loc + ("enable_web_search",),
                "warning",
                f"ignored: {btype} here has no provider-hosted web search (only gemini does); the sandbox has no "
                "network, so agents work from their knowledge and context paths",
            )


def _sandbox_limits(tr: Translation, out: dict[str, Any], limits: dict[str, list[tuple[Loc, Any]]]) -> None:
    if not limits["memory"] and not limits["cpus"]:
        return
    sandbox = out.setdefault("sandbox", {})
    if not isinstance(sandbox, dict):
        return
    total_mem = 0
    for loc, value in limits["memory"]:
        n = _size_bytes(value)
        if n is None:
            tr.add(loc, "error", f"not a size: {value!r} (try 512m or 2g)")
            continue
        total_mem += n
    total_cpu = 0.0
    for loc, value in limits["cpus"]:
        try:
            total_cpu += float(value)
        except (TypeError, ValueError):
            tr.add(loc, "error", f"not a number of CPUs: {value!r}")
    formats: tuple[tuple[str, Any, Callable[[Any], str]], ...] = (
        ("memory", total_mem, lambda n: f"{n // (1 << 20)}m"),
        ("cpus", total_cpu, lambda n: f"{n:g}"),
    )
    for kind, total, fmt in formats:
        if not limits[kind] or not total:
            continue
        first = limits[kind][0][0]
        if kind in sandbox:
            tr.add(first, "warning", f"ignored: sandbox.{kind} is set (limits are per run, for all agents together)")
            continue
        sandbox[kind] = fmt(total) if kind == "memory" else round(total, 3)
        tr.add(first, "warning", f"mapped to sandbox.{kind}={sandbox[kind]}: the sum over agents, one limit per run")


# Keys this module knows, by the kind of mapping they sit in: for "did you mean" on typos.
KNOWN_KEYS: dict[str, frozenset[str]] = {
    "": frozenset({"display", "memory"}),
    "orchestrator": frozenset({*_ORCH_WARN, "timeout", "agent_temporary_workspace"}),
    "coordination": frozenset(_COORDINATION),
    "timeout_settings": frozenset(_ROUND_TIMEOUTS),
    "backend": frozenset(
        {
            *_BACKEND_REFUSED,
            *_BACKEND_WARN,
            "cwd",
            "enable_mcp_command_line",
            "command_line_execution_mode",
            "command_line_docker_network_mode",
            "command_line_docker_memory_limit",
            "command_line_docker_cpu_limit",
            "text",
            "reasoning",
            "chat_template_kwargs",
        }
    ),
    "agent": frozenset({"append_system_prompt"}),
}

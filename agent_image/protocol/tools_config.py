"""MassGen's `backend.custom_tools` and `backend.mcp_servers` keys, validated for the sandbox.

Formats follow MassGen's documentation: a custom tool entry names a Python file (or a dotted
module) and one or more functions, with optional names, descriptions and preset arguments,
each either shared or one per function. MCP servers come as a list of `{name, type, ...}` or
as MassGen's mapping form `{name: {type, ...}}`. Tool names as the model sees them follow
MassGen too: `custom_tool__<name>` and `mcp__<server>__<tool>`.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from pathlib import PurePosixPath
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

CUSTOM_PREFIX = "custom_tool__"
MCP_PREFIX = "mcp__"
# What OpenAI and Gemini both accept as a function name.
TOOL_NAME_RE = re.compile(r"\A[A-Za-z_][A-Za-z0-9_-]{0,63}\Z")
_IDENT_RE = re.compile(r"\A[A-Za-z_][A-Za-z0-9_]*\Z")
_MODULE_RE = re.compile(r"\A[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\Z")
_SERVER_RE = re.compile(r"\A[A-Za-z][A-Za-z0-9_-]{0,39}\Z")
# ${VAR} (MassGen resolves it from the host's environment and .env); ${cwd} is the agent's workspace.
ENV_REF_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
MAX_TOOLS_PER_ENTRY = 64
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
MAX_MCP_SERVERS = 16

NO_NETWORK_HINT = (
    "the sandbox has no network; run the server inside the sandbox instead, as type stdio or with its "
    "command and a loopback url (the command must be in sandbox.image, built FROM the agent image)"
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _per_function(value: Any, count: int, key: str) -> list[Any]:
    """MassGen's rule: a single value is shared, a list must give one value per function."""
    if value is None:
        return [None] * count
    if isinstance(value, list):
        if len(value) != count:
            raise ValueError(
                f"{key} is a list of {len(value)} but function lists {count}; give one value "
                f"(shared by every function) or exactly {count}"
            )
        return value
    return [value] * count


class CustomToolSpec(_Strict):
    """One function offered as a tool, after MassGen's list/shared fields are paired up."""

    tool: str  # the name the model calls, custom_tool__<name>
    function: str
    path: str | None  # a .py file (as the sandbox sees it), or None with `module`
    module: str | None
    description: str | None
    preset_args: dict[str, Any]
    default_params: dict[str, Any]
    category: str | None


class CustomToolEntry(_Strict):
    """One `custom_tools` entry in MassGen's format."""

    function: str | list[str]
    path: str | None = None
    name: str | list[str] | None = None
    description: str | list[str] | None = None
    preset_args: dict[str, Any] | list[dict[str, Any] | None] | None = None
    # MassGen's computer-use examples: values used when the model does not pass them.
    default_params: dict[str, Any] | list[dict[str, Any] | None] | None = None
    category: str | None = None

    @model_validator(mode="after")
    def _check(self) -> CustomToolEntry:
        functions = [self.function] if isinstance(self.function, str) else list(self.function)
        if not functions:
            raise ValueError("function lists no function")
        if len(functions) > MAX_TOOLS_PER_ENTRY:
            raise ValueError(f"at most {MAX_TOOLS_PER_ENTRY} functions per custom_tools entry")
        for f in functions:
            if not _IDENT_RE.match(f):
                raise ValueError(f"function {f!r} is not a Python identifier")
        if self.path is None:
            raise ValueError(
                "custom tool needs a path: a .py file inside an orchestrator.context_paths entry, or a "
                "module importable in sandbox.image; MassGen's built-in tools are not in the sandbox, "
                "but the shell and file tools are"
            )
        if not self.path.strip():
            raise ValueError("path is empty")
        if not is_file_path(self.path) and not _MODULE_RE.match(self.path):
            raise ValueError(f"path {self.path!r} is neither a .py file nor a dotted module name")
        names = _per_function(self.name, len(functions), "name")
        _per_function(self.description, len(functions), "description")
        _per_function(self.preset_args, len(functions), "preset_args")
        _per_function(self.default_params, len(functions), "default_params")
        for n, f in zip(names, functions, strict=True):
            tool = tool_name(n or f)
            if not TOOL_NAME_RE.match(tool):
                raise ValueError(f"tool name {tool!r} must be letters, digits, _ or -, at most 64 characters")
        return self

    @property
    def is_file(self) -> bool:
        return self.path is not None and is_file_path(self.path)

    def specs(self) -> list[CustomToolSpec]:
        functions = [self.function] if isinstance(self.function, str) else list(self.function)
        n = len(functions)
        names = _per_function(self.name, n, "name")
        descriptions = _per_function(self.description, n, "description")
        presets = _per_function(self.preset_args, n, "preset_args")
        defaults = _per_function(self.default_params, n, "default_params")
        return [
            CustomToolSpec(
                tool=tool_name(names[i] or f),
                function=f,
                path=self.path if self.is_file else None,
                module=None if self.is_file else self.path,
                description=descriptions[i],
                preset_args=dict(presets[i] or {}),
                default_params=dict(defaults[i] or {}),
                category=self.category,
            )
            for i, f in enumerate(functions)
        ]


def excluded_custom_tool(spec: CustomToolSpec, names: Collection[str]) -> bool:
    """Whether MassGen's `exclude_custom_tools` leaves this tool out.

    MassGen skips every file or folder so named when it copies a custom-tools directory for its
    code-based tools (`_computer_use`, `_browser_automation`, at any depth). Here the configured
    `custom_tools` are the one source, so the same names apply to each tool's path: a tool whose
    file (or module) lies under an excluded name is not offered, nor imported. A tool's own name
    (with or without `custom_tool__`) or function name excludes just that function.
    """
    if not names:
        return False
    where = PurePosixPath(spec.path).parts if spec.path is not None else tuple((spec.module or "").split("."))
    return bool(set(names) & {*where, spec.tool, spec.tool.removeprefix(CUSTOM_PREFIX), spec.function})


def is_file_path(path: str) -> bool:
    """A `custom_tools` path that names a file (else it is a dotted module)."""
    return path.endswith(".py") or "/" in path


def tool_name(name: str) -> str:
    """MassGen's model-facing name of a custom tool."""
    return name if name.startswith(CUSTOM_PREFIX) else CUSTOM_PREFIX + name


def mcp_tool_name(server: str, tool: str) -> str:
    return f"{MCP_PREFIX}{server}__{tool}"


class McpServerConfig(_Strict):
    """One entry of `mcp_servers` (MassGen's keys; `security` and `timeout` are accepted)."""

    name: str
    type: Literal["stdio", "streamable-http", "sse"] = "stdio"
    command: str | None = None
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str | None = None
    url: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    allowed_tools: list[str] | None = None
    exclude_tools: list[str] = Field(default_factory=list)
    security: dict[str, Any] | None = None  # MassGen's argument sanitising level; the sandbox is the boundary
    timeout: float | None = Field(default=None, gt=0, le=3600)  # seconds per call (default: the shell's)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _SERVER_RE.match(v) or "__" in v:
            raise ValueError("MCP server name must start with a letter; letters, digits, _ and - (no '__'), 1-40")
        return v

    @model_validator(mode="after")
    def _check(self) -> McpServerConfig:
        if self.type == "stdio":
            if not self.command or not self.command.strip():
                raise ValueError(f"stdio MCP server {self.name!r} needs a command")
            if self.url is not None:
                raise ValueError(f"stdio MCP server {self.name!r} takes a command, not a url")
        else:
            if not self.url:
                raise ValueError(f"{self.type} MCP server {self.name!r} needs a url")
            host = (urlsplit(self.url).hostname or "").lower()
            if host not in LOOPBACK_HOSTS:
                raise ValueError(
                    f"{self.type} MCP server {self.name!r} at {self.url} cannot be reached: {NO_NETWORK_HINT}"
                )
            if not self.command:
                raise ValueError(
                    f"{self.type} MCP server {self.name!r} at {self.url}: nothing listens on the sandbox's "
                    "loopback unless the run starts it; add the server's command (and args) so it is started "
                    "inside the sandbox, or use type stdio (the command must be in sandbox.image)"
                )
        for key, value in [*self.env.items(), *(("args", a) for a in self.args)]:
            for var in ENV_REF_RE.findall(value):
                if var != "cwd":
                    raise ValueError(
                        f"MCP server {self.name!r}: ${{{var}}} in {key} would copy a host variable into "
                        "the sandbox, and secrets never enter it (model keys are added by the host's gateway); "
                        "write the value itself, or ${cwd} for the agent's workspace"
                    )
        return self

    def offers(self, tool: str) -> bool:
        """Whether `tool` (the server's own name) passes this server's filters.

        MassGen's filters name tools either plainly or as `mcp__<server>__<tool>`; both work.
        """
        full = mcp_tool_name(self.name, tool)
        if self.allowed_tools is not None and not ({tool, full} & set(self.allowed_tools)):
            return False
        return not ({tool, full} & set(self.exclude_tools))


def normalize_mcp_servers(value: Any) -> Any:
    """MassGen also writes `mcp_servers` as a mapping `{name: {...}}`; make it a list."""
    if isinstance(value, dict):
        out = []
        for name, body in value.items():
            if isinstance(body, dict):
                out.append({"name": name, **body})
            else:
                out.append(body)
        return out
    return value


def check_tool_keys(custom: list[CustomToolEntry], servers: list[McpServerConfig]) -> None:
    """Names must be unique within one agent (the model calls tools by name).

    Raises:
        ValueError: a duplicate tool or server name.
    """
    seen: set[str] = set()
    for entry in custom:
        for spec in entry.specs():
            if spec.tool in seen:
                raise ValueError(f"custom tool {spec.tool!r} is defined twice")
            seen.add(spec.tool)
    names = [s.name for s in servers]
    for n in names:
        if names.count(n) > 1:
            raise ValueError(f"MCP server {n!r} is defined twice")
    if len(servers) > MAX_MCP_SERVERS:
        raise ValueError(f"at most {MAX_MCP_SERVERS} MCP servers per agent")

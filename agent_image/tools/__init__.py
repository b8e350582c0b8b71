"""In-sandbox tools the agent loop runs on behalf of models and scripted agents."""

from agent_image.tools.files import FileAccess, FileToolError
from agent_image.tools.shell import ShellOutcome, minimal_env, run_shell
from agent_image.tools.todo import TodoList
from agent_image.tools.toolbox import ToolBox, ToolResult

__all__ = [
    "FileAccess",
    "FileToolError",
    "ShellOutcome",
    "TodoList",
    "ToolBox",
    "ToolResult",
    "minimal_env",
    "run_shell",
]

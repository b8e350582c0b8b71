"""The scripted backend: replays steps from the config, deterministically, with no model at all.

Steps go through the same tool path as a model's calls (same sandbox, same limits). Templates
`{{name}}` expand to: a `save_as` name of an earlier step, `question`, `workspace`, `own_id`,
`answers` (all current answers), `answer:<agent id or anon id>`, `env:<VAR>`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from typing import Any

from ..protocol.config import (
    AnswerStep,
    BackendConfig,
    RawStep,
    ReadFileStep,
    ShellStep,
    SleepStep,
    VoteStep,
    WriteFileStep,
)
from .base import BackendError, Completion, Message, ToolCall, ToolSpec

_TEMPLATE = re.compile(r"\{\{\s*([A-Za-z0-9_:.\-]+)\s*\}\}")


def template_names(text: str) -> list[str]:
    return _TEMPLATE.findall(text)


class ScriptedBackend:
    provider = "scripted"

    def __init__(
        self, cfg: BackendConfig, view: Callable[[], Any], sleep: Callable[[float], Any], workspace: str
    ) -> None:
        self.steps = list(cfg.steps)
        self.final = cfg.final
        self._view = view
        self._sleep = sleep
        self._workspace = workspace
        self._pos = 0
        self._vars: dict[str, str] = {}
        self._pending: ShellStep | ReadFileStep | None = None
        self._last_vote: VoteStep | None = None
        self._n = 0

    # -- templating ------------------------------------------------------------------

    def render(self, text: str) -> str:
        view = self._view()

        def sub(m: re.Match[str]) -> str:
            name = m.group(1)
            if name in self._vars:
                return self._vars[name]
            if name == "question":
                return str(view.question)
            if name == "workspace":
                return self._workspace
            if name == "own_id":
                return str(view.own_id)
            if name == "answers":
                return "\n\n".join(f"[{k}] {v}" for k, v in view.answers.items())
            if name.startswith("answer:"):
                key = name.split(":", 1)[1]
                anon = view.anon_of.get(key, key)
                return str(view.answers.get(anon, ""))
            if name.startswith("env:"):
                return os.environ.get(name[4:], "")
            return m.group(0)

        return _TEMPLATE.sub(sub, text)

    # -- the backend protocol --------------------------------------------------------

    def _call(self, name: str, **arguments: Any) -> Completion:
        self._n += 1
        return Completion(
            message=Message(
                role="assistant", tool_calls=(ToolCall(id=f"call_{self._n}", name=name, arguments=arguments),)
            ),
            model="scripted",
        )

    def _absorb(self, messages: list[Message]) -> None:
        if self._pending is None or not messages or messages[-1].role != "tool":
            return
        step, self._pending = self._pending, None
        if not step.save_as:
            return
        content = messages[-1].content
        if isinstance(step, ShellStep):
            try:
                data = json.loads(content)
                content = str(data.get("stdout", ""))
            except (ValueError, AttributeError):
                pass
        self._vars[step.save_as] = content.strip()

    async def complete(self, messages: list[Message], tools: list[ToolSpec]) -> Completion:
        self._absorb(messages)
        view = self._view()
        if view.phase == "present":
            text = self.render(self.final) if self.final is not None else str(view.answers.get(view.own_anon, ""))
            return Completion(message=Message(role="assistant", content=text), model="scripted")
        while self._pos < len(self.steps):
            step = self.steps[self._pos]
            self._pos += 1
            if isinstance(step, SleepStep):
                await self._sleep(step.sleep)
            elif isinstance(step, ShellStep):
                self._pending = step
                return self._call("shell", command=self.render(step.shell), timeout=step.timeout)
            elif isinstance(step, WriteFileStep):
                return self._call("write_file", path=self.render(step.write_file), content=self.render(step.content))
            elif isinstance(step, ReadFileStep):
                self._pending = step
                return self._call("read_file", path=self.render(step.read_file))
            elif isinstance(step, AnswerStep):
                return self._call("new_answer", content=self.render(step.answer))
            elif isinstance(step, VoteStep):
                self._last_vote = step
                return self._vote(step, view)
            elif isinstance(step, RawStep):
                self._n += 1
                calls = tuple(
                    ToolCall(
                        id=f"call_{self._n}_{i}", name=str(c.get("name", "")), arguments=dict(c.get("arguments", {}))
                    )
                    for i, c in enumerate(step.raw_tool_calls)
                )
                return Completion(
                    message=Message(role="assistant", content=step.text, tool_calls=calls), model="scripted"
                )
        # Script exhausted: keep voting the way it last did (or for the first answer).
        return self._vote(self._last_vote or VoteStep(vote="auto"), view)

    def _vote(self, step: VoteStep, view: Any) -> Completion:
        target = self.render(step.vote)
        if target == "auto":
            target = sorted(view.answers)[0] if view.answers else "agent1"
        target = view.anon_of.get(target, target)
        return self._call("vote", agent_id=target, reason=self.render(step.reason))

    async def aclose(self) -> None:
        return None


__all__ = ["BackendError", "ScriptedBackend", "template_names"]

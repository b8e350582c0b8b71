"""One agent turn: model calls and tool calls until a valid workflow call (or the agent gives up)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from ..backends.base import Backend, Completion, Message, ToolCall, ToolSpec
from ..protocol.events import AgentError, ErrorKind, ModelCall, ToolCalled
from .outbox import EventWriter
from .prompts import ENFORCEMENT, NEW_ANSWER, WORKFLOW_TOOLS


class ToolRunner(Protocol):
    """What a turn needs from the in-sandbox toolbox (agent_image.tools.ToolBox)."""

    def specs(self) -> list[ToolSpec]: ...

    async def call(self, name: str, arguments: dict[str, Any]) -> Any: ...


class AgentGaveUp(Exception):
    """The agent kept breaking the protocol past its retry budget."""

    def __init__(self, agent: str, attempts: int, last_error: str) -> None:
        self.agent = agent
        self.attempts = attempts
        self.last_error = last_error
        super().__init__(f"agent={agent} gave up after {attempts} invalid replies: {last_error}")


@dataclass(frozen=True)
class Workflow:
    """A valid end of a coordination turn."""

    kind: str  # "answer" | "vote"
    content: str = ""
    target_anon: str = ""
    reason: str = ""


@dataclass(frozen=True)
class TurnLimits:
    max_invalid: int
    max_tool_calls: int


PriceFn = Callable[[str, str, Completion], float]


class TurnRunner:
    """Runs turns for one agent; owns nothing but the references it is given."""

    def __init__(
        self,
        agent: str,
        backend: Backend,
        tools: ToolRunner,
        writer: EventWriter,
        limits: TurnLimits,
        price: PriceFn | None = None,
    ) -> None:
        self.agent = agent
        self.backend = backend
        self.tools = tools
        self.writer = writer
        self.limits = limits
        self.price = price

    async def _complete(self, messages: list[Message], specs: list[ToolSpec]) -> Completion:
        t0 = time.monotonic()
        completion = await self.backend.complete(messages, specs)
        # Behind the host gateway the supervisor meters every call itself (trusted); the engine
        # reports calls only when it talks to models directly (--sandbox none).
        if self.backend.provider != "scripted" and not os.environ.get("MASSGEN_MODEL_SOCKET"):
            u = completion.usage
            self.writer.emit(
                ModelCall,
                agent=self.agent,
                provider=self.backend.provider,
                model=completion.model or "unknown",
                prompt_tokens=u.prompt_tokens,
                completion_tokens=u.completion_tokens,
                cached_tokens=u.cached_tokens,
                latency_s=round(completion.latency_s or (time.monotonic() - t0), 6),
                ttft_s=completion.ttft_s,
                cost_usd=self.price(self.backend.provider, completion.model, completion) if self.price else 0.0,
            )
        return completion

    async def _run_tools(self, calls: list[ToolCall], messages: list[Message], used: int) -> int:
        for call in calls:
            used += 1
            if used > self.limits.max_tool_calls:
                raise AgentGaveUp(self.agent, used, f"more than {self.limits.max_tool_calls} tool calls in one turn")
            t0 = time.monotonic()
            result = await self.tools.call(call.name, call.arguments)
            self.writer.emit(
                ToolCalled,
                agent=self.agent,
                tool=call.name[:200],  # a model may call any name; events cap it
                summary=str(getattr(result, "summary", ""))[:500],
                ok=bool(getattr(result, "ok", True)),
                duration_s=round(time.monotonic() - t0, 4),
                kind=getattr(result, "kind", "builtin"),
            )
            messages.append(Message(role="tool", content=result.content, tool_call_id=call.id, name=call.name))
        return used

    async def coordinate(
        self,
        messages: list[Message],
        workflow_specs: list[ToolSpec],
        vote_targets: list[str],
        may_answer: Callable[[], str | None],
    ) -> Workflow:
        """Run one coordination turn.

        Args:
            may_answer: returns an error text when a new answer is not allowed right now.

        Raises:
            AgentGaveUp: too many invalid replies or tool calls.
            BackendError: the model failed.
        """
        specs = [*workflow_specs, *self.tools.specs()]
        invalid = 0
        used = 0
        while True:
            completion = await self._complete(messages, specs)
            msg = completion.message
            messages.append(msg)
            wf = [c for c in msg.tool_calls if c.name in WORKFLOW_TOOLS]
            other = [c for c in msg.tool_calls if c.name not in WORKFLOW_TOOLS]
            if other:
                used = await self._run_tools(other, messages, used)
                if not wf:
                    continue
            error, outcome = self._validate(wf, vote_targets, may_answer)
            if outcome is not None:
                return outcome
            invalid += 1
            self.writer.emit(AgentError, agent=self.agent, kind=ErrorKind.INVALID_CALL, message=error, attempt=invalid)
            if invalid >= self.limits.max_invalid:
                raise AgentGaveUp(self.agent, invalid, error)
            if wf:
                for c in wf:
                    messages.append(Message(role="tool", content=f"ERROR: {error}", tool_call_id=c.id, name=c.name))
            else:
                messages.append(Message(role="user", content=f"{error}\n{ENFORCEMENT}"))

    @staticmethod
    def _validate(
        wf: list[ToolCall], vote_targets: list[str], may_answer: Callable[[], str | None]
    ) -> tuple[str, Workflow | None]:
        if not wf:
            return "No workflow tool was called.", None
        names = {c.name for c in wf}
        if len(names) > 1:
            return "Cannot use both 'vote' and 'new_answer' in the same reply; call exactly one.", None
        if len(wf) > 1:
            return f"Call '{wf[0].name}' only once per reply.", None
        call = wf[0]
        args: Mapping[str, Any] = call.arguments if isinstance(call.arguments, Mapping) else {}
        if "__raw__" in args:
            return f"The arguments of '{call.name}' are not valid JSON; send a JSON object.", None
        if call.name == NEW_ANSWER:
            content = args.get("content")
            if not isinstance(content, str) or not content.strip():
                return "new_answer needs a non-empty string argument 'content'.", None
            refusal = may_answer()
            if refusal:
                return refusal, None
            return "", Workflow(kind="answer", content=content)
        target = args.get("agent_id")
        reason = args.get("reason", "")
        if not vote_targets:
            return "Cannot vote when no answers exist. Use new_answer.", None
        if not isinstance(target, str) or target not in vote_targets:
            return f"Invalid agent_id {target!r}. Valid agents: {', '.join(vote_targets)}.", None
        return "", Workflow(kind="vote", target_anon=target, reason=str(reason)[:4000])

    async def present(self, messages: list[Message]) -> str:
        """Run the winner's presentation; returns the final text (may be empty).

        Raises:
            AgentGaveUp: too many tool calls.
            BackendError: the model failed.
        """
        specs = self.tools.specs()
        used = 0
        while True:
            completion = await self._complete(messages, specs)
            msg = completion.message
            messages.append(msg)
            for c in msg.tool_calls:
                # Models often "present" through new_answer; take its content as the final text.
                if c.name == NEW_ANSWER and isinstance(c.arguments.get("content"), str):
                    return str(c.arguments["content"])
            other = [c for c in msg.tool_calls if c.name not in WORKFLOW_TOOLS]
            if not other:
                return msg.content
            used = await self._run_tools(other, messages, used)

"""Fake model upstreams on loopback speaking the real OpenAI, Gemini and Anthropic wire protocols.

A fake is a context manager; `.base_url` is what an SDK is pointed at. A `policy` maps each
request (a `FakeRequest`: the JSON body as a dict, plus `.path`, `.headers`, `.prompt_text`,
`.tool_names`, `.stream`) to a `Reply` (text and/or `FakeToolCall`s, token counts), a `Fault`,
or a plain string. `faults=[...]` answer the first requests before the policy does.
"""

from ._common import (
    FakeRequest,
    FakeServer,
    FakeToolCall,
    Fault,
    Policy,
    Reply,
    UsageTotals,
    closed,
    sequence,
)
from .anthropic_server import FakeAnthropic
from .gemini_server import FakeGemini
from .openai_server import FakeOpenAI

__all__ = [
    "FakeAnthropic",
    "FakeGemini",
    "FakeOpenAI",
    "FakeRequest",
    "FakeServer",
    "FakeToolCall",
    "Fault",
    "Policy",
    "Reply",
    "UsageTotals",
    "closed",
    "sequence",
]

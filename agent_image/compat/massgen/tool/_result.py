"""What a MassGen custom tool returns: `ExecutionResult` holding text, image or audio blocks.

Field names and defaults follow MassGen's documentation of `massgen.tool._result`, so a tool
file written for MassGen builds its results here unchanged; the sandbox's engine reads them
back by these names (`output_blocks[].block_type/.data`, `meta_info`, `is_final`, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


def _new_result_id() -> str:
    return datetime.now().strftime("%Y%m%d_%H%M%S_%f")


@dataclass
class ContentBlock:
    """One piece of a tool's output; `data` is text, or base64 for images and audio."""

    block_type: str
    data: str


class TextContent(ContentBlock):
    """Plain text for the model."""

    def __init__(self, data: str) -> None:
        super().__init__("text", data)


class ImageContent(ContentBlock):
    """A base64-encoded image."""

    def __init__(self, data: str) -> None:
        super().__init__("image", data)


class AudioContent(ContentBlock):
    """Base64-encoded audio."""

    def __init__(self, data: str) -> None:
        super().__init__("audio", data)


@dataclass
class ExecutionResult:
    """A tool's result; streaming tools yield several, the last (`is_final`) one counts."""

    output_blocks: list[ContentBlock]
    meta_info: dict[str, Any] | None = None  # for the system; not shown to the model
    is_streaming: bool = False
    is_final: bool = True
    was_interrupted: bool = False
    result_id: str = field(default_factory=_new_result_id)

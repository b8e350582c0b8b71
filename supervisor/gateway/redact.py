"""Keys never reach the sandbox: every byte and header sent back has them replaced by ``[redacted]``.

`SseRelay` cuts a stream at line ends first, so a key never straddles two writes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from urllib.parse import quote

REDACTED = "[redacted]"


class Redactor:
    """Replaces every known key (raw, URL-quoted and JSON-escaped) in text and bytes.

    Redaction runs on whole values before anything is cut: `clip` redacts, then shortens, then
    drops a tail that is the start of a key (a cut made mid-key), and `truncated` does the last
    step for a buffer that a read limit may have cut. So no prefix of a key leaves the gateway
    whatever the sandbox does to move a cut.
    """

    def __init__(self, secrets: list[str]) -> None:
        # JSON-escaped twice over: Python's way, and encoders that escape "/" as "\\/".
        escaped: tuple[Callable[[str], str], ...] = (
            lambda k: json.dumps(k)[1:-1],
            lambda k: json.dumps(k)[1:-1].replace("/", "\\/"),
        )
        forms = {s for k in secrets if len(k) >= 4 for s in (k, quote(k, safe=""), *(e(k) for e in escaped))}
        self._text = sorted(forms, key=len, reverse=True)
        self._bytes = [s.encode() for s in self._text]

    def text(self, value: str) -> str:
        """`value` with every key replaced."""
        for s in self._text:
            if s in value:
                value = value.replace(s, REDACTED)
        return value

    def data(self, value: bytes) -> bytes:
        """`value` with every key replaced."""
        for s in self._bytes:
            if s in value:
                value = value.replace(s, REDACTED.encode())
        return value

    def truncated(self, value: bytes) -> bytes:
        """`data` for a buffer that may end mid-key (a read limit): the partial key is dropped too."""
        value = self.data(value)
        for s in self._bytes:
            for n in range(min(len(s) - 1, len(value)), 0, -1):
                if value.endswith(s[:n]):
                    return value[:-n]
        return value

    def clip(self, value: str, limit: int) -> str:
        """One redacted line of at most `limit` characters (whitespace folded, `...` where cut)."""
        value = self.text(" ".join(value.split()))
        if len(value) <= limit:
            return value
        value = value[: max(0, limit - 3)]
        for s in self._text:
            for n in range(min(len(s) - 1, len(value)), 0, -1):
                if value.endswith(s[:n]):
                    value = value[:-n]
                    break
        return value + "..."


class SseRelay:
    """Cuts a byte stream at line ends (a key never straddles two writes) and keeps the last usage event."""

    def __init__(self, marker: bytes, redact: Redactor) -> None:
        self._marker = marker
        self._redact = redact
        self._pending = b""
        self.usage_line: bytes | None = None  # the last event carrying usage
        self.first_usage_line: bytes | None = None  # the first (Anthropic: message_start)

    def feed(self, chunk: bytes) -> bytes:
        """The complete lines so far, redacted; a partial last line waits for the next chunk."""
        end = chunk.rfind(b"\n")
        if end < 0:
            self._pending += chunk
            return b""
        out = self._pending + chunk[: end + 1] if self._pending else chunk[: end + 1]
        self._pending = chunk[end + 1 :]
        self._scan(out)
        return self._redact.data(out)

    def flush(self) -> bytes:
        """What is left at the stream's end, redacted."""
        out, self._pending = self._pending, b""
        self._scan(out)
        return self._redact.data(out)

    def _scan(self, data: bytes) -> None:
        if self._marker not in data:
            return
        for line in data.split(b"\n"):
            if line.startswith(b"data:") and self._marker in line:
                if self.first_usage_line is None:
                    self.first_usage_line = line[5:]
                self.usage_line = line[5:]

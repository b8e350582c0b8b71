"""Keys never reach the sandbox: every byte and header sent back has them replaced by ``[redacted]``.

`SseRelay` cuts a stream at line ends first, so a key never straddles two writes.
"""

from __future__ import annotations

from urllib.parse import quote

REDACTED = "[redacted]"


class Redactor:
    """Replaces every known key (raw and URL-quoted) in text and bytes."""

    def __init__(self, secrets: list[str]) -> None:
        forms = {s for k in secrets if len(k) >= 4 for s in (k, quote(k, safe=""))}
        self._text = sorted(forms, key=len, reverse=True)
        self._bytes = [s.encode() for s in self._text]

    def text(self, value: str) -> str:
        for s in self._text:
            if s in value:
                value = value.replace(s, REDACTED)
        return value

    def data(self, value: bytes) -> bytes:
        for s in self._bytes:
            if s in value:
                value = value.replace(s, REDACTED.encode())
        return value


class SseRelay:
    """Cuts a byte stream at line ends (a key never straddles two writes) and keeps the last usage event."""

    def __init__(self, marker: bytes, redact: Redactor) -> None:
        self._marker = marker
        self._redact = redact
        self._pending = b""
        self.usage_line: bytes | None = None

    def feed(self, chunk: bytes) -> bytes:
        end = chunk.rfind(b"\n")
        if end < 0:
            self._pending += chunk
            return b""
        out = self._pending + chunk[: end + 1] if self._pending else chunk[: end + 1]
        self._pending = chunk[end + 1 :]
        self._scan(out)
        return self._redact.data(out)

    def flush(self) -> bytes:
        out, self._pending = self._pending, b""
        self._scan(out)
        return self._redact.data(out)

    def _scan(self, data: bytes) -> None:
        if self._marker not in data:
            return
        for line in reversed(data.split(b"\n")):
            if line.startswith(b"data:") and self._marker in line:
                self.usage_line = line[5:]
                return

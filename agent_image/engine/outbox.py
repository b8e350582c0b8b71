"""The events outbox: the engine's only output channel, one JSON event per line, append-only."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from ..protocol.events import EVENT_ADAPTER, MAX_EVENT_BYTES, Event, LogLine
from .clock import Clock, SystemClock

EVENTS_FILE = "events.jsonl"


class EventWriter:
    """Stamps events with seq/ts and appends them with a single write(2) each.

    One write per line on an O_APPEND descriptor means a reader never sees two events
    interleaved, and a crash leaves at most one partial last line (which readers skip).
    """

    def __init__(self, path: Path | None, clock: Clock | None = None) -> None:
        self._clock = clock or SystemClock()
        self._seq = 0
        self._lock = threading.Lock()
        self._fd: int | None = None
        self.events: list[Event] = []  # kept for in-process consumers and tests
        if path is not None:
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)

    def emit(self, event_type: type[Any], /, **fields: Any) -> Event:
        with self._lock:
            ev = event_type(seq=self._seq, ts=self._clock.now(), **fields)
            line = ev.model_dump_json().encode() + b"\n"
            if len(line) > MAX_EVENT_BYTES:
                # Never let one oversized payload (a huge answer) poison the stream.
                ev = self._shrink(event_type, fields)
                line = ev.model_dump_json().encode() + b"\n"
            self._seq += 1
            if self._fd is not None:
                os.write(self._fd, line)
            self.events.append(EVENT_ADAPTER.validate_python(ev))
            emitted: Event = ev
            return emitted

    def _shrink(self, event_type: type[Any], fields: dict[str, Any]) -> Any:
        budget = MAX_EVENT_BYTES // 2
        trimmed = dict(fields)
        for key in ("content", "message", "reason", "detail", "summary"):
            val = trimmed.get(key)
            if isinstance(val, str) and len(val) > budget:
                trimmed[key] = val[:budget] + f"\n[truncated: {len(val)} chars in total]"
        return event_type(seq=self._seq, ts=self._clock.now(), **trimmed)

    def log(self, message: str, level: str = "info") -> None:
        self.emit(LogLine, level=level, message=message[:8000])

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

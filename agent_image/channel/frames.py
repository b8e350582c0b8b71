"""The channel's wire format, shared by the sandbox (hub) and the supervisor (stdlib only).

A frame is `type:u8 | sid:u32 | len:u32 | payload[len]`, big-endian, `len <= MAX_PAYLOAD`.
`sid` names a stream inside the channel: odd ids are opened by the sandbox (a connection to its
API socket), even ids by the supervisor (a file transfer); 0 is the channel itself.
Every type, who sends it and what its payload holds is in docs/channel.md.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

VERSION = 1
HEADER = struct.Struct(">BII")
OFFSET = struct.Struct(">Q")
MAX_PAYLOAD = 1 << 20
EVENTS_CHUNK = 256 << 10  # the most outbox bytes one EVENTS frame carries
DATA_CHUNK = 64 << 10  # the most bytes one DATA frame carries (API streams, file transfers)


class T(IntEnum):
    """Frame types (docs/channel.md has the table)."""

    HELLO = 1  # supervisor -> sandbox, JSON {"v", "run_id", "have"}: I hold `have` bytes of the outbox
    WELCOME = 2  # sandbox -> supervisor, JSON {"v", "run_id", "state", "exit", "outbox_size"}
    EVENTS = 3  # sandbox -> supervisor, u64 offset + raw bytes of the outbox's events.jsonl from there
    ACK = 4  # supervisor -> sandbox, u64: the supervisor has appended the outbox up to here
    OPEN = 5  # sandbox -> supervisor, sid (odd): a client connected to the sandbox's API socket
    DATA = 6  # both, sid: bytes of that stream
    CLOSE = 7  # both, sid: that stream is over (either side; both directions)
    PUT = 8  # supervisor -> sandbox, sid (even), JSON {"dest", "read_only"}: a tar follows as DATA, ends with CLOSE
    GET = 9  # supervisor -> sandbox, sid (even), JSON {"path", "max_bytes"}: that folder as a tar (DATA, then DONE)
    DONE = 10  # sandbox -> supervisor, sid (even), JSON {"ok": true, "bytes"} or {"ok": false, "error"}
    START = 11  # supervisor -> sandbox: start the engine (once; later STARTs are ignored)
    SIGNAL = 12  # supervisor -> sandbox, JSON {"signal": N}: deliver to the engine's process group
    EXIT = 13  # sandbox -> supervisor, JSON {"exit_code", "signal"}: the engine has exited
    BYE = 14  # supervisor -> sandbox: I have everything; exit with the engine's code
    PING = 15  # both: answer with PONG carrying the same payload
    PONG = 16
    LOG = 17  # sandbox -> supervisor, UTF-8 text: the hub's own diagnostics


class FrameError(ValueError):
    """Bytes that are not a frame of this protocol (the peer is broken or hostile)."""


@dataclass(frozen=True)
class Frame:
    """One decoded frame."""

    type: T
    sid: int
    payload: bytes

    def json(self) -> dict[str, Any]:
        """The payload as a JSON object.

        Raises:
            FrameError: it is not one.
        """
        try:
            doc = json.loads(self.payload)
        except (UnicodeDecodeError, ValueError) as exc:
            raise FrameError(f"{self.type.name}: payload is not JSON: {exc}") from exc
        if not isinstance(doc, dict):
            raise FrameError(f"{self.type.name}: payload is not a JSON object")
        return doc

    def offset(self) -> tuple[int, bytes]:
        """An EVENTS/ACK payload: (u64 offset, the rest).

        Raises:
            FrameError: shorter than an offset.
        """
        if len(self.payload) < OFFSET.size:
            raise FrameError(f"{self.type.name}: payload shorter than an offset")
        return OFFSET.unpack_from(self.payload)[0], self.payload[OFFSET.size :]


def encode(type_: T, sid: int = 0, payload: bytes = b"") -> bytes:
    """One frame's bytes.

    Raises:
        FrameError: the payload is over MAX_PAYLOAD.
    """
    if len(payload) > MAX_PAYLOAD:
        raise FrameError(f"{type_.name}: payload of {len(payload)} bytes is over {MAX_PAYLOAD}")
    return HEADER.pack(int(type_), sid, len(payload)) + payload


def encode_json(type_: T, doc: dict[str, Any], sid: int = 0) -> bytes:
    """A frame whose payload is `doc` as compact JSON."""
    return encode(type_, sid, json.dumps(doc, separators=(",", ":")).encode())


def encode_offset(type_: T, offset: int, data: bytes = b"") -> bytes:
    """An EVENTS or ACK frame."""
    return encode(type_, 0, OFFSET.pack(offset) + data)


class Decoder:
    """Incremental decoding: feed bytes as they arrive, take the frames that are complete."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> Iterator[Frame]:
        """The frames completed by `data`, in order.

        Raises:
            FrameError: an unknown type or an oversized length (the stream is unusable after).
        """
        self._buf += data
        while len(self._buf) >= HEADER.size:
            type_, sid, n = HEADER.unpack_from(self._buf)
            if n > MAX_PAYLOAD:
                raise FrameError(f"frame of {n} bytes is over {MAX_PAYLOAD}")
            try:
                kind = T(type_)
            except ValueError:
                raise FrameError(f"unknown frame type {type_}") from None
            end = HEADER.size + n
            if len(self._buf) < end:
                return
            payload = bytes(self._buf[HEADER.size : end])
            del self._buf[:end]
            yield Frame(kind, sid, payload)

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held back."""
        return len(self._buf)

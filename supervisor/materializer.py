"""The host-side single writer of a run's log dir: validates events and materializes them."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from agent_image.protocol.events import (
    MAX_EVENT_BYTES,
    AnswerSubmitted,
    Event,
    FinalAnswer,
    LogLine,
    ModelCall,
    RunFinished,
    RunStarted,
    parse_event,
)
from agent_image.protocol.reducer import StatusReducer
from agent_image.protocol.result import RunResult
from agent_image.protocol.status import ConfigNote, ContainerSection, RunState, Status

from .logdir import LABEL_RE, SAFE_NAME_RE, RunPaths, atomic_write, atomic_write_json, sync_files
from .verdict import Verdict

log = logging.getLogger(__name__)

MIN_STATUS_INTERVAL_S = 0.25
MAX_STATUS_INTERVAL_S = 2.0
READ_CHUNK = 1 << 20
MAX_AGENTS = 16
# One drain reads small slices and stops after DRAIN_SLICE_S: the work a sandbox can cause per
# event-loop turn is bounded in time, not only in bytes (2-byte junk lines are 4096 per slice).
READ_SLICE_BYTES = 8 << 10
DRAIN_SLICE_S = 0.005
MAX_DRAIN_BYTES = 4 << 20  # one drain's byte bound when no time bound is given
SEEN_SEQS = 4096
MAX_COLLISION_LOGS = 10
# Repeated warnings about sandbox lines: the first of a kind is logged, the rest are counted
# and summed up once per interval ("ignored N more ...").
WARN_INTERVAL_S = 5.0
# Any string from the sandbox is cut to this many characters before it is logged or put into
# status.json / result.json (answers and final answers go to their own files, whole).
MAX_SANDBOX_TEXT = 2000
# massgen.log takes at most this much of the sandbox's own text (its log events and output);
# the supervisor's own lines are always written (repeated ones are aggregated).
MAX_SANDBOX_LOG_BYTES = 16 << 20


def clip(text: str, limit: int = MAX_SANDBOX_TEXT) -> str:
    """`text` cut to `limit` characters, saying how long it was."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... [{len(text) - limit} more characters cut]"


def _clip_model(model: BaseModel, keep: frozenset[str] = frozenset()) -> Any:
    """A copy of a sandbox-provided model with every long string (nested models too) clipped."""
    update: dict[str, Any] = {}
    for name, value in model:
        if name in keep:
            continue
        if isinstance(value, str) and len(value) > MAX_SANDBOX_TEXT:
            update[name] = clip(value)
        elif isinstance(value, list) and any(isinstance(v, BaseModel) for v in value):
            update[name] = [_clip_model(v) if isinstance(v, BaseModel) else v for v in value]
    return model.model_copy(update=update) if update else model


def _digest(raw: bytes) -> bytes:
    return hashlib.blake2b(raw.strip(), digest_size=16).digest()


class OutboxTailer:
    """Reads new complete lines of the sandbox's events file from a saved offset.

    The file lives in a directory the sandbox can write, so it is untrusted: opened with
    O_NOFOLLOW|O_NONBLOCK and accepted only if it is a regular file; the descriptor is kept,
    so replacing the file with a symlink later changes nothing for us. Reads never go past
    `max_offset` (the outbox cap: past it the run is stopped, and what follows is not read).
    """

    def __init__(
        self, path: Path, offset: int = 0, max_line: int = MAX_EVENT_BYTES, max_offset: int | None = None
    ) -> None:
        self.path = path
        self.offset = offset
        self.max_line = max_line
        self.max_offset = max_offset
        self._fd: int | None = None
        self._buf = bytearray()
        self._skipping = False
        self._refused: str | None = None
        self.warnings: list[str] = []
        self.dropped = 0  # oversized lines skipped: each leaves one legitimate gap in seq
        self.more = False
        # For the lines the last read returned: where each ends in the file, so a reader that
        # stops mid-way can rewind to the first line it did not apply; and whether it dropped any.
        self.line_ends: list[int] = []
        self.read_dropped = False

    def _open(self) -> bool:
        if self._fd is not None:
            return True
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        except OSError as exc:  # ELOOP: a symlink was planted
            return self._refuse(f"refusing outbox events file: {exc.strerror}")
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return self._refuse("refusing outbox events file: not a regular file")
        self._fd = fd
        return True

    def _refuse(self, warning: str) -> bool:
        # Every poll retries the open; warn once per cause, or the sandbox could flood massgen.log.
        if warning != self._refused:
            self.warnings.append(warning)
            self._refused = warning
        return False

    def fileno(self) -> int | None:
        """The descriptor of the events file once it is open (for a watch on that file alone)."""
        return self._fd if self._open() else None

    def size(self) -> int:
        """The events file's current size (0 before it exists): one fstat, no reading."""
        if not self._open():
            return 0
        assert self._fd is not None
        return os.fstat(self._fd).st_size

    def _drop(self, size: str) -> None:
        self.dropped += 1
        self.read_dropped = True
        self.warnings.append(f"dropped an oversized event line ({size} bytes)")

    def read_lines(self, max_bytes: int = MAX_DRAIN_BYTES) -> list[bytes]:
        """Complete new lines, reading at most `max_bytes` (`more` says whether data is left)."""
        self.more = False
        self.read_dropped = False
        self.line_ends = ends = []
        if not self._open():
            return []
        assert self._fd is not None
        lines: list[bytes] = []
        budget = max_bytes
        if self.max_offset is not None:
            budget = min(budget, self.max_offset - self.offset)
        while True:
            if budget <= 0:
                # bounded work per call: the follower comes back for the rest
                self.more = self.max_offset is None or self.offset < self.max_offset
                break
            chunk = os.pread(self._fd, min(READ_CHUNK, budget), self.offset)
            if not chunk:
                break
            chunk_at = self.offset
            budget -= len(chunk)
            self.offset += len(chunk)
            start = 0
            if self._skipping:
                # Inside a line already dropped: discard up to its newline, and count it once
                # (a 50 MB line is one warning and one seq gap, not one per read).
                nl = chunk.find(b"\n")
                if nl < 0:
                    continue
                self._skipping = False
                start = nl + 1
            last = chunk.rfind(b"\n")
            if last < start:
                self._buf += chunk[start:] if start else chunk
            else:
                head = chunk[start:last]
                pos = chunk_at + start - len(self._buf)  # where the first line starts
                if self._buf:
                    head = bytes(self._buf) + head
                self._buf = bytearray(chunk[last + 1 :])
                for part in head.split(b"\n"):
                    pos += len(part) + 1
                    if len(part) > self.max_line:
                        self._drop(str(len(part)))
                    else:
                        lines.append(part)
                        ends.append(pos)
            if len(self._buf) > self.max_line:
                self._drop(f">{self.max_line}")
                self._buf = bytearray()
                self._skipping = True
        return lines

    def rewind(self, offset: int) -> None:
        """Read again from `offset`, the end of a line the last read returned (see line_ends)."""
        self.offset = offset
        self._buf = bytearray()
        self._skipping = False
        self.more = True

    @property
    def committed_offset(self) -> int:
        """Bytes of the file consumed as complete lines (a partial last line is re-read later)."""
        return self.offset - len(self._buf)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


FOLLOW_STATE = ".follow.json"


def _open_append(path: Path, *, binary: bool) -> Any:
    """Append-open a log dir file, never through a symlink; kept open for the run's life."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    return os.fdopen(fd, "ab") if binary else os.fdopen(fd, "a", encoding="utf-8")


def _trim_partial_line(path: Path) -> None:
    """A crash mid-append can leave half a line at the end; drop it (it is re-read from the outbox)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb+") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            if size == 0:
                return
            fh.seek(max(0, size - READ_CHUNK))
            tail = fh.read()
            if tail.endswith(b"\n"):
                return
            cut = tail.rfind(b"\n")
            fh.truncate(size - len(tail) + cut + 1 if cut >= 0 else max(0, size - len(tail)))
    except FileNotFoundError:
        return


def _log_stamp(ts: float) -> str:
    """Local time with milliseconds, as massgen.log lines start: ``2026-12-02 03:04:05.678``."""
    ms = int(ts * 1000) % 1000  # truncated, never rounded up into the next second
    return f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(ts))}.{ms:03d}"


class Materializer:
    """Turns validated events into status.json, answers, final/, massgen.log and result.json."""

    def __init__(self, paths: RunPaths, *, clock: Callable[[], float] = time.time, resume: bool = False) -> None:
        self.paths = paths
        self.clock = clock
        self.reducer = StatusReducer(paths.run_id, str(paths.log_dir))
        self.status.run.state = RunState.STARTING
        self.resume_offset = 0
        if resume:
            _trim_partial_line(paths.events)
        self._events = _open_append(paths.events, binary=True)
        self._log = _open_append(paths.log, binary=False)
        self._unsynced: set[Path] = set()  # answers written without fsync (see _write_file)
        # Bytes of every file this materializer keeps in the log dir (appended ones as they grow,
        # replaced ones at their latest size): what the run's disk budget counts for the log dir.
        self._sizes: dict[str, int] = {
            "events.jsonl": os.fstat(self._events.fileno()).st_size,
            "massgen.log": os.fstat(self._log.fileno()).st_size,
        }
        self._sandbox_log_bytes = 0
        self._stamp_second, self._stamp_text = -1, ""
        self._write_lock = threading.Lock()
        self._status_gen = self._committed_gen = 0
        self._log_capped = False
        # kind -> [window start, suppressed count]: see _warn
        self._warned: dict[str, list[float]] = {}
        self.ignored_lines = 0  # outbox lines that were not accepted as events, all kinds
        self._agents: set[str] = set()
        self._last_seq = -1
        self._dirty = True
        self._last_write = 0.0
        self.finished_event: RunFinished | None = None
        self.final_file: Path | None = None
        self.event_count = 0
        self.listeners: list[Callable[[Event], None]] = []
        self._tailer: OutboxTailer | None = None
        self._started = False
        self._gap_allowance = 0
        self._seen: OrderedDict[int, bytes] = OrderedDict()  # digests of the last SEEN_SEQS accepted lines, by seq
        self.collisions = 0
        self.result: RunResult | None = None
        # With --sandbox none the engine calls models itself and reports them; behind the
        # gateway only the host's own metering counts.
        self.accept_model_calls = True
        if resume:
            self._replay()

    def _replay(self) -> None:
        """Rebuild state after a supervisor restart: events.jsonl, telemetry.jsonl, our own facts."""
        previous: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            previous = json.loads(self.paths.status.read_text(encoding="utf-8"))
        with os.fdopen(os.open(self.paths.events, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb") as fh:
            for raw in fh:
                try:
                    ev = parse_event(raw)
                except ValidationError:
                    continue
                if ev.seq <= self._last_seq:
                    continue
                self._last_seq = ev.seq
                self.event_count += 1
                if isinstance(ev, RunStarted):
                    self._started = True
                self._remember(ev.seq, raw)
                if not isinstance(ev, LogLine):
                    self._side_effects(ev)
                self._fold(ev, raw)
        try:
            with os.fdopen(os.open(self.paths.log_dir / "telemetry.jsonl", os.O_RDONLY | os.O_NOFOLLOW), "rb") as fh:
                for raw in fh:
                    with contextlib.suppress(ValidationError):
                        self.reducer.apply(ModelCall.model_validate_json(raw))
        except FileNotFoundError:
            pass
        st = self.status
        if previous:
            with contextlib.suppress(ValidationError):
                old = Status.model_validate(previous)
                st.container = old.container
                st.children = old.children
                st.run.deadline = old.run.deadline
                st.run.sandbox = old.run.sandbox
                st.run.parent_run_id = old.run.parent_run_id
                st.run.depth = old.run.depth
                st.run.supervisor_id = old.run.supervisor_id
                st.run.supervisor_pid = os.getpid()
                st.meta.question = st.meta.question or old.meta.question
                st.meta.config_warnings = old.meta.config_warnings
        try:
            state = json.loads((self.paths.log_dir / FOLLOW_STATE).read_text(encoding="utf-8"))
            self.resume_offset = int(state.get("offset", 0))
        except (OSError, ValueError, TypeError):
            self.resume_offset = 0
        self.log(f"supervisor resumed: replayed {self.event_count} events; outbox offset {self.resume_offset}")

    @property
    def status(self) -> Status:
        return self.reducer.status

    @property
    def written_bytes(self) -> int:
        """Bytes the materializer has in the log dir now (events, massgen.log, answers, status...).

        Appended files count as they grow, replaced files at their latest size; the disk budget
        reads this rather than walking the log dir.
        """
        return sum(self._sizes.values())

    def _write_file(self, path: Path, data: bytes | str) -> None:
        # Answers are written on the loop without fsync (one can wait ~0.2 s for the journal
        # while other runs' disks are busy): events.jsonl replay rewrites them after a crash,
        # and finalize makes them durable before result.json says the run is done.
        raw = data.encode() if isinstance(data, str) else data
        atomic_write(path, raw, sync=False)
        self._unsynced.add(path)
        self._sizes[str(path.relative_to(self.paths.log_dir))] = len(raw)

    def _write_json(self, path: Path, obj: Any) -> None:
        atomic_write_json(path, obj)
        with contextlib.suppress(OSError):
            self._sizes[str(path.relative_to(self.paths.log_dir))] = os.stat(path).st_size

    # -- logging -------------------------------------------------------------------------

    def log(self, message: str, level: str = "info", ts: float | None = None, *, sandbox: bool = False) -> None:
        """One massgen.log entry; `sandbox` marks text the sandbox wrote (capped in all).

        Callers clip sandbox strings they embed in their own messages (`clip`).
        """
        if sandbox:
            if self._sandbox_log_bytes >= MAX_SANDBOX_LOG_BYTES:
                if not self._log_capped:
                    self._log_capped = True
                    self.log(
                        f"massgen.log holds {MAX_SANDBOX_LOG_BYTES >> 20} MiB of the sandbox's own text;"
                        " later sandbox log lines are not written here (events.jsonl still has the events)",
                        "warning",
                    )
                return
            message = clip(message, MAX_SANDBOX_LOG_BYTES - self._sandbox_log_bytes)
            self._sandbox_log_bytes += len(message)
        stamp = self._stamp(ts or self.clock())
        text = "".join(f"{stamp} {level.upper():7} {line}\n" for line in message.splitlines() or [""])
        self._log.write(text)
        self._log.flush()
        self._sizes["massgen.log"] += len(text.encode())

    def _stamp(self, ts: float) -> str:
        """_log_stamp(ts), with the date and time formatted once per second (a flood logs many per second)."""
        try:
            second = int(ts)
            if second != self._stamp_second:
                self._stamp_text = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
                self._stamp_second = second
        except (OverflowError, OSError, ValueError):
            # ts comes from the sandbox: a valid event may still be outside time_t's range
            return _log_stamp(self.clock())
        return f"{self._stamp_text}.{int(ts * 1000) % 1000:03d}"

    def _warn(self, kind: str, message: str) -> None:
        """A warning about a line from the sandbox, aggregated per kind.

        The first of a kind is written at once; later ones within WARN_INTERVAL_S are only
        counted and summed up in one line by flush_warnings. A junk line costs a counter bump,
        not a log line: 32 MiB of junk no longer makes a 1.8 GB massgen.log.
        """
        self.ignored_lines += 1
        window = self._warned.get(kind)
        if window is None:
            self._warned[kind] = [self.clock(), 0]
            self.log(message, "warning")
        else:
            window[1] += 1

    def _suppressed(self, kind: str) -> bool:
        """Count a warning of `kind` and say True when its interval already logged one (see _warn)."""
        window = self._warned.get(kind)
        if window is None:
            return False
        window[1] += 1
        self.ignored_lines += 1
        return True

    def flush_warnings(self, *, force: bool = False) -> None:
        """Write "ignored N more ..." for each kind whose interval is over (all kinds if `force`)."""
        if not self._warned:
            return
        now = self.clock()
        for kind, (since, count) in list(self._warned.items()):
            if force or now - since >= WARN_INTERVAL_S:
                del self._warned[kind]
                if count:
                    self.log(f"ignored {int(count)} more {kind} in the last {max(0.0, now - since):.1f}s", "warning")

    # -- events ----------------------------------------------------------------------------

    def feed(self, raw: bytes) -> Event | None:
        """Validate and apply one line; malformed lines become warnings, never exceptions."""
        stripped = raw.strip()
        if not stripped:
            return None
        if len(raw) > MAX_EVENT_BYTES:
            self._warn("oversized event lines", f"ignored oversized event line ({len(raw)} bytes)")
            return None
        if stripped[:1] != b"{" or stripped[-1:] != b"}":
            # Cheap before the parser: the commonest junk costs a slice, not a JSON error path.
            self._warn("malformed event lines", "ignored malformed event line: not a JSON object")
            return None
        try:
            ev = parse_event(raw)
        except ValidationError as exc:
            if self._suppressed("malformed event lines"):
                return None  # counted; describing the error would cost more than parsing
            first = exc.errors(include_url=False, include_input=False)[0]
            where = clip(".".join(str(p) for p in first["loc"]), 200)
            self._warn("malformed event lines", f"ignored malformed event line: {where}: {clip(first['msg'], 200)}")
            return None
        if ev.seq <= self._last_seq:
            # Already seen: a replay after a restart repeats the same line. A different line
            # with a used seq was not written by the engine (or the engine's own line lost the
            # race to a forged one): say so.
            seen = self._seen.get(ev.seq)
            if seen is not None and seen != _digest(raw):
                self.collisions += 1
                if self.collisions <= MAX_COLLISION_LOGS:
                    self.log(
                        f"sequence collision: a second, different line with seq {ev.seq} (type {ev.type}) ignored;"
                        " a process in the sandbox may be forging events",
                        "warning",
                    )
            return None
        gap = ev.seq - (self._last_seq + 1)
        if 0 < gap <= self._gap_allowance:
            self._gap_allowance -= gap  # lines the tailer dropped as oversized
        elif gap:
            # The engine numbers its events without gaps; anything else was not written by it
            # (a forged line must not make us skip the real events that follow).
            self._warn(
                "events out of sequence",
                f"ignored event out of sequence: expected seq {self._last_seq + 1}, got {ev.seq}",
            )
            return None
        problem = self._unacceptable(ev)
        if problem:
            self._warn("unacceptable events", f"ignored event seq={ev.seq} type={ev.type}: {problem}")
            self._last_seq = ev.seq
            return None
        self._last_seq = ev.seq
        data = raw.rstrip(b"\n") + b"\n"
        self._events.write(data)
        self._events.flush()
        self._sizes["events.jsonl"] += len(data)
        self.event_count += 1
        self._remember(ev.seq, raw)
        self._side_effects(ev)
        self._fold(ev, raw)
        self._dirty = True
        for fn in self.listeners:
            fn(ev)
        return ev

    def _remember(self, seq: int, raw: bytes) -> None:
        self._seen[seq] = _digest(raw)
        while len(self._seen) > SEEN_SEQS:
            # popitem, not pop(next(iter())): a plain dict's first live key is found by
            # scanning past every deleted slot, which made this O(n) per accepted event.
            self._seen.popitem(last=False)

    def _fold(self, ev: Event, raw: bytes) -> None:
        """Apply an accepted event to status; the sandbox's run_finished is only a claim (see finalize).

        Its strings are clipped on the way in (answers only go in as previews).
        """
        if isinstance(ev, RunFinished | LogLine):
            # A log line changes nothing in status but its clock fields, which write_status
            # sets itself: folding it would be the costliest no-op of a forged-log flood.
            return
        question = self.status.meta.question
        if len(raw) > MAX_SANDBOX_TEXT:  # no string of a shorter line can be longer
            ev = _clip_model(ev, keep=frozenset({"content"}))
        self.reducer.apply(ev)
        if question:
            # The supervisor was told the question; the sandbox's claim of it is not needed.
            self.status.meta.question = question

    def _unacceptable(self, ev: Event) -> str | None:
        """Why an event cannot be part of this run (it is then dropped), or None."""
        if isinstance(ev, RunStarted):
            if self._started:
                return "a second run_started"
            if len(ev.agents) > MAX_AGENTS:
                return f"more than {MAX_AGENTS} agents"
            self._started = True
            return None
        if isinstance(ev, ModelCall) and not self.accept_model_calls:
            return "model calls are metered by the gateway, not reported by the sandbox"
        fields = type(ev).__pydantic_fields__
        for name in ("agent", "target", "winner"):
            # Only fields the event has: getattr on a missing one takes pydantic's slow path.
            value = getattr(ev, name) if name in fields else None
            if value is not None and value not in self._agents:
                return f"{name} {str(value)[:40]!r} is not an agent of this run"
        return None

    def _side_effects(self, ev: Event) -> None:
        if isinstance(ev, RunStarted):
            self._agents = {a.id for a in ev.agents if SAFE_NAME_RE.fullmatch(a.id)}
        elif isinstance(ev, AnswerSubmitted):
            if ev.agent in self._agents and LABEL_RE.fullmatch(ev.label):
                target = self.paths.answer_file(ev.agent, ev.label)
                target.parent.mkdir(parents=True, exist_ok=True)
                self._write_file(target, ev.content)
            else:
                self._warn(
                    "answers from unknown agents or labels",
                    f"answer from unknown agent/label {clip(ev.agent, 80)!r}/{clip(ev.label, 80)!r} not written",
                )
        elif isinstance(ev, FinalAnswer):
            if ev.agent in self._agents:
                target = self.paths.final_file(ev.agent)
                target.parent.mkdir(parents=True, exist_ok=True)
                self._write_file(target, ev.content)
                self.final_file = target
                self.status.results.answer_file = str(target)
        elif isinstance(ev, LogLine):
            self.log(ev.message, ev.level, ts=ev.ts, sandbox=True)
        elif isinstance(ev, RunFinished):
            self.finished_event = ev

    def drain(self, tailer: OutboxTailer, budget_s: float = DRAIN_SLICE_S) -> int:
        """Apply new outbox lines for about `budget_s` seconds; returns the events applied.

        Reads small slices until the file is exhausted or the time is up (then `tailer.more`
        is set and the follower comes back on a later loop turn): one flooding sandbox cannot
        hold the event loop that serves every other run and the API.
        """
        self._tailer = tailer
        n = 0
        deadline = time.monotonic() + budget_s
        while True:
            lines = tailer.read_lines(READ_SLICE_BYTES)
            self._gap_allowance += tailer.dropped
            self.ignored_lines += tailer.dropped
            tailer.dropped = 0
            for w in tailer.warnings:
                if w.startswith("dropped an oversized"):
                    self._warn("oversized event lines dropped", w)
                    self.ignored_lines -= 1  # counted above with the drop
                else:
                    self.log(w, "warning")
            tailer.warnings.clear()
            for i, line in enumerate(lines):
                if self.feed(line) is not None:
                    n += 1
                if time.monotonic() >= deadline and i + 1 < len(lines) and not tailer.read_dropped:
                    # Out of time mid-slice (a line can cost a file write): the rest is read
                    # again next turn. Not past a dropped line, whose gap allowance is counted.
                    tailer.rewind(tailer.line_ends[i])
                    break
            if not tailer.more or time.monotonic() >= deadline:
                break
        self.flush_warnings()
        return n

    def record_model_call(self, ev: ModelCall) -> None:
        """A call metered by the host gateway: into status telemetry and telemetry.jsonl."""
        self.reducer.apply(ev)
        text = ev.model_dump_json() + "\n"
        with _open_append(self.paths.log_dir / "telemetry.jsonl", binary=False) as fh:
            fh.write(text)
        self._sizes["telemetry.jsonl"] = self._sizes.get("telemetry.jsonl", 0) + len(text.encode())
        self.log(
            f"model call agent={ev.agent} {ev.provider}/{ev.model} tokens={ev.prompt_tokens}+{ev.completion_tokens}"
            f" cached={ev.cached_tokens} cost_usd={ev.cost_usd:.6f} latency_s={ev.latency_s:.3f} ok={ev.ok}"
        )
        self._dirty = True

    # -- supervisor facts --------------------------------------------------------------------

    def set_config_notes(self, notes: Iterable[Any]) -> None:
        """Record the config's warnings and info notes: massgen.log, status.json meta.config_warnings
        (warnings only) and, at the end, result.json."""
        kept = []
        for note in notes:
            self.log(f"config {note.severity}: {note}", "warning" if note.severity == "warning" else "info")
            if note.severity == "warning":
                kept.append(ConfigNote.model_validate(note.to_dict()))
        self.status.meta.config_warnings = kept
        self._dirty = True

    def set_run(self, **fields: object) -> None:
        for k, v in fields.items():
            setattr(self.status.run, k, v)
        self._dirty = True

    def set_container(self, section: ContainerSection) -> None:
        self.status.container = section
        self._dirty = True

    # -- status.json -------------------------------------------------------------------------

    def next_write_in(self) -> float:
        """Seconds until write_status would write (0 when due), for followers to sleep exactly that long."""
        since = self.clock() - self._last_write
        return max(0.0, (MIN_STATUS_INTERVAL_S if self._dirty else MAX_STATUS_INTERVAL_S) - since)

    def write_status(self, *, force: bool = False) -> bool:
        """Coalesced: at most one write per 0.25 s, at least one per 2 s while running."""
        job = self._status_job(force)
        if job is None:
            return False
        self._commit(*job)
        return True

    async def write_status_async(self, *, force: bool = False) -> bool:
        """write_status with the file writes on a worker thread.

        Each write is two fsyncs, and a sandbox flooding the disk can make an fsync take a long
        time: that may delay this run's follower, never the event loop everyone shares.
        """
        job = self._status_job(force)
        if job is None:
            return False
        await asyncio.to_thread(self._commit, *job)
        return True

    def _status_job(self, force: bool) -> tuple[int, list[tuple[Path, Any]]] | None:
        """What a due status write would write (a snapshot taken now), or None when not due."""
        now = self.clock()
        since = now - self._last_write
        if not force:
            if since < MIN_STATUS_INTERVAL_S:
                return None
            if not self._dirty and since < MAX_STATUS_INTERVAL_S:
                return None
        st = self.status
        st.meta.last_updated = now
        if st.meta.start_time is not None and st.run.state != RunState.FINISHED:
            st.meta.elapsed_seconds = round(max(0.0, now - st.meta.start_time), 3)
        files: list[tuple[Path, Any]] = [(self.paths.status, st.model_dump(mode="json"))]
        if self._tailer is not None:
            # Saved after the events it covers were appended: a crash in between re-reads them
            # from the outbox and the seq check drops the duplicates.
            state = {"offset": self._tailer.committed_offset, "seq": self._last_seq}
            files.append((self.paths.log_dir / FOLLOW_STATE, state))
        self._last_write = now
        self._dirty = False
        self._status_gen += 1
        return self._status_gen, files

    def _commit(self, gen: int, files: list[tuple[Path, Any]]) -> None:
        # A write still on its thread when a later one (finalize after a cancel) runs must not
        # replace the later status with its older snapshot.
        with self._write_lock:
            if gen < self._committed_gen:
                return
            if any(path == self.paths.result for path, _ in files):
                pending, self._unsynced = sorted(self._unsynced), set()
                sync_files(pending)
            for path, doc in files:
                self._write_json(path, doc)
            self._committed_gen = gen

    def finalize(self, verdict: Verdict, *, container_exit: int | None = None) -> RunResult:
        """Record the run's end in status.json and result.json; later calls return the first verdict.

        Only here does `run.state` become finished: the sandbox's own `run_finished` is a claim
        (kept in `finished_event` for supervisor/verdict.py), never applied to status.
        """
        result, job = self._finalize_job(verdict, container_exit)
        if job is not None:
            self._commit(*job)
        return result

    async def finalize_async(self, verdict: Verdict, *, container_exit: int | None = None) -> RunResult:
        """finalize with the file writes (six fsyncs) on a worker thread, as write_status_async."""
        result, job = self._finalize_job(verdict, container_exit)
        if job is not None:
            await asyncio.to_thread(self._commit, *job)
        return result

    def _finalize_job(
        self, verdict: Verdict, container_exit: int | None
    ) -> tuple[RunResult, tuple[int, list[tuple[Path, Any]]] | None]:
        if self.result is not None:
            return self.result, None
        self.flush_warnings(force=True)
        now = self.clock()
        # The detail may be the engine's claim, i.e. sandbox text.
        exit_code, reason, detail = verdict.exit_code, verdict.reason.value, clip(verdict.detail)
        # The verdict goes to status, never into events.jsonl (that holds only what the sandbox wrote).
        self.reducer.apply(
            RunFinished(seq=self._last_seq + 1, ts=now, exit_code=exit_code, reason=reason, detail=detail)
        )
        st = self.status
        if st.meta.start_time is not None:
            st.meta.elapsed_seconds = round(max(0.0, now - st.meta.start_time), 3)
        winner = st.results.winner if exit_code == 0 else None
        started = st.run.started_at
        result = RunResult(
            run_id=self.paths.run_id,
            exit_code=exit_code,
            reason=reason,
            detail=detail,
            winner=winner,
            answer_file=str(self.final_file) if (self.final_file and exit_code == 0) else None,
            status_file=str(self.paths.status),
            log_dir=str(self.paths.log_dir),
            started_at=started,
            finished_at=now,
            duration_s=round(now - started, 3) if started else None,
            container_exit_code=container_exit,
            container_id=st.container.id if st.container else None,
            config_warnings=list(st.meta.config_warnings),
        )
        if self.collisions > MAX_COLLISION_LOGS:
            self.log(
                f"{self.collisions} sequence collisions in total (only the first {MAX_COLLISION_LOGS} logged)",
                "warning",
            )
        self.log(f"run finished: exit_code={exit_code} reason={reason} {detail}".rstrip())
        job = self._status_job(True)
        assert job is not None  # forced
        gen, files = job
        files.append((self.paths.result, json.loads(result.model_dump_json())))  # last: it means "done"
        self.result = result
        return result, (gen, files)

    def close(self) -> None:
        if not self._log.closed:
            self.flush_warnings(force=True)
        self._events.close()
        self._log.close()

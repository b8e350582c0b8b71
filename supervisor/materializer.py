"""The host-side single writer of a run's log dir: validates events and materializes them."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import stat
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

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

from .logdir import LABEL_RE, SAFE_NAME_RE, RunPaths, atomic_write, atomic_write_json
from .verdict import Verdict

log = logging.getLogger(__name__)

MIN_STATUS_INTERVAL_S = 0.25
MAX_STATUS_INTERVAL_S = 2.0
READ_CHUNK = 1 << 20
MAX_AGENTS = 16
MAX_DRAIN_BYTES = 4 << 20
SEEN_SEQS = 4096
MAX_COLLISION_LOGS = 10


def _digest(raw: bytes) -> bytes:
    return hashlib.blake2b(raw.strip(), digest_size=16).digest()


class OutboxTailer:
    """Reads new complete lines of the sandbox's events file from a saved offset.

    The file lives in a directory the sandbox can write, so it is untrusted: opened with
    O_NOFOLLOW|O_NONBLOCK and accepted only if it is a regular file; the descriptor is kept,
    so replacing the file with a symlink later changes nothing for us.
    """

    def __init__(self, path: Path, offset: int = 0, max_line: int = MAX_EVENT_BYTES) -> None:
        self.path = path
        self.offset = offset
        self.max_line = max_line
        self._fd: int | None = None
        self._buf = b""
        self._skipping = False
        self._refused: str | None = None
        self.warnings: list[str] = []
        self.dropped = 0  # oversized lines skipped: each leaves one legitimate gap in seq
        self.more = False

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

    def read_lines(self, max_bytes: int = MAX_DRAIN_BYTES) -> list[bytes]:
        """Complete new lines, reading at most `max_bytes` (`more` says whether data is left)."""
        self.more = False
        if not self._open():
            return []
        assert self._fd is not None
        lines: list[bytes] = []
        budget = max_bytes
        while True:
            if budget <= 0:
                self.more = True  # bounded work per call: the follower comes back for the rest
                break
            chunk = os.pread(self._fd, min(READ_CHUNK, budget), self.offset)
            if not chunk:
                break
            budget -= len(chunk)
            self.offset += len(chunk)
            data = self._buf + chunk
            parts = data.split(b"\n")
            self._buf = parts.pop()
            for part in parts:
                if self._skipping:
                    self._skipping = False  # the tail of an oversized line
                    continue
                if len(part) > self.max_line:
                    self.dropped += 1
                    self.warnings.append(f"dropped an oversized event line ({len(part)} bytes)")
                    continue
                lines.append(part)
            if len(self._buf) > self.max_line:
                self.dropped += 1
                self.warnings.append(f"dropped an oversized event line (>{self.max_line} bytes)")
                self._buf = b""
                self._skipping = True
        return lines

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
        self._seen: dict[int, bytes] = {}  # digests of the last SEEN_SEQS accepted lines, by seq
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
                self._fold(ev)
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

    # -- logging -------------------------------------------------------------------------

    def log(self, message: str, level: str = "info", ts: float | None = None) -> None:
        try:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts or self.clock()))
        except (OverflowError, OSError, ValueError):
            # ts comes from the sandbox: a valid event may still be outside time_t's range
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.clock()))
        for line in message.splitlines() or [""]:
            self._log.write(f"{stamp} {level.upper():7} {line}\n")
        self._log.flush()

    # -- events ----------------------------------------------------------------------------

    def feed(self, raw: bytes) -> Event | None:
        """Validate and apply one line; malformed lines become warnings, never exceptions."""
        if not raw.strip():
            return None
        if len(raw) > MAX_EVENT_BYTES:
            self.log(f"ignored oversized event line ({len(raw)} bytes)", "warning")
            return None
        try:
            ev = parse_event(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            self.log(f"ignored malformed event line: {where}: {first['msg']}", "warning")
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
            self.log(f"ignored event out of sequence: expected seq {self._last_seq + 1}, got {ev.seq}", "warning")
            return None
        problem = self._unacceptable(ev)
        if problem:
            self.log(f"ignored event seq={ev.seq} type={ev.type}: {problem}", "warning")
            self._last_seq = ev.seq
            return None
        self._last_seq = ev.seq
        self._events.write(raw.rstrip(b"\n") + b"\n")
        self._events.flush()
        self.event_count += 1
        self._remember(ev.seq, raw)
        self._side_effects(ev)
        self._fold(ev)
        self._dirty = True
        for fn in self.listeners:
            fn(ev)
        return ev

    def _remember(self, seq: int, raw: bytes) -> None:
        self._seen[seq] = _digest(raw)
        while len(self._seen) > SEEN_SEQS:
            self._seen.pop(next(iter(self._seen)))

    def _fold(self, ev: Event) -> None:
        """Apply an accepted event to status; the sandbox's run_finished is only a claim (see finalize)."""
        if not isinstance(ev, RunFinished):
            self.reducer.apply(ev)

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
        for name in ("agent", "target", "winner"):
            value = getattr(ev, name, None)
            if value is not None and value not in self._agents:
                return f"{name} {str(value)[:40]!r} is not an agent of this run"
        return None

    def _side_effects(self, ev: Event) -> None:
        if isinstance(ev, RunStarted):
            self._agents = {a.id for a in ev.agents if SAFE_NAME_RE.match(a.id)}
        elif isinstance(ev, AnswerSubmitted):
            if ev.agent in self._agents and LABEL_RE.match(ev.label):
                target = self.paths.answer_file(ev.agent, ev.label)
                target.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(target, ev.content)
            else:
                self.log(f"answer from unknown agent/label {ev.agent!r}/{ev.label!r} not written", "warning")
        elif isinstance(ev, FinalAnswer):
            if ev.agent in self._agents:
                target = self.paths.final_file(ev.agent)
                target.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(target, ev.content)
                self.final_file = target
                self.status.results.answer_file = str(target)
        elif isinstance(ev, LogLine):
            self.log(ev.message, ev.level, ts=ev.ts)
        elif isinstance(ev, RunFinished):
            self.finished_event = ev

    def drain(self, tailer: OutboxTailer) -> int:
        self._tailer = tailer
        n = 0
        lines = tailer.read_lines()
        self._gap_allowance += tailer.dropped
        tailer.dropped = 0
        for line in lines:
            if self.feed(line) is not None:
                n += 1
        for w in tailer.warnings:
            self.log(w, "warning")
        tailer.warnings.clear()
        return n

    def record_model_call(self, ev: ModelCall) -> None:
        """A call metered by the host gateway: into status telemetry and telemetry.jsonl."""
        self.reducer.apply(ev)
        with _open_append(self.paths.log_dir / "telemetry.jsonl", binary=False) as fh:
            fh.write(ev.model_dump_json() + "\n")
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
        now = self.clock()
        since = now - self._last_write
        if not force:
            if since < MIN_STATUS_INTERVAL_S:
                return False
            if not self._dirty and since < MAX_STATUS_INTERVAL_S:
                return False
        st = self.status
        st.meta.last_updated = now
        if st.meta.start_time is not None and st.run.state != RunState.FINISHED:
            st.meta.elapsed_seconds = round(max(0.0, now - st.meta.start_time), 3)
        atomic_write_json(self.paths.status, st.model_dump(mode="json"))
        if self._tailer is not None:
            # Saved after the events it covers were appended: a crash in between re-reads them
            # from the outbox and the seq check drops the duplicates.
            atomic_write_json(
                self.paths.log_dir / FOLLOW_STATE, {"offset": self._tailer.committed_offset, "seq": self._last_seq}
            )
        self._last_write = now
        self._dirty = False
        return True

    def finalize(self, verdict: Verdict, *, container_exit: int | None = None) -> RunResult:
        """Record the run's end in status.json and result.json; later calls return the first verdict.

        Only here does `run.state` become finished: the sandbox's own `run_finished` is a claim
        (kept in `finished_event` for supervisor/verdict.py), never applied to status.
        """
        if self.result is not None:
            return self.result
        now = self.clock()
        exit_code, reason, detail = verdict.exit_code, verdict.reason.value, verdict.detail
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
        self.write_status(force=True)
        atomic_write_json(self.paths.result, json.loads(result.model_dump_json()))
        self.result = result
        return result

    def close(self) -> None:
        self._events.close()
        self._log.close()

"""What the dashboard shows, read from log directories only (status.json, events.jsonl, ...).

Everything read here was written by the supervisor, but much of it repeats what a sandbox
claimed (answers, tool summaries, log lines): it is data to escape, never markup. Files are
opened with O_NOFOLLOW and read with a size cap, so a planted symlink or a huge file cannot
make the dashboard read elsewhere or stall.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from agent_image.protocol.events import (
    AgentError,
    AgentFailed,
    AnswerSubmitted,
    FinalAnswer,
    LogLine,
    ModelCall,
    RunStarted,
    ToolCalled,
    VoteCast,
    WinnerSelected,
    parse_event,
)

# The log-dir layout and its bounded, symlink-refusing readers are logdir's (one home for them),
# and a run's row (what the lists show of its status.json) is runrows' (ps and watch share it).
from ..logdir import STATUS_NAME, iter_run_dirs, read_capped, read_json
from ..runrows import RunRow, row_from_status
from ..runrows import as_int as _int
from ..runrows import as_num as _num
from ..runrows import as_str as _str
from ..runrows import section as _section

STATUS = STATUS_NAME
MAX_EVENTS_BYTES = 64 << 20
MAX_RESULT_BYTES = 1 << 20
LOG_TAIL_BYTES = 64 << 10
MAX_DEPTH = 32
# Environment variables whose values must never be shown, even if a log line repeats one.
_SECRET_NAME_RE = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL)", re.IGNORECASE)
MIN_SECRET_CHARS = 8
_STALE_VOTE_RE = re.compile(r"^(\S+) voted for \S+ on a stale view")


def file_size(path: Path) -> int:
    try:
        st = os.lstat(path)
    except OSError:
        return 0
    return st.st_size if stat.S_ISREG(st.st_mode) else 0


class Redactor:
    """Replaces the values of the host's secret-looking environment variables in displayed text."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        values = {v for k, v in env.items() if _SECRET_NAME_RE.search(k) and len(v) >= MIN_SECRET_CHARS}
        self._re = re.compile("|".join(re.escape(v) for v in sorted(values, key=len, reverse=True))) if values else None

    def __call__(self, text: str) -> str:
        return self._re.sub("[redacted]", text) if self._re is not None else text


def read_row(log_dir: Path) -> RunRow:
    st = read_json(log_dir / STATUS)
    if st is None and file_size(log_dir / "massgen.log"):
        # Prepared (massgen.log is its first file) but no status.json yet: the config is being
        # checked or the sandbox started; shown at once rather than seconds later.
        return RunRow(run_id=log_dir.name, log_dir=log_dir, state="starting")
    return row_from_status(log_dir, st)


class RunIndex:
    """Every run under some logs roots, by log dir; refreshed one status.json at a time."""

    def __init__(self, roots: Iterable[Path] = ()) -> None:
        self.roots: list[Path] = []
        self.rows: dict[Path, RunRow] = {}
        self.by_id: dict[str, Path] = {}
        for r in roots:
            self.add_root(r)

    def add_root(self, root: Path) -> bool:
        root = root.absolute()
        if root in self.roots:
            return False
        self.roots.append(root)
        return True

    def put(self, row: RunRow) -> None:
        self.rows[row.log_dir] = row
        self.by_id[row.run_id] = row.log_dir

    def discover(self, directory: Path, depth: int = 0) -> list[RunRow]:
        """New (and, for unfinished runs, nested) run dirs under `directory`; returns the rows added."""
        added: list[RunRow] = []
        if depth > MAX_DEPTH:
            return added
        for d in iter_run_dirs(directory):
            row = self.rows.get(d)
            if row is None:
                if not (d / STATUS).exists() and not file_size(d / "massgen.log"):
                    continue  # created a moment ago; its first log line will announce it
                row = read_row(d)
                self.put(row)
                added.append(row)
            elif row.finished and not added:
                # A finished run grows no new children, but one found finished may have some.
                continue
            added.extend(self.discover(d / "children", depth + 1))
        return added

    def scan(self) -> list[RunRow]:
        added: list[RunRow] = []
        for root in self.roots:
            added.extend(self.discover(root))
        return added

    def inside(self, log_dir: Path) -> bool:
        from ..logdir import RUN_ID_RE

        if not RUN_ID_RE.fullmatch(log_dir.name):
            return False
        for root in self.roots:
            with contextlib.suppress(ValueError):
                rel = log_dir.relative_to(root).parts
                # <root>/<run>, <root>/<run>/children/<run>, ...: the layout we create, nothing else.
                return len(rel) % 2 == 1 and all(p == "children" for p in rel[1::2])
        return False

    def get(self, run_id: str) -> RunRow | None:
        d = self.by_id.get(run_id)
        return self.rows.get(d) if d is not None else None

    def ordered(self) -> list[RunRow]:
        """Tree order: newest top-level run first, each run's children (oldest first) under it."""
        kids: dict[Path, list[RunRow]] = {}
        roots: list[RunRow] = []
        for row in sorted(self.rows.values(), key=lambda r: r.run_id):
            parent = row.log_dir.parent.parent if row.log_dir.parent.name == "children" else None
            if parent is not None and parent in self.rows:
                kids.setdefault(parent, []).append(row)
            else:
                roots.append(row)
        out: list[RunRow] = []

        def walk(row: RunRow, level: int) -> None:
            out.append(row)
            if level < MAX_DEPTH:
                for k in kids.get(row.log_dir, []):
                    walk(k, level + 1)

        for r in reversed(roots):
            walk(r, 0)
        return out

    def root_of(self, row: RunRow) -> RunRow:
        cur = row
        for _ in range(MAX_DEPTH):
            if cur.log_dir.parent.name != "children":
                break
            parent = self.rows.get(cur.log_dir.parent.parent)
            if parent is None:
                break
            cur = parent
        return cur


# -- one run in full ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Mark:
    """One thing an agent did at a time: a point on the timeline."""

    t: float  # seconds since the run started
    agent: str
    kind: str  # answer, vote, restart, tool, model, error, failed, winner, final
    title: str
    seq: int | None = None


@dataclass(frozen=True)
class UsagePoint:
    t: float
    tokens: int
    cost_usd: float


@dataclass(frozen=True)
class Answer:
    agent: str
    label: str
    t: float
    content: str


@dataclass
class RunDetail:
    """Everything the run page shows, from one pass over the log dir."""

    row: RunRow
    status: dict[str, Any]
    result: dict[str, Any] | None
    agents: dict[str, dict[str, Any]]
    marks: list[Mark]
    answers: list[Answer]
    final: Answer | None
    usage_total: list[UsagePoint]
    usage_by_agent: dict[str, list[UsagePoint]]
    usage_by_model: dict[str, list[UsagePoint]]
    duration_s: float
    children: list[RunRow]
    container: dict[str, Any]
    log_tail: str
    log_offset: int
    events_truncated: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class JsonLines:
    """A JSON-lines file parsed incrementally: each read parses only the complete lines appended
    since the last (a page open on a long run must not re-parse megabytes per status write)."""

    def __init__(self, path: Path, parse: Callable[[bytes], Any], limit: int = MAX_EVENTS_BYTES) -> None:
        self.path = path
        self.parse = parse
        self.limit = limit
        self.offset = 0
        self.items: list[Any] = []
        self.truncated = False
        self._lock = threading.Lock()

    def read(self) -> list[Any]:
        with self._lock:
            size = file_size(self.path)
            if size < self.offset:  # replaced or cut: start over
                self.offset, self.items, self.truncated = 0, [], False
            want = min(size, self.limit) - self.offset
            if want > 0:
                raw = read_capped(self.path, want, self.offset) or b""
                end = raw.rfind(b"\n") + 1
                for line in raw[:end].split(b"\n"):
                    if line.strip():
                        with contextlib.suppress(ValidationError, ValueError):
                            self.items.append(self.parse(line))
                self.offset += end
            self.truncated = size > self.limit
            return list(self.items)


class RunFiles:
    """The incremental readers of one run's events.jsonl and telemetry.jsonl."""

    def __init__(self, log_dir: Path) -> None:
        self.events = JsonLines(log_dir / "events.jsonl", parse_event)
        self.telemetry = JsonLines(log_dir / "telemetry.jsonl", ModelCall.model_validate_json)


def _cumulative(calls: list[ModelCall], t0: float) -> list[UsagePoint]:
    # The same sums, in the same (file) order and rounding, as the reducer's telemetry totals
    # (agent_image.protocol.reducer._add_usage): the chart's last point is status.json's figure.
    # Concurrent calls may be recorded out of ts order; a point is drawn no earlier than the last.
    pts = [UsagePoint(0.0, 0, 0.0)]
    tokens, cost, t = 0, 0.0, 0.0
    for ev in calls:
        tokens += ev.prompt_tokens + ev.completion_tokens
        cost = round(cost + ev.cost_usd, 10)
        t = max(t, ev.ts - t0)
        pts.append(UsagePoint(t, tokens, cost))
    return pts


def log_tail(log_dir: Path, redact: Redactor, limit: int = LOG_TAIL_BYTES) -> tuple[str, int]:
    """The last `limit` bytes of massgen.log (from a line start) and the file offset they end at."""
    path = log_dir / "massgen.log"
    size = file_size(path)
    start = max(0, size - limit)
    raw = read_capped(path, size - start, start) or b""
    end = start + len(raw)
    if start:
        raw = raw[raw.find(b"\n") + 1 :] if b"\n" in raw else b""
    return redact(raw.decode("utf-8", "replace")), end


def log_since(log_dir: Path, offset: int, redact: Redactor, limit: int = LOG_TAIL_BYTES) -> tuple[str, int, bool]:
    """New complete lines of massgen.log after `offset` (at most `limit` bytes), the new offset, and
    whether the file was replaced or truncated (then the text starts again from its beginning)."""
    path = log_dir / "massgen.log"
    size = file_size(path)
    reset = size < offset
    if reset:
        offset = 0
    if size == offset:
        return "", offset, reset
    if size - offset > limit:
        offset = size - limit
    raw = read_capped(path, size - offset, offset) or b""
    end = raw.rfind(b"\n")
    if end < 0:
        return "", offset, reset
    return redact(raw[: end + 1].decode("utf-8", "replace")), offset + end + 1, reset


def load_detail(row: RunRow, index: RunIndex | None, redact: Redactor, files: RunFiles | None = None) -> RunDetail:
    """Read one run's files (status, events, telemetry, result, children, log tail) into a `RunDetail`.

    `files` keeps what was parsed before (a live page's run); without it everything is read afresh.
    """
    d = row.log_dir
    files = files or RunFiles(d)
    status = read_json(d / STATUS) or {}
    row = row_from_status(d, status) if status else row
    result = read_json(d / "result.json", MAX_RESULT_BYTES)
    events = files.events.read()
    truncated = files.events.truncated
    t0 = row.start_time
    if t0 is None:
        t0 = next((e.ts for e in events), 0.0)
    marks: list[Mark] = []
    answers: list[Answer] = []
    final: Answer | None = None
    calls: list[ModelCall] = []
    standing: set[str] = set()
    agents_order: list[str] = []
    end_ts = t0

    def rel(ts: float) -> float:
        return max(0.0, ts - t0)

    for ev in events:
        end_ts = max(end_ts, ev.ts)
        if isinstance(ev, RunStarted):
            agents_order = [a.id for a in ev.agents]
        elif isinstance(ev, AnswerSubmitted):
            answers.append(Answer(ev.agent, ev.label, rel(ev.ts), redact(ev.content)))
            marks.append(Mark(rel(ev.ts), ev.agent, "answer", f"{ev.label}: {redact(ev.content[:200])}", ev.seq))
            # A new answer clears every standing vote: those agents start over (MassGen's restart).
            for other in sorted(standing - {ev.agent}):
                marks.append(Mark(rel(ev.ts), other, "restart", f"vote cleared by {ev.label}; looks again", ev.seq))
            standing.clear()
        elif isinstance(ev, VoteCast):
            standing.add(ev.agent)
            marks.append(Mark(rel(ev.ts), ev.agent, "vote", f"vote for {ev.target}: {redact(ev.reason[:200])}", ev.seq))
        elif isinstance(ev, ToolCalled):
            ok = "" if ev.ok else " (failed)"
            marks.append(
                Mark(rel(ev.ts), ev.agent, "tool", f"{ev.tool}{ok} {ev.duration_s:.2f}s: {redact(ev.summary)}", ev.seq)
            )
        elif isinstance(ev, ModelCall):
            calls.append(ev)
        elif isinstance(ev, AgentError):
            marks.append(Mark(rel(ev.ts), ev.agent, "error", f"{ev.kind.value}: {redact(ev.message[:300])}", ev.seq))
        elif isinstance(ev, AgentFailed):
            standing.discard(ev.agent)
            marks.append(Mark(rel(ev.ts), ev.agent, "failed", f"{ev.reason}: {redact(ev.message[:300])}", ev.seq))
        elif isinstance(ev, WinnerSelected):
            marks.append(Mark(rel(ev.ts), ev.winner, "winner", f"winner {ev.winner} votes {ev.votes}", ev.seq))
        elif isinstance(ev, FinalAnswer):
            final = Answer(ev.agent, "final", rel(ev.ts), redact(ev.content))
            marks.append(Mark(rel(ev.ts), ev.agent, "final", "final answer", ev.seq))
        elif isinstance(ev, LogLine):
            # The engine's note when it discards a vote cast on a view older than the newest
            # answer (agent_image/engine/orchestrator.py): that agent, too, starts over.
            m = _STALE_VOTE_RE.match(ev.message)
            if m and m.group(1) in agents_order:
                marks.append(
                    Mark(rel(ev.ts), m.group(1), "restart", "vote on a stale view discarded; looks again", ev.seq)
                )
    calls.extend(files.telemetry.read())
    for c in calls:
        end_ts = max(end_ts, c.ts)
        tokens = c.prompt_tokens + c.completion_tokens
        ok = "" if c.ok else " (failed)"
        title = f"{c.provider}/{c.model}{ok}: {tokens} tokens, ${c.cost_usd:.6f}, {c.latency_s:.2f}s"
        marks.append(Mark(rel(c.ts), c.agent, "model", title))
    by_agent: dict[str, list[ModelCall]] = {}
    by_model: dict[str, list[ModelCall]] = {}
    for c in calls:
        by_agent.setdefault(c.agent, []).append(c)
        by_model.setdefault(f"{c.provider}/{c.model}", []).append(c)
    agents = {k: v for k, v in (status.get("agents") or {}).items() if isinstance(v, dict)}
    for a in agents_order:
        agents.setdefault(a, {})
    run = _section(status, "run")
    finished_at = _num(run.get("finished_at"))
    updated = _num(_section(status, "meta").get("last_updated"))
    end = finished_at or updated or end_ts
    duration = max(rel(end), rel(end_ts), row.elapsed_s or 0.0)
    children: list[RunRow] = []
    for child_dir in iter_run_dirs(d / "children"):
        known = index.rows.get(child_dir) if index is not None else None
        children.append(known or read_row(child_dir))
    tail, offset = log_tail(d, redact)
    if final is None:
        res = _section(status, "results")
        af = _str(res.get("answer_file"))
        if af and row.winner:
            text = read_capped(d / "final" / row.winner / "answer.txt", 1 << 20)
            if text is not None:
                final = Answer(row.winner, "final", duration, redact(text.decode("utf-8", "replace")))
    return RunDetail(
        row=row,
        status=status,
        result=result,
        agents=agents,
        marks=sorted(marks, key=lambda m: (m.t, m.seq or 0)),
        answers=answers,
        final=final,
        usage_total=_cumulative(calls, t0),
        usage_by_agent={k: _cumulative(v, t0) for k, v in by_agent.items()},
        usage_by_model={k: _cumulative(v, t0) for k, v in by_model.items()},
        duration_s=duration,
        children=children,
        container=_section(status, "container"),
        log_tail=tail,
        log_offset=offset,
        events_truncated=truncated,
    )


# -- batches (`massgen-run batch`) ---------------------------------------------------------------


@dataclass
class BatchRow:
    """One batch dir's live status.json (supervisor/batch/runner.py writes it)."""

    key: str  # a stable id for the page (a hash of the dir)
    batch_dir: Path
    name: str = ""
    state: str = "unknown"
    items: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    cost_usd: float = 0.0
    tokens: int = 0
    elapsed_s: float | None = None
    eta_s: float | None = None
    exit_code: int | None = None
    stopping: str | None = None

    @property
    def done(self) -> int:
        return sum(self.counts.get(k, 0) for k in ("pass", "fail", "error", "skipped"))


def read_batch(batch_dir: Path) -> BatchRow | None:
    """The batch in `batch_dir`, or None when its status.json is missing or not a batch's."""
    import hashlib

    st = read_json(batch_dir / STATUS)
    if st is None or not isinstance(st.get("batch"), str) or not isinstance(st.get("counts"), dict):
        return None
    spend = _section(st, "spend")
    counts = {str(k): v for k, v in st["counts"].items() if isinstance(v, int) and not isinstance(v, bool)}
    stopping = st.get("stopping")
    return BatchRow(
        key="b" + hashlib.sha256(str(batch_dir).encode()).hexdigest()[:12],
        batch_dir=batch_dir,
        name=st["batch"][:200],
        state=_str(st.get("state")) or "unknown",
        items=_int(st.get("items")) or 0,
        counts=counts,
        cost_usd=_num(spend.get("cost_usd")) or 0.0,
        tokens=_int(spend.get("tokens")) or 0,
        elapsed_s=_num(st.get("elapsed_s")),
        eta_s=_num(st.get("eta_s")),
        exit_code=_int(st.get("exit_code")),
        stopping=stopping if isinstance(stopping, str) else None,
    )


def iter_batch_dirs(batches_root: Path) -> Iterator[Path]:
    """Batch dirs directly under `batches_root` (those holding a status.json), never through a symlink."""
    try:
        with os.scandir(batches_root) as it:
            names = sorted(e.name for e in it if e.is_dir(follow_symlinks=False))
    except OSError:
        return
    for name in names:
        d = batches_root / name
        if file_size(d / STATUS):
            yield d

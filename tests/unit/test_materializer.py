"""The host-side materializer and outbox tailer: untrusted lines in, log dir files out."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import supervisor.materializer as materializer_mod
from agent_image.protocol.events import MAX_EVENT_BYTES, parse_event
from agent_image.protocol.reducer import reduce_events
from agent_image.protocol.result import Reason
from agent_image.protocol.status import RunState, Status
from supervisor.logdir import RunPaths, atomic_write_json, create_run_dirs
from supervisor.materializer import Materializer, OutboxTailer
from supervisor.verdict import Verdict

T0 = 1_750_000_000.0


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def line(**fields: Any) -> bytes:
    """One event as a JSON line without the newline."""
    fields.setdefault("ts", T0)
    return json.dumps(fields).encode()


def started(seq: int = 0, agents: tuple[str, ...] = ("alpha", "bravo")) -> bytes:
    infos = [{"id": a, "anon": f"agent{i + 1}", "backend": "scripted"} for i, a in enumerate(agents)]
    return line(type="run_started", seq=seq, run_id="r", question="2+2?", agents=infos, timeout_seconds=60)


def strict_json(path: Path) -> Any:
    """Parse a file as standard JSON (no NaN or Infinity)."""

    def refuse(const: str) -> Any:
        raise ValueError(f"non-standard JSON constant {const}")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def paths(tmp_path: Path) -> RunPaths:
    return create_run_dirs(tmp_path / "deep" / "runs", tmp_path / "ws")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def mat(paths: RunPaths, clock: FakeClock) -> Iterator[Materializer]:
    m = Materializer(paths, clock=clock)
    yield m
    m.close()


# --- feed ---------------------------------------------------------------------------------


def test_valid_lines_are_appended_verbatim_and_answers_materialized(mat: Materializer, paths: RunPaths) -> None:
    """Valid lines land in events.jsonl byte for byte; answers and the final answer become files."""
    lines = [
        started(),
        line(type="answer", seq=1, agent="alpha", label="agent1.1", content="four\n"),
        # unusual but valid spacing must survive as written
        b'{"type": "answer",  "seq": 2, "ts": 1.5, "agent": "bravo", "label": "agent2.1", "content": "4"}',
        line(type="vote", seq=3, agent="alpha", target="bravo", reason="shorter"),
        line(type="winner", seq=4, winner="bravo", votes={"bravo": 1}),
        line(type="final_answer", seq=5, agent="bravo", content="The answer is 4."),
        line(type="run_finished", seq=6, exit_code=0, reason="completed"),
    ]
    for raw in lines:
        assert mat.feed(raw) is not None
    assert paths.events.read_bytes() == b"".join(raw + b"\n" for raw in lines)
    assert paths.answer_file("alpha", "agent1.1").read_text() == "four\n"
    assert paths.answer_file("bravo", "agent2.1").read_text() == "4"
    final = paths.log_dir / "final" / "bravo" / "answer.txt"
    assert final.read_text() == "The answer is 4."
    assert mat.final_file == final
    assert mat.status.results.answer_file == str(final)
    assert mat.event_count == len(lines)


BAD_LINES = {
    "malformed_json": b'{"type": "log", "seq": 1,',
    "not_an_object": b"[1, 2, 3]",
    "schema_invalid": line(type="answer", seq=1, agent="alpha", label="agent1.1"),
    "extra_field": line(type="log", seq=1, message="m", extra="x"),
    "unknown_type": line(type="teleport", seq=1),
    "bad_version": line(type="log", seq=1, message="m", v=2),
    "negative_seq": line(type="log", seq=-1, message="m"),
    "nan_timestamp": b'{"type": "log", "seq": 1, "ts": NaN, "message": "m"}',
    "infinite_cost": b'{"type": "model_call", "seq": 1, "ts": 1, "agent": "a", "provider": "p", "model": "m", "cost_usd": Infinity}',
    "not_utf8": b'{"type": "log", "seq": 1, "ts": 1, "message": "\xff\xfe"}',
    "oversized": line(type="answer", seq=1, agent="alpha", label="agent1.1", content="x" * MAX_EVENT_BYTES),
}


@pytest.mark.parametrize("raw", list(BAD_LINES.values()), ids=list(BAD_LINES))
def test_bad_line_is_a_warning_never_an_exception(mat: Materializer, paths: RunPaths, raw: bytes) -> None:
    """A malformed, schema-invalid, unknown-type or oversized line is logged as a warning and skipped."""
    mat.feed(started())
    before = paths.events.read_bytes()
    assert mat.feed(raw) is None
    assert paths.events.read_bytes() == before
    log_text = paths.log.read_text()
    assert "WARNING" in log_text
    assert "ignored" in log_text
    assert not paths.answer_file("alpha", "agent1.1").exists()
    # the stream carries on after the bad line
    assert mat.feed(line(type="log", seq=1, message="still here")) is not None


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raws=st.lists(st.binary(max_size=200), max_size=10))
def test_arbitrary_bytes_never_crash_feed(tmp_path_factory: pytest.TempPathFactory, raws: list[bytes]) -> None:
    """Any bytes fed as lines give a warning or an event, never an exception, and status stays writable."""
    root = tmp_path_factory.mktemp("fuzz")
    m = Materializer(create_run_dirs(root / "runs", root / "ws"), clock=FakeClock())
    try:
        m.feed(started())
        for raw in raws:
            m.feed(raw)
        m.write_status(force=True)
        Status.model_validate(strict_json(m.paths.status))
    finally:
        m.close()


_json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    fields=st.dictionaries(
        st.sampled_from(
            ["type", "seq", "ts", "agent", "label", "content", "message", "level", "v", "exit_code", "reason"]
        ),
        _json_scalars
        | st.sampled_from(["log", "answer", "run_finished", "final_answer", "agent1.1", "alpha", "../../etc"]),
        max_size=8,
    )
)
def test_near_miss_events_never_crash_feed(tmp_path_factory: pytest.TempPathFactory, fields: dict[str, Any]) -> None:
    """Objects with event-like keys and arbitrary values never make feed raise or write outside agents/."""
    root = tmp_path_factory.mktemp("near")
    paths = create_run_dirs(root / "runs", root / "ws")
    m = Materializer(paths, clock=FakeClock())
    try:
        m.feed(started())
        m.feed(json.dumps(fields).encode())
        m.write_status(force=True)
        strict_json(paths.status)
    finally:
        m.close()
    allowed = {paths.events, paths.log, paths.status}
    assert files_under(root) - allowed <= {paths.answer_file("alpha", "agent1.1"), paths.final_file("alpha")}


def test_duplicate_seq_is_ignored(mat: Materializer, paths: RunPaths) -> None:
    """A replayed line (seq already seen) is neither appended nor applied."""
    first = line(type="answer", seq=1, agent="alpha", label="agent1.1", content="v1")
    mat.feed(started())
    assert mat.feed(first) is not None
    replay = line(type="answer", seq=1, agent="alpha", label="agent1.1", content="v2")
    assert mat.feed(replay) is None
    assert mat.feed(started(seq=0)) is None
    assert paths.events.read_bytes().count(b"\n") == 2
    assert paths.answer_file("alpha", "agent1.1").read_text() == "v1"
    assert mat.status.agents["alpha"].answer_count == 1


def test_out_of_sequence_event_is_dropped_and_later_events_still_apply(mat: Materializer, paths: RunPaths) -> None:
    """The engine numbers events without gaps: a line with a jumped seq (forged) is dropped, the real next one applies."""
    mat.feed(started())
    assert mat.feed(line(type="log", seq=10**15, message="forged")) is None
    assert "out of sequence: expected seq 1, got 1000000000000000" in paths.log.read_text()
    assert mat.feed(line(type="log", seq=1, message="real")) is not None


def test_events_about_unknown_agents_and_sandbox_model_calls_are_dropped(mat: Materializer, paths: RunPaths) -> None:
    """Events naming agents the run never announced, and model calls when the gateway meters, are ignored."""
    mat.feed(started())
    mat.accept_model_calls = False
    assert mat.feed(line(type="turn_started", seq=1, agent="x9999", turn=1)) is None
    assert mat.feed(line(type="model_call", seq=2, agent="alpha", provider="p", model="m", prompt_tokens=5)) is None
    assert "x9999" not in mat.status.agents and mat.status.telemetry.totals.calls == 0


@pytest.mark.parametrize(
    ("agent", "announced"),
    [("../../etc", True), ("..", True), ("alpha/../../x", True), ("../../etc", False), ("ghost", False)],
)
def test_answer_from_bad_or_unannounced_agent_writes_nothing(
    mat: Materializer, paths: RunPaths, tmp_path: Path, agent: str, announced: bool
) -> None:
    """An answer or final from a path-like or never-announced agent id writes no file at all."""
    mat.feed(started(agents=("alpha", agent) if announced else ("alpha", "bravo")))
    before = files_under(tmp_path)
    mat.feed(line(type="answer", seq=1, agent=agent, label="agent2.1", content="pwned"))
    mat.feed(line(type="final_answer", seq=2, agent=agent, content="pwned"))
    assert files_under(tmp_path) == before
    assert not any("pwned" in p.read_text(errors="replace") for p in files_under(tmp_path) if p != paths.events)
    text = paths.log.read_text()
    assert "not written" in text or "is not an agent of this run" in text


@pytest.mark.parametrize("label", ["../../x", "agent1.1/../../..", "agent1", "x.1"])
def test_answer_with_bad_label_writes_nothing(mat: Materializer, tmp_path: Path, label: str) -> None:
    """An answer whose label is not agent<N>.<k> is not written anywhere."""
    mat.feed(started())
    before = files_under(tmp_path)
    mat.feed(line(type="answer", seq=1, agent="alpha", label=label, content="pwned"))
    assert files_under(tmp_path) == before


def test_extreme_timestamp_does_not_crash_logging(mat: Materializer, paths: RunPaths) -> None:
    """Timestamps outside the schema's range (far future/past) are rejected with a warning, never a crash."""
    mat.feed(started())
    assert mat.feed(line(type="log", seq=1, ts=1e20, message="far future")) is None
    assert mat.feed(line(type="log", seq=1, ts=-1e18, message="far past")) is None
    text = paths.log.read_text()
    assert "far future" not in text and "ignored malformed event line" in text


def test_overflowing_cost_keeps_status_json_standard(mat: Materializer, paths: RunPaths) -> None:
    """Two huge but finite costs must not produce Infinity in status.json."""
    mat.feed(started())
    for seq in (1, 2):
        mat.feed(line(type="model_call", seq=seq, agent="alpha", provider="p", model="m", cost_usd=1e308))
    mat.write_status(force=True)
    strict_json(paths.status)


# --- status.json ------------------------------------------------------------------------------


@pytest.fixture
def write_count(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    calls: list[Path] = []
    real = atomic_write_json  # the very function supervisor.materializer imported

    def spy(path: Path, obj: Any) -> None:
        calls.append(path)
        real(path, obj)

    monkeypatch.setattr(materializer_mod, "atomic_write_json", spy)
    return calls


def test_status_writes_are_coalesced(
    mat: Materializer, paths: RunPaths, clock: FakeClock, write_count: list[Path]
) -> None:
    """Two writes within 0.25 s give one file write; with no change a write still happens every 2 s."""
    mat.feed(started())
    assert mat.write_status() is True
    mat.feed(line(type="log", seq=1, message="x"))
    clock.advance(0.1)
    assert mat.write_status() is False
    assert len(write_count) == 1
    clock.advance(0.2)
    assert mat.write_status() is True
    assert len(write_count) == 2
    clock.advance(1.0)
    assert mat.write_status() is False  # nothing changed, under 2 s
    clock.advance(1.0)
    assert mat.write_status() is True  # nothing changed, but 2 s have passed
    assert len(write_count) == 3
    clock.advance(0.01)
    assert mat.write_status(force=True) is True
    assert len(write_count) == 4
    assert write_count == [paths.status] * 4
    assert strict_json(paths.status)["meta"]["last_updated"] == clock.now


def test_status_elapsed_follows_the_clock(mat: Materializer, paths: RunPaths, clock: FakeClock) -> None:
    """While running, elapsed_seconds in status.json is measured from run_started with the injected clock."""
    mat.feed(line(type="run_started", seq=0, ts=T0, run_id="r", question="q", agents=[], timeout_seconds=5))
    clock.advance(3.5)
    mat.write_status(force=True)
    assert strict_json(paths.status)["meta"]["elapsed_seconds"] == 3.5


def test_status_writes_are_atomic(mat: Materializer, paths: RunPaths, clock: FakeClock) -> None:
    """A reader polling status.json during many writes always sees complete valid JSON; no temp files remain."""
    mat.feed(started())
    mat.write_status(force=True)
    stop = threading.Event()
    errors: list[Exception] = []
    reads = 0

    def reader() -> None:
        nonlocal reads
        while not stop.is_set():
            try:
                Status.model_validate(strict_json(paths.status))
                reads += 1
            except Exception as exc:  # noqa: BLE001 - any failure to read or validate is the finding
                errors.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for seq in range(1, 61):
            mat.feed(line(type="log", seq=seq, message="x" * seq))
            clock.advance(0.3)
            assert mat.write_status()
    finally:
        stop.set()
        thread.join(timeout=10)
    assert errors == []
    assert reads > 0
    assert list(paths.log_dir.rglob("*.tmp")) == []
    assert {p.name for p in paths.log_dir.iterdir() if p.is_file()} == {"events.jsonl", "massgen.log", "status.json"}


def test_finalize_writes_result_and_finished_status(mat: Materializer, paths: RunPaths, clock: FakeClock) -> None:
    """finalize writes result.json with the given exit code and reason and a finished, 100% status.json."""
    for raw in [
        started(),
        line(type="answer", seq=1, agent="alpha", label="agent1.1", content="4"),
        line(type="winner", seq=2, winner="alpha", votes={"alpha": 2}),
        line(type="final_answer", seq=3, agent="alpha", content="4"),
        line(type="run_finished", seq=4, exit_code=0, reason="completed"),
    ]:
        mat.feed(raw)
    clock.advance(12.0)
    result = mat.finalize(Verdict(Reason.COMPLETED))
    doc = strict_json(paths.result)
    assert (doc["exit_code"], doc["reason"], doc["winner"]) == (0, "completed", "alpha")
    assert doc["answer_file"] == str(paths.final_file("alpha"))
    assert doc["duration_s"] == 12.0
    assert doc == json.loads(result.model_dump_json())
    status = Status.model_validate(strict_json(paths.status))
    assert status.run.state == RunState.FINISHED
    assert status.coordination.completion_percentage == 100
    assert (status.run.exit_code, status.run.reason) == (0, "completed")
    assert list(paths.log_dir.rglob("*.tmp")) == []


def test_finalize_supervisor_verdict_overrides_engine(mat: Materializer, paths: RunPaths, clock: FakeClock) -> None:
    """A supervisor verdict (timeout) overrides the engine's; no winner or answer file is reported."""
    for raw in [
        started(),
        line(type="answer", seq=1, agent="alpha", label="agent1.1", content="4"),
        line(type="final_answer", seq=2, agent="alpha", content="4"),
    ]:
        mat.feed(raw)
    events_before = paths.events.read_bytes()
    mat.finalize(Verdict(Reason.TIMEOUT, "deadline passed"), container_exit=137)
    doc = strict_json(paths.result)
    assert (doc["exit_code"], doc["reason"], doc["detail"]) == (3, "timeout", "deadline passed")
    assert (doc["winner"], doc["answer_file"], doc["container_exit_code"]) == (None, None, 137)
    status = strict_json(paths.status)
    assert status["run"]["state"] == "finished"
    assert status["run"]["exit_code"] == 3
    assert status["coordination"]["completion_percentage"] == 100
    assert status["coordination"]["phase"] == "failed"
    assert paths.events.read_bytes() == events_before
    assert "run finished: exit_code=3 reason=timeout deadline passed" in paths.log.read_text()


def test_status_matches_the_pure_reducer(mat: Materializer, paths: RunPaths) -> None:
    """After feeding, status.json's coordination and agents equal reduce_events over events.jsonl."""
    for raw in [
        started(),
        line(type="turn_started", seq=1, agent="alpha", turn=1),
        line(type="answer", seq=2, agent="alpha", label="agent1.1", content="4"),
        line(type="vote", seq=3, agent="bravo", target="alpha", reason="ok"),
    ]:
        mat.feed(raw)
    mat.write_status(force=True)
    replayed = reduce_events([parse_event(x) for x in paths.events.read_bytes().splitlines()])
    written = Status.model_validate(strict_json(paths.status))
    assert written.coordination == replayed.coordination
    assert written.agents == replayed.agents
    assert written.results == replayed.results


# --- OutboxTailer -------------------------------------------------------------------------------


@pytest.fixture
def outbox(tmp_path: Path) -> Path:
    d = tmp_path / "outbox"
    d.mkdir()
    return d / "events.jsonl"


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as fh:
        fh.write(data)


def test_tailer_missing_file_reads_nothing(outbox: Path) -> None:
    """Before the engine creates the file there is nothing to read and nothing to warn about."""
    tailer = OutboxTailer(outbox)
    assert tailer.read_lines() == []
    assert tailer.warnings == []


def test_tailer_holds_back_partial_last_line(outbox: Path) -> None:
    """A line without its newline is held back until the newline arrives."""
    tailer = OutboxTailer(outbox)
    append(outbox, b'{"a": 1}\n{"b":')
    assert tailer.read_lines() == [b'{"a": 1}']
    assert tailer.read_lines() == []
    append(outbox, b" 2}")
    assert tailer.read_lines() == []
    append(outbox, b"\n")
    assert tailer.read_lines() == [b'{"b": 2}']
    tailer.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lines=st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")), max_size=12),
    tail=st.binary(max_size=10).map(lambda b: b.replace(b"\n", b"")),
    cuts=st.lists(st.integers(0, 600), max_size=6),
    chunk=st.integers(1, 64),
)
def test_tailer_reassembles_lines_split_across_reads(
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
    lines: list[bytes],
    tail: bytes,
    cuts: list[int],
    chunk: int,
) -> None:
    """However the bytes arrive and however small the read chunk, complete lines come out whole and in order."""
    monkeypatch.setattr(materializer_mod, "READ_CHUNK", chunk)
    path = tmp_path_factory.mktemp("tail") / "events.jsonl"
    data = b"".join(x + b"\n" for x in lines) + tail
    tailer = OutboxTailer(path)
    got: list[bytes] = []
    pos = 0
    for cut in sorted(min(c, len(data)) for c in cuts) + [len(data)]:
        append(path, data[pos:cut])
        pos = max(pos, cut)
        got += tailer.read_lines()
    tailer.close()
    assert got == lines
    assert tailer.warnings == []


def test_tailer_drops_oversized_line_and_keeps_going(outbox: Path) -> None:
    """A line over the limit is dropped with a warning; the lines after it still come through."""
    tailer = OutboxTailer(outbox, max_line=100)
    append(outbox, b"first\n" + b"x" * 101 + b"\nsecond\n")
    assert tailer.read_lines() == [b"first", b"second"]
    assert len(tailer.warnings) == 1 and "oversized" in tailer.warnings[0]
    tailer.close()


def test_tailer_drops_oversized_line_that_spans_reads(outbox: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An oversized line arriving over several reads is dropped whole, tail included."""
    monkeypatch.setattr(materializer_mod, "READ_CHUNK", 16)
    tailer = OutboxTailer(outbox, max_line=50)
    append(outbox, b"ok1\n" + b"y" * 70)
    assert tailer.read_lines() == [b"ok1"]
    append(outbox, b"y" * 200)
    assert tailer.read_lines() == []
    append(outbox, b"yyyy\nok2\npartial")
    assert tailer.read_lines() == [b"ok2"]
    append(outbox, b"\n")
    assert tailer.read_lines() == [b"partial"]
    assert tailer.warnings and all("oversized" in w for w in tailer.warnings)
    tailer.close()


def test_oversized_real_event_dropped_then_next_parses(paths: RunPaths, clock: FakeClock) -> None:
    """Through drain: an oversized event line is skipped with a warning and the next event is applied."""
    outbox = paths.sandbox / "events.jsonl"
    huge = line(type="answer", seq=1, agent="alpha", label="agent1.1", content="x" * MAX_EVENT_BYTES)
    append(outbox, started() + b"\n" + huge + b"\n" + line(type="log", seq=2, message="after") + b"\n")
    m = Materializer(paths, clock=clock)
    tailer = OutboxTailer(outbox)
    try:
        # drain works in time slices: on a loaded machine one slice may not reach the end
        applied = m.drain(tailer)
        for _ in range(10_000):
            if not tailer.more:
                break
            applied += m.drain(tailer)
        assert applied == 2
    finally:
        tailer.close()
        m.close()
    assert m.status.agents["alpha"].answer_count == 0
    assert "dropped an oversized event line" in paths.log.read_text()
    assert not paths.answer_file("alpha", "agent1.1").exists()


def test_tailer_refuses_symlink(outbox: Path, tmp_path: Path) -> None:
    """An events.jsonl that is a symlink to an outside file is not read, and the target is untouched."""
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b'{"type": "log", "seq": 0, "ts": 1, "message": "secret"}\n')
    os.symlink(secret, outbox)
    before = (secret.read_bytes(), secret.stat().st_mtime_ns)
    tailer = OutboxTailer(outbox)
    assert tailer.read_lines() == []
    assert tailer.warnings and "refusing" in tailer.warnings[0]
    assert (secret.read_bytes(), secret.stat().st_mtime_ns) == before


def test_tailer_warns_once_per_refusal(outbox: Path, tmp_path: Path) -> None:
    """Polling a refused path again and again records one warning, not one per poll."""
    os.symlink(tmp_path / "elsewhere", outbox)
    tailer = OutboxTailer(outbox)
    for _ in range(5):
        assert tailer.read_lines() == []
    assert len(tailer.warnings) == 1
    outbox.unlink()
    outbox.write_bytes(b"real\n")
    assert tailer.read_lines() == [b"real"]
    assert len(tailer.warnings) == 1
    tailer.close()


def test_drain_logs_symlink_refusal(paths: RunPaths, clock: FakeClock, tmp_path: Path) -> None:
    """drain copies the tailer's refusal into massgen.log and applies nothing."""
    secret = tmp_path / "secret.jsonl"
    secret.write_bytes(started() + b"\n")
    os.symlink(secret, paths.sandbox / "events.jsonl")
    m = Materializer(paths, clock=clock)
    try:
        assert m.drain(OutboxTailer(paths.sandbox / "events.jsonl")) == 0
    finally:
        m.close()
    assert "refusing outbox events file" in paths.log.read_text()
    assert paths.events.read_bytes() == b""


@pytest.mark.timeout(10)
def test_tailer_refuses_fifo_without_blocking(outbox: Path) -> None:
    """A FIFO at the events path is refused at once, with no writer on the other end."""
    os.mkfifo(outbox)
    tailer = OutboxTailer(outbox)
    assert tailer.read_lines() == []
    assert tailer.warnings == ["refusing outbox events file: not a regular file"]


def test_tailer_refuses_directory(outbox: Path) -> None:
    """A directory at the events path is refused, not read."""
    outbox.mkdir()
    tailer = OutboxTailer(outbox)
    assert tailer.read_lines() == []
    assert tailer.warnings == ["refusing outbox events file: not a regular file"]


def test_tailer_keeps_reading_the_file_it_opened(outbox: Path, tmp_path: Path) -> None:
    """Once opened, replacing the path with a symlink changes nothing: the tailer keeps its descriptor."""
    append(outbox, b"one\n")
    tailer = OutboxTailer(outbox)
    assert tailer.read_lines() == [b"one"]
    with open(outbox, "ab") as fh:
        os.rename(outbox, tmp_path / "moved.jsonl")
        other = tmp_path / "other.jsonl"
        other.write_bytes(b"evil\n")
        os.symlink(other, outbox)
        fh.write(b"two\n")
    assert tailer.read_lines() == [b"two"]
    tailer.close()


def test_a_sandbox_run_finished_is_a_claim_not_the_status(mat: Materializer, paths: RunPaths) -> None:
    """A (forged) mid-run run_finished leaves the run running; later events still fold; finalize decides."""
    mat.feed(started())
    mat.feed(line(type="run_finished", seq=1, exit_code=0, reason="completed"))
    assert mat.finished_event is not None and mat.finished_event.reason == "completed"
    assert mat.status.run.state != RunState.FINISHED and mat.status.run.exit_code is None
    assert mat.feed(line(type="answer", seq=2, agent="alpha", label="agent1.1", content="4")) is not None
    assert mat.status.agents["alpha"].answer_count == 1
    mat.write_status(force=True)
    assert strict_json(paths.status)["run"]["state"] != "finished"
    mat.finalize(Verdict(Reason.TIMEOUT, "deadline passed"))
    status = strict_json(paths.status)
    assert (status["run"]["state"], status["run"]["exit_code"], status["run"]["reason"]) == ("finished", 3, "timeout")


def test_a_different_line_with_a_used_seq_is_logged_once_per_collision(mat: Materializer, paths: RunPaths) -> None:
    """Replays (the same line again) are silent; a different line with a used seq is a logged collision."""
    first = line(type="answer", seq=1, agent="alpha", label="agent1.1", content="real")
    mat.feed(started())
    mat.feed(first)
    assert mat.feed(first) is None
    assert mat.collisions == 0
    assert mat.feed(line(type="answer", seq=1, agent="alpha", label="agent1.1", content="forged")) is None
    assert mat.collisions == 1
    assert paths.answer_file("alpha", "agent1.1").read_text() == "real"
    log_text = paths.log.read_text()
    assert log_text.count("sequence collision") == 1 and "seq 1" in log_text


# --- floods: aggregated warnings, clipped strings, bounded work -------------------------------


def test_repeated_malformed_lines_are_aggregated_per_interval(
    mat: Materializer, paths: RunPaths, clock: FakeClock
) -> None:
    """10^4 junk lines give one warning, then one "ignored N more" line per interval, not one line each."""
    mat.feed(started())
    for _ in range(10_000):
        mat.feed(b"x")
    clock.advance(materializer_mod.WARN_INTERVAL_S)
    mat.flush_warnings()
    for _ in range(10):
        mat.feed(b"{}")
    mat.close()
    text = paths.log.read_text()
    assert text.count("ignored malformed event line") == 2  # the first of each interval
    assert "ignored 9999 more malformed event lines in the last 5.0s" in text
    assert "ignored 9 more malformed event lines" in text  # flushed on close
    assert len(text.splitlines()) < 10
    assert mat.ignored_lines == 10_010


def test_forged_long_strings_are_clipped_in_status_and_log(mat: Materializer, paths: RunPaths) -> None:
    """A 500 KB reason in agent_failed and run_finished, and a 400 KB field name, stay out of status.json and massgen.log."""
    big = "R" * 500_000
    mat.feed(started(agents=("alpha",)))
    assert mat.feed(line(type="agent_failed", seq=1, agent="alpha", reason=big, message="m")) is not None
    assert mat.feed(json.dumps({"type": "log", "seq": 2, "ts": T0, "message": "m", "k" * 400_000: 1}).encode()) is None
    assert mat.feed(line(type="run_finished", seq=2, exit_code=0, reason=big, detail=big)) is not None
    mat.write_status(force=True)
    assert paths.status.stat().st_size < 16 << 10
    status = strict_json(paths.status)
    assert status["agents"]["alpha"]["error"]["type"].startswith("R" * 100)
    assert "more characters cut" in status["agents"]["alpha"]["error"]["type"]
    mat.finalize(Verdict(Reason.AGENT_FAILED, big))
    assert paths.result.stat().st_size < 8 << 10
    assert paths.status.stat().st_size < 16 << 10
    assert paths.log.stat().st_size < 8 << 10
    # what the sandbox wrote is kept whole in events.jsonl, the record of what it said
    assert big in paths.events.read_text()


def test_the_question_in_status_is_the_supervisors(mat: Materializer) -> None:
    """A run_started claiming another question does not replace the one the supervisor was given."""
    mat.status.meta.question = "the real question"
    mat.feed(line(type="run_started", seq=0, run_id="r", question="Q" * 100_000, agents=[], timeout_seconds=60))
    assert mat.status.meta.question == "the real question"


def test_sandbox_log_text_is_capped(mat: Materializer, paths: RunPaths, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past MAX_SANDBOX_LOG_BYTES the sandbox's log events stop reaching massgen.log (one note says so); ours still do."""
    monkeypatch.setattr(materializer_mod, "MAX_SANDBOX_LOG_BYTES", 50_000)
    mat.feed(started())
    for seq in range(1, 101):
        assert mat.feed(line(type="log", seq=seq, message="s" * 1000)) is not None
    mat.log("supervisor line after the cap")
    text = paths.log.read_text()
    assert 50_000 <= paths.log.stat().st_size < 60_000
    assert text.count("later sandbox log lines are not written") == 1
    assert text.rstrip().endswith("supervisor line after the cap")
    assert mat.event_count == 101  # the events themselves are all applied


def test_written_bytes_counts_what_the_materializer_keeps(mat: Materializer, paths: RunPaths) -> None:
    """written_bytes equals the bytes of the files the materializer wrote in the log dir."""
    for raw in [
        started(),
        line(type="answer", seq=1, agent="alpha", label="agent1.1", content="four" * 1000),
        line(type="log", seq=2, message="hello"),
        line(type="final_answer", seq=3, agent="alpha", content="4"),
    ]:
        mat.feed(raw)
    mat.write_status(force=True)
    mat.finalize(Verdict(Reason.COMPLETED))
    on_disk = sum(p.stat().st_size for p in files_under(paths.log_dir) if paths.sandbox not in p.parents)
    assert mat.written_bytes == on_disk


def test_a_50_mb_line_is_one_warning_and_one_gap(paths: RunPaths, clock: FakeClock) -> None:
    """One 50 MB line read in many slices: one drop, one warning, and a forged event two seqs ahead is still refused."""
    outbox = paths.sandbox / "events.jsonl"
    append(outbox, started() + b"\n")
    m = Materializer(paths, clock=clock)
    tailer = OutboxTailer(outbox)
    try:
        assert m.drain(tailer) == 1
        with open(outbox, "ab") as fh:
            for _ in range(50):
                fh.write(b"z" * 1_000_000)
        while m.drain(tailer, budget_s=60) or tailer.more:
            pass
        append(outbox, b"\n" + line(type="log", seq=3, message="forged two ahead") + b"\n")
        append(outbox, line(type="log", seq=1, message="real next") + b"\n")
        while m.drain(tailer) or tailer.more:
            pass
    finally:
        tailer.close()
        m.close()
    text = paths.log.read_text()
    assert text.count("oversized") == 1, text
    assert "forged two ahead" not in paths.events.read_text()
    assert "real next" in paths.events.read_text()


def test_drain_is_bounded_in_time_and_resumes_exactly(paths: RunPaths, clock: FakeClock) -> None:
    """A drain stops after its time slice mid-backlog; later drains pick up at the next line, none lost or repeated."""
    outbox = paths.sandbox / "events.jsonl"
    n = 20_000
    append(outbox, started() + b"\n" + b"".join(line(type="log", seq=i, message=f"m{i}") + b"\n" for i in range(1, n)))
    m = Materializer(paths, clock=clock)
    tailer = OutboxTailer(outbox)
    try:
        applied = m.drain(tailer, budget_s=0.001)
        assert 0 < applied < n and tailer.more
        # the offset saved for a restart covers exactly the lines applied
        m.write_status(force=True)
        saved = json.loads((paths.log_dir / materializer_mod.FOLLOW_STATE).read_text())
        assert saved == {
            "offset": len(b"".join(paths.events.read_bytes().splitlines(keepends=True))),
            "seq": applied - 1,
        }
        while tailer.more:
            applied += m.drain(tailer, budget_s=0.001)
    finally:
        tailer.close()
        m.close()
    assert applied == n
    seqs = [json.loads(raw)["seq"] for raw in paths.events.read_bytes().splitlines()]
    assert seqs == list(range(n))


def test_massgen_log_lines_carry_milliseconds(tmp_path: Path) -> None:
    """Every massgen.log line starts with local time to the millisecond (truncated), then the level."""
    import re
    import time

    clock = FakeClock(1_700_000_000.9876)
    m = Materializer(create_run_dirs(tmp_path / "runs", tmp_path / "ws"), clock=clock)
    m.log("first")
    clock.advance(0.0125)
    m.log("two\nlines", "warning")
    m.close()
    lines = m.paths.log.read_text().splitlines()
    first, after = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) for t in (1_700_000_000, 1_700_000_001))
    assert lines[0] == f"{first}.987 INFO    first"  # .9876: truncated, not rounded to .988
    assert lines[1:] == [f"{after}.000 WARNING two", f"{after}.000 WARNING lines"]
    stamp = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\.\d{3} ")
    assert len(lines) == 3 and all(stamp.match(line) for line in lines)


def test_answers_skip_fsync_on_the_loop_and_are_synced_before_result_json(
    mat: Materializer, paths: RunPaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No fsync per answer while following; finalize syncs them all before it writes result.json."""
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    mat.feed(started())
    mat.feed(line(type="answer", seq=1, agent="alpha", label="agent1.1", content="4"))
    mat.feed(line(type="final_answer", seq=2, agent="alpha", content="4"))
    answer, final = paths.answer_file("alpha", "agent1.1"), paths.final_file("alpha")
    assert answer.read_text() == "4" and final.read_text() == "4"
    assert str(answer) not in synced and str(final) not in synced
    mat.finalize(Verdict(Reason.COMPLETED))
    assert str(answer) in synced and str(final) in synced
    result_syncs = [i for i, p in enumerate(synced) if p.startswith(str(paths.log_dir / ".result.json."))]
    assert result_syncs and synced.index(str(final)) < result_syncs[0]

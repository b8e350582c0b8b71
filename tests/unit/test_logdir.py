"""Run ids, per-run directories and atomic writes."""

from __future__ import annotations

import datetime as dt
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from supervisor.logdir import RUN_ID_RE, atomic_write, atomic_write_json, create_run_dirs, new_run_id


def test_run_id_format() -> None:
    """A run id is log_YYYYMMDD_HHMMSS_ffffff_<6 hex> built from the given time."""
    run_id = new_run_id(dt.datetime(2025, 3, 4, 5, 6, 7, 89))
    assert RUN_ID_RE.match(run_id)
    assert run_id.startswith("log_20250304_050607_000089_")
    suffix = run_id.rsplit("_", 1)[1]
    assert len(suffix) == 6 and int(suffix, 16) >= 0


def test_run_ids_differ_within_one_microsecond() -> None:
    """Ids made for the same instant still differ by their random suffix."""
    now = dt.datetime(2025, 1, 1)
    ids = {new_run_id(now) for _ in range(50)}
    assert len(ids) > 45  # 24 random bits: a collision among 50 is ~1e-4 likely


def test_create_run_dirs_layout(tmp_path: Path) -> None:
    """create_run_dirs makes the log dir with its subdirs and a matching workspace, both resolved."""
    paths = create_run_dirs(tmp_path / "runs", tmp_path / "ws")
    assert RUN_ID_RE.match(paths.run_id)
    assert paths.log_dir == (tmp_path / "runs" / paths.run_id).resolve()
    assert paths.workspace == (tmp_path / "ws" / paths.run_id).resolve()
    assert sorted(p.name for p in paths.log_dir.iterdir()) == ["agents", "children", "final", "sandbox"]
    assert paths.workspace.is_dir() and not any(paths.workspace.iterdir())
    assert paths.answer_file("a", "agent1.1") == paths.log_dir / "agents" / "a" / "agent1.1" / "answer.txt"


def test_concurrent_create_run_dirs_are_distinct(tmp_path: Path) -> None:
    """200 create_run_dirs calls from threads at once give 200 distinct log dirs and workspaces."""
    start = threading.Barrier(20)

    def make(_: int) -> tuple[Path, Path]:
        if _ < 20:
            start.wait(timeout=10)
        paths = create_run_dirs(tmp_path / "runs", tmp_path / "ws")
        return paths.log_dir, paths.workspace

    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(make, range(200)))
    assert len({log for log, _ in results}) == 200
    assert len({ws for _, ws in results}) == 200
    assert len(list((tmp_path / "runs").iterdir())) == 200
    assert len(list((tmp_path / "ws").iterdir())) == 200


def test_create_run_dirs_retries_on_collision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When a run id is already taken, create_run_dirs picks another instead of reusing the dir."""
    ids = iter(
        ["log_20250101_000000_000000_aaaaaa", "log_20250101_000000_000000_aaaaaa", "log_20250101_000000_000000_bbbbbb"]
    )
    monkeypatch.setattr("supervisor.logdir.new_run_id", lambda now=None: next(ids))
    first = create_run_dirs(tmp_path / "runs", tmp_path / "ws")
    (first.log_dir / "marker").write_text("mine")
    second = create_run_dirs(tmp_path / "runs", tmp_path / "ws")
    assert (first.run_id, second.run_id) == ("log_20250101_000000_000000_aaaaaa", "log_20250101_000000_000000_bbbbbb")
    assert (first.log_dir / "marker").read_text() == "mine"


def test_atomic_write_replaces_content_and_leaves_no_temp(tmp_path: Path) -> None:
    """atomic_write replaces the file's content in one step and leaves no temp file behind."""
    target = tmp_path / "status.json"
    target.write_text("old content that is longer than the new one")
    atomic_write(target, "new")
    assert target.read_text() == "new"
    atomic_write(target, b"\x00bytes")
    assert target.read_bytes() == b"\x00bytes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status.json"]
    assert target.stat().st_mode & 0o777 == 0o644


def test_atomic_write_json_is_valid_json(tmp_path: Path) -> None:
    """atomic_write_json writes parseable JSON ending in a newline."""
    target = tmp_path / "result.json"
    atomic_write_json(target, {"exit_code": 0, "reason": "completed"})
    assert json.loads(target.read_text()) == {"exit_code": 0, "reason": "completed"}
    assert target.read_text().endswith("\n")


def test_atomic_write_failure_leaves_old_file_and_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If the replace step fails, the old content stays and the temp file is removed."""
    target = tmp_path / "status.json"
    target.write_text("old")

    def boom(src: str, dst: str) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk on fire"):
        atomic_write(target, "new")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status.json"]


def test_atomic_write_concurrent_writers_never_tear(tmp_path: Path) -> None:
    """Concurrent writers and a reader: the file always holds one writer's complete content."""
    target = tmp_path / "status.json"
    payloads = [json.dumps({"writer": i, "pad": "x" * (1000 * i)}) for i in range(8)]
    atomic_write(target, payloads[0])
    stop = threading.Event()
    seen: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            seen.append(target.read_text())

    thread = threading.Thread(target=reader)
    thread.start()

    def write_ten(i: int) -> None:
        for _ in range(10):
            atomic_write(target, payloads[i])

    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(write_ten, range(8)))
    finally:
        stop.set()
        thread.join(timeout=10)
    assert seen and set(seen) <= set(payloads)
    assert target.read_text() in payloads
    assert list(tmp_path.glob("*.tmp")) == []


def test_read_status_refuses_symlinks_fifos_oversize_and_non_objects(tmp_path: Path) -> None:
    """status.json is read only from a regular file, at most MAX_STATUS_BYTES, and only as a JSON object."""
    from supervisor.logdir import MAX_STATUS_BYTES, read_status

    good = tmp_path / "good"
    good.mkdir()
    atomic_write_json(good / "status.json", {"run": {"state": "running"}})
    assert read_status(good) == {"run": {"state": "running"}}
    link = tmp_path / "link"
    link.mkdir()
    (link / "status.json").symlink_to(good / "status.json")
    fifo = tmp_path / "fifo"
    fifo.mkdir()
    os.mkfifo(fifo / "status.json")
    big = tmp_path / "big"
    big.mkdir()
    (big / "status.json").write_text('{"pad": "' + "x" * MAX_STATUS_BYTES + '"}')
    listed = tmp_path / "list"
    listed.mkdir()
    (listed / "status.json").write_text("[1, 2]")
    for d in (link, fifo, big, listed, tmp_path / "missing"):
        assert read_status(d) is None, d


def test_finish_lost_run_writes_supervisor_lost_once(tmp_path: Path) -> None:
    """finish_lost_run ends a run with supervisor_lost (exit 2) in result.json and status.json; a second call does nothing."""
    from supervisor.materializer import Materializer
    from supervisor.reaper import finish_lost_run

    paths = create_run_dirs(tmp_path / "runs", tmp_path / "ws")
    mat = Materializer(paths)
    mat.write_status(force=True)
    mat.close()
    assert finish_lost_run(paths, "the supervisor is gone")
    result = json.loads(paths.result.read_text())
    assert (result["exit_code"], result["reason"]) == (2, "supervisor_lost")
    assert "the supervisor is gone" in result["detail"]
    status = json.loads(paths.status.read_text())
    assert status["run"]["state"] == "finished" and status["run"]["reason"] == "supervisor_lost"
    before = paths.result.read_bytes()
    assert not finish_lost_run(paths, "again")
    assert paths.result.read_bytes() == before

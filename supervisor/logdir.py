"""The log-dir layout: where runs go, how they are found and read, run ids, atomic writes.

One run is ``<logs_root>/<run_id>/`` (see `RunPaths` for its files); a nested run is
``<log_dir>/children/<run_id>/``, recursively. Everything that lists or reads runs from disk
(`ps`, `watch`, `status`, the dashboard, the daemon's restart scan, the reaper) goes through
`iter_run_dirs` / `walk_run_dirs` and `read_status`, which never follow a symlink and read a
bounded amount: a sandbox can write folders and files that look like ours.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
import secrets
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RUN_ID_RE = re.compile(r"\Alog_\d{8}_\d{6}_\d{6}_[0-9a-f]{6}\Z")
# Agent ids (dots allowed after the first letter, as in MassGen ids such as `gemini2.5flash`).
SAFE_NAME_RE = re.compile(r"\A[A-Za-z][A-Za-z0-9_.-]{0,39}\Z")
LABEL_RE = re.compile(r"\Aagent\d{1,3}\.\d{1,6}\Z")
STATUS_NAME = "status.json"
RESULT_NAME = "result.json"
CHILDREN_NAME = "children"
MAX_STATUS_BYTES = 4 << 20
MAX_NESTING_SCAN = 32  # a bound against a pathological (deep or looping) layout


def default_logs_root() -> Path:
    """Where runs go without ``--logs-root``: ``$MASSGEN_LOGS_ROOT``, else ``./.massgen/runs``."""
    env = os.environ.get("MASSGEN_LOGS_ROOT")
    return Path(env) if env else Path.cwd() / ".massgen" / "runs"


def iter_run_dirs(directory: Path) -> Iterator[Path]:
    """Run dirs directly under `directory` (a logs root or a `children/` dir), by name, never through a symlink."""
    try:
        with os.scandir(directory) as it:
            names = sorted(e.name for e in it if RUN_ID_RE.fullmatch(e.name) and e.is_dir(follow_symlinks=False))
    except OSError:
        return
    for name in names:
        yield directory / name


def walk_run_dirs(root: Path, max_depth: int = MAX_NESTING_SCAN) -> Iterator[Path]:
    """Every run under `root`, each followed by its nested runs; only the layout we create, never rglob."""
    for log_dir in iter_run_dirs(root):
        yield log_dir
        children = log_dir / CHILDREN_NAME
        if max_depth > 0 and children.is_dir() and not children.is_symlink():
            yield from walk_run_dirs(children, max_depth - 1)


def read_capped(path: Path, limit: int, offset: int = 0) -> bytes | None:
    """At most `limit` bytes of a regular file from `offset`, never following a symlink; None if unreadable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        # Never more than the file holds: a buffer of `limit` bytes per read would cost more
        # than the read itself (ps reads a thousand status.json files).
        return os.pread(fd, max(0, min(limit, st.st_size - offset)), offset)
    except OSError:
        return None
    finally:
        os.close(fd)


def read_json(path: Path, limit: int = MAX_STATUS_BYTES) -> dict[str, Any] | None:
    """A JSON object from a file read as `read_capped` does; None if unreadable, not JSON or not an object."""
    raw = read_capped(path, limit)
    if raw is None:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def read_status(log_dir: Path) -> dict[str, Any] | None:
    """A run's status.json as a JSON object (unvalidated: readers pick the fields they show), or None."""
    return read_json(log_dir / STATUS_NAME)


def new_run_id(now: _dt.datetime | None = None) -> str:
    now = now or _dt.datetime.now()
    return f"log_{now:%Y%m%d_%H%M%S_%f}_{secrets.token_hex(3)}"


def atomic_write(path: Path, data: bytes | str, mode: int = 0o644, *, sync: bool = True) -> None:
    """Temp file in the same directory, fsync, os.replace, fsync the directory.

    With `sync=False` readers still never see a partial file, but durability is the caller's
    (`sync_files` later): an fsync can wait for the whole filesystem's journal commit.
    """
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
            fh.flush()
            if sync:
                os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if sync:
        _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def sync_files(paths: list[Path]) -> None:
    """Make files written with `atomic_write(..., sync=False)` durable (they and their directories).

    Best effort: a file that cannot be synced must not keep result.json from being written.
    """
    for p in paths:
        with contextlib.suppress(OSError):
            fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for directory in {p.parent for p in paths}:
        with contextlib.suppress(OSError):
            _fsync_dir(directory)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@dataclass(frozen=True)
class RunPaths:
    """Where one run's files live on the host."""

    run_id: str
    log_dir: Path
    workspace: Path

    @property
    def status(self) -> Path:
        return self.log_dir / STATUS_NAME

    @property
    def result(self) -> Path:
        return self.log_dir / RESULT_NAME

    @property
    def events(self) -> Path:
        return self.log_dir / "events.jsonl"

    @property
    def log(self) -> Path:
        return self.log_dir / "massgen.log"

    @property
    def config(self) -> Path:
        return self.log_dir / "config.yaml"

    @property
    def sandbox(self) -> Path:
        return self.log_dir / "sandbox"

    @property
    def children(self) -> Path:
        return self.log_dir / CHILDREN_NAME

    def answer_file(self, agent: str, label: str) -> Path:
        return self.log_dir / "agents" / agent / label / "answer.txt"

    def final_file(self, agent: str) -> Path:
        return self.log_dir / "final" / agent / "answer.txt"


def create_run_dirs(logs_root: Path, workspaces_root: Path) -> RunPaths:
    """Create a fresh, uniquely named log dir (and workspace); mkdir without exist_ok is the lock."""
    logs_root.mkdir(parents=True, exist_ok=True)
    workspaces_root.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        run_id = new_run_id()
        log_dir = logs_root / run_id
        try:
            log_dir.mkdir()
        except FileExistsError:
            continue
        workspace = workspaces_root / run_id
        workspace.mkdir()
        for sub in ("sandbox", "children", "agents", "final"):
            (log_dir / sub).mkdir()
        return RunPaths(run_id, log_dir.resolve(), workspace.resolve())
    raise RuntimeError("could not allocate a unique run id")  # pragma: no cover - 16M ids per microsecond

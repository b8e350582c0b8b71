"""Log directory layout, run ids that never collide, and atomic file writes."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RUN_ID_RE = re.compile(r"^log_\d{8}_\d{6}_\d{6}_[0-9a-f]{6}$")
# Agent ids (dots allowed after the first letter, as in MassGen ids such as `gemini2.5flash`).
SAFE_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,39}$")
LABEL_RE = re.compile(r"^agent\d{1,3}\.\d{1,6}$")


def new_run_id(now: _dt.datetime | None = None) -> str:
    now = now or _dt.datetime.now()
    return f"log_{now:%Y%m%d_%H%M%S_%f}_{secrets.token_hex(3)}"


def atomic_write(path: Path, data: bytes | str, mode: int = 0o644) -> None:
    """Temp file in the same directory, fsync, os.replace, fsync the directory."""
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


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
        return self.log_dir / "status.json"

    @property
    def result(self) -> Path:
        return self.log_dir / "result.json"

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
        return self.log_dir / "children"

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

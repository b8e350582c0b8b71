"""Helpers for running the real `massgen-run` CLI as a subprocess (e2e and docker tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    env["PYTHONPATH"] = str(REPO)
    if "MASSGEN_DAEMON_SOCKET" not in extra:
        # a daemon someone runs on this machine must not pick up tests meant for the embedded one
        env["MASSGEN_NO_DAEMON"] = "1"
    env.update(extra)
    return env


def massgen_run(args: list[str], cwd: Path, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "supervisor.cli", *args],
        cwd=cwd,
        env=cli_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def parse_lines(stdout: str) -> dict[str, str]:
    out = {}
    for line in stdout.splitlines():
        key, sep, value = line.partition(": ")
        if sep and key.isupper():
            out[key] = value
    return out


def load(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def write_config(directory: Path, text: str, name: str = "run.yaml") -> Path:
    p = directory / name
    p.write_text(textwrap.dedent(text))
    return p


def start_cli(args: list[str], cwd: Path, **env: str) -> tuple[subprocess.Popen[str], Path]:
    """`massgen-run ARGS` in the background; returns the process and the LOG_DIR of its line 1."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "supervisor.cli", *args],
        cwd=cwd,
        env=cli_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()
    assert first.startswith("LOG_DIR: "), first
    return proc, Path(first.split(": ", 1)[1].strip())


def wait_for_event(log_dir: Path, kind: str, timeout: float = 30.0) -> None:
    """Poll the run's events.jsonl until an event of `kind` is there (fail after `timeout`)."""
    deadline = time.monotonic() + timeout
    needle = f'"type":"{kind}"'.encode()
    while True:
        events = log_dir / "events.jsonl"
        if events.exists() and needle in events.read_bytes().replace(b" ", b""):
            return
        assert time.monotonic() < deadline, f"no {kind} event in {events} after {timeout:g}s"
        time.sleep(0.05)

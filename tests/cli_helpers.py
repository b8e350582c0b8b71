"""Helpers for running the real `massgen-run` CLI as a subprocess (e2e and docker tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
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

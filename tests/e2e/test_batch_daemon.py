"""`massgen-run batch` through the daemon: the daemon owns the runs, so a killed batch loses nothing."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.docker.conftest import agent_image, runtime  # noqa: F401 - fixtures shared with the docker tests
from tests.e2e.test_daemon import Daemon, daemon  # noqa: F401 - the daemon fixture

pytestmark = pytest.mark.docker

SLOW = """\
agents:
  - id: a
    backend:
      type: scripted
      steps:
        - shell: sleep 2; python3 -c "print({{question}})"
          save_as: r
        - answer: "{{r}}"
        - vote: auto
          reason: ok
sandbox:
  memory: 256m
"""


def _ledger(d: Path) -> list[dict[str, Any]]:
    p = d / "items.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []


def _wait(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.mark.timeout(600)
def test_batch_via_the_daemon_survives_kill_9(daemon: Daemon, tmp_path: Path) -> None:  # noqa: F811
    """The batch submits to the daemon (SUPERVISOR: daemon); after kill -9 of the batch the daemon keeps
    running its items, and the same command waits for those runs instead of starting them again."""
    (tmp_path / "slow.yaml").write_text(SLOW)
    qs = "".join(json.dumps({"id": f"q{i}", "question": f"{i}*3", "expected": i * 3}) + "\n" for i in range(8))
    (tmp_path / "qs.jsonl").write_text(qs)
    spec = tmp_path / "batch.yaml"
    spec.write_text("configs:\n  s: slow.yaml\nquestions: qs.jsonl\nassert:\n  - type: number_close\nmax_parallel: 3\n")
    d = tmp_path / "batch"
    cmd = [sys.executable, "-m", "supervisor.cli", "batch", str(spec), "--batch-dir", str(d), "--automation"]
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=daemon.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        _wait(lambda: len(_ledger(d)) >= 2, 240, "2 items")
        _wait(lambda: json.loads((d / "status.json").read_text())["in_flight"], 60, "an item in flight")
    finally:
        proc.kill()
        out, _err = proc.communicate(timeout=30)
    assert "SUPERVISOR: daemon" in out
    before = _ledger(d)
    known = {r["run_id"] for r in before}
    orphans = {
        sub.name for item in (d / "runs").iterdir() if item.name != "workspaces" for sub in item.iterdir()
    } - known
    assert orphans
    # The daemon still follows them: they finish with nobody from the batch around.
    logs = [p for p in (d / "runs").glob("*/log_*") if p.name in orphans and p.parent.name != "workspaces"]
    assert len(logs) == len(orphans)
    _wait(lambda: all((p / "result.json").exists() for p in logs), 120, "the orphaned runs to finish")

    res = subprocess.run(cmd, cwd=tmp_path, env=daemon.env(), capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stdout + res.stderr
    after = _ledger(d)
    assert after[: len(before)] == before
    assert len(after) == 8 and len({r["item"] for r in after}) == 8
    assert all(r["state"] == "pass" and r["attempt"] == 1 for r in after)
    assert orphans <= {r["run_id"] for r in after}
    assert daemon.alive

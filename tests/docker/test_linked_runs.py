"""Runs on a runtime that shares no filesystem (remote-docker), here against the local engine.

The same code path as a remote engine except the engine's address: no host path is mounted,
the run channel carries spec, events, the API and the workspace (docs/channel.md). The second,
TLS-only engine in its own network namespace is exercised by tests/remote/, and the shared
contract cases (timeout, SIGINT, OOM, nested, SIGTERM ignored, ...) on both runtimes by tests/conformance/.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from supervisor.runtime.base import LABEL_RUN
from supervisor.runtime.docker import DockerRuntime
from tests.cli_helpers import load, parse_lines, start_cli, wait_for_event

pytestmark = pytest.mark.docker

QUICK = ["--automation", "--config", "@examples/quickstart", "What is 2+2?"]


def _gone(runtime: DockerRuntime, run_id: str) -> bool:
    return runtime.list_owned({LABEL_RUN: run_id}) == []


def test_quickstart_through_the_channel_mounts_no_host_path(
    runtime: DockerRuntime, agent_image: str, tmp_path: Path
) -> None:
    """Exit 0 with the contract lines; the events came through the channel; no bind mount; removed."""
    proc, log_dir = start_cli([*QUICK, "--image", agent_image], tmp_path, MASSGEN_RUNTIME="remote-docker")
    wait_for_event(log_dir, "run_started")
    st = load(log_dir / "status.json")
    info = runtime._api.inspect_container(st["container"]["id"])  # still running: the hub waits for BYE
    assert [m for m in info["Mounts"] if m["Type"] == "bind"] == []
    assert "/workspace" in info["HostConfig"]["Tmpfs"]
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, out + err
    f = parse_lines(out)
    assert "2 + 2 = 4" in Path(f["ANSWER_FILE"]).read_text()
    seqs = [ev["seq"] for ev in map(json.loads, (log_dir / "events.jsonl").read_text().splitlines())]
    assert seqs == list(range(len(seqs))) and len(seqs) > 5
    # The winner's workspace came back over the channel before the sandbox was removed.
    assert (log_dir / "final" / f["WINNER"] / "workspace").is_dir()
    assert "run channel up" in (log_dir / "massgen.log").read_text()
    assert _gone(runtime, log_dir.name)

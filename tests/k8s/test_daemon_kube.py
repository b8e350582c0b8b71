"""`massgen-supervisor` with MASSGEN_RUNTIME=kubernetes, killed with -9 while its Jobs run.

The runs' pods are in the (fake) cluster; nothing of theirs is on this host but what the channel
brought. A restarted daemon finds the Jobs by label selector, re-links each pod over pods/exec
(HELLO says how many outbox bytes the log dir holds, the hub replays from there) and follows
them to their end; a deadline that passed while no daemon ran is a timeout at once.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.runtime.kubernetes.runtime import KubernetesRuntime
from tests.cli_helpers import load, parse_lines, write_config
from tests.e2e.test_daemon import (
    Daemon,
    _assert_events_mirror_the_outbox,
    _assert_finished_ok,
    _finish,
    _first_line_log_dir,
    _types,
    _until,
)
from tests.fakes.kube_api import FakeKubeAPI
from tests.remote.test_daemon_remote import COPY, _ticking_config

pytestmark = pytest.mark.docker

SLEEPER = """\
agents:
  - id: a
    backend: {type: scripted, steps: [{shell: "sleep 300", timeout: 600}, {answer: never}]}
timeout_settings: {orchestrator_timeout_seconds: 15}
sandbox: {stop_grace_seconds: 1}
"""


class KubeDaemon(Daemon):
    """The test daemon with MASSGEN_RUNTIME=kubernetes on the fake cluster."""

    def __init__(self, kubeconfig: Path, image: str, work: Path) -> None:
        self.kube_env = {"MASSGEN_K8S_KUBECONFIG": str(kubeconfig), "MASSGEN_RUNTIME": "kubernetes"}
        super().__init__(KubernetesRuntime(env=self.kube_env), image, work)  # type: ignore[arg-type]  # a Runtime too

    def env(self) -> dict[str, str]:
        return {**super().env(), **self.kube_env}


@pytest.fixture
def kube_daemon(fake_kube: FakeKubeAPI, fake_kubeconfig: Path, tmp_path: Path) -> Iterator[KubeDaemon]:
    from supervisor.images import agent_image_tag

    d = KubeDaemon(fake_kubeconfig, agent_image_tag(), tmp_path)
    d.start()
    try:
        yield d
    finally:
        d.cleanup()
    assert d.containers() == []


def test_kill_9_of_the_daemon_with_2_jobs_then_restart_readopts_both(kube_daemon: KubeDaemon, tmp_path: Path) -> None:
    """kill -9 with two Jobs running; the restarted daemon re-adopts both through pods/exec, they
    exit 0, their clients reattach, and each log dir holds every event exactly once (those written
    while no daemon ran included)."""
    d = kube_daemon
    cfg = write_config(tmp_path, _ticking_config())
    procs = [d.cli(["--automation", "--config", str(cfg), "q"], tmp_path) for _ in range(2)]
    runs = [(p, _first_line_log_dir(p)) for p in procs]
    for _, log_dir in runs:

        def running_a_tool(ld: Path = log_dir) -> bool:
            return "tool_called" in _types(ld / "events.jsonl")

        _until(running_a_tool, 90, f"{log_dir.name} running a tool")
    assert len([c for c in d.containers() if c.state == "running"]) == 2
    d.kill9()
    time.sleep(3.0)  # the pods write on; nothing reaches this host meanwhile
    assert len(d.containers()) == 2
    d.start()
    for proc, log_dir in runs:
        rc, out, err = _finish(proc, timeout=180)
        assert rc == 0, out + err + d.stderr_tail()
        assert parse_lines(out)["RUN_ID"] == log_dir.name
        _assert_finished_ok(log_dir)
        _assert_events_mirror_the_outbox(log_dir)
        held = (log_dir / "sandbox" / "events.jsonl").read_bytes()
        copy = (tmp_path / "workspaces" / log_dir.name / Path(COPY).name).read_bytes()
        assert held[: len(copy)] == copy and len(held) > len(copy)
        log = (log_dir / "massgen.log").read_text()
        assert "supervisor resumed" in log and "run channel re-linked" in log, log[-2000:]
    _until(lambda: d.containers() == [], 60, "the Jobs deleted")


def test_a_deadline_passing_while_the_daemon_is_down_is_a_timeout(kube_daemon: KubeDaemon, tmp_path: Path) -> None:
    """The run's deadline passes with no daemon (the engine times itself out, the hub keeps its
    events for a supervisor): the restarted one adopts the Job, re-links, gets the end (exit 3
    timeout) and deletes the Job."""
    d = kube_daemon
    cfg = write_config(tmp_path, SLEEPER)
    proc = d.cli(["--automation", "--config", str(cfg), "q"], tmp_path)
    log_dir = _first_line_log_dir(proc)
    _until(lambda: "turn_started" in _types(log_dir / "events.jsonl"), 90, "the run's first turn")
    d.kill9()
    deadline = float(load(log_dir / "status.json")["run"]["deadline"])
    time.sleep(max(0.0, deadline - time.time()) + 1.0)
    d.start()
    rc, out, err = _finish(proc, timeout=120)
    assert rc == 3, out + err + d.stderr_tail()
    assert load(log_dir / "result.json")["reason"] == "timeout"
    assert "run channel re-linked" in (log_dir / "massgen.log").read_text()
    _until(lambda: d.containers() == [], 60, "the Job deleted")


def test_a_batch_through_the_daemon_runs_on_the_cluster(kube_daemon: KubeDaemon, tmp_path: Path) -> None:
    """`massgen-run batch` with nothing changed: the daemon's runtime setting puts every item on
    the cluster (one Job each), the gate passes, and no Job is left."""
    import json
    import subprocess
    import sys

    d = kube_daemon
    (tmp_path / "good.yaml").write_text(
        (Path(__file__).resolve().parents[1] / "data" / "batch" / "good.yaml").read_text()
    )
    qs = "".join(json.dumps({"id": f"q{i}", "question": f"{i}*7", "expected": i * 7}) + "\n" for i in range(4))
    (tmp_path / "qs.jsonl").write_text(qs)
    spec = tmp_path / "batch.yaml"
    spec.write_text("configs:\n  g: good.yaml\nquestions: qs.jsonl\nassert:\n  - type: number_close\nmax_parallel: 2\n")
    out_dir = tmp_path / "batch"
    cmd = [sys.executable, "-m", "supervisor.cli", "batch", str(spec), "--batch-dir", str(out_dir), "--automation"]
    res = subprocess.run(cmd, cwd=tmp_path, env=d.env(), capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stdout + res.stderr + d.stderr_tail()
    assert "SUPERVISOR: daemon" in res.stdout
    items = [json.loads(line) for line in (out_dir / "items.jsonl").read_text().splitlines()]
    assert len(items) == 4
    for item in items:
        log = next((out_dir / "runs").glob(f"*/{item['run_id']}/massgen.log")).read_text()
        assert "sandbox started: id=mg-" in log  # a Job's name, not a container id
    _until(lambda: d.containers() == [], 60, "the Jobs deleted")

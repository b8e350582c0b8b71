"""The automation contract on every runtime: quickstart, four at once, nested, timeout -> 3, SIGINT -> 4, OOM -> 2,
an engine ignoring SIGTERM killed after grace."""

from __future__ import annotations

import asyncio
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from supervisor.images import agent_image_tag
from supervisor.lifecycle import RunExecution, RunRequest
from tests.cli_helpers import load, massgen_run, parse_lines, start_cli, wait_for_event, write_config
from tests.conformance.conftest import Runtime
from tests.conformance.engines import engine_of, no_container_for

pytestmark = pytest.mark.docker

SLEEPER = """\
agents:
  - id: a
    backend:
      type: scripted
      steps: [{shell: "sleep 60", timeout: 120}, {answer: never}]
"""


def _quick(rt: Runtime) -> list[str]:
    return ["--automation", *rt.args, "--config", "@examples/quickstart", "What is 2+2?"]


def test_quickstart_exits_0_with_the_answer(runtime_under_test: Runtime, tmp_path: Path) -> None:
    """Quickstart: exit 0, the answer file holds "4", result.json and status.json agree."""
    p = massgen_run(_quick(runtime_under_test), tmp_path, 180, **runtime_under_test.env)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "sandbox none" not in p.stderr  # really in a sandbox of that runtime
    f = parse_lines(p.stdout)
    assert "4" in Path(f["ANSWER_FILE"]).read_text()
    log_dir = Path(f["LOG_DIR"])
    assert (load(log_dir / "result.json")["exit_code"], load(log_dir / "status.json")["run"]["state"]) == (
        0,
        "finished",
    )


def test_four_runs_at_once(runtime_under_test: Runtime, tmp_path: Path) -> None:
    """Four quickstarts at once: four distinct log dirs, all exit 0."""
    with ThreadPoolExecutor(4) as pool:
        procs = list(
            pool.map(
                lambda _: massgen_run(_quick(runtime_under_test), tmp_path, 180, **runtime_under_test.env), range(4)
            )
        )
    assert [p.returncode for p in procs] == [0, 0, 0, 0], [p.stderr[-500:] for p in procs]
    assert len({parse_lines(p.stdout)["LOG_DIR"] for p in procs}) == 4


def test_whole_run_timeout_exits_3(runtime_under_test: Runtime, tmp_path: Path) -> None:
    """A sleep past the whole-run timeout: exit 3 soon after, TIMEOUT line, result.json says timeout."""
    cfg = write_config(tmp_path, SLEEPER + "timeout_settings: {orchestrator_timeout_seconds: 3}\n")
    t0 = time.monotonic()
    p = massgen_run(
        ["--automation", *runtime_under_test.args, "--config", str(cfg), "q"], tmp_path, 180, **runtime_under_test.env
    )
    assert p.returncode == 3, p.stdout + p.stderr
    assert time.monotonic() - t0 < 40
    assert p.stdout.splitlines()[-1].startswith("TIMEOUT: timeout")
    assert load(Path(parse_lines(p.stdout)["LOG_DIR"]) / "result.json")["reason"] == "timeout"


def test_sigint_exits_4(runtime_under_test: Runtime, tmp_path: Path) -> None:
    """SIGINT to the CLI mid-run: exit 4, INTERRUPTED line, result.json says interrupted."""
    cfg = write_config(tmp_path, SLEEPER)
    proc, log_dir = start_cli(
        ["--automation", *runtime_under_test.args, "--config", str(cfg), "q"], tmp_path, **runtime_under_test.env
    )
    try:
        wait_for_event(log_dir, "turn_started", timeout=60)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 4, out + err
    assert out.splitlines()[-1].startswith("INTERRUPTED: interrupted")
    assert load(log_dir / "result.json")["exit_code"] == 4


def test_allocating_past_the_memory_limit_exits_2_oom(runtime_under_test: Runtime, tmp_path: Path) -> None:
    """A step that allocates past the memory limit: exit 2, FAILED: oom, status and result say oom."""
    cfg = write_config(
        tmp_path,
        """\
        agents:
          - id: a
            backend:
              type: scripted
              steps:
                - shell: python3 -c "b = bytearray(400 * 1024 * 1024); print(len(b))"
                - answer: survived
                - vote: auto
        sandbox: {memory: 96m}
        """,
    )
    p = massgen_run(
        ["--automation", *runtime_under_test.args, "--config", str(cfg), "q"], tmp_path, 180, **runtime_under_test.env
    )
    assert p.returncode == 2, p.stdout + p.stderr
    assert p.stdout.splitlines()[-1].startswith("FAILED: oom")
    f = parse_lines(p.stdout)
    assert load(f["STATUS_FILE"])["container"]["oom_killed"] is True
    assert load(Path(f["LOG_DIR"]) / "result.json")["reason"] == "oom"


def test_nested_quickstart_child_on_the_same_runtime(runtime_under_test: Runtime, tmp_path: Path) -> None:
    """@examples/meta/nested_quickstart: the child runs on the same runtime, and the parent reads its
    answer through its own view of the child's log dir (a mount locally, a copy through the channel)."""
    args = ["--automation", *runtime_under_test.args, "--config", "@examples/meta/nested_quickstart", "What is 2+2?"]
    p = massgen_run(args, tmp_path, 180, **runtime_under_test.env)
    assert p.returncode == 0, p.stdout + p.stderr
    f = parse_lines(p.stdout)
    [child] = load(Path(f["STATUS_FILE"]))["children"]
    assert (child["state"], child["exit_code"]) == ("finished", 0)
    child_dir = Path(f["LOG_DIR"]) / "children" / child["run_id"]
    child_result = load(child_dir / "result.json")
    child_answer = (child_dir / "final" / child_result["winner"] / "answer.txt").read_text().strip()
    assert "2 + 2 = 4" in child_answer and child_answer in Path(f["ANSWER_FILE"]).read_text()


def test_engine_ignoring_sigterm_is_killed_after_grace(runtime_under_test: Runtime, tmp_path: Path) -> None:
    """An engine that ignores SIGTERM past its deadline: SIGKILL after stop_grace_seconds, exit 3
    timeout with the engine's 137 (on remote-docker the hub survives both and still reports)."""
    cfg = write_config(
        tmp_path,
        """\
        agents:
          - id: a
            backend: {type: scripted}
        sandbox: {timeout_seconds: 6, stop_grace_seconds: 1}
        """,
    )
    # (6 s: the clock includes the sandbox's start, which must be over before the deadline for
    # the engine to have set SIG_IGN; a Job's pod under load took 5 s to have its hub listening.)
    req = RunRequest(
        question="q",
        config_source=str(cfg),
        logs_root=tmp_path / "runs",
        sandbox="docker",
        image=agent_image_tag(),
        engine_command=(
            "python3",
            "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)",
        ),
    )
    t0 = time.monotonic()
    result = asyncio.run(RunExecution(req, engine_of(runtime_under_test)).run())
    assert (result.exit_code, result.reason) == (3, "timeout")
    assert time.monotonic() - t0 < 6 + 1 + 2 + 10
    assert result.container_exit_code == 137
    log = (tmp_path / "runs" / result.run_id / "massgen.log").read_text()
    assert "stopping sandbox: timeout (grace 1s)" in log
    assert no_container_for(runtime_under_test, result.run_id)

"""Whole runs in their containers through the real CLI: the contract, deadlines, interrupts, isolation."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from supervisor.lifecycle import RunExecution, RunRequest
from supervisor.runtime.base import LABEL_RUN
from supervisor.runtime.docker import DockerRuntime
from tests.cli_helpers import load, massgen_run, parse_lines, start_cli, wait_for_event, write_config

pytestmark = pytest.mark.docker

QUICK = ["--automation", "--config", "@examples/quickstart", "What is 2+2?"]


def _no_container_for(runtime: DockerRuntime, run_id: str) -> bool:
    return runtime.list_owned({LABEL_RUN: run_id}) == []


def test_quickstart_runs_in_a_container_and_leaves_none(
    runtime: DockerRuntime, agent_image: str, tmp_path: Path
) -> None:
    """The quickstart exits 0 with the contract lines; status.json names its container; it is removed."""
    p = massgen_run([*QUICK, "--image", agent_image], tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    f = parse_lines(p.stdout)
    assert p.stdout.splitlines()[0].startswith("LOG_DIR: /") and len(p.stdout.splitlines()) <= 20
    st = load(f["STATUS_FILE"])
    assert re.fullmatch(r"[0-9a-f]{64}", st["container"]["id"])
    assert st["container"]["image"] == agent_image and st["run"]["sandbox"] == "docker"
    assert st["container"]["exit_code"] == 0 and st["container"]["oom_killed"] is False
    assert "2 + 2 = 4" in Path(f["ANSWER_FILE"]).read_text()
    assert _no_container_for(runtime, f["RUN_ID"])


def test_first_use_builds_nothing_when_images_exist_and_four_runs_at_once(
    runtime: DockerRuntime, agent_image: str, tmp_path: Path
) -> None:
    """Four containerised runs at once (image resolved by the CLI itself): distinct dirs, all exit 0."""
    with ThreadPoolExecutor(4) as pool:
        procs = list(pool.map(lambda _: massgen_run(QUICK, tmp_path), range(4)))
    assert [p.returncode for p in procs] == [0] * 4, [p.stdout + p.stderr for p in procs]
    runs = [parse_lines(p.stdout) for p in procs]
    assert len({r["LOG_DIR"] for r in runs}) == 4
    ids = {load(r["STATUS_FILE"])["container"]["id"] for r in runs}
    assert len(ids) == 4
    assert all(_no_container_for(runtime, r["RUN_ID"]) for r in runs)


def test_scripted_sleep_past_the_deadline_exits_3(runtime: DockerRuntime, agent_image: str, tmp_path: Path) -> None:
    """A step sleeping past the whole-run timeout: exit 3 within grace + 2 s of the deadline, container gone."""
    cfg = write_config(
        tmp_path,
        """\
        agents:
          - id: a
            backend: {type: scripted, steps: [{shell: "sleep 300", timeout: 600}, {answer: never}]}
        timeout_settings: {orchestrator_timeout_seconds: 3}
        sandbox: {stop_grace_seconds: 2}
        """,
    )
    t0 = time.monotonic()
    p = massgen_run(["--automation", "--image", agent_image, "--config", str(cfg), "q"], tmp_path)
    elapsed = time.monotonic() - t0
    assert p.returncode == 3, p.stdout + p.stderr
    assert elapsed < 3 + 2 + 2 + 3  # deadline + grace + 2 s, plus CLI and container start-up
    f = parse_lines(p.stdout)
    assert load(Path(f["LOG_DIR"]) / "result.json")["reason"] == "timeout"
    st = load(f["STATUS_FILE"])
    assert (st["run"]["state"], st["run"]["exit_code"]) == ("finished", 3)
    assert _no_container_for(runtime, f["RUN_ID"])


def test_engine_ignoring_sigterm_is_killed_after_grace(
    runtime: DockerRuntime, agent_image: str, tmp_path: Path
) -> None:
    """A sandbox that ignores SIGTERM is killed after the grace period: exit 3, container removed."""
    cfg = write_config(
        tmp_path,
        """\
        agents:
          - id: a
            backend: {type: scripted}
        sandbox: {timeout_seconds: 2, stop_grace_seconds: 1}
        """,
    )
    req = RunRequest(
        question="q",
        config_source=str(cfg),
        logs_root=tmp_path / "runs",
        sandbox="docker",
        image=agent_image,
        engine_command=(
            "python3",
            "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)",
        ),
    )
    t0 = time.monotonic()
    result = asyncio.run(RunExecution(req, runtime).run())
    elapsed = time.monotonic() - t0
    assert (result.exit_code, result.reason) == (3, "timeout")
    assert elapsed < 2 + 1 + 2 + 3
    assert result.container_exit_code == 137  # SIGKILL after the grace period
    assert _no_container_for(runtime, result.run_id)


def test_sigint_to_the_cli_interrupts_the_container_with_exit_4(
    runtime: DockerRuntime, agent_image: str, tmp_path: Path
) -> None:
    """Ctrl+C of the CLI stops the container gracefully: exit 4, result.json, container gone."""
    cfg = write_config(
        tmp_path,
        """\
        agents:
          - id: a
            backend: {type: scripted, steps: [{shell: "sleep 300", timeout: 600}, {answer: never}]}
        """,
    )
    proc, log_dir = start_cli(["--automation", "--image", agent_image, "--config", str(cfg), "q"], tmp_path)
    wait_for_event(log_dir, "turn_started")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 4, out + err
    res = load(log_dir / "result.json")
    assert (res["exit_code"], res["reason"]) == (4, "interrupted")
    assert _no_container_for(runtime, log_dir.name)


def test_allocating_past_the_memory_limit_exits_2_oom(runtime: DockerRuntime, agent_image: str, tmp_path: Path) -> None:
    """A step that allocates past the memory limit: exit 2, reason oom, final status written."""
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
    p = massgen_run(["--automation", "--image", agent_image, "--config", str(cfg), "q"], tmp_path)
    assert p.returncode == 2, p.stdout + p.stderr
    assert p.stdout.splitlines()[-1].startswith("FAILED: oom")
    f = parse_lines(p.stdout)
    st = load(f["STATUS_FILE"])
    assert st["container"]["oom_killed"] is True and st["run"]["reason"] == "oom"
    assert load(Path(f["LOG_DIR"]) / "result.json")["reason"] == "oom"


def test_inside_the_sandbox_isolation_holds(runtime: DockerRuntime, agent_image: str, tmp_path: Path) -> None:
    """Scripted probes inside the sandbox: non-root, read-only /, read-only context, no socket, no keys, only lo, pids limit."""
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    forks = (
        "import os, signal, time\n"
        "pids = []\n"
        "for _ in range(1000):\n"
        "    try:\n"
        "        pid = os.fork()\n"
        "    except OSError:\n"
        "        break\n"
        "    if pid == 0:\n"
        "        time.sleep(30)\n"
        "        os._exit(0)\n"
        "    pids.append(pid)\n"
        "for pid in pids:\n"
        "    os.kill(pid, signal.SIGKILL)\n"
        "    os.waitpid(pid, 0)\n"
        "print(len(pids))\n"
    )
    (ctx / "doc.txt").write_text("context")
    cfg = write_config(
        tmp_path,
        f"""\
        agents:
          - id: probe
            backend:
              type: scripted
              steps:
                - {{write_file: forks.py, content: {json.dumps(forks)}}}
                - {{shell: "id -u", save_as: uid}}
                - {{shell: "touch /rootfile 2>/dev/null && echo WROTE || echo DENIED", save_as: root}}
                - {{shell: "touch {ctx}/x 2>/dev/null && echo WROTE || echo DENIED", save_as: ctx}}
                - {{shell: "cat {ctx}/doc.txt", save_as: ctxread}}
                - {{shell: "ls /var/run/docker.sock /run/docker.sock 2>&1 | grep -c 'No such' ", save_as: nosock}}
                - {{shell: "env | grep -c _API_KEY || true", save_as: keys}}
                - {{shell: "ls /sys/class/net | tr '\\\\n' ' '", save_as: nets}}
                - {{shell: "python3 forks.py", save_as: procs, timeout: 60}}
                - answer: "uid={{{{uid}}}}|root={{{{root}}}}|ctx={{{{ctx}}}}|ctxread={{{{ctxread}}}}|nosock={{{{nosock}}}}|keys={{{{keys}}}}|nets={{{{nets}}}}|procs={{{{procs}}}}"
                - vote: auto
        orchestrator:
          context_paths: [{{path: {ctx}}}]
        sandbox: {{pids: 128}}
        """,
    )
    p = massgen_run(
        ["--automation", "--image", agent_image, "--config", str(cfg), "q"], tmp_path, OPENAI_API_KEY="sk-host-secret"
    )
    assert p.returncode == 0, p.stdout + p.stderr
    answer = Path(parse_lines(p.stdout)["ANSWER_FILE"]).read_text()
    facts = dict(kv.split("=", 1) for kv in answer.split("|"))
    assert facts["uid"] != "0"
    assert facts["root"] == "DENIED" and facts["ctx"] == "DENIED" and facts["ctxread"] == "context"
    assert facts["nosock"] == "2" and facts["keys"] == "0"
    assert facts["nets"].split() == ["lo"]
    assert 0 < int(facts["procs"]) < 128  # forks stopped by the pids limit, and the run went on
    assert not (ctx / "x").exists()
    assert "sk-host-secret" not in (Path(parse_lines(p.stdout)["LOG_DIR"]) / "massgen.log").read_text()


def test_symlinks_planted_in_the_outbox_are_not_followed(
    runtime: DockerRuntime, agent_image: str, tmp_path: Path
) -> None:
    """Symlinks to host files planted in the outbox neither leak those files into the log dir nor change them."""
    secret = tmp_path / "host_secret.txt"
    fake_event = json.dumps(
        {"v": 1, "seq": 999, "ts": 1.0, "type": "log", "level": "info", "message": "FROM-HOST-FILE"}
    )
    secret.write_text(fake_event + "\n")
    before = secret.read_bytes()
    outbox = "/run/massgen/outbox"
    cfg = write_config(
        tmp_path,
        f"""\
        agents:
          - id: a
            backend:
              type: scripted
              steps:
                - shell: "sleep 1; mv {outbox}/events.jsonl {outbox}/moved.jsonl; ln -s {secret} {outbox}/events.jsonl; ln -sf {secret} {outbox}/status.json; ln -sf {secret} {outbox}/result.json; echo planted"
                - answer: done
                - vote: auto
        """,
    )
    p = massgen_run(["--automation", "--image", agent_image, "--config", str(cfg), "q"], tmp_path)
    log_dir = Path(p.stdout.splitlines()[0].split(": ", 1)[1])
    assert secret.read_bytes() == before
    assert b"FROM-HOST-FILE" not in (log_dir / "events.jsonl").read_bytes()
    assert "FROM-HOST-FILE" not in (log_dir / "massgen.log").read_text()
    assert p.returncode == 0, p.stdout + p.stderr  # the engine kept writing to the file we had open


def test_quickstart_under_gvisor(runtime: DockerRuntime, agent_image: str, tmp_path: Path) -> None:
    """With sandbox.runtime runsc the quickstart passes in a gVisor sandbox (skips only when runsc is absent outside CI)."""
    import os

    if "runsc" not in runtime.available_runtimes():
        if os.environ.get("MASSGEN_REQUIRE_DOCKER") == "1":
            pytest.fail("runsc is not registered with the engine (CI registers it in .ci/docker-up.sh)")
        pytest.skip("runsc not registered with this engine")
    src = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"
    cfg = tmp_path / "gvisor.yaml"
    cfg.write_text(src.read_text() + "sandbox:\n  runtime: runsc\n")
    p = massgen_run(["--automation", "--image", agent_image, "--config", str(cfg), "What is 2+2?"], tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    st = load(parse_lines(p.stdout)["STATUS_FILE"])
    assert st["container"]["runtime"] == "runsc"


def test_sandbox_of_a_killed_cli_is_reaped_by_the_next_run(
    runtime: DockerRuntime, agent_image: str, tmp_path: Path
) -> None:
    """kill -9 of massgen-run orphans its sandbox; the next massgen-run removes it and records supervisor_lost."""
    cfg = write_config(
        tmp_path,
        """\
        agents:
          - id: a
            backend: {type: scripted, steps: [{shell: "sleep 300", timeout: 600}, {answer: never}]}
        """,
    )
    proc, log_dir = start_cli(["--automation", "--image", agent_image, "--config", str(cfg), "q"], tmp_path)
    deadline = time.monotonic() + 30
    while runtime.list_owned({LABEL_RUN: log_dir.name}) == []:
        assert time.monotonic() < deadline, "the sandbox never started"
        time.sleep(0.05)
    proc.kill()
    proc.communicate(timeout=30)
    assert runtime.list_owned({LABEL_RUN: log_dir.name}) != []  # orphaned
    p = massgen_run(QUICK, tmp_path)  # no --image: the CLI's own preflight reaps
    assert p.returncode == 0, p.stdout + p.stderr
    assert "reaped 1 sandbox" in p.stderr
    assert _no_container_for(runtime, log_dir.name)
    res = load(log_dir / "result.json")
    assert (res["exit_code"], res["reason"]) == (2, "supervisor_lost")
    assert load(log_dir / "status.json")["run"]["state"] == "finished"


def test_a_sandbox_left_created_is_a_start_failure_after_the_start_timeout(
    runtime: DockerRuntime, agent_image: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A container that is created but never started (as one whose supervisor died between the two):
    the run ends start_failed once the start timeout passes, not at its deadline; the follower does
    not spin on the engine meanwhile, and the container is removed."""
    import docker.models.containers

    import supervisor.lifecycle

    cfg = write_config(
        tmp_path,
        """\
        agents:
          - id: a
            backend: {type: scripted}
        sandbox: {timeout_seconds: 120}
        """,
    )
    monkeypatch.setattr(supervisor.lifecycle, "START_TIMEOUT_S", 3.0)
    monkeypatch.setattr(docker.models.containers.Container, "start", lambda self, **kw: None)
    waits: list[float] = []
    real_wait = runtime.wait

    def counted_wait(handle: object, timeout: float) -> object:
        waits.append(timeout)
        return real_wait(handle, timeout)  # type: ignore[arg-type]

    monkeypatch.setattr(runtime, "wait", counted_wait)
    req = RunRequest(
        question="q", config_source=str(cfg), logs_root=tmp_path / "runs", sandbox="docker", image=agent_image
    )
    t0 = time.monotonic()
    result = asyncio.run(RunExecution(req, runtime).run())
    elapsed = time.monotonic() - t0
    assert (result.exit_code, result.reason) == (2, "start_failed"), result
    assert "created but not started within 3s" in (result.detail or "")
    assert 3.0 <= elapsed < 60, elapsed  # the start timeout, far from the 120 s deadline
    assert len(waits) <= elapsed / 2 + 3, f"{len(waits)} engine waits in {elapsed:.1f}s: the follower spun"
    assert _no_container_for(runtime, result.run_id)

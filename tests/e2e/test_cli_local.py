"""The automation contract end to end with the real CLI and `--sandbox none` (no Docker)."""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.cli_helpers import load, massgen_run, parse_lines, start_cli, wait_for_event, write_config

QUICK = ["--automation", "--sandbox", "none", "--config", "@examples/quickstart", "What is 2+2?"]


def test_quickstart_prints_the_contract_lines_and_exits_0(tmp_path: Path) -> None:
    """Line 1 is LOG_DIR, <= 20 ASCII lines, answer file holds the final answer, status/result agree."""
    p = massgen_run(QUICK, tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].startswith("LOG_DIR: /")
    assert len(lines) <= 20
    assert p.stdout.isascii() and "\x1b" not in p.stdout
    keys = [line.split(":", 1)[0] for line in lines]
    assert keys == [
        "LOG_DIR",
        "RUN_ID",
        "STATUS_FILE",
        "STATUS",
        "AGENTS",
        "QUESTION",
        "[Coordination in progress - monitor status.json for real-time updates]",
        "WINNER",
        "DURATION",
        "ANSWER_FILE",
        "FINAL_DIR",
        "ANSWER_PREVIEW",
        "COMPLETED",
    ]
    f = parse_lines(p.stdout)
    log_dir = Path(f["LOG_DIR"])
    assert log_dir.is_absolute() and log_dir.name == f["RUN_ID"]
    answer = Path(f["ANSWER_FILE"]).read_text()
    assert "4" in answer and f["ANSWER_PREVIEW"] == " ".join(answer.split())[:200]
    st = load(f["STATUS_FILE"])
    assert st["run"]["state"] == "finished" and st["coordination"]["completion_percentage"] == 100
    assert st["results"]["winner"] == f["WINNER"]
    res = load(log_dir / "result.json")
    assert (res["exit_code"], res["reason"], res["winner"]) == (0, "completed", f["WINNER"])
    assert (log_dir / "config.yaml").exists() and (log_dir / "events.jsonl").stat().st_size > 0
    assert list((log_dir / "agents").glob("*/agent*.*/answer.txt"))
    assert "sandbox none" in p.stderr  # the explicit no-isolation warning


def test_four_parallel_runs_get_distinct_dirs_and_workspaces(tmp_path: Path) -> None:
    """Four runs at once in the same directory: four log dirs, four workspaces, all exit 0."""
    with ThreadPoolExecutor(4) as pool:
        procs = list(pool.map(lambda _: massgen_run(QUICK, tmp_path), range(4)))
    assert [p.returncode for p in procs] == [0, 0, 0, 0], [p.stderr for p in procs]
    dirs = {parse_lines(p.stdout)["LOG_DIR"] for p in procs}
    assert len(dirs) == 4
    assert len(list((tmp_path / ".massgen" / "workspaces").iterdir())) == 4


BAD_CONFIGS = {
    "syntax": "agents: [\n",
    "not_mapping": "- 1\n- 2\n",
    "no_agents": "orchestrator: {}\n",
    "unknown_key": "agents:\n  - id: a\n    backend: {type: scripted}\nbogus: 1\n",
    "bad_backend": "agents:\n  - id: a\n    backend: {type: bard}\n",
    "missing_model": "agents:\n  - id: a\n    backend: {type: openai}\n",
    "dup_ids": "agents:\n  - id: a\n    backend: {type: scripted}\n  - id: a\n    backend: {type: scripted}\n",
    "bad_timeout": "agents:\n  - id: a\n    backend: {type: scripted}\ntimeout_settings: {orchestrator_timeout_seconds: -5}\n",
    "bad_step": "agents:\n  - id: a\n    backend: {type: scripted, steps: [{teleport: 1}]}\n",
    "missing_path": "agents:\n  - id: a\n    backend: {type: scripted}\norchestrator:\n  context_paths: [{path: /nonexistent/xyz}]\n",
}


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_bad_configs_exit_1_with_one_line_error(tmp_path: Path, name: str) -> None:
    """Each kind of bad config: exit 1, LOG_DIR first, a FAILED line naming the file, result.json written."""
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(BAD_CONFIGS[name])
    p = massgen_run(["--automation", "--sandbox", "none", "--config", str(cfg), "q"], tmp_path)
    assert p.returncode == 1, p.stdout + p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].startswith("LOG_DIR: ")
    assert lines[-1].startswith("FAILED: ") and str(cfg) in lines[-1]
    res = load(Path(parse_lines(p.stdout)["LOG_DIR"]) / "result.json")
    assert res["exit_code"] == 1
    st = load(Path(parse_lines(p.stdout)["LOG_DIR"]) / "status.json")
    assert st["run"]["state"] == "finished" and st["run"]["exit_code"] == 1


def test_missing_config_file_and_unknown_example_exit_1(tmp_path: Path) -> None:
    """A config path that does not exist, or an unknown @examples name, is a config error (exit 1)."""
    for cfg in (str(tmp_path / "nope.yaml"), "@examples/does_not_exist"):
        p = massgen_run(["--automation", "--sandbox", "none", "--config", cfg, "q"], tmp_path)
        assert p.returncode == 1
        assert p.stdout.splitlines()[-1].startswith("FAILED: config_missing")


def test_missing_api_key_exits_1_naming_the_variable(tmp_path: Path) -> None:
    """An openai agent without OPENAI_API_KEY fails at once with exit 1 and names the variable."""
    cfg = write_config(tmp_path, "agents:\n  - id: a\n    backend: {type: openai, model: gpt-x}\n")
    p = massgen_run(["--automation", "--sandbox", "none", "--config", str(cfg), "q"], tmp_path)
    assert p.returncode == 1
    assert "OPENAI_API_KEY" in p.stdout.splitlines()[-1]


def test_whole_run_timeout_exits_3_with_result(tmp_path: Path) -> None:
    """A scripted sleep past the whole-run timeout: exit 3, TIMEOUT line, result.json and final status."""
    cfg = write_config(
        tmp_path,
        """\
        agents:
          - id: a
            backend:
              type: scripted
              steps: [{shell: "sleep 60", timeout: 120}, {answer: never}]
        timeout_settings: {orchestrator_timeout_seconds: 1.5}
        """,
    )
    t0 = time.monotonic()
    p = massgen_run(["--automation", "--sandbox", "none", "--config", str(cfg), "q"], tmp_path)
    assert p.returncode == 3, p.stdout + p.stderr
    assert time.monotonic() - t0 < 15
    assert p.stdout.splitlines()[-1].startswith("TIMEOUT: timeout")
    log_dir = Path(parse_lines(p.stdout)["LOG_DIR"])
    assert load(log_dir / "result.json")["exit_code"] == 3
    st = load(log_dir / "status.json")
    assert (st["run"]["state"], st["run"]["reason"]) == ("finished", "timeout")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_to_the_cli_interrupts_with_exit_4(tmp_path: Path, sig: signal.Signals) -> None:
    """SIGINT or SIGTERM to the CLI mid-run: exit 4, INTERRUPTED line, result.json, no engine left."""
    cfg = write_config(
        tmp_path,
        """\
        agents:
          - id: a
            backend:
              type: scripted
              steps: [{shell: "sleep 60", timeout: 120}, {answer: never}]
        """,
    )
    proc, log_dir = start_cli(["--automation", "--sandbox", "none", "--config", str(cfg), "q"], tmp_path)
    wait_for_event(log_dir, "turn_started")
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 4, out + err
    assert out.splitlines()[-1].startswith("INTERRUPTED: interrupted")
    res = load(log_dir / "result.json")
    assert (res["exit_code"], res["reason"]) == (4, "interrupted")
    assert load(log_dir / "status.json")["run"]["state"] == "finished"


def test_human_mode_shows_progress_and_the_final_answer(tmp_path: Path) -> None:
    """Without --automation the CLI prints a readable live log and the full final answer."""
    p = massgen_run(["--sandbox", "none", "--config", "@examples/quickstart", "What is 2+2?"], tmp_path)
    assert p.returncode == 0, p.stderr
    assert "answered agent1.1" in p.stdout and "final answer" in p.stdout and "2 + 2 = 4" in p.stdout


def test_ps_status_and_logs_read_finished_runs(tmp_path: Path) -> None:
    """ps --all lists the run, status --json is the status document, logs prints massgen.log."""
    p = massgen_run(QUICK, tmp_path)
    run_id = parse_lines(p.stdout)["RUN_ID"]
    ps = massgen_run(["ps", "--all"], tmp_path)
    assert run_id in ps.stdout and "finished" in ps.stdout
    st = massgen_run(["status", run_id, "--json"], tmp_path)
    assert '"winner": "agent_a"' in st.stdout
    logs = massgen_run(["logs", run_id], tmp_path)
    assert "run finished: exit_code=0" in logs.stdout


def test_stop_verb_interrupts_a_running_embedded_run(tmp_path: Path) -> None:
    """`massgen-run stop RUN` makes the supervising CLI stop the run: it exits 4 with INTERRUPTED."""
    cfg = write_config(
        tmp_path,
        """\
        agents:
          - id: a
            backend: {type: scripted, steps: [{shell: "sleep 60", timeout: 120}, {answer: never}]}
        """,
    )
    proc, log_dir = start_cli(
        ["--automation", "--sandbox", "none", "--config", str(cfg), "q"], tmp_path, MASSGEN_NO_DAEMON="1"
    )
    wait_for_event(log_dir, "turn_started")
    stop = massgen_run(["stop", log_dir.name], tmp_path, MASSGEN_NO_DAEMON="1")
    assert stop.returncode == 0, stop.stderr
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 4, out + err
    assert load(log_dir / "result.json")["reason"] == "interrupted"

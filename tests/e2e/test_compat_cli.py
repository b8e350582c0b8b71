"""MassGen keys through the real CLI: warnings in massgen.log, status.json and result.json, on stderr in
human mode and never on stdout in --automation; `validate`; the MassGen poller fields and lines."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from tests.cli_helpers import load, massgen_run, parse_lines, write_config

MASSGEN_STYLE = """\
agents:
  - id: agent.a
    backend:
      type: scripted
      cwd: workspace1
      enable_mcp_command_line: true
      command_line_execution_mode: local
      steps:
        - shell: "echo hi"
        - answer: "four"
        - vote: auto
  - id: agent_b
    backend:
      type: scripted
      steps:
        - sleep: 0.5
        - vote: auto
orchestrator:
  snapshot_storage: snapshots
  agent_temporary_workspace: temp_workspaces
  voting_sensitivity: balanced
ui:
  display_type: rich_terminal
  logging_enabled: true
  type: rich_terminal
"""


def test_warnings_go_to_files_and_never_to_stdout_in_automation(tmp_path: Path) -> None:
    """A MassGen-style config runs (exit 0); its warnings are in massgen.log, status.json and result.json only."""
    cfg = write_config(tmp_path, MASSGEN_STYLE)
    p = massgen_run(["--automation", "--sandbox", "none", "--config", str(cfg), "q"], tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "config warning" not in p.stdout and "command_line_execution_mode" not in p.stdout
    assert "command_line_execution_mode" not in p.stderr  # stderr is often the same file (2>&1)
    f = parse_lines(p.stdout)
    log_dir = Path(f["LOG_DIR"])
    st, res = load(log_dir / "status.json"), load(log_dir / "result.json")
    keys = {w["key"] for w in st["meta"]["config_warnings"]}
    assert "agents.0.backend.command_line_execution_mode" in keys
    assert "ui.type" in keys and "orchestrator.agent_temporary_workspace" not in keys  # mapped (info)
    assert all(w["severity"] == "warning" and w["line"] for w in st["meta"]["config_warnings"])
    assert res["config_warnings"] == st["meta"]["config_warnings"]
    log = (log_dir / "massgen.log").read_text()
    assert "config warning:" in log and "config info:" in log and "backend.cwd" in log
    # MassGen pollers: the lines and the fields they read
    assert f["STATUS"] == f["STATUS_FILE"]
    assert f["FINAL_DIR"] == str(Path(f["ANSWER_FILE"]).parent)
    assert st["is_complete"] is True and st["finish_reason"] == "completed"
    assert st["finish_reason_details"] == "completed"
    assert st["coordination"]["active_agent"] is None
    assert set(st["costs"]) == {"total_estimated_cost", "total_input_tokens", "total_output_tokens"}
    assert all("times_restarted" in a for a in st["agents"].values())
    assert "agent.a" in st["agents"]  # a dotted MassGen id


def test_human_mode_prints_warnings_on_stderr(tmp_path: Path) -> None:
    """Without --automation the warnings are on stderr, one line each, naming file, line and key."""
    cfg = write_config(tmp_path, MASSGEN_STYLE)
    p = massgen_run(["--sandbox", "none", "--config", str(cfg), "q"], tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    warned = [line for line in p.stderr.splitlines() if line.startswith("config warning: ")]
    assert any(f"{cfg}:" in w and "key=agents.0.backend.command_line_execution_mode" in w for w in warned)
    assert "config warning" not in p.stdout


def test_output_file_gets_the_final_answer(tmp_path: Path) -> None:
    """--output-file PATH: the final answer is copied there and OUTPUT_FILE names it."""
    out = tmp_path / "out" / "final.md"
    p = massgen_run(
        ["--automation", "--sandbox", "none", "--output-file", str(out), "--config", "@examples/quickstart", "q"],
        tmp_path,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    f = parse_lines(p.stdout)
    assert f["OUTPUT_FILE"] == str(out)
    assert out.read_text() == Path(f["ANSWER_FILE"]).read_text()


def test_validate_verb(tmp_path: Path) -> None:
    """`validate`: 0 with warnings listed, 1 with --strict; errors exit 1 with did-you-mean; --json is one object."""
    cfg = write_config(tmp_path, MASSGEN_STYLE)
    p = massgen_run(["validate", str(cfg)], tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.splitlines()[-1].startswith(f"OK: {cfg} (")
    assert any(line.startswith("warning: ") and "command_line_execution_mode" in line for line in p.stdout.splitlines())
    assert massgen_run(["validate", "--strict", str(cfg)], tmp_path).returncode == 1
    j = massgen_run(["validate", "--json", str(cfg)], tmp_path)
    doc = json.loads(j.stdout)
    assert doc["valid"] is True and doc["errors"] == [] and doc["warnings"] and doc["notes"]
    assert not (tmp_path / ".massgen").exists()  # nothing started, no log dir
    bad = write_config(tmp_path, "agents:\n  - id: a\n    backend: {type: scripted, stepz: []}\n", "bad.yaml")
    b = massgen_run(["validate", str(bad)], tmp_path)
    assert b.returncode == 1
    assert "key=agents.0.backend.stepz unknown key; did you mean 'steps'?" in b.stdout
    assert b.stdout.splitlines()[-1] == f"INVALID: {bad}: 1 error(s)"
    refused = write_config(tmp_path, "agents:\n  - id: a\n    backend: {type: claude_code, model: sonnet}\n", "cc.yaml")
    r = json.loads(massgen_run(["validate", "--json", str(refused)], tmp_path).stdout)
    assert r["valid"] is False and r["errors"][0]["key"] == "agents.0.backend.type"
    missing = write_config(
        tmp_path,
        "agents:\n  - id: a\n    backend: {type: scripted}\norchestrator:\n  context_paths: [{path: nowhere}]\n",
        "m.yaml",
    )
    m = massgen_run(["validate", str(missing)], tmp_path)
    assert m.returncode == 1 and "path does not exist" in m.stdout


def test_validate_is_fast(tmp_path: Path) -> None:
    """A generous bound on the CLI's validate (the bench measures the real figure against a baseline)."""
    cfg = write_config(tmp_path, MASSGEN_STYLE)
    times = []
    for _ in range(3):
        t0 = time.monotonic()
        assert massgen_run(["validate", str(cfg)], tmp_path).returncode == 0
        times.append(time.monotonic() - t0)
    assert statistics.median(times) < 5.0


def test_cost_budget_with_an_unpriced_model_is_price_missing(tmp_path: Path) -> None:
    """A cost budget over a model without a price is a config error (exit 1, price_missing), not a silent $0."""
    cfg = write_config(
        tmp_path,
        """\
        agents:
          - id: a
            backend: {type: chatcompletion, model: llama3.3-70b, base_url: "https://api.cerebras.ai/v1"}
        sandbox:
          budget: {max_cost_usd: 1.0}
        """,
    )
    p = massgen_run(["--automation", "--sandbox", "none", "--config", str(cfg), "q"], tmp_path, CEREBRAS_API_KEY="x")
    assert p.returncode == 1, p.stdout + p.stderr
    last = p.stdout.splitlines()[-1]
    assert (
        last.startswith("FAILED: price_missing: ") and "openai/llama3.3-70b" in last and "MASSGEN_PRICING_FILE" in last
    )
    v = massgen_run(["validate", str(cfg)], tmp_path)
    assert v.returncode == 1 and "no price for openai/llama3.3-70b" in v.stdout
    priced = tmp_path / "prices.json"
    priced.write_text('{"openai": {"llama3.3-70b": {"input": 0.85, "cached_input": 0.85, "output": 1.2}}}')
    assert massgen_run(["validate", str(cfg)], tmp_path, MASSGEN_PRICING_FILE=str(priced)).returncode == 0


def test_validate_inside_a_sandbox_needs_no_supervisor(tmp_path: Path) -> None:
    """In a sandbox (MASSGEN_SUPERVISOR_SOCKET set) `validate` checks the file locally, with the same output."""
    cfg = write_config(tmp_path, MASSGEN_STYLE)
    sock = str(tmp_path / "no-such.sock")
    p = massgen_run(["validate", "--json", str(cfg)], tmp_path, MASSGEN_SUPERVISOR_SOCKET=sock)
    assert p.returncode == 0, p.stdout + p.stderr
    doc = json.loads(p.stdout)
    assert doc["valid"] and any(w["key"] == "ui.type" for w in doc["warnings"])
    bad = write_config(tmp_path, "agents:\n  - id: a\n    backend: {type: scripted, stepz: []}\n", "bad.yaml")
    b = massgen_run(["validate", str(bad)], tmp_path, MASSGEN_SUPERVISOR_SOCKET=sock)
    assert b.returncode == 1 and "did you mean 'steps'?" in b.stdout


def test_agent_temporary_workspace_lets_peers_read_workspace_snapshots(tmp_path: Path) -> None:
    """MassGen's agent_temporary_workspace: after an answer, the others read a snapshot of that agent's workspace."""
    cfg = write_config(
        tmp_path,
        """\
        agents:
          - id: a
            backend:
              type: scripted
              steps:
                - write_file: result.txt
                  content: "computed 42"
                - answer: "see my result.txt"
                - vote: auto
          - id: b
            backend:
              type: scripted
              steps:
                - sleep: 1.0
                - read_file: ../.peers/agent1/result.txt
                  save_as: peer
                - answer: "a said: {{peer}}"
                - vote: auto
        orchestrator:
          agent_temporary_workspace: temp_workspaces
        """,
    )
    p = massgen_run(["--automation", "--sandbox", "none", "--config", str(cfg), "q"], tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    log_dir = Path(parse_lines(p.stdout)["LOG_DIR"])
    answers = [a.read_text() for a in (log_dir / "agents" / "b").rglob("answer.txt")]
    assert any("a said: computed 42" in a for a in answers), answers


def _massgen_poller_view(st: dict) -> dict:  # type: ignore[type-arg]
    """What a poller written for MassGen reads: every field of the v0.1.8 case study's status.json example,
    plus MassGen's later is_complete / finish_reason / finish_reason_details / costs. KeyError = incompatible."""
    meta, co, res = st["meta"], st["coordination"], st["results"]
    view = {
        "session_id": meta["session_id"],
        "log_dir": meta["log_dir"],
        "question": meta["question"],
        "start_time": meta["start_time"],
        "elapsed_seconds": meta["elapsed_seconds"],
        "phase": co["phase"],
        "active_agent": co["active_agent"],
        "completion_percentage": co["completion_percentage"],
        "is_final_presentation": co["is_final_presentation"],
        "agents": {
            aid: (a["status"], a["answer_count"], a["latest_answer_label"], a["times_restarted"])
            for aid, a in st["agents"].items()
        },
        "winner": res["winner"],
        "votes": res["votes"],
        "is_complete": st["is_complete"],
        "finish_reason": st["finish_reason"],
        "finish_reason_details": st["finish_reason_details"],
        "cost": st["costs"]["total_estimated_cost"],
        "tokens": (st["costs"]["total_input_tokens"], st["costs"]["total_output_tokens"]),
    }
    assert isinstance(view["completion_percentage"], int) and 0 <= view["completion_percentage"] <= 100
    assert view["active_agent"] is None or view["active_agent"] in st["agents"]
    return view


def test_a_massgen_poller_works_against_a_live_run_and_a_finished_one(tmp_path: Path) -> None:
    """A poller reading MassGen's fields sees the run live (in_progress, an active agent) and then finished."""
    from tests.cli_helpers import start_cli

    cfg = write_config(
        tmp_path,
        """\
        agents:
          - id: agent_a
            backend:
              type: scripted
              steps:
                - shell: "sleep 3"
                - answer: "four"
                - vote: auto
          - id: agent_b
            backend:
              type: scripted
              steps:
                - sleep: 4
                - vote: auto
        """,
    )
    proc, log_dir = start_cli(["--automation", "--sandbox", "none", "--config", str(cfg), "2+2?"], tmp_path)
    live: list[dict] = []  # type: ignore[type-arg]
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            st = json.loads((log_dir / "status.json").read_text())
        except (OSError, ValueError):
            time.sleep(0.1)
            continue
        live.append(_massgen_poller_view(st))
        time.sleep(0.2)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, out + err
    during = [v for v in live if not v["is_complete"]]
    assert during and all(v["finish_reason"] == "in_progress" and v["finish_reason_details"] is None for v in during)
    assert any(v["active_agent"] == "agent_a" for v in during)  # agent_a's shell step is running
    assert all(v["completion_percentage"] < 100 for v in during)
    done = _massgen_poller_view(load(log_dir / "status.json"))
    assert done["is_complete"] and done["finish_reason"] == "completed" and done["completion_percentage"] == 100
    assert done["winner"] == "agent_a" and done["votes"].get("agent1.1", 0) >= 1
    assert done["agents"]["agent_a"][1:3] == (1, "agent1.1")
    assert done["session_id"] == log_dir.name and done["question"] == "2+2?"

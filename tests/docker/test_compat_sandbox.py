"""MassGen-style configs in real sandboxes: the case study's meta config against loopback fakes (a nested
run from an agent's shell, warnings in status/result and not on stdout), and two OpenAI-compatible
agents with different upstreams and keys (each upstream sees only its own key)."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.cli_helpers import REPO, load, massgen_run, parse_lines, write_config
from tests.fakes import FakeAnthropic, FakeGemini, FakeOpenAI, FakeRequest, FakeToolCall, Reply

pytestmark = pytest.mark.docker

OPENAI_KEY = "sk-host-openai-7f3a"
GEMINI_KEY = "gm-host-gemini-91c2"
NESTED = 'massgen-run --automation --config @examples/quickstart "What is 2+2?" > exp.txt 2>&1; cat exp.txt'


def analyst_openai(req: FakeRequest) -> Reply:
    """agent_a: runs a nested MassGen experiment from its shell, answers with what it saw, then votes."""
    text = req.prompt_text
    if "selected to present" in text:
        return Reply(text="FINAL: the nested run answered; see its log dir.")
    if "(your own latest answer)" in text:
        return Reply(tool_calls=[FakeToolCall("vote", {"agent_id": "agent1", "reason": "ran the experiment"})])
    if "COMPLETED:" in text:  # the shell's output, in this turn
        winner = text.split("WINNER: ", 1)[1].split()[0]
        answer = f"Ran a nested experiment: WINNER={winner}"
        return Reply(tool_calls=[FakeToolCall("new_answer", {"content": answer})])
    return Reply(tool_calls=[FakeToolCall("shell", {"command": NESTED, "timeout": 240})])


def analyst_gemini(req: FakeRequest) -> Reply:
    """agent_b: answers while nobody has, then votes for agent1."""
    if "selected to present" in req.prompt_text:
        return Reply(text="FINAL from b")
    if "(no answers available yet)" in req.prompt_text:
        return Reply(tool_calls=[FakeToolCall("new_answer", {"content": "four"})])
    return Reply(tool_calls=[FakeToolCall("vote", {"agent_id": "agent1", "reason": "it ran the experiment"})])


def meta_config(oa_url: str, gm_url: str) -> str:
    # Written like MassGen's meta/massgen_suggests_to_improve_massgen.yaml (base_url: the fakes).
    return textwrap.dedent(f"""\
        agents:
          - id: agent_a
            backend:
              type: openai
              model: gpt-4o-mini
              base_url: "{oa_url}"
              cwd: workspace1
              enable_mcp_command_line: true
              command_line_execution_mode: local
            system_message: &teach |
              You have access to MassGen through the command line and can:
              - Run MassGen in automation mode using:
                massgen-run --automation --config [config] "[question]"
              - Monitor progress by reading status.json files
              - Read final results from log directories
              Always use automation mode for running MassGen to get structured output.
          - id: agent_b
            backend:
              type: gemini
              model: gemini-2.5-flash
              base_url: "{gm_url}"
              cwd: workspace2
              enable_mcp_command_line: true
              command_line_execution_mode: local
            system_message: *teach
        orchestrator:
          snapshot_storage: snapshots_meta
          agent_temporary_workspace: temp_workspaces_meta
          context_paths:
            - path: agent_image
              permission: read
            - path: docs
              permission: read
        ui:
          display_type: rich_terminal
          logging_enabled: true
        """)


def test_case_study_meta_config_runs_unchanged_with_a_nested_run(agent_image: str, tmp_path: Path) -> None:
    """The meta config runs against the fakes from the project folder, exits 0, an agent's shell starts a nested
    run, and the config warnings are in status.json and result.json, never on stdout."""
    cfg = write_config(tmp_path, "")
    with (
        FakeOpenAI(analyst_openai, api_key=OPENAI_KEY) as oa,
        FakeGemini(analyst_gemini, api_key=GEMINI_KEY) as gm,
    ):
        cfg.write_text(meta_config(oa.base_url, gm.root_url))
        p = massgen_run(
            ["--automation", "--image", agent_image, "--logs-root", str(tmp_path / "runs"), "--config", str(cfg), "Q"],
            REPO,  # context paths are relative to where the run starts, as in MassGen
            timeout=300,
            OPENAI_API_KEY=OPENAI_KEY,
            GEMINI_API_KEY=GEMINI_KEY,
        )
    assert p.returncode == 0, p.stdout + p.stderr
    f = parse_lines(p.stdout)
    assert f["WINNER"] == "agent_a"
    assert "config" not in p.stdout.lower().replace(f["LOG_DIR"].lower(), "")
    assert "command_line_execution_mode" not in p.stdout + p.stderr
    st, res = load(f["STATUS_FILE"]), load(Path(f["LOG_DIR"]) / "result.json")
    warned = {w["key"] for w in st["meta"]["config_warnings"]}
    assert {"agents.0.backend.command_line_execution_mode", "agents.1.backend.command_line_execution_mode"} <= warned
    assert res["config_warnings"] == st["meta"]["config_warnings"]
    # the nested run: started from agent_a's shell, finished with exit 0, its winner in the answer
    assert len(st["children"]) == 1 and st["children"][0]["exit_code"] == 0
    child = load(Path(f["LOG_DIR"]) / "children" / st["children"][0]["run_id"] / "result.json")
    answer = (Path(f["LOG_DIR"]) / "agents" / "agent_a").rglob("answer.txt")
    assert any(f"WINNER={child['winner']}" in a.read_text() for a in answer)
    assert st["is_complete"] and st["finish_reason"] == "completed"
    assert OPENAI_KEY not in p.stdout + p.stderr and GEMINI_KEY not in p.stdout + p.stderr


def _coordinate(req: FakeRequest) -> Reply:
    if "selected to present" in req.prompt_text:
        return Reply(text="FINAL: 4")
    if "(no answers available yet)" in req.prompt_text:
        return Reply(tool_calls=[FakeToolCall("new_answer", {"content": "4"})])
    return Reply(tool_calls=[FakeToolCall("vote", {"agent_id": "agent1", "reason": "right"})])


def test_two_chatcompletion_agents_each_upstream_sees_only_its_own_key(agent_image: str, tmp_path: Path) -> None:
    """Two `chatcompletion` agents at two upstreams with two keys (MASSGEN_KEYS_FILE by URL) in one run."""
    k1, k2, other = "sk-upstream-one-1111", "sk-upstream-two-2222", "sk-openai-not-theirs-3333"
    with FakeOpenAI(_coordinate, api_key=k1) as one, FakeOpenAI(_coordinate, api_key=k2) as two:
        keys = tmp_path / "keys.json"
        keys.write_text(json.dumps({one.base_url: {"api_key": k1}, two.base_url: {"api_key": k2}}))
        config = textwrap.dedent(f"""\
            agents:
              - id: cerebras.like
                backend: {{type: chatcompletion, model: gpt-4o-mini, base_url: "{one.base_url}"}}
              - id: together.like
                backend: {{type: chatcompletion, model: gpt-4o-mini, base_url: "{two.base_url}"}}
            """)
        cfg = write_config(tmp_path, config)
        p = massgen_run(
            ["--automation", "--image", agent_image, "--config", str(cfg), "Q"],
            tmp_path,
            timeout=180,
            MASSGEN_KEYS_FILE=str(keys),
            OPENAI_API_KEY=other,
        )
    assert p.returncode == 0, p.stdout + p.stderr
    assert one.requests and two.requests
    assert {r.headers.get("authorization") for r in one.requests} == {f"Bearer {k1}"}
    assert {r.headers.get("authorization") for r in two.requests} == {f"Bearer {k2}"}
    f = parse_lines(p.stdout)
    t = load(f["STATUS_FILE"])["telemetry"]["by_agent"]
    assert t["cerebras.like"]["calls"] == len(one.requests)
    assert t["together.like"]["calls"] == len(two.requests)
    text = "\n".join(q.read_text(errors="replace") for q in Path(f["LOG_DIR"]).rglob("*") if q.is_file())
    for k in (k1, k2, other):
        assert k not in text and k not in p.stdout + p.stderr


ANTHROPIC_KEY = "sk-ant-host-secret-5d1e"
PROBE = "env; cat /proc/*/environ 2>/dev/null | tr '\\0' '\\n'; ls -la /run/massgen/api 2>&1"


def claude_policy(req: FakeRequest) -> Reply:
    """Probe the sandbox's environment from the shell first, then answer, vote and present (with cache reads)."""
    text = req.prompt_text
    if "selected to present" in text:
        return Reply(text="FINAL: 2 + 2 = 4", prompt_tokens=900, completion_tokens=20, cached_tokens=100)
    if "(your own latest answer)" in text or ("agent1" in text and "(no answers available yet)" not in text):
        vote = FakeToolCall("vote", {"agent_id": "agent1", "reason": "correct"})
        return Reply(tool_calls=[vote], prompt_tokens=700, completion_tokens=25, cached_tokens=50)
    if "PATH=" in text:  # the probe's output came back: answer
        answer = FakeToolCall("new_answer", {"content": "2 + 2 = 4"})
        return Reply(tool_calls=[answer], prompt_tokens=800, completion_tokens=30)
    return Reply(tool_calls=[FakeToolCall("shell", {"command": PROBE})], prompt_tokens=500, completion_tokens=15)


def test_claude_agents_coordinate_in_a_sandbox_through_the_gateway(agent_image: str, tmp_path: Path) -> None:
    """Two claude agents (streaming and not) on the real anthropic SDK in one sandbox: a full round against the
    fake Messages API; the key never shows inside (their own shell output goes back to the fake); telemetry
    equals the fake's usage, priced."""
    with FakeAnthropic(claude_policy, api_key=ANTHROPIC_KEY) as fake:
        config = textwrap.dedent(f"""\
            agents:
              - id: claude_a
                backend: {{type: claude, model: claude-sonnet-4-5, base_url: "{fake.root_url}"}}
              - id: claude_b
                backend: {{type: claude, model: claude-sonnet-4-5, base_url: "{fake.root_url}", stream: false}}
            sandbox:
              budget: {{max_cost_usd: 1.0}}
            """)
        cfg = write_config(tmp_path, config)
        p = massgen_run(
            ["--automation", "--image", agent_image, "--config", str(cfg), "What is 2+2?"],
            tmp_path,
            timeout=180,
            ANTHROPIC_API_KEY=ANTHROPIC_KEY,
        )
    assert p.returncode == 0, p.stdout + p.stderr
    f = parse_lines(p.stdout)
    assert Path(f["ANSWER_FILE"]).read_text() == "FINAL: 2 + 2 = 4"
    assert {r.headers.get("authorization") for r in fake.requests} == {f"Bearer {ANTHROPIC_KEY}"}
    assert any(r.stream for r in fake.requests) and any(not r.stream for r in fake.requests)
    probes = [r for r in fake.requests if "PATH=" in r.prompt_text]
    assert probes, "the probe's output never reached the model"
    for r in fake.requests:
        assert ANTHROPIC_KEY not in r.prompt_text  # nothing in the sandbox held the key
    text = "\n".join(q.read_text(errors="replace") for q in Path(f["LOG_DIR"]).rglob("*") if q.is_file())
    assert ANTHROPIC_KEY not in text and ANTHROPIC_KEY not in p.stdout + p.stderr
    t = load(f["STATUS_FILE"])["telemetry"]
    u = fake.usage
    got = t["by_model"]["claude/claude-sonnet-4-5"]
    want = (u.calls, u.prompt_tokens, u.completion_tokens, u.cached_tokens)
    assert (got["calls"], got["prompt_tokens"], got["completion_tokens"], got["cached_tokens"]) == want
    cost = ((u.prompt_tokens - u.cached_tokens) * 3.0 + u.cached_tokens * 0.30 + u.completion_tokens * 15.0) / 1e6
    assert got["cost_usd"] == pytest.approx(cost, abs=1e-9) and cost > 0
    assert set(t["by_agent"]) == {"claude_a", "claude_b"}


def _writer_policy(ctx: Path, outside: Path) -> Callable[[FakeRequest], Reply]:
    """Answer, vote for itself, then present: write a file of the writable context path and plant symlinks."""
    plant = (
        f"ln -s {outside} {ctx}/escape-dir; ln -s {outside}/victim.txt {ctx}/victim-link; "
        f"echo pwned > {ctx}/victim-link 2>/dev/null; echo planted"
    )

    def policy(req: FakeRequest) -> Reply:
        text = req.prompt_text
        if "selected to present" in text:
            if "planted" not in text:
                return Reply(
                    tool_calls=[
                        FakeToolCall("write_file", {"path": f"{ctx}/notes.txt", "content": "edited by the winner\n"}),
                        FakeToolCall("write_file", {"path": f"{ctx}/sub/new.txt", "content": "a new file\n"}),
                        FakeToolCall("shell", {"command": plant}),
                    ]
                )
            return Reply(text="FINAL: notes edited")
        if "(no answers available yet)" in text:
            return Reply(tool_calls=[FakeToolCall("new_answer", {"content": "I will edit notes.txt"})])
        return Reply(tool_calls=[FakeToolCall("vote", {"agent_id": "agent1", "reason": "mine"})])

    return policy


def test_permission_write_applies_the_winners_edits_on_exit_0_and_never_a_symlink(
    agent_image: str, tmp_path: Path
) -> None:
    """The winner edits a writable context path in its presentation: the host file changes after exit 0, the
    change set and diff are in final/<winner>/context/0/, and symlinks planted in the copy change nothing."""
    ctx, outside = tmp_path / "project", tmp_path / "outside"
    ctx.mkdir()
    outside.mkdir()
    (ctx / "notes.txt").write_text("original\n")
    (ctx / "keep.txt").write_text("untouched\n")
    (outside / "victim.txt").write_text("victim\n")
    with FakeOpenAI(_writer_policy(ctx, outside), api_key=OPENAI_KEY) as oa:
        config = textwrap.dedent(f"""\
            agents:
              - id: writer
                backend: {{type: openai, model: gpt-4o-mini, base_url: "{oa.base_url}"}}
            orchestrator:
              context_paths:
                - path: {ctx}
                  permission: write
            """)
        cfg = write_config(tmp_path, config)
        p = massgen_run(
            ["--automation", "--image", agent_image, "--config", str(cfg), "Edit the notes"],
            tmp_path,
            timeout=180,
            OPENAI_API_KEY=OPENAI_KEY,
        )
    assert p.returncode == 0, p.stdout + p.stderr
    f = parse_lines(p.stdout)
    assert (ctx / "notes.txt").read_text() == "edited by the winner\n"
    assert (ctx / "sub" / "new.txt").read_text() == "a new file\n"
    assert (ctx / "keep.txt").read_text() == "untouched\n"
    assert not (ctx / "escape-dir").exists() and not (ctx / "victim-link").exists()
    assert (outside / "victim.txt").read_text() == "victim\n" and sorted(p.name for p in outside.iterdir()) == [
        "victim.txt"
    ]
    changes_dir = Path(f["LOG_DIR"]) / "final" / "writer" / "context" / "0"
    changes = json.loads((changes_dir / "changes.json").read_text())
    assert changes["changed"] == ["notes.txt"] and changes["added"] == ["sub/new.txt"]
    assert sorted(changes["applied"]) == ["notes.txt", "sub/new.txt"]
    assert {r["path"] for r in changes["refused"]} == {"escape-dir", "victim-link"}
    diff = (changes_dir / "changes.diff").read_text()
    assert "-original" in diff and "+edited by the winner" in diff
    assert (changes_dir / "files" / "notes.txt").read_text() == "edited by the winner\n"
    assert (Path(f["LOG_DIR"]) / "final" / "writer" / "workspace").is_dir()  # the winner's workspace is kept


def test_permission_write_leaves_the_host_untouched_on_any_other_exit(agent_image: str, tmp_path: Path) -> None:
    """An agent writes the copy from its shell, then the run times out (exit 3): the host folder is unchanged."""
    ctx = tmp_path / "project"
    ctx.mkdir()
    (ctx / "notes.txt").write_text("original\n")
    config = textwrap.dedent(f"""\
        agents:
          - id: a
            backend:
              type: scripted
              steps:
                - shell: "echo changed > {ctx}/notes.txt && echo more > {ctx}/added.txt && cat {ctx}/notes.txt"
                - answer: "changed it"
                - sleep: 120
        orchestrator:
          context_paths:
            - path: {ctx}
              permission: write
        timeout_settings:
          orchestrator_timeout_seconds: 8
        """)
    cfg = write_config(tmp_path, config)
    p = massgen_run(["--automation", "--image", agent_image, "--config", str(cfg), "q"], tmp_path, timeout=120)
    assert p.returncode == 3, p.stdout + p.stderr
    assert (ctx / "notes.txt").read_text() == "original\n"
    assert sorted(q.name for q in ctx.iterdir()) == ["notes.txt"]
    log = (Path(parse_lines(p.stdout)["LOG_DIR"]) / "massgen.log").read_text()
    assert "permission write" in log

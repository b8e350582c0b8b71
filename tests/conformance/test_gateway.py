"""The model gateway on every runtime: real SDKs in the sandbox, keys only on the supervisor's host.

The fakes (tests/fakes/) listen on this host's loopback. The sandbox has no network: on the
local runtime its model calls go through the run's bind-mounted socket, on remote-docker
through the run channel (the hub's API socket bridged to the supervisor's host socket). Either
way only the supervisor's gateway, here, talks to the upstreams and adds the key.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from tests.cli_helpers import load, massgen_run, parse_lines, start_cli, wait_for_event, write_config
from tests.conformance.conftest import Runtime
from tests.conformance.engines import inspect, no_container_for
from tests.docker.test_gateway_sandbox import (
    BUDGET_TOKENS,
    CALL_TOKENS,
    GEMINI_KEY,
    KEYS,
    OPENAI_KEY,
    OPENAI_MODEL,
    PROBE_SCRIPT,
    QUESTION,
    assert_no_secret,
    coordinating_policy,
    echo_policy,
    log_dir_text,
    model_agents,
)
from tests.fakes import FakeGemini, FakeOpenAI, FakeRequest, FakeToolCall, Reply
from tests.remote import engine

pytestmark = pytest.mark.docker


def _cli(rt: Runtime, cfg: Path, cwd: Path, **env: str) -> tuple[subprocess.CompletedProcess[str], dict[str, str]]:
    p = massgen_run(["--automation", *rt.args, "--config", str(cfg), QUESTION], cwd, 180, **rt.env, **env)
    return p, parse_lines(p.stdout)


def test_openai_and_gemini_agents_complete_a_round_through_the_gateway(
    runtime_under_test: Runtime, tmp_path: Path
) -> None:
    """A streaming OpenAI agent and a non-streaming Gemini agent answer, vote and present; every
    upstream call carried the host's key, and no key is in the output or the log dir."""
    rt = runtime_under_test
    with (
        FakeOpenAI(coordinating_policy, api_key=OPENAI_KEY) as oa,
        FakeGemini(coordinating_policy, api_key=GEMINI_KEY) as gm,
    ):
        p, f = _cli(rt, write_config(tmp_path, model_agents(oa.base_url, gm.root_url)), tmp_path, **KEYS)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    assert (f["WINNER"], Path(f["ANSWER_FILE"]).read_text()) == ("gpt", "FINAL: 2 + 2 = 4")
    assert oa.requests and all(r.stream for r in oa.requests)
    assert gm.requests and not any(r.stream for r in gm.requests)
    assert {r.headers.get("authorization") for r in oa.requests} == {f"Bearer {OPENAI_KEY}"}
    assert {r.headers.get("x-goog-api-key") for r in gm.requests} == {GEMINI_KEY}
    t = load(f["STATUS_FILE"])["telemetry"]["totals"]
    assert t["calls"] == oa.usage.calls + gm.usage.calls > 0
    assert t["total_tokens"] == sum(u.prompt_tokens + u.completion_tokens for u in (oa.usage, gm.usage))
    assert_no_secret(out, "the CLI output")
    assert_no_secret(log_dir_text(f), "the log dir")
    if rt.name == "remote-docker":
        assert "run channel up" in (Path(f["LOG_DIR"]) / "massgen.log").read_text()
    assert no_container_for(rt, f["RUN_ID"])


def test_no_key_is_visible_inside_the_sandbox(runtime_under_test: Runtime, tmp_path: Path) -> None:
    """A prober agent finds no key in its environment, its processes' environments, its files or
    any gateway answer (echoed keys come back redacted); the engine's own view of the sandbox
    (its env and command) holds none either, and on remote-docker no host path is mounted."""
    rt = runtime_under_test
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "probe.py").write_text(PROBE_SCRIPT)
    (ctx / "notes.txt").write_text("context for the agents\n")
    report = "/workspace/probe.json"
    with (
        FakeOpenAI(echo_policy(lambda r: r.headers.get("authorization", "")), api_key=OPENAI_KEY) as oa,
        FakeGemini(echo_policy(lambda r: r.headers.get("x-goog-api-key", "")), api_key=GEMINI_KEY) as gm,
    ):
        config = model_agents(oa.base_url, gm.root_url) + textwrap.dedent(f"""\
              - id: prober
                backend:
                  type: scripted
                  steps:
                    - shell: python3 {ctx}/probe.py {report} /workspace /run/massgen {ctx}
                      timeout: 60
                    - shell: sleep 2
                    - answer: probed
                    - vote: auto
            orchestrator:
              context_paths: [{{path: "{ctx}", permission: read}}]
            timeout_settings: {{orchestrator_timeout_seconds: 120}}
            """)
        cfg = write_config(tmp_path, config)
        proc, log_dir = start_cli(
            ["--automation", *rt.args, "--config", str(cfg), QUESTION], tmp_path, **rt.env, **KEYS
        )
        try:
            wait_for_event(log_dir, "run_started", timeout=90)
            container_id = load(log_dir / "status.json")["container"]["id"]
            info = inspect(rt, container_id)  # the hub waits for BYE: still there
            bound = engine.host_paths_mounted(container_id, rt.env) if rt.name == "remote-docker" else []
            out, err = proc.communicate(timeout=180)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 0, out + err
    f = {**parse_lines(out), "LOG_DIR": str(log_dir), "RUN_ID": log_dir.name}
    assert_no_secret(json.dumps(info["Config"]), "the sandbox's config on its engine")
    assert bound == []
    workspace = tmp_path / ".massgen" / "workspaces" / f["RUN_ID"]
    raw = (workspace / "probe.json").read_text()  # on remote-docker: fetched over the channel
    assert_no_secret(raw, "what the prober saw")
    seen = json.loads(raw)
    # The prober really looked: its environment, every process's, the outbox, the context folder.
    assert seen["env"]["MASSGEN_MODEL_SOCKET"] == "/run/massgen/api/api.sock"
    assert "1" in seen["proc_environ"], seen["errors"]  # PID 1: the container's own environment
    assert any(path.startswith("/run/massgen/outbox/") for path in seen["files"])
    assert seen["files"][f"{ctx}/notes.txt"] == "context for the agents\n"
    http = {h["name"]: h for h in seen["http"]}
    assert all(h["status"] is not None for h in http.values()), http
    assert [m["id"] for m in json.loads(http["models"]["body"])["data"]] == [OPENAI_MODEL]
    for name in ("openai_echo", "openai_echo_stream", "gemini_echo", "gemini_echo_stream"):
        assert http[name]["status"] == 200 and "[redacted]" in http[name]["body"], http[name]
    for name, status in (("openai_401", 401), ("gemini_400", 400), ("openai_500", 502), ("gemini_500", 502)):
        assert http[name]["status"] == status and "[redacted]" in http[name]["body"], http[name]
    for name in ("openai_401", "gemini_400"):  # echoed in a header too
        echoed = [v for k, v in http[name]["headers"] if k.lower() == "x-echo-key"]
        assert len(echoed) == 1 and "[redacted]" in echoed[0], http[name]
    assert http["openai_other_model"]["status"] == 403
    # The upstreams saw the real keys only, never what the sandbox sent.
    assert {r.headers.get("authorization") for r in oa.requests} == {f"Bearer {OPENAI_KEY}"}
    assert {r.headers.get("x-goog-api-key") for r in gm.requests} == {GEMINI_KEY}
    assert all("key" not in r.query for r in gm.requests)
    assert_no_secret(out + err, "the CLI output")
    assert_no_secret(log_dir_text(f), "the log dir")
    assert_no_secret("\n".join(q.read_text(errors="replace") for q in workspace.rglob("*") if q.is_file()), "workspace")
    assert no_container_for(rt, f["RUN_ID"])


def test_token_budget_exceeded_exits_2(runtime_under_test: Runtime, tmp_path: Path) -> None:
    """A model that would spend 3x max_tokens: exit 2 budget_exceeded, spent <= budget + one call."""
    rt = runtime_under_test
    per_call = sum(CALL_TOKENS)
    planned = 3 * BUDGET_TOKENS // per_call + 1
    calls = {"n": 0}

    def policy(req: FakeRequest) -> Reply:
        calls["n"] += 1
        if calls["n"] < planned:
            shell = FakeToolCall("shell", {"command": "true"})
            return Reply(tool_calls=[shell], prompt_tokens=CALL_TOKENS[0], completion_tokens=CALL_TOKENS[1])
        return coordinating_policy(req)

    with FakeOpenAI(policy, api_key=OPENAI_KEY) as oa:
        cfg = write_config(
            tmp_path,
            f"""\
            agents:
              - id: gpt
                backend: {{type: openai, model: {OPENAI_MODEL}, base_url: "{oa.base_url}"}}
            sandbox: {{budget: {{max_tokens: {BUDGET_TOKENS}}}}}
            timeout_settings: {{orchestrator_timeout_seconds: 90}}
            """,
        )
        t0 = time.monotonic()
        p, f = _cli(rt, cfg, tmp_path, OPENAI_API_KEY=OPENAI_KEY)
    assert p.returncode == 2, p.stdout + p.stderr
    assert time.monotonic() - t0 < 80  # stopped by the budget, not by the whole-run timeout
    assert load(Path(f["LOG_DIR"]) / "result.json")["reason"] == "budget_exceeded"
    assert p.stdout.splitlines()[-1].startswith("FAILED: budget_exceeded")
    totals = load(f["STATUS_FILE"])["telemetry"]["totals"]
    assert BUDGET_TOKENS <= totals["total_tokens"] <= BUDGET_TOKENS + per_call, totals
    assert totals["total_tokens"] == oa.usage.prompt_tokens + oa.usage.completion_tokens
    assert oa.usage.calls < planned
    assert no_container_for(rt, f["RUN_ID"])

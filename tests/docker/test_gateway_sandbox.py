"""Model agents in real sandboxes reach fake upstreams only through the run's gateway socket.

Every test runs the real CLI (`--image`, so the embedded supervisor and its gateway run on this
host next to the fakes); containers have no network, so a request that reaches a fake went
through the socket, and the fake sees the key the host added.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from supervisor.runtime.base import LABEL_RUN
from supervisor.runtime.docker import DockerRuntime
from tests.cli_helpers import REPO, load, massgen_run, parse_lines, write_config
from tests.fakes import (
    FakeGemini,
    FakeOpenAI,
    FakeRequest,
    FakeServer,
    FakeToolCall,
    Fault,
    Policy,
    Reply,
    UsageTotals,
    closed,
)

pytestmark = pytest.mark.docker

OPENAI_KEY = "sk-host-secret-1"
GEMINI_KEY = "gm-host-secret-2"
SECRETS = (OPENAI_KEY, GEMINI_KEY, "host-secret")
KEYS = {"OPENAI_API_KEY": OPENAI_KEY, "GEMINI_API_KEY": GEMINI_KEY}
OPENAI_MODEL = "gpt-4o-mini"  # both priced in configs/pricing.json
GEMINI_MODEL = "gemini-2.5-flash"
QUESTION = "What is 2+2?"


def coordinating_policy(req: FakeRequest) -> Reply:
    """Answer when nobody has, present when selected, otherwise vote for agent1 (cached/thinking tokens too)."""
    text = req.prompt_text
    if "selected to present" in text:
        return Reply(text="FINAL: 2 + 2 = 4", prompt_tokens=1300, completion_tokens=50, cached_tokens=400)
    if "(no answers available yet)" in text:
        answer = FakeToolCall("new_answer", {"content": "2 + 2 = 4"})
        return Reply(tool_calls=[answer], prompt_tokens=1000, completion_tokens=70, thoughts_tokens=30)
    vote = FakeToolCall("vote", {"agent_id": "agent1", "reason": "correct"})
    return Reply(tool_calls=[vote], prompt_tokens=1200, completion_tokens=60, cached_tokens=300)


def model_agents(oa_url: str, gm_url: str) -> str:
    """Config lines for a streaming OpenAI agent `gpt` and a non-streaming Gemini agent `gem`."""
    return textwrap.dedent(f"""\
        agents:
          - id: gpt
            backend: {{type: openai, model: {OPENAI_MODEL}, base_url: "{oa_url}"}}
          - id: gem
            backend: {{type: gemini, model: {GEMINI_MODEL}, base_url: "{gm_url}", stream: false}}
        """)


def run_cli(tmp: Path, image: str, config: str, **env: str) -> tuple[subprocess.CompletedProcess[str], dict[str, str]]:
    cfg = write_config(tmp, config)
    p = massgen_run(["--automation", "--image", image, "--config", str(cfg), QUESTION], tmp, timeout=120, **env)
    return p, parse_lines(p.stdout)


def output(p: subprocess.CompletedProcess[str]) -> str:
    return p.stdout + p.stderr


def log_dir_text(f: dict[str, str]) -> str:
    """Every file the host wrote for the run, concatenated."""
    files = sorted(q for q in Path(f["LOG_DIR"]).rglob("*") if q.is_file())
    return "\n".join(q.read_text(errors="replace") for q in files)


def assert_no_secret(text: str, where: str) -> None:
    for s in SECRETS:
        assert s not in text, f"{s!r} found in {where}"


def no_container_for(runtime: DockerRuntime, run_id: str) -> bool:
    return runtime.list_owned({LABEL_RUN: run_id}) == []


def model_cost(provider: str, model: str, usage: UsageTotals) -> float:
    """USD for `usage` at the configs/pricing.json list price (linear, so totals suffice)."""
    price: dict[str, float] = json.loads((REPO / "configs" / "pricing.json").read_text())[provider][model]
    fresh = usage.prompt_tokens - usage.cached_tokens
    return (
        fresh * price["input"] + usage.cached_tokens * price["cached_input"] + usage.completion_tokens * price["output"]
    ) / 1e6


# -- (a) + (c): one full round, shared by the assertions below -----------------------------------


@dataclass(frozen=True)
class Round:
    """The CLI's outcome and the fakes (closed, their request logs and usage kept)."""

    proc: subprocess.CompletedProcess[str]
    lines: dict[str, str]
    openai: FakeServer
    gemini: FakeServer


@pytest.fixture(scope="module")
def round_run(agent_image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Round]:
    """An OpenAI and a Gemini agent coordinating in one sandbox against the fakes (real keys on the host)."""
    tmp = tmp_path_factory.mktemp("round")
    with (
        FakeOpenAI(coordinating_policy, api_key=OPENAI_KEY) as oa,
        FakeGemini(coordinating_policy, api_key=GEMINI_KEY) as gm,
    ):
        p, f = run_cli(tmp, agent_image, model_agents(oa.base_url, gm.root_url), **KEYS)
    yield Round(p, f, oa, gm)


def test_openai_and_gemini_agents_complete_a_round_through_the_gateway(
    round_run: Round, runtime: DockerRuntime
) -> None:
    """A streaming OpenAI agent and a Gemini agent answer, vote and present from inside a sandbox via the socket."""
    p, f, oa, gm = round_run.proc, round_run.lines, round_run.openai, round_run.gemini
    assert p.returncode == 0, output(p)
    assert f["WINNER"] == "gpt"
    assert Path(f["ANSWER_FILE"]).read_text() == "FINAL: 2 + 2 = 4"
    st = load(f["STATUS_FILE"])
    assert st["run"]["sandbox"] == "docker" and st["container"]["exit_code"] == 0
    assert oa.requests and all(r.stream for r in oa.requests)
    assert gm.requests and not any(r.stream for r in gm.requests)
    # The fakes accept only the real keys, so every call above carried them.
    assert {r.headers.get("authorization") for r in oa.requests} == {f"Bearer {OPENAI_KEY}"}
    assert {r.headers.get("x-goog-api-key") for r in gm.requests} == {GEMINI_KEY}
    assert all("key" not in r.query for r in gm.requests)
    assert_no_secret(output(p), "the CLI output")
    assert_no_secret(log_dir_text(f), "the log dir")
    assert no_container_for(runtime, f["RUN_ID"])


def test_status_telemetry_equals_what_the_fakes_reported_and_is_priced(round_run: Round) -> None:
    """status.json telemetry sums the fakes' usage per model and per agent; cost follows configs/pricing.json."""
    p, f, oa, gm = round_run.proc, round_run.lines, round_run.openai, round_run.gemini
    assert p.returncode == 0, output(p)
    t = load(f["STATUS_FILE"])["telemetry"]
    assert oa.usage.cached_tokens > 0 and gm.usage.completion_tokens > 0
    for key, agent, usage, provider, model in (
        (f"openai/{OPENAI_MODEL}", "gpt", oa.usage, "openai", OPENAI_MODEL),
        (f"gemini/{GEMINI_MODEL}", "gem", gm.usage, "gemini", GEMINI_MODEL),
    ):
        want = {
            "calls": usage.calls,
            "failed_calls": 0,
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "cached_tokens": usage.cached_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        }
        cost = model_cost(provider, model, usage)
        assert cost > 0
        for section in (t["by_model"][key], t["by_agent"][agent]):
            assert {k: section[k] for k in want} == want, (key, agent, section)
            assert section["cost_usd"] == pytest.approx(cost, abs=1e-9)
    assert set(t["by_model"]) == {f"openai/{OPENAI_MODEL}", f"gemini/{GEMINI_MODEL}"}
    assert set(t["by_agent"]) == {"gpt", "gem"}
    assert t["totals"]["calls"] == oa.usage.calls + gm.usage.calls
    assert t["totals"]["total_tokens"] == sum(u.prompt_tokens + u.completion_tokens for u in (oa.usage, gm.usage))
    want_cost = model_cost("openai", OPENAI_MODEL, oa.usage) + model_cost("gemini", GEMINI_MODEL, gm.usage)
    assert t["totals"]["cost_usd"] == pytest.approx(want_cost, abs=1e-9)
    lines = (Path(f["LOG_DIR"]) / "telemetry.jsonl").read_text().splitlines()
    assert len(lines) == oa.usage.calls + gm.usage.calls


# -- (b): nothing in the sandbox holds or can fetch a key -------------------------------------------

# Run by a scripted agent inside the sandbox: record everything a hostile agent could see.
PROBE_SCRIPT = r"""
import json, os, sys
import httpx2

out_path, roots = sys.argv[1], sys.argv[2:]
seen = {"env": dict(os.environ), "proc_environ": {}, "files": {}, "http": [], "errors": []}
for pid in os.listdir("/proc"):
    if pid.isdigit():
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                seen["proc_environ"][pid] = fh.read().decode("utf-8", "replace")
        except OSError as exc:
            seen["errors"].append(f"/proc/{pid}/environ: {exc}")
for root in roots:
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            try:
                with open(path, "rb") as fh:
                    seen["files"][path] = fh.read(1 << 20).decode("utf-8", "replace")
            except OSError as exc:
                seen["errors"].append(f"{path}: {exc}")
sock = os.environ["MASSGEN_MODEL_SOCKET"]
client = httpx2.Client(transport=httpx2.HTTPTransport(uds=sock), base_url="http://massgen-gateway", timeout=60)

def probe(name, method, url, **kw):
    try:
        r = client.request(method, url, **kw)
        seen["http"].append({"name": name, "status": r.status_code, "headers": list(r.headers.items()), "body": r.text})
    except Exception as exc:
        seen["http"].append({"name": name, "status": None, "error": repr(exc)})

oa_auth = {"Authorization": "Bearer sk-sandbox-guess"}
gm_auth = {"x-goog-api-key": "sandbox-guess"}
def chat(word, **extra):
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": word}], **extra}
def gem(word):
    return {"contents": [{"role": "user", "parts": [{"text": word}]}]}
gm_url = "/gemini/v1beta/models/gemini-2.5-flash"
probe("models", "GET", "/openai/v1/models", headers=oa_auth)
probe("openai_echo", "POST", "/openai/v1/chat/completions", headers=oa_auth, json=chat("PROBE-ECHO"))
probe("openai_echo_stream", "POST", "/openai/v1/chat/completions", headers=oa_auth, json=chat("PROBE-ECHO", stream=True))
probe("openai_401", "POST", "/openai/v1/chat/completions", headers=oa_auth, json=chat("PROBE-401"))
probe("openai_500", "POST", "/openai/v1/chat/completions", headers=oa_auth, json=chat("PROBE-500"))
probe("openai_other_model", "POST", "/openai/v1/chat/completions", headers=oa_auth, json=chat("hi", model="gpt-4o"))
probe("gemini_echo", "POST", gm_url + ":generateContent?key=sandbox-guess", headers=gm_auth, json=gem("PROBE-ECHO"))
probe("gemini_echo_stream", "POST", gm_url + ":streamGenerateContent?alt=sse", headers=gm_auth, json=gem("PROBE-ECHO"))
probe("gemini_400", "POST", gm_url + ":generateContent", headers=gm_auth, json=gem("PROBE-400"))
probe("gemini_500", "POST", gm_url + ":generateContent", headers=gm_auth, json=gem("PROBE-500"))
probe("no_such_route", "GET", "/openai/v1/keys", headers=oa_auth)
probe("runs", "GET", "/v1/runs")
with open(out_path, "w") as fh:
    json.dump(seen, fh)
print("probed", len(seen["files"]), "files and", len(seen["http"]), "requests")
"""


def echo_policy(key_of: Callable[[FakeRequest], str]) -> Policy:
    """The coordinating policy, except that PROBE-* prompts get the key the upstream received echoed back."""

    def policy(req: FakeRequest) -> Reply | Fault:
        key = key_of(req)
        if "PROBE-ECHO" in req.prompt_text:
            # In one piece, as a server quoting a key does: a key cut across stream deltas (or
            # encoded) is an upstream working against us, which no redaction can stop.
            return Reply(text=f"you sent {key}", prompt_tokens=10, completion_tokens=5, chunk_size=1000)
        if "PROBE-401" in req.prompt_text or "PROBE-400" in req.prompt_text:
            status = 401 if "PROBE-401" in req.prompt_text else 400
            return Fault(status, f"API key not valid: {key}", headers={"x-echo-key": key})
        if "PROBE-500" in req.prompt_text:
            return Fault(500, f"internal error for {key}", retry_after=0, headers={"x-echo-key": key})
        return coordinating_policy(req)

    return policy


# (c) no key visible inside the sandbox: tests/conformance/test_gateway.py, on every runtime.


# -- (d) budget, (e) rate limit, (f) upstream down, (g) no key -------------------------------------

BUDGET_TOKENS = 1000
CALL_TOKENS = (70, 20)  # 90 per call: the budget is crossed mid-call, not on a call boundary


# (d) the token budget: tests/conformance/test_gateway.py, on every runtime.


def test_rate_limited_upstream_is_retried_after_retry_after(
    agent_image: str, tmp_path: Path, runtime: DockerRuntime
) -> None:
    """Both upstreams answer 429 (Retry-After: 1) once, then 200: the run succeeds, each call metered once."""
    limited = Fault(429, "rate limited, slow down", retry_after=1)
    with (
        FakeOpenAI(coordinating_policy, faults=[limited], api_key=OPENAI_KEY) as oa,
        FakeGemini(coordinating_policy, faults=[limited], api_key=GEMINI_KEY) as gm,
    ):
        t0 = time.monotonic()
        p, f = run_cli(tmp_path, agent_image, model_agents(oa.base_url, gm.root_url), **KEYS)
        elapsed = time.monotonic() - t0
    assert p.returncode == 0, output(p)
    assert elapsed >= 1.0
    for fake in (oa, gm):
        assert len(fake.requests) == fake.usage.calls + 1  # the 429, retried once by the gateway
    totals = load(f["STATUS_FILE"])["telemetry"]["totals"]
    assert (totals["calls"], totals["failed_calls"]) == (oa.usage.calls + gm.usage.calls, 0)
    assert no_container_for(runtime, f["RUN_ID"])


def test_upstream_down_fails_the_run_quickly_naming_the_upstream(
    agent_image: str, tmp_path: Path, runtime: DockerRuntime
) -> None:
    """Nothing listens upstream: exit 2 within 30 s, the message names 127.0.0.1:port, never a key."""
    oa_port, gm_port = closed(), closed()
    t0 = time.monotonic()
    p, f = run_cli(
        tmp_path, agent_image, model_agents(f"http://127.0.0.1:{oa_port}/v1", f"http://127.0.0.1:{gm_port}"), **KEYS
    )
    elapsed = time.monotonic() - t0
    assert p.returncode == 2, output(p)
    assert elapsed < 30
    res = load(Path(f["LOG_DIR"]) / "result.json")
    assert res["reason"] == "backend_error", res
    last = p.stdout.splitlines()[-1]
    assert last.startswith("FAILED: backend_error")
    assert f"127.0.0.1:{oa_port}" in res["detail"] or f"127.0.0.1:{gm_port}" in res["detail"], res
    st = load(f["STATUS_FILE"])
    errors = {a: st["agents"][a]["error"]["message"] for a in ("gpt", "gem")}
    assert f"127.0.0.1:{oa_port}" in errors["gpt"] and f"127.0.0.1:{gm_port}" in errors["gem"], errors
    # The gateway retried; neither SDK retried its answer (x-should-retry: false) on top.
    by_model = st["telemetry"]["by_model"]
    for key in (f"openai/{OPENAI_MODEL}", f"gemini/{GEMINI_MODEL}"):
        assert (by_model[key]["calls"], by_model[key]["failed_calls"]) == (1, 1), by_model
    assert_no_secret(output(p), "the CLI output")
    assert_no_secret(log_dir_text(f), "the log dir")
    assert no_container_for(runtime, f["RUN_ID"])


@pytest.mark.parametrize(
    ("present", "missing"),
    [("GEMINI_API_KEY", "OPENAI_API_KEY"), ("OPENAI_API_KEY", "GEMINI_API_KEY or GOOGLE_API_KEY")],
)
def test_missing_host_key_fails_at_once_naming_the_variable(
    agent_image: str, tmp_path: Path, runtime: DockerRuntime, present: str, missing: str
) -> None:
    """A provider without a key on the host: exit 1 key_missing before any sandbox starts, naming the variable."""
    t0 = time.monotonic()
    p, f = run_cli(
        tmp_path, agent_image, model_agents("http://127.0.0.1:9/v1", "http://127.0.0.1:9"), **{present: KEYS[present]}
    )
    elapsed = time.monotonic() - t0
    assert p.returncode == 1, output(p)
    assert elapsed < 15
    res = load(Path(f["LOG_DIR"]) / "result.json")
    assert res["reason"] == "key_missing", res
    assert f"needs {missing} in the environment" in res["detail"], res
    last = p.stdout.splitlines()[-1]
    assert last.startswith("FAILED: key_missing") and missing in last, last
    assert load(f["STATUS_FILE"])["container"] is None
    assert no_container_for(runtime, f["RUN_ID"])

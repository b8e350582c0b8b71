"""Key prefixes through the gateway (issue 9.6): an upstream echoing request headers in its errors.

A sandbox pads a header of its own so that the host's key lands at every offset of any cut the
gateway makes (the error text, the read limit); no prefix of the key of 8 or more characters may
come back, in a body, a header or any file of the log dir.
"""

from __future__ import annotations

import json
import secrets
import textwrap
from pathlib import Path

from tests.cli_helpers import massgen_run, parse_lines, write_config
from tests.fakes import FakeOpenAI, FakeRequest, FakeToolCall, Fault, Reply

KEY = "sk-" + secrets.token_hex(20)  # random: no 8-character prefix of it appears by chance
MODEL = "gpt-4o-mini"

PADDER = r"""
import json, os, sys
import httpx2

out_path, top = sys.argv[1], int(sys.argv[2])
sock = os.environ["MASSGEN_MODEL_SOCKET"]
client = httpx2.Client(transport=httpx2.HTTPTransport(uds=sock), base_url="http://massgen-gateway", timeout=60)
seen = []
for pad in range(top):
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "PROBE-PAD"}]}
    r = client.post("/openai/v1/chat/completions", json=body, headers={"x-pad": "A" * pad})
    seen.append({"pad": pad, "status": r.status_code, "headers": list(r.headers.items()), "body": r.text})
with open(out_path, "w") as fh:
    json.dump(seen, fh)
print("padded", len(seen), "requests")
"""


def echo_headers(req: FakeRequest) -> Reply | Fault:
    """A debugging upstream: its errors quote the request headers, the sandbox's padding first."""
    if "PROBE-PAD" in req.prompt_text:
        pad, auth = req.headers.get("x-pad", ""), req.headers.get("authorization")
        return Fault(500, f"bad request; headers: x-pad={pad} authorization={auth}", retry_after=0)
    if "selected to present" in req.prompt_text:
        return Reply(text="FINAL: 4", prompt_tokens=10, completion_tokens=5)
    if "(no answers available yet)" in req.prompt_text:
        return Reply(tool_calls=[FakeToolCall("new_answer", {"content": "4"})], prompt_tokens=10, completion_tokens=5)
    return Reply(
        tool_calls=[FakeToolCall("vote", {"agent_id": "agent1", "reason": "ok"})], prompt_tokens=10, completion_tokens=5
    )


def leaked(text: str) -> bool:
    return KEY[:8] in text


def test_no_prefix_of_the_key_leaves_the_gateway_whatever_the_padding(agent_image: str, tmp_path: Path) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "pad.py").write_text(PADDER)
    top = 360  # the error text is cut near 300 characters: the key crosses the cut at every offset
    with FakeOpenAI(echo_headers, api_key=KEY) as oa:
        config = textwrap.dedent(f"""\
            agents:
              - id: gpt
                backend: {{type: openai, model: {MODEL}, base_url: "{oa.base_url}"}}
              - id: padder
                backend:
                  type: scripted
                  steps:
                    - shell: python3 {ctx}/pad.py /workspace/seen.json {top}
                      timeout: 240
                    - answer: padded
                    - vote: auto
            orchestrator:
              context_paths: [{{path: "{ctx}", permission: read}}]
            timeout_settings: {{orchestrator_timeout_seconds: 280, agent_timeout_seconds: 280}}
            """)
        cfg = write_config(tmp_path, config)
        p = massgen_run(
            ["--automation", "--image", agent_image, "--config", str(cfg), "Q?"],
            tmp_path,
            timeout=320,
            OPENAI_API_KEY=KEY,
        )
        upstream_saw = [r.headers.get("x-pad", "") for r in oa.requests if "x-pad" in r.headers]
    f = parse_lines(p.stdout)
    assert p.returncode == 0, p.stdout + p.stderr
    workspace = tmp_path / ".massgen" / "workspaces" / f["RUN_ID"]
    seen = json.loads((workspace / "seen.json").read_text())
    # The attack really ran: every padding length reached the upstream and came back as an error.
    assert len(seen) == top and {len(pad) for pad in upstream_saw} == set(range(top))
    assert all(s["status"] == 502 and "[redacted]" in s["body"] for s in seen if s["pad"] < 150), seen[:2]
    for s in seen:
        assert not leaked(s["body"]) and not leaked(json.dumps(s["headers"])), s
    for q in Path(f["LOG_DIR"]).rglob("*"):
        if q.is_file():
            assert not leaked(q.read_text(errors="replace")), q
    assert not leaked(p.stdout + p.stderr)

"""In-sandbox tools: run start-up with one stdio MCP server vs without; a custom tool call's overhead.

Targets (issue 12): the start-up of a containerised run with one stdio MCP server (CLI start to
the first agent turn, whose model call has the server's tools) is at most 0.5 s longer than the
same run's without it (medians, samples interleaved so both see the same load); a custom tool
call adds under 50 ms over the function's own time (measured in the agent image: the worker
reports the function's own time, the engine the call's). Also shown: the engine's share of the
start-up (servers up), the whole run's difference and the end's (stopping the server after the
final answer). Figures under load are not the targets' conditions: the load average is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report

REPO = Path(__file__).resolve().parents[1]
KEY = "sk-bench-tools-0123456789"
READY = re.compile(r"MCP servers ready in ([0-9.]+)s")

SERVER = """
from mcp.server.fastmcp import FastMCP

server = FastMCP("bench")

@server.tool()
def ping() -> str:
    \"\"\"Answer pong.\"\"\"
    return "pong"

if __name__ == "__main__":
    server.run()
"""

TOOL = '''
import time
from massgen.tool._result import ExecutionResult, TextContent

async def work(ms: int) -> ExecutionResult:
    """Busy for `ms` milliseconds.

    Args:
        ms: How long.
    """
    time.sleep(ms / 1000)
    return ExecutionResult(output_blocks=[TextContent(data="done")])
'''

# Runs inside the agent image: N calls through the engine's custom-tool runner.
CALLS = """
import asyncio, json, statistics, sys, time
from pathlib import Path
from agent_image.protocol.tools_config import CustomToolEntry
from agent_image.tools.custom import CustomTools, describe_tools
from agent_image.tools.shell import minimal_env

async def main(n, ms):
    specs = CustomToolEntry(path="/bench/tool.py", function="work").specs()
    ws = Path("/tmp")
    loaded = await describe_tools(specs, cwd=ws, env=minimal_env(), timeout=120, max_output_bytes=64000)
    tools = CustomTools(loaded, workspace=ws, env=minimal_env(), timeout=60, max_output_bytes=64000)
    await tools.warm()
    overheads = []
    for _ in range(n):
        await asyncio.sleep(1.0)  # a model turn (~1 s or more): the next worker warms meanwhile
        t0 = time.monotonic()
        out = await tools.call("custom_tool__work", {"ms": ms})
        total = time.monotonic() - t0
        assert out.ok, out.content
        overheads.append(total - out.own_s)
    await tools.aclose()
    print(json.dumps({"median_s": statistics.median(overheads), "max_s": max(overheads)}))

asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
"""


def _config(work: Path, with_server: bool, model_url: str | None = None) -> Path:
    """The bench run: a scripted agent, or (with `model_url`) an openai agent on the loopback fake."""
    server = ""
    if with_server:
        server = f"""\
              mcp_servers:
                - name: bench
                  type: stdio
                  command: python3
                  args: ["{work}/server.py"]
        """
    if model_url is None:
        backend = 'type: scripted\n      steps:\n        - answer: "4"\n        - vote: auto\n'
    else:
        backend = f'type: openai\n      model: gpt-4o-mini\n      base_url: "{model_url}"\n'
    text = "agents:\n  - id: a\n    backend:\n      " + backend
    text += textwrap.indent(textwrap.dedent(server), " " * 6) if server else ""
    text += f"orchestrator:\n  context_paths:\n    - path: {work}\n"
    kind = "openai" if model_url else "scripted"
    path = work / f"{kind}_{'with_mcp' if with_server else 'without'}.yaml"
    path.write_text(text)
    return path


def _model_policy() -> Any:
    from tests.fakes import FakeRequest, FakeToolCall, Reply

    def policy(req: FakeRequest) -> Reply:
        text = req.prompt_text
        if "selected to present" in text:
            return Reply(text="4")
        if "(no answers available yet)" in text:
            return Reply(tool_calls=[FakeToolCall("new_answer", {"content": "4"})])
        return Reply(tool_calls=[FakeToolCall("vote", {"agent_id": "agent1", "reason": "ok"})])

    return policy


@dataclass(frozen=True)
class Sample:
    """One run, on the host's clock (the engine's event times are the same clock)."""

    startup: float  # CLI started -> the first agent turn (the first model call follows at once)
    total: float  # CLI started -> CLI exited
    servers_up: float  # the engine's "ready in" (servers started, initialized, listed); 0 without
    stop: float  # final answer -> run_finished: the engine stopping its servers
    end: float  # final answer -> CLI exited


def _sample(stdout: str, launched: float, exited: float) -> Sample:
    log_dir = next(line.split(": ", 1)[1] for line in stdout.splitlines() if line.startswith("LOG_DIR: "))
    events = [json.loads(line) for line in (Path(log_dir) / "events.jsonl").read_text().splitlines()]
    ready = (m for e in events if e["type"] == "log" and (m := READY.search(e["message"])))
    first_turn = next(e["ts"] for e in events if e["type"] == "turn_started")
    final = next(e["ts"] for e in events if e["type"] == "final_answer")
    return Sample(
        startup=first_turn - launched,
        total=exited - launched,
        servers_up=next((float(m.group(1)) for m in ready), 0.0),
        stop=events[-1]["ts"] - final,
        end=exited - final,
    )


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def _median(samples: list[Sample], field: str) -> float:
    return statistics.median(getattr(s, field) for s in samples)


def _report(label: str, base_s: list[Sample], mcp_s: list[Sample]) -> bool:
    base, mcp = _median(base_s, "startup"), _median(mcp_s, "startup")
    added = mcp - base
    ok = added <= 0.5
    print(f"-- {label}")
    print(f"{'start-up, no MCP server':44} median {base * 1000:8.1f} ms   (CLI start -> first agent turn)")
    report("start-up, one stdio MCP server", mcp, base, "+<= 500 ms")
    print(f"{'':44} added {added * 1000:8.1f} ms   {_verdict(ok)}")
    up = _median(mcp_s, "servers_up") * 1000
    print(f"{'':44} of which the engine's servers up (start, initialize, list): {up:6.1f} ms")
    tb, tm = _median(base_s, "total"), _median(mcp_s, "total")
    print(
        f"{'whole run (CLI start -> exit)':44} median {tm * 1000:8.1f} ms   without {tb * 1000:8.1f} ms   "
        f"added {(tm - tb) * 1000:6.1f} ms"
    )
    eb, em = _median(base_s, "end"), _median(mcp_s, "end")
    stop, stop_base = _median(mcp_s, "stop") * 1000, _median(base_s, "stop") * 1000
    print(
        f"{'end (final answer -> exit)':44} median {em * 1000:8.1f} ms   without {eb * 1000:8.1f} ms   "
        f"added {(em - eb) * 1000:6.1f} ms; stopping the server {stop:6.1f} ms (without one {stop_base:4.1f} ms)"
    )
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-n", type=int, default=7, help="samples per figure")
    ap.add_argument("--work-ms", type=int, default=20, help="the custom tool's own time")
    ap.add_argument("--agent", choices=("both", "scripted", "openai"), default="both", help="which agent's runs")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from supervisor.images import ensure_images
    from supervisor.runtime.docker import DockerRuntime

    image = ensure_images(DockerRuntime(), progress=lambda m: print(m, file=sys.stderr))
    env = dict(os.environ, PYTHONPATH=str(REPO), OPENAI_API_KEY=KEY)
    work = Path(tempfile.mkdtemp(prefix="mgbench-tools-"))
    load_before = os.getloadavg()[0]
    try:
        (work / "server.py").write_text(SERVER)
        (work / "tool.py").write_text(TOOL)
        work.chmod(0o755)

        def run(cfg: Path) -> Sample:
            cmd = [sys.executable, "-m", "supervisor.cli", "--automation", "--image", image, "--config", str(cfg), "Q"]
            launched = time.time()
            p = subprocess.run(cmd, cwd=str(work), env=env, capture_output=True, text=True, check=False)
            exited = time.time()
            if p.returncode != 0:
                raise SystemExit(f"benchmark run failed ({p.returncode}): {' '.join(cmd)}\n{p.stdout}\n{p.stderr}")
            return _sample(p.stdout, launched, exited)

        from tests.fakes import FakeOpenAI

        startup_ok = True
        with FakeOpenAI(_model_policy(), api_key=KEY) as oa:
            kinds = [
                ("scripted", "scripted agent", None),
                ("openai", "openai agent (SDK, gateway, fake model)", oa.base_url),
            ]
            for kind, label, url in kinds:
                if args.agent not in ("both", kind):
                    continue
                without, with_mcp = _config(work, False, url), _config(work, True, url)
                run(without), run(with_mcp)  # warm-up: page cache, image layers
                base_s: list[Sample] = []
                mcp_s: list[Sample] = []
                for _ in range(args.n):  # interleaved, so load spikes hit both
                    base_s.append(run(without))
                    mcp_s.append(run(with_mcp))
                startup_ok = _report(label, base_s, mcp_s) and startup_ok

        calls = subprocess.run(
            ["docker", "run", "--rm", "--network", "none", "--read-only", "--tmpfs", "/tmp", "-v", f"{work}:/bench:ro"]
            + [image, "python3", "-c", CALLS, str(max(args.n, 10)), str(args.work_ms)],
            capture_output=True,
            text=True,
            check=False,
        )
        if calls.returncode != 0:
            raise SystemExit(f"custom tool calls failed:\n{calls.stdout}\n{calls.stderr}")
        figures = json.loads(calls.stdout.strip().splitlines()[-1])
        over = figures["median_s"]
        own = args.work_ms / 1000
        call_ok = over < 0.05
        report("custom tool call (own time excluded)", own + over, own, "overhead < 50 ms")
        worst = figures["max_s"] * 1000
        print(f"{'':44} overhead median {over * 1000:6.1f} ms, max {worst:6.1f} ms   {_verdict(call_ok)}")
        ok = startup_ok and call_ok
        load = f"load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end (2 cores here)"
        print(_verdict(ok), f"(baseline: the same run without the server; the function's own time; {load})")
        return 0 if ok else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

"""In-sandbox tools: run start-up with one stdio MCP server vs without; a custom tool call's overhead.

Targets (issue 12): a containerised run with one stdio MCP server takes at most 0.5 s longer
than the same run without it, start to exit (medians, samples interleaved so both see the same
load; the engine's own share is shown: bringing the server up, and stopping it after the final
answer); a custom tool call adds under 50 ms over the function's own time (measured in the
agent image: the worker reports the function's own time, the engine the call's). Figures under
load are not the targets' conditions: the load average is printed with them.
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report

REPO = Path(__file__).resolve().parents[1]
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


def _config(work: Path, with_server: bool) -> Path:
    server = ""
    if with_server:
        server = f"""\
              mcp_servers:
                - name: bench
                  type: stdio
                  command: python3
                  args: ["{work}/server.py"]
        """
    text = textwrap.dedent("""\
        agents:
          - id: a
            backend:
              type: scripted
              steps:
                - answer: "4"
                - vote: auto
        """)
    text += textwrap.indent(textwrap.dedent(server), " " * 6) if server else ""
    text += f"orchestrator:\n  context_paths:\n    - path: {work}\n"
    path = work / ("with_mcp.yaml" if with_server else "without.yaml")
    path.write_text(text)
    return path


def _phases(stdout: str) -> tuple[float | None, float]:
    """From the run's events: the engine's tool set-up (servers started, initialized, listed) and
    the time from the final answer to run_finished (servers stopped)."""
    log_dir = next(line.split(": ", 1)[1] for line in stdout.splitlines() if line.startswith("LOG_DIR: "))
    events = [json.loads(line) for line in (Path(log_dir) / "events.jsonl").read_text().splitlines()]
    setup = next((float(m.group(1)) for e in events if e["type"] == "log" and (m := READY.search(e["message"]))), None)
    final = next(e["ts"] for e in events if e["type"] == "final_answer")
    return setup, events[-1]["ts"] - final


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-n", type=int, default=7, help="samples per figure")
    ap.add_argument("--work-ms", type=int, default=20, help="the custom tool's own time")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from supervisor.images import ensure_images
    from supervisor.runtime.docker import DockerRuntime

    image = ensure_images(DockerRuntime(), progress=lambda m: print(m, file=sys.stderr))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    work = Path(tempfile.mkdtemp(prefix="mgbench-tools-"))
    load_before = os.getloadavg()[0]
    try:
        (work / "server.py").write_text(SERVER)
        (work / "tool.py").write_text(TOOL)
        work.chmod(0o755)
        without, with_mcp = _config(work, False), _config(work, True)

        def run(cfg: Path) -> tuple[float, float | None, float]:
            cmd = [sys.executable, "-m", "supervisor.cli", "--automation", "--image", image, "--config", str(cfg), "Q"]
            t0 = time.perf_counter()
            p = subprocess.run(cmd, cwd=str(work), env=env, capture_output=True, text=True, check=False)
            wall = time.perf_counter() - t0
            if p.returncode != 0:
                raise SystemExit(f"benchmark run failed ({p.returncode}): {' '.join(cmd)}\n{p.stdout}\n{p.stderr}")
            return (wall, *_phases(p.stdout))

        run(without), run(with_mcp)  # warm-up: page cache, image layers
        base_s, mcp_s = [], []
        for _ in range(args.n):  # interleaved, so load spikes hit both
            base_s.append(run(without))
            mcp_s.append(run(with_mcp))
        base = statistics.median(r[0] for r in base_s)
        mcp = statistics.median(r[0] for r in mcp_s)
        added = mcp - base
        startup_ok = added <= 0.5
        setup = statistics.median(r[1] or 0.0 for r in mcp_s)
        close = statistics.median(r[2] for r in mcp_s)
        close_base = statistics.median(r[2] for r in base_s)
        print(f"{'run, no MCP server':44} median {base * 1000:8.1f} ms")
        report("run with one stdio MCP server", mcp, base, "+<= 500 ms")
        print(f"{'':44} added {added * 1000:8.1f} ms   {_verdict(startup_ok)}")
        print(
            f"{'':44} of which in the engine: servers up (start, initialize, list) {setup * 1000:6.1f} ms; "
            f"final answer -> run_finished {close * 1000:6.1f} ms (without a server {close_base * 1000:5.1f} ms)"
        )

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

"""The remote engine (linked through the run channel) versus the local one, figures of one run.

Issue #15's targets:
(a) the quickstart end to end (CLI) on the remote engine at most 1.5x of the local one;
(b) status.json freshness over the channel, p95 < 0.5 s: for a scripted run emitting events over
    time, an event's `ts` in the sandbox -> the moment host status.json reflects it
    (agents.<id>.last_activity), polled in a tight loop (as bench/bench_daemon.py (c) does; the
    two engines share this host's clock);
(c) the gateway's added latency over the channel, median < 10 ms a call: a script in the sandbox
    times non-streaming chat completions through its model socket (remote: the hub's socket,
    the channel, the supervisor's gateway; local: the bind-mounted socket, the gateway) against
    the same calls made on this host straight to the loopback fake upstream.
The remote engine is the one of tests/remote/engine.py (its own network namespace, TLS only);
bring it up with `scripts/remote-engine.sh up && scripts/remote-engine.sh push` first.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median_of, report, time_cmd

REPO = Path(__file__).resolve().parents[1]
KEY = "sk-bench-remote-0123456789"
MODEL = "gpt-4o-mini"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "What is 2+2? " * 20}]}
FRESHNESS_CONFIG = """\
agents:
  - id: a
    backend:
      type: scripted
      steps:
{steps}        - answer: done
        - vote: auto
"""
# Runs in the sandbox: time `n` calls through the model socket, after `warmup` untimed ones
# (argv: n, warmup, the output file, the request body's file).
TIMER = r"""
import json, os, sys, time
import httpx2

n, warmup, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
with open(sys.argv[4]) as fh:
    body = json.load(fh)
sock = os.environ["MASSGEN_MODEL_SOCKET"]
client = httpx2.Client(transport=httpx2.HTTPTransport(uds=sock), base_url="http://massgen-gateway", timeout=60)
took = []
for i in range(warmup + n):
    t0 = time.perf_counter()
    r = client.post("/openai/v1/chat/completions", json=body, headers={"Authorization": "Bearer x"})
    r.raise_for_status()
    r.json()
    if i >= warmup:
        took.append(time.perf_counter() - t0)
with open(out, "w") as fh:
    json.dump(took, fh)
"""


def _check(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def _start(args: list[str], cwd: str, env: dict[str, str]) -> tuple[subprocess.Popen[str], Path]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "supervisor.cli", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()
    if not first.startswith("LOG_DIR: "):
        out, err = proc.communicate()
        raise SystemExit(f"no LOG_DIR line: {first}{out}\n{err}")
    return proc, Path(first.split(": ", 1)[1].strip())


def _finish(proc: subprocess.Popen[str], what: str) -> str:
    out, err = proc.communicate(timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed ({proc.returncode}):\n{out}\n{err}")
    return out


def freshness(env: dict[str, str], work: str, steps: int, rounds: int) -> list[float]:
    """Event-to-status.json lags (seconds) of `rounds` scripted runs on the runtime `env` selects."""
    cfg = Path(work) / "fresh.yaml"
    cfg.write_text(FRESHNESS_CONFIG.format(steps="".join("        - shell: sleep 0.2\n" for _ in range(steps))))
    lags: list[float] = []
    for _ in range(rounds):
        proc, log_dir = _start(["--automation", "--config", str(cfg), "q"], work, env)
        status_file = log_dir / "status.json"
        seen: list[tuple[float, float]] = []  # (when we saw it, last_activity in it)
        last = None
        while proc.poll() is None and not (log_dir / "result.json").exists():
            try:
                st = json.loads(status_file.read_bytes())
            except (OSError, ValueError):
                continue
            now = time.time()
            activity = (st.get("agents", {}).get("a") or {}).get("last_activity")
            if activity is not None and activity != last:
                seen.append((now, activity))
                last = activity
            time.sleep(0.002)
        _finish(proc, "a freshness run")
        for raw in (log_dir / "sandbox" / "events.jsonl").read_bytes().splitlines():
            ev = json.loads(raw)
            if ev.get("agent") != "a" or ev["type"] not in ("turn_started", "tool_called", "answer", "vote"):
                continue
            visible = next((when for when, act in seen if act >= ev["ts"]), None)
            if visible is not None:  # the final write may land after result.json: not a freshness sample
                lags.append(max(0.0, visible - ev["ts"]))
    if not lags:
        raise SystemExit("no freshness sample")
    return sorted(lags)


def _p95(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(0.95 * len(xs)))]


def gateway_calls(env: dict[str, str], work: str, base_url: str, calls: int, warmup: int) -> list[float]:
    """Seconds per call, timed in the sandbox of one run on the runtime `env` selects."""
    ctx = Path(work) / "timer"
    ctx.mkdir(exist_ok=True)
    (ctx / "timer.py").write_text(TIMER)
    (ctx / "body.json").write_text(json.dumps(BODY))
    report_in_sandbox = "/workspace/timings.json"
    cfg = Path(work) / "gateway.yaml"
    cfg.write_text(
        textwrap.dedent(f"""\
        agents:
          - id: gpt
            backend: {{type: openai, model: {MODEL}, base_url: "{base_url}"}}
          - id: timer
            backend:
              type: scripted
              steps:
                - shell: python3 {ctx}/timer.py {calls} {warmup} {report_in_sandbox} {ctx}/body.json
                  timeout: 300
                - answer: timed
                - vote: auto
        orchestrator:
          context_paths: [{{path: "{ctx}", permission: read}}]
        """)
    )
    proc, log_dir = _start(["--automation", "--config", str(cfg), "q"], work, {**env, "OPENAI_API_KEY": KEY})
    _finish(proc, "a gateway run")
    linked = "run channel up" in (log_dir / "massgen.log").read_text()
    if linked != (env.get("MASSGEN_RUNTIME") == "remote-docker"):
        raise SystemExit(f"the gateway run {log_dir} ran on the wrong runtime (linked: {linked})")
    took: list[float] = json.loads((Path(work) / ".massgen" / "workspaces" / log_dir.name / "timings.json").read_text())
    return took


def direct_calls(base_url: str, calls: int, warmup: int) -> list[float]:
    """The same calls from this host straight to the fake upstream."""
    import httpx2

    took = []
    with httpx2.Client(headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as client:
        for i in range(warmup + calls):
            t0 = time.perf_counter()
            r = client.post(f"{base_url}/chat/completions", json=BODY)
            r.raise_for_status()
            r.json()
            if i >= warmup:
                took.append(time.perf_counter() - t0)
    return took


def _policy(req: object) -> object:
    """The fake model: answers and votes for the `gpt` agent; anything else gets a plain reply."""
    from tests.fakes import FakeToolCall, Reply

    text = getattr(req, "prompt_text", "")
    if "selected to present" in text:
        return Reply(text="4", prompt_tokens=10, completion_tokens=2)
    if "(no answers available yet)" in text:
        return Reply(tool_calls=[FakeToolCall("new_answer", {"content": "4"})], prompt_tokens=10)
    if getattr(req, "tool_names", ()):
        return Reply(tool_calls=[FakeToolCall("vote", {"agent_id": "agent1", "reason": "ok"})])
    return Reply(text="Four. " * 40, prompt_tokens=60, completion_tokens=80)


def bench_freshness(local_env: dict[str, str], remote_env: dict[str, str], work: str, steps: int, rounds: int) -> bool:
    lags_local = freshness(local_env, work, steps, rounds)
    lags_remote = freshness(remote_env, work, steps, rounds)
    for name, lags in (("local (bind-mounted outbox)", lags_local), ("remote (over the channel)", lags_remote)):
        print(
            f"(b) status.json freshness, {name:27} {len(lags):3} events: p50 {statistics.median(lags) * 1000:4.0f} ms"
            f"  p95 {_p95(lags) * 1000:4.0f} ms  max {lags[-1] * 1000:4.0f} ms"
        )
    ok = _p95(lags_remote) < 0.5
    print(f"    {_check(ok)} (target: remote p95 < 500 ms)")
    return ok


def bench_gateway(local_env: dict[str, str], remote_env: dict[str, str], work: str, calls: int, warmup: int) -> bool:
    from tests.fakes import FakeOpenAI
    from tests.fakes._common import _Handler

    _Handler.disable_nagle_algorithm = True  # as bench_gateway.py: no delayed-ACK stalls in the fake
    with FakeOpenAI(_policy, api_key=KEY) as fake:  # type: ignore[arg-type]
        direct = direct_calls(fake.base_url, calls // 2, warmup)
        via_local = gateway_calls(local_env, work, fake.base_url, calls, warmup)
        via_remote = gateway_calls(remote_env, work, fake.base_url, calls, warmup)
        direct += direct_calls(fake.base_url, calls - calls // 2, warmup)
    d, lo, rm = (statistics.median(x) * 1000 for x in (direct, via_local, via_remote))
    print(f"(c) model call, this host straight to the fake upstream  median {d:7.2f} ms  ({len(direct)} calls)")
    print(f"    from a local sandbox through the gateway             median {lo:7.2f} ms  added {lo - d:+6.2f} ms")
    print(
        f"    from a remote sandbox through channel and gateway    median {rm:7.2f} ms  added {rm - d:+6.2f} ms"
        f"  (the channel's own share {rm - lo:+6.2f} ms)"
    )
    ok = rm - d < 10.0
    print(f"    {_check(ok)} (target: added over the channel < 10 ms median)")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=7, help="quickstart samples per side")
    ap.add_argument("--steps", type=int, default=12, help="sleep 0.2 steps in a freshness run")
    ap.add_argument("--rounds", type=int, default=3, help="freshness runs per side")
    ap.add_argument("--calls", type=int, default=200, help="timed gateway calls per side")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--parts", default="abc", help="which figures: a quickstart, b freshness, c gateway")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from tests.remote import engine

    if not engine.answers():
        print("the remote engine does not answer: scripts/remote-engine.sh up && scripts/remote-engine.sh push")
        return 2
    local_env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    local_env.update(PYTHONPATH=str(REPO), MASSGEN_NO_DAEMON="1")
    remote_env = {**local_env, **engine.engine_env(), "MASSGEN_RUNTIME": "remote-docker"}
    work = tempfile.mkdtemp(prefix="mgbench-")
    ok_a = ok_b = ok_c = True
    try:
        if "a" in args.parts:
            quick = [sys.executable, "-m", "supervisor.cli", "--automation", "--config", "@examples/quickstart", "q"]
            local, _ = median_of(lambda: time_cmd(quick, cwd=work, env=local_env), args.n)
            remote, _ = median_of(lambda: time_cmd(quick, cwd=work, env=remote_env), args.n)
            report("(a) quickstart, remote through the channel", remote, local, "ratio <= 1.5x")
            ok_a = remote / local <= 1.5
            print(f"    {_check(ok_a)} (baseline: the same quickstart on the local engine, bind mounts)")
        if "b" in args.parts:
            ok_b = bench_freshness(local_env, remote_env, work, args.steps, args.rounds)
        if "c" in args.parts:
            ok_c = bench_gateway(local_env, remote_env, work, args.calls, args.warmup)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ok = ok_a and ok_b and ok_c
    print("ALL PASS" if ok else "SOME MISS")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

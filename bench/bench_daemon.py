"""The daemon: submit-to-container latency, 16 runs in parallel, peak RSS, status.json freshness.

(a) POST /v1/runs -> the container's `start` event (docker events) versus a bare
    `docker run -d` of the same image -> its `start` event. Target: median ratio <= 1.5x.
(b) 16 quickstarts through the daemon (16 `massgen-run --automation` clients at once) versus
    the same 16 one after the other; the daemon's peak RSS meanwhile. Target: RSS < 150 MB.
(c) For a scripted run emitting events over time: an event's `ts` in the sandbox -> the moment
    host status.json reflects it (agents.<id>.last_activity), polled in a tight loop.
    Target: p95 < 0.5 s.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report

REPO = Path(__file__).resolve().parents[1]
LABEL_BENCH = "io.massgen.bench"
LABEL_SUPERVISOR = "io.massgen.supervisor-id"
LABEL_RUN = "io.massgen.run-id"
QUICK = ["--automation", "--config", "@examples/quickstart", "What is 2+2?"]
FRESHNESS_CONFIG = """\
agents:
  - id: a
    backend:
      type: scripted
      steps:
{steps}        - answer: done
        - vote: auto
"""


class StartEvents:
    """Engine-side `start` times of containers, keyed by one label's value (docker events, in a thread)."""

    def __init__(self, client: Any) -> None:
        self._stream = client.events(decode=True, filters={"type": "container", "event": "start"})
        self._seen: dict[str, float] = {}
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for ev in self._stream:
                attrs = ev.get("Actor", {}).get("Attributes", {})
                t = ev.get("timeNano", 0) / 1e9 or time.time()
                with self._cond:
                    for label in (LABEL_BENCH, LABEL_RUN):
                        if label in attrs:
                            self._seen[attrs[label]] = t
                    self._cond.notify_all()
        except Exception:  # noqa: BLE001 - the stream ends with an error when closed
            return

    def wait(self, key: str, timeout: float = 60.0) -> float:
        with self._cond:
            if not self._cond.wait_for(lambda: key in self._seen, timeout):
                raise SystemExit(f"no container start event for {key} within {timeout}s")
            return self._seen.pop(key)

    def close(self) -> None:
        self._stream.close()


class Daemon:
    """massgen-supervisor on a short socket, its logs in `work`."""

    def __init__(self, image: str, work: Path, max_concurrent: int) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="mgb-", dir="/tmp"))
        self.socket = self.dir / "d.sock"
        self.logs_root = work / "runs"
        self.env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY") and k != "MASSGEN_NO_DAEMON"} | {
            "PYTHONPATH": str(REPO),
            "MASSGEN_DAEMON_SOCKET": str(self.socket),
            "MASSGEN_LOGS_ROOT": str(self.logs_root),
            "MASSGEN_SOCKET_DIR": str(self.dir / "r"),
        }
        cmd = [sys.executable, "-m", "supervisor.daemon", "--socket", str(self.socket)]
        cmd += ["--logs-root", str(self.logs_root), "--image", image, "--max-concurrent", str(max_concurrent)]
        self.err = open(work / "daemon.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd, env=self.env, cwd=self.dir, stdout=subprocess.PIPE, stderr=self.err, text=True
        )
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in self.proc.stdout or []], daemon=True).start()
        deadline = time.monotonic() + 60
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise SystemExit(f"the daemon did not start; see {work / 'daemon.log'}") from None
            if line.startswith("SOCKET: "):
                break
        from supervisor.daemon import supervisor_id_for

        self.sid = supervisor_id_for(self.socket)

    def http(self) -> Any:
        import httpx2

        return httpx2.Client(transport=httpx2.HTTPTransport(uds=str(self.socket)), base_url="http://d", timeout=90)

    def cli(self, cwd: Path) -> subprocess.Popen[str]:
        cmd = [sys.executable, "-m", "supervisor.cli", *QUICK]
        return subprocess.Popen(cmd, cwd=cwd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.err.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _check(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def bench_latency(d: Daemon, image: str, events: StartEvents, n: int) -> bool:
    ours: list[float] = []
    bare: list[float] = []
    with d.http() as c:
        for i in range(n + 1):  # the first pair warms up both paths
            t0 = time.time()
            resp = c.post("/v1/runs", json={"question": "What is 2+2?", "example": "quickstart"})
            resp.raise_for_status()
            run_id = resp.json()["run_id"]
            dt_ours = events.wait(run_id) - t0
            c.get(f"/v1/runs/{run_id}/result", params={"wait": "60"})
            token = uuid.uuid4().hex
            t0 = time.time()
            cmd = ["docker", "run", "-d", "--rm", "--network", "none", "--label", f"{LABEL_BENCH}={token}"]
            subprocess.run([*cmd, image, "python3", "-c", "pass"], check=True, capture_output=True)
            dt_bare = events.wait(token) - t0
            if i:
                ours.append(dt_ours)
                bare.append(dt_bare)
    med, base = statistics.median(ours), statistics.median(bare)
    report("(a) POST /v1/runs -> container started", med, base, "ratio <= 1.5x")
    ok = med / base <= 1.5
    print(
        f"    {_check(ok)}  samples ms: ours {[round(x * 1000) for x in ours]}  bare {[round(x * 1000) for x in bare]}"
    )
    return ok


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        import psutil

        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.peak = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self.stop.wait(0.02)


def _run_clients(d: Daemon, cwd: Path, count: int, parallel: bool) -> float:
    t0 = time.perf_counter()
    if parallel:
        procs = [d.cli(cwd) for _ in range(count)]
        outs = [(p, *p.communicate(timeout=600)) for p in procs]
    else:
        outs = []
        for _ in range(count):
            p = d.cli(cwd)
            outs.append((p, *p.communicate(timeout=600)))
    dt = time.perf_counter() - t0
    for p, out, err in outs:
        if p.returncode != 0:
            raise SystemExit(f"a quickstart failed ({p.returncode}):\n{out}\n{err}")
    return dt


def bench_parallel(d: Daemon, work: Path, count: int, max_concurrent: int) -> bool:
    _run_clients(d, work, 1, parallel=False)  # warm-up
    sampler = RssSampler(d.proc.pid)
    sampler.start()
    try:
        par = _run_clients(d, work, count, parallel=True)
        ser = _run_clients(d, work, count, parallel=False)
    finally:
        sampler.stop.set()
        sampler.join()
    print(
        f"(b) {count} quickstarts via the daemon (--max-concurrent {max_concurrent}): parallel {par:.2f} s, "
        f"serial {ser:.2f} s ({ser / count:.2f} s each), parallel/serial {par / ser:.2f} (speed-up {ser / par:.1f}x)"
    )
    mb = sampler.peak / 2**20
    ok = mb < 150
    print(f"    daemon peak RSS {mb:.1f} MB (target < 150 MB)  {_check(ok)}")
    return ok


def bench_freshness(d: Daemon, steps: int, rounds: int) -> bool:
    text = FRESHNESS_CONFIG.format(steps="".join("        - shell: sleep 0.2\n" for _ in range(steps)))
    lags: list[float] = []
    with d.http() as c:
        for _ in range(rounds):
            resp = c.post("/v1/runs", json={"question": "q", "config_text": text})
            resp.raise_for_status()
            info = resp.json()
            status_file, log_dir = Path(info["status_file"]), Path(info["log_dir"])
            seen: list[tuple[float, float]] = []  # (when we saw it, last_activity in it)
            last = None
            while not (log_dir / "result.json").exists():
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
            res = c.get(f"/v1/runs/{info['run_id']}/result", params={"wait": "60"}).json()
            if res["exit_code"] != 0:
                raise SystemExit(f"freshness run failed: {res}")
            for raw in (log_dir / "sandbox" / "events.jsonl").read_bytes().splitlines():
                ev = json.loads(raw)
                if ev.get("agent") != "a" or ev["type"] not in ("turn_started", "tool_called", "answer", "vote"):
                    continue
                visible = next((when for when, act in seen if act >= ev["ts"]), None)
                if visible is not None:  # the final write may land after result.json: not a freshness sample
                    lags.append(max(0.0, visible - ev["ts"]))
    lags.sort()
    p50, p95 = statistics.median(lags), lags[min(len(lags) - 1, int(0.95 * len(lags)))]
    ok = p95 < 0.5
    print(
        f"(c) status.json freshness over {len(lags)} events: p50 {p50 * 1000:.0f} ms  p95 {p95 * 1000:.0f} ms  "
        f"max {lags[-1] * 1000:.0f} ms (target p95 < 500 ms)  {_check(ok)}"
    )
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=7, help="latency samples per side")
    ap.add_argument("--runs", type=int, default=16, help="quickstarts for the parallel figure")
    ap.add_argument("--max-concurrent", type=int, default=4)
    ap.add_argument("--steps", type=int, default=12, help="sleep 0.2 steps in the freshness run")
    ap.add_argument("--rounds", type=int, default=3, help="freshness runs")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    import docker

    from supervisor.images import ensure_images
    from supervisor.runtime.docker import DockerRuntime

    image = ensure_images(DockerRuntime(), progress=lambda m: print(m, file=sys.stderr))
    work = Path(tempfile.mkdtemp(prefix="mgbench-daemon-"))
    client = docker.from_env()
    events = StartEvents(client)
    d = Daemon(image, work, args.max_concurrent)
    try:
        ok = bench_latency(d, image, events, args.n)
        ok &= bench_parallel(d, work, args.runs, args.max_concurrent)
        ok &= bench_freshness(d, args.steps, args.rounds)
    finally:
        d.stop()
        events.close()
        for c in client.containers.list(all=True, filters={"label": f"{LABEL_SUPERVISOR}={d.sid}"}):
            c.remove(force=True)
        client.close()
        shutil.rmtree(work, ignore_errors=True)
    print("ALL PASS" if ok else "SOME MISS")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

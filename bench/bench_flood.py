"""A daemon while one of its runs floods its outbox: API latency, and what one flood line costs.

(a) `/v1/health` latency of a real `massgen-supervisor` with no run (the baseline) versus while
    one run forges accepted `log` events into its outbox faster than the daemon can apply them
    (the most work per byte a sandbox can cause). Target: p99 < 100 ms while flooding.
(b) The follower's cost per forged line (Materializer.drain over a prepared outbox file, no
    sandbox), for accepted log events and for junk lines. Figures only.

Usage: .venv/bin/python bench/bench_flood.py [--seconds 15]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from supervisor.images import ensure_images  # noqa: E402
from supervisor.logdir import create_run_dirs  # noqa: E402
from supervisor.materializer import Materializer, OutboxTailer  # noqa: E402
from supervisor.runtime.docker import DockerRuntime  # noqa: E402
from tests.cli_helpers import write_config  # noqa: E402
from tests.e2e.test_daemon import Daemon  # noqa: E402
from tests.security.test_flood import FORGE_VALID, OUTBOX, _agent, _script_step  # noqa: E402


def _percentiles(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {k: s[min(len(s) - 1, int(q * len(s)))] for k, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))}


def _probe(d: Daemon, seconds: float) -> list[float]:
    out: list[float] = []
    end = time.monotonic() + seconds
    with d.http(timeout=60) as client:
        while time.monotonic() < end:
            t0 = time.perf_counter()
            client.get("/v1/health").raise_for_status()
            out.append(time.perf_counter() - t0)
            time.sleep(0.02)
    return out


def health_under_flood(seconds: float) -> None:
    runtime = DockerRuntime.from_env(timeout=60)
    image = ensure_images(runtime, progress=lambda _m: None)
    work = Path(tempfile.mkdtemp(prefix="bench-flood-"))
    d = Daemon(runtime, image, work)
    d.start()
    try:
        idle = _probe(d, min(seconds, 5.0))
        cfg = write_config(
            work,
            _agent(
                _script_step("forge.py", FORGE_VALID)
                + f'        - {{shell: "python3 forge.py {OUTBOX} {seconds + 10} {8 << 20} 1", timeout: 300}}\n'
                + "        - answer: x\n        - vote: auto\n"
            ),
            name="flood.yaml",
        )
        proc = d.cli(["--automation", "--config", str(cfg), "q"], work)
        assert proc.stdout is not None
        log_dir = Path(proc.stdout.readline().decode().split(": ", 1)[1].strip())
        outbox = log_dir / "sandbox" / "events.jsonl"
        while not outbox.exists() or outbox.stat().st_size < 4 << 20:
            time.sleep(0.05)
        applied0 = (log_dir / "events.jsonl").stat().st_size
        flooding = _probe(d, seconds)
        applied = (log_dir / "events.jsonl").stat().st_size - applied0
        backlog = outbox.stat().st_size - (log_dir / "events.jsonl").stat().st_size
        with d.http() as client:  # through the API: the daemon then gives the run's disk back
            client.post(f"/v1/runs/{log_dir.name}/stop")
        proc.communicate(timeout=90)
    finally:
        d.cleanup()
        shutil.rmtree(work, ignore_errors=True)  # the flood left ~100 MiB of outbox there
    base, flood = _percentiles(idle), _percentiles(flooding)
    for k in ("p50", "p90", "p99"):
        print(
            f"health {k} idle {base[k] * 1000:7.1f} ms   flooding {flood[k] * 1000:7.1f} ms"
            f"   ratio {flood[k] / base[k]:5.1f}x" + ("   target: < 100 ms while flooding" if k == "p99" else "")
        )
    print(
        f"flood: {len(flooding)} probes over {seconds:g}s; the daemon applied {applied / seconds / 2**20:.1f} MiB/s"
        f" of forged events and was {backlog >> 20} MiB behind the sandbox at the end (it keeps up with the API,"
        " not with the flood)"
    )


def drain_cost() -> None:
    root = Path(tempfile.mkdtemp(prefix="bench-drain-"))
    for name, body in (
        ("accepted log line", lambda i: json.dumps({"v": 1, "seq": i, "ts": 1.0, "type": "log", "message": "forged"})),
        ("junk line 'x'", lambda _i: "x"),
        ("junk object '{}'", lambda _i: "{}"),
    ):
        paths = create_run_dirs(root / name.split()[0] / "runs", root / name.split()[0] / "ws")
        outbox = paths.sandbox / "events.jsonl"
        n = 100_000
        first = {"v": 1, "seq": 0, "ts": 1.0, "type": "run_started", "run_id": "r", "question": "q"}
        first |= {"agents": [{"id": "a", "anon": "agent1", "backend": "scripted"}], "timeout_seconds": 60}
        outbox.write_text(json.dumps(first) + "\n" + "".join(body(i) + "\n" for i in range(1, n)))
        mat = Materializer(paths)
        tailer = OutboxTailer(outbox)
        t0 = time.perf_counter()
        worst = 0.0
        while True:
            s0 = time.perf_counter()
            mat.drain(tailer)
            worst = max(worst, time.perf_counter() - s0)
            if not tailer.more:
                break
        dt = time.perf_counter() - t0
        mat.close()
        tailer.close()
        log_kib = paths.log.stat().st_size >> 10
        print(
            f"drain {name:18} {dt / n * 1e6:6.1f} us/line   longest slice {worst * 1000:5.1f} ms"
            f"   massgen.log {log_kib} KiB for {n} lines"
        )
    shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=15.0, help="how long to probe while flooding")
    p.add_argument("--skip-daemon", action="store_true", help="only (b), no Docker")
    args = p.parse_args()
    drain_cost()
    if not args.skip_daemon:
        health_under_flood(args.seconds)


if __name__ == "__main__":
    main()

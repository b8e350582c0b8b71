"""The web dashboard: runs-page first load, status change -> open page, the daemon's RSS with it on.

A logs root with 1,000 finished and 20 live runs (log dirs written by the real Materializer)
is served by `massgen-supervisor --web`.

(a) First load of the runs page: the server's own time (its Server-Timing header) versus
    reading the same 1,020 status.json files once (what `massgen-run ps --all` does) in this
    process. Target: under 0.5 s server time.
(b) With 10 runs pages open (10 event streams), one live run's status.json is rewritten at a
    time; latency from the write (after os.replace) to the row update arriving on all 10
    streams, versus a bare watchdog observer in this process noticing the same replace.
    Target: p95 under 0.5 s.
(c) The daemon's RSS with the dashboard on and 10 pages open (after (a) and (b)) versus the
    same daemon, same logs root, without --web. Target: growth under 30 MB.

Needs a Docker engine (the daemon reconciles by container label at start; no run is started).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent_image.protocol.status import ContainerSection, RunState  # noqa: E402
from supervisor.logdir import create_run_dirs  # noqa: E402
from supervisor.materializer import Materializer  # noqa: E402
from supervisor.verdict import Verdict  # noqa: E402

PAGES = 10


def make_runs(root: Path, finished: int, live: int) -> list[Materializer]:
    """`finished` finished runs and `live` running ones (their materializers kept open for writes)."""
    keep = []
    for i in range(finished + live):
        paths = create_run_dirs(root, root.parent / "workspaces")
        mat = Materializer(paths)
        seq = 0

        def feed(kind: str, mat: Materializer = mat, **fields: Any) -> None:
            nonlocal seq
            mat.feed(json.dumps({"v": 1, "seq": seq, "ts": time.time(), "type": kind, **fields}).encode())
            seq += 1

        feed(
            "run_started",
            run_id=paths.run_id,
            question=f"question {i}",
            timeout_seconds=60,
            agents=[{"id": a, "anon": f"agent{n + 1}", "backend": "scripted"} for n, a in enumerate(("a", "b"))],
        )
        feed("answer", agent="a", label="agent1.1", content=f"answer {i}")
        feed("vote", agent="b", target="a", reason="fine")
        if i < finished:
            feed("vote", agent="a", target="a", reason="fine")
            feed("winner", winner="a", votes={"a": 2})
            feed("final_answer", agent="a", content=f"final {i}")
            mat.finalize(Verdict("completed"))
            mat.close()
        else:
            mat.set_run(state=RunState.RUNNING)
            mat.write_status(force=True)
            keep.append(mat)
    return keep


def rss_of(pid: int) -> int:
    import psutil

    return int(psutil.Process(pid).memory_info().rss)


class DaemonProc:
    def __init__(self, work: Path, logs_root: Path, web: bool) -> None:
        self.sock = work / ("w.sock" if web else "p.sock")
        env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
        env.update(PYTHONPATH=str(REPO), MASSGEN_SOCKET_DIR=str(work / "r"), MASSGEN_LOG_LEVEL="WARNING")
        cmd = [sys.executable, "-m", "supervisor.daemon", "--socket", str(self.sock), "--logs-root", str(logs_root)]
        cmd += ["--image", "massgen-sandbox/agent:bench-unused"]
        if web:
            cmd += ["--web", "127.0.0.1:0"]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.url = ""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("DASHBOARD: "):
                self.url = line.split(": ", 1)[1].strip()
            if line.startswith("SOCKET: "):
                break
        else:
            raise SystemExit("the daemon exited before listening (is a Docker engine running?)")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def bare_watchdog_latency(root: Path, mats: list[Materializer], n: int) -> list[float]:
    """The floor: a watchdog observer in this process noticing a status.json replace."""
    from watchdog.events import FileCreatedEvent, FileModifiedEvent, FileMovedEvent, FileSystemEventHandler
    from watchdog.observers import Observer

    seen: queue.SimpleQueue[tuple[str, float]] = queue.SimpleQueue()

    class H(FileSystemEventHandler):
        def on_any_event(self, event: Any) -> None:
            dest = os.fsdecode(getattr(event, "dest_path", "") or "")
            if dest.endswith("/status.json"):
                seen.put((os.path.basename(os.path.dirname(dest)), time.perf_counter()))

    obs = Observer()
    obs.schedule(H(), str(root), recursive=True, event_filter=[FileMovedEvent, FileModifiedEvent, FileCreatedEvent])
    obs.start()
    time.sleep(1.0)  # the recursive walk of 1,020 run dirs
    out = []
    try:
        for i in range(n):
            mat = mats[i % len(mats)]
            mat.set_container(ContainerSection(cpu_percent=float(i % 97)))
            t0 = time.perf_counter()
            mat.write_status(force=True)
            while True:
                run_id, t = seen.get(timeout=5)
                if run_id == mat.paths.run_id:
                    out.append(t - t0)
                    break
    finally:
        obs.stop()
        obs.join(5)
    return out


async def open_pages(url: str, base: str) -> tuple[Any, list[Any], list[asyncio.Queue[tuple[str, float]]]]:
    import aiohttp

    jar = aiohttp.CookieJar(unsafe=True)
    http = aiohttp.ClientSession(cookie_jar=jar)
    async with http.get(url) as r:  # the token URL: sets the cookie
        await r.read()
    streams, queues = [], []
    for i in range(PAGES):
        async with http.get(base + "/") as r:
            text = await r.text()
        gen = text.split('data-gen="', 1)[1].split('"', 1)[0]
        es = await http.get(f"{base}/events?since={gen}", timeout=aiohttp.ClientTimeout(total=None))
        q: asyncio.Queue[tuple[str, float]] = asyncio.Queue()
        streams.append(es)
        queues.append(q)

        async def reader(es: Any = es, q: asyncio.Queue[tuple[str, float]] = q) -> None:
            event = None
            async for raw in es.content:
                line = raw.decode().rstrip("\n")
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: ") and event == "row":
                    q.put_nowait((json.loads(line[6:])["id"], time.perf_counter()))

        streams.append(asyncio.get_running_loop().create_task(reader(), name=f"page-{i}"))
    return http, streams, queues


async def dashboard_latency(url: str, mats: list[Materializer], n: int) -> tuple[list[float], Any, list[Any]]:
    base = url.split("/?")[0]
    http, streams, queues = await open_pages(url, base)
    await asyncio.sleep(0.5)
    out = []
    for i in range(n):
        mat = mats[i % len(mats)]
        mat.set_container(ContainerSection(cpu_percent=float(100 + i % 97)))
        t0 = time.perf_counter()
        await asyncio.to_thread(mat.write_status, force=True)
        for q in queues:
            while True:
                run_id, t = await asyncio.wait_for(q.get(), 5)
                if run_id == mat.paths.run_id:
                    out.append(t - t0)
                    break
        await asyncio.sleep(0.02)
    return out, http, streams


def p95(xs: list[float]) -> float:
    return sorted(xs)[max(0, int(len(xs) * 0.95) - 1)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--finished", type=int, default=1000)
    ap.add_argument("--live", type=int, default=20)
    ap.add_argument("--changes", type=int, default=200)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mgdash-", dir="/tmp"))
    root = work / "runs"
    try:
        t0 = time.perf_counter()
        mats = make_runs(root, args.finished, args.live)
        print(f"made {args.finished} finished + {args.live} live runs in {time.perf_counter() - t0:.1f}s under {root}")

        from supervisor.dashboard._data import RunIndex

        t0 = time.perf_counter()
        RunIndex([root]).scan()
        read_all = time.perf_counter() - t0

        plain = DaemonProc(work, root, web=False)
        time.sleep(2.0)
        rss_plain = rss_of(plain.proc.pid)
        plain.stop()

        web = DaemonProc(work, root, web=True)
        try:
            import httpx2

            base = web.url.split("/?")[0]
            with httpx2.Client(timeout=30) as c:
                t0 = time.perf_counter()
                r = c.get(web.url, follow_redirects=True)
                first_wall = time.perf_counter() - t0
                server = float(r.headers["server-timing"].split("dur=")[1]) / 1000
                assert r.status_code == 200 and r.text.count("<tr id=") == args.finished + args.live
                t0 = time.perf_counter()
                c.get(base + "/")
                again_wall = time.perf_counter() - t0
            bare = bare_watchdog_latency(root, mats, args.changes)

            async def live() -> tuple[list[float], int]:
                lat, http, streams = await dashboard_latency(web.url, mats, args.changes)
                rss = rss_of(web.proc.pid)  # 10 pages still open
                for s in streams:
                    if isinstance(s, asyncio.Task):
                        s.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await s
                    else:
                        s.close()
                await http.close()
                return lat, rss

            lat, rss_web = asyncio.run(live())
        finally:
            web.stop()
            for m in mats:
                m.close()

        def line(name: str, value: float, baseline: float, target: str) -> None:
            figures = f"{value * 1000:8.1f} ms   baseline {baseline * 1000:8.1f} ms   ratio {value / baseline:5.2f}x"
            print(f"{name:48} {figures}   target: {target}")

        n = args.finished + args.live
        print(f"(a) runs page, {n} runs: first load wall {first_wall * 1000:.0f} ms, again {again_wall * 1000:.0f} ms")
        line("(a) first load, server time vs reading all status", server, read_all, "< 500 ms")
        line(
            f"(b) status change -> {PAGES} open pages, p95",
            p95(lat),
            p95(bare),
            f"< 500 ms (median {statistics.median(lat) * 1000:.1f} ms)",
        )
        growth = (rss_web - rss_plain) / 2**20
        print(
            f"(c) daemon RSS: without --web {rss_plain / 2**20:.1f} MiB, with it and {PAGES} pages open "
            f"{rss_web / 2**20:.1f} MiB, growth {growth:.1f} MiB   ratio {rss_web / rss_plain:.2f}x   target: < 30 MB"
        )
        ok = server < 0.5 and p95(lat) < 0.5 and growth * 2**20 < 30e6
        print("targets met" if ok else "TARGETS MISSED")
        return 0 if ok else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

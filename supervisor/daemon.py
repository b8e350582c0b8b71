"""`massgen-supervisor`: the long-running daemon serving the runs API on a unix socket.

First SIGTERM/SIGINT: graceful — stop accepting, let go of running sandboxes (they keep
running and are re-adopted on the next start). Second: forced — exit at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import hashlib
import json
import logging
import os
import signal
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from aiohttp import web

from .logdir import default_logs_root, walk_run_dirs
from .runtime.select import RUNTIMES
from .sockets import default_socket

log = logging.getLogger("supervisor.daemon")

EXIT_FORCED = 130


def supervisor_id_for(socket_path: Path) -> str:
    """Stable across restarts of the daemon on the same socket: how it recognises its containers."""
    return "daemon-" + hashlib.sha256(str(socket_path.absolute()).encode()).hexdigest()[:10]


def _hostport(value: str) -> tuple[str, int]:
    from .dashboard._cli import parse_hostport

    return parse_hostport(value)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="massgen-supervisor",
        description="Supervise massgen runs, each in its own container, behind an HTTP API on a unix socket.",
    )
    p.add_argument(
        "--socket",
        type=Path,
        default=None,
        help="API socket (default $MASSGEN_DAEMON_SOCKET or a per-user runtime dir)",
    )
    p.add_argument(
        "--logs-root",
        type=Path,
        default=None,
        help="default logs root ($MASSGEN_LOGS_ROOT, else ./.massgen/runs as for massgen-run)",
    )
    p.add_argument(
        "--max-concurrent",
        type=int,
        default=int(os.environ.get("MASSGEN_MAX_CONCURRENT", "4")),
        help="containers running at once; later runs queue FIFO (default 4)",
    )
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on 127.0.0.1:PORT")
    p.add_argument(
        "--web",
        type=_hostport,
        default=None,
        metavar="[HOST:]PORT",
        help="serve the web dashboard on HOST:PORT (default host 127.0.0.1); prints DASHBOARD: <url with token>",
    )
    p.add_argument("--image", default=None, help="agent image (default: built when missing)")
    p.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default=None,
        help="docker (default, or $MASSGEN_RUNTIME), remote-docker (the engine DOCKER_HOST names; no shared files)"
        " or kubernetes (each run a Job; docs/kubernetes.md)",
    )
    p.add_argument("--log-level", default=os.environ.get("MASSGEN_LOG_LEVEL", "INFO"))
    return p


OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "massgen-supervisor", "version": "1"},
    "paths": {
        "/v1/health": {"get": {"responses": {"200": {"description": "alive"}}}},
        "/v1/runs": {
            "get": {
                "responses": {
                    "200": {
                        "description": "runs",
                        "content": {
                            "application/json": {
                                "schema": {"type": "array", "items": {"$ref": "#/components/schemas/RunInfo"}}
                            }
                        },
                    }
                }
            },
            "post": {
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/SubmitRun"}}},
                },
                "responses": {
                    "201": {
                        "description": "started",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/RunInfo"}}},
                    },
                    "400": {
                        "description": "bad request",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
                    },
                    "413": {"description": "body too large"},
                },
            },
        },
        "/v1/runs/{run_id}": {
            "get": {
                "parameters": [{"$ref": "#/components/parameters/RunId"}],
                "responses": {
                    "200": {"description": "run"},
                    "400": {"description": "bad id"},
                    "404": {"description": "unknown run"},
                },
            }
        },
        "/v1/runs/{run_id}/status": {
            "get": {
                "parameters": [{"$ref": "#/components/parameters/RunId"}],
                "responses": {
                    "200": {"description": "status.json"},
                    "400": {"description": "bad id"},
                    "404": {"description": "unknown run"},
                    "409": {"description": "not ready"},
                },
            }
        },
        "/v1/runs/{run_id}/result": {
            "get": {
                "parameters": [
                    {"$ref": "#/components/parameters/RunId"},
                    {
                        "name": "wait",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "number", "minimum": 0, "maximum": 60},
                    },
                ],
                "responses": {
                    "200": {"description": "result.json"},
                    "202": {"description": "still running"},
                    "400": {"description": "bad input"},
                    "404": {"description": "unknown run"},
                },
            }
        },
        "/v1/runs/{run_id}/stop": {
            "post": {
                "parameters": [{"$ref": "#/components/parameters/RunId"}],
                "responses": {
                    "202": {"description": "stopping"},
                    "400": {"description": "bad id"},
                    "404": {"description": "unknown run"},
                },
            }
        },
    },
    "components": {
        "parameters": {
            "RunId": {
                "name": "run_id",
                "in": "path",
                "required": True,
                "schema": {"type": "string", "pattern": "^log_[0-9]{8}_[0-9]{6}_[0-9]{6}_[0-9a-f]{6}$"},
            }
        },
        "schemas": {},
    },
}


def openapi_doc() -> dict[str, Any]:
    from agent_image.protocol.api import ErrorBody, RunInfo, SubmitRun

    doc = json.loads(json.dumps(OPENAPI))
    for model in (SubmitRun, RunInfo, ErrorBody):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        doc["components"]["schemas"][model.__name__] = schema
    out: dict[str, Any] = doc
    return out


async def reconcile(sup: Any, runtime: Any, logs_root: Path, extra_roots: Iterable[Path] = ()) -> dict[str, int]:
    """Re-adopt our containers, finish runs whose container exited, fail runs whose container vanished."""

    from .lifecycle import RunExecution, RunRequest
    from .logdir import RunPaths
    from .runtime.base import LABEL_DEADLINE, LABEL_LOG_DIR, LABEL_PARENT, LABEL_RUN, LABEL_SUPERVISOR, LABEL_WORKSPACE
    from .runtime.docker import DockerHandle

    counts = {"adopted": 0, "lost": 0}
    found = await asyncio.to_thread(runtime.list_owned, {LABEL_SUPERVISOR: sup.supervisor_id})
    by_id = {f.labels.get(LABEL_RUN, ""): f for f in found}
    adopted: dict[str, Any] = {}

    def depth_of(run_id: str) -> int:
        d, cur = 0, by_id[run_id]
        while cur.labels.get(LABEL_PARENT) in by_id and d < 16:
            cur = by_id[cur.labels[LABEL_PARENT]]
            d += 1
        return d

    for run_id in sorted(by_id, key=depth_of):
        facts = by_id[run_id]
        labels = facts.labels
        try:
            log_dir = Path(labels[LABEL_LOG_DIR])
            deadline = float(labels[LABEL_DEADLINE])
        except (KeyError, ValueError):
            log.warning("container %s has incomplete labels; leaving it alone", facts.id[:12])
            continue
        workspace = Path(labels.get(LABEL_WORKSPACE) or log_dir)
        paths = RunPaths(run_id, log_dir, workspace)
        parent = adopted.get(labels.get(LABEL_PARENT, ""))
        req = RunRequest(
            question="",
            config_source=str(paths.config),
            logs_root=log_dir.parent,
            supervisor_id=sup.supervisor_id,
            image=facts.image,
            parent_run_id=labels.get(LABEL_PARENT) or None,
            depth=parent.depth + 1 if parent else 0,
        )
        execution = RunExecution(req, runtime)
        record = await sup.adopt(execution, paths, DockerHandle(facts.id), deadline, parent)
        adopted[run_id] = record
        counts["adopted"] += 1
        if labels.get(LABEL_PARENT) and parent is None:
            # its parent is gone: a subtree never outlives its root
            await sup.stop(record, "parent run lost")
    # Log dirs that say "running" but have no container: the supervisor lost them. Walk only
    # the layout we create (<root>/<run id>/children/<run id>/...), never rglob: sandboxes can
    # write folders (their outbox, snapshots) that look like log dirs.
    from .reaper import reap_disks

    for root in {logs_root, *extra_roots}:
        # Disks of runs nobody follows any more and whose container is gone: copied back, released.
        await asyncio.to_thread(reap_disks, runtime, root.parent / "workspaces")
        for log_dir in walk_run_dirs(root):
            if log_dir.name in adopted:
                continue
            try:
                if _finish_lost(log_dir, sup.supervisor_id):
                    counts["lost"] += 1
            except Exception:
                log.exception("could not finish lost run %s", log_dir)
    return counts


def _read_roots(path: Path) -> list[Path]:
    """Logs roots earlier runs of this daemon used (CLIs send their own), for the lost-run scan."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [Path(p) for p in data if isinstance(p, str) and os.path.isabs(p)] if isinstance(data, list) else []


def _finish_lost(log_dir: Path, supervisor_id: str) -> bool:
    """Finish a run this daemon supervised whose container is gone (others' runs are left alone)."""
    from .logdir import RunPaths, read_status
    from .reaper import finish_lost_run

    if (log_dir / "result.json").exists():
        return False
    st = read_status(log_dir)
    run = st.get("run", {}) if st is not None else {}
    if not isinstance(run, dict) or run.get("state") == "finished" or run.get("supervisor_id") != supervisor_id:
        return False
    return finish_lost_run(
        RunPaths(log_dir.name, log_dir, log_dir), "the supervisor restarted and the run's container no longer exists"
    )


async def serve(args: argparse.Namespace) -> int:
    from .api import RunsApi, UnixServer, make_app
    from .core import Supervisor, size_thread_pool
    from .images import ensure_images
    from .runtime.docker import DockerRuntime
    from .services import SocketServices

    size_thread_pool(asyncio.get_running_loop())
    sock = (args.socket or default_socket()).absolute()
    logs_root = (args.logs_root or default_logs_root()).absolute()
    from .sockets import ensure_private_dir

    ensure_private_dir(sock.parent)
    from .runtime.select import make_runtime, runtime_name

    kind = runtime_name(args.runtime)
    runtime: Any = DockerRuntime() if kind == "docker" else make_runtime(kind)
    if kind == "docker":
        image = args.image or await asyncio.to_thread(
            ensure_images, runtime, progress=lambda m: log.info("image: %s", m)
        )
    else:
        from .images import agent_image_tag

        image = args.image or agent_image_tag()  # pushed there with `massgen-run image push`
    sup = Supervisor(
        runtime,
        supervisor_id=supervisor_id_for(sock),
        image=image,
        services=SocketServices,
        max_concurrent=args.max_concurrent,
    )
    from .metrics import StatsSampler

    sampler = StatsSampler(sup, runtime)
    sampler.start()
    roots_file = sock.parent / f"{sock.name}.roots.json"
    known_roots = _read_roots(roots_file)
    sup.logs_roots.update(known_roots)

    def remember(root: Path) -> None:
        from .logdir import atomic_write_json

        atomic_write_json(roots_file, sorted(str(r) for r in sup.logs_roots))

    sup.on_new_logs_root = remember
    dashboard = None
    if args.web is not None:
        from .dashboard import Dashboard, SupervisorControl
        from .dashboard._cli import warn_if_exposed

        host, port = args.web
        warn_if_exposed(host)
        dashboard = Dashboard(
            lambda: {logs_root, *sup.logs_roots}, control=SupervisorControl(sup), host=host, port=port
        )
        try:
            dashboard_url = await dashboard.start()
        except OSError as exc:
            log.error("cannot serve the dashboard on %s:%d: %s", host, port, exc.strerror or exc)
            # Before reconciliation: nothing is adopted yet, so nothing is left behind.
            await asyncio.gather(dashboard.close(), sampler.stop())
            return 1
    counts = await reconcile(sup, runtime, logs_root, known_roots)
    log.info("reconciled: adopted=%d lost=%d", counts["adopted"], counts["lost"])
    # What every run's socket needs, imported now rather than on the loop when the first run
    # starts (compiling the gateway there stalled every other run for ~100 ms on a busy host).
    from . import gateway, pricing  # noqa: F401

    # Everything loaded so far lives as long as the daemon: take it out of the cyclic GC's
    # reach. A full collection over it took 100-200 ms on a busy host, a stall of the one
    # event loop every run and API client shares, triggered by the garbage a flooding run makes.
    gc.collect()
    gc.freeze()

    async def health(_r: web.Request) -> web.Response:
        live = sum(1 for r in sup.records.values() if r.live)
        return web.json_response(
            {"ok": True, "supervisor_id": sup.supervisor_id, "live_runs": live, "logs_root": str(logs_root)}
        )

    async def openapi(_r: web.Request) -> web.Response:
        return web.json_response(openapi_doc())

    routes = [
        web.get("/v1/health", health),
        web.get("/openapi.json", openapi),
        *RunsApi(sup, None, logs_root=logs_root).routes(),
    ]
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()
    server = UnixServer(make_app(routes), sock, mode=0o600)
    await server.start()
    metrics = None
    if args.metrics_port is not None:
        from .metrics import serve_metrics

        metrics = await serve_metrics(sup, args.metrics_port)
    log.info(
        "massgen-supervisor %s listening on %s (logs %s, max %d containers)",
        sup.supervisor_id,
        sock,
        logs_root,
        args.max_concurrent,
    )
    if dashboard is not None:
        print(f"DASHBOARD: {dashboard_url}", flush=True)
    print(f"SOCKET: {sock}", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(name: str) -> None:
        if stop.is_set():
            log.warning("second %s: forced exit", name)
            os._exit(EXIT_FORCED)
        log.info("%s: graceful shutdown (sandboxes keep running and are re-adopted on restart)", name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig.name)
    await stop.wait()
    await sampler.stop()
    # Let go of the runs while the server closes: aiohttp waits for in-flight handlers, and a
    # client long-polling a result (up to 60 s) would otherwise hold the shutdown open while the
    # daemon keeps supervising. Detached runs answer those polls at once.
    await asyncio.gather(server.close(), sup.detach_all(), dashboard.close() if dashboard else asyncio.sleep(0))
    if metrics is not None:
        await metrics.cleanup()
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    from .runtime.select import make_runtime, runtime_name

    try:
        args.runtime = runtime_name(args.runtime)
        if args.runtime != "docker":
            make_runtime(args.runtime)  # its settings (MASSGEN_K8S_*) read now: contacts nothing
    except ValueError as exc:  # a runtime or a setting of it that is no value: a usage error, as a bad --runtime is
        parser.error(str(exc))
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    return asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())

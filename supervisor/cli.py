"""`massgen-run`: run a question (automation or human mode) and the ops verbs.

Heavy imports happen inside functions so that `--help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from agent_image.protocol.automation import ascii_line, terminal_safe

from .logdir import default_logs_root, iter_run_dirs, read_status
from .sockets import daemon_client

VERBS = ("image", "ps", "status", "logs", "stop", "watch", "dashboard", "report", "validate")
EPILOG = """\
examples:
  massgen-run --automation --config @examples/quickstart "What is 2+2?"
  massgen-run --config my_run.yaml "Summarise the design"      (live, human-readable)
  massgen-run validate my_run.yaml [--json] [--strict]          (check a config, MassGen keys included)
  massgen-run image build                                       (build the sandbox images)
  massgen-run ps [--tree] | status RUN [--json] | logs RUN [-f] | watch
  massgen-run dashboard [--port N] | report RUN [-o FILE]       (web dashboard; one-file HTML report)
  massgen-run batch batch.yaml [--batch-dir DIR]               (configs x questions x repeats; see batch --help)

exit codes: 0 ok, 1 config error, 2 execution error, 3 timeout, 4 interrupted
"""


def _say(*parts: object, **kw: Any) -> None:
    """print(), with everything that is not printable escaped: lines here carry sandbox text."""
    print(*(terminal_safe(str(p)) for p in parts), **kw)


class _Parser(argparse.ArgumentParser):
    """Usage errors are configuration errors: exit 1 (argparse's own 2 means 'execution error' here)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(1, f"{self.prog}: error: {message}\n")


from .runtime.select import RUNTIMES, runtime_name  # noqa: E402 - light (no SDK imports)


def _run_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="massgen-run",
        description="Run a multi-agent question, each run in its own hardened container.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("question", help="the question for the agents")
    p.add_argument("--config", required=True, help="config file, or @examples/NAME (see configs/)")
    p.add_argument(
        "--automation", action="store_true", help="print ~10 parseable lines (LOG_DIR first) and nothing else"
    )
    p.add_argument(
        "--sandbox",
        choices=("docker", "none"),
        default=os.environ.get("MASSGEN_SANDBOX", "docker"),
        help="docker (default): the run gets its own container; none: run on this host, unisolated",
    )
    p.add_argument(
        "--logs-root", type=Path, default=None, help="where log dirs go (default ./.massgen/runs or $MASSGEN_LOGS_ROOT)"
    )
    p.add_argument("--image", default=None, help="agent image to use (default: built automatically)")
    p.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default=None,
        help="docker (default, or $MASSGEN_RUNTIME): this host's engine; remote-docker: the engine DOCKER_HOST names,"
        " sharing no filesystem (docs/remote-docker.md)",
    )
    p.add_argument(
        "--output-file", default=None, metavar="PATH", help="also write the final answer to PATH (OUTPUT_FILE: line)"
    )
    return p


class _Printer:
    """The CLI's listener: automation lines or a live human view."""

    def __init__(self, automation: bool, output_file: str | None = None) -> None:
        self.automation = automation
        self.output_file = output_file
        self.t0: float | None = None
        self.lines = 0

    def config_notes(self, notes: Any) -> None:
        # Human mode only: in automation mode stdout is the line contract and stderr is often
        # the same file (`> out.txt 2>&1`); the warnings are in status.json and result.json.
        if self.automation:
            return
        for note in notes:
            if note.severity == "warning":
                _say(f"config warning: {note}", file=sys.stderr, flush=True)

    def out(self, line: str) -> None:
        _say(line, flush=True)
        self.lines += 1

    def prepared(self, paths: Any, config: Any, question: str) -> None:
        import time

        self.t0 = time.time()
        agents = ", ".join(config.agent_ids) if config is not None else "-"
        if self.automation:
            from agent_image.protocol.automation import head_lines

            ids = config.agent_ids if config is not None else None
            for line in head_lines(str(paths.log_dir), paths.run_id, str(paths.status), ids, question):
                self.out(line)
        else:
            _say(f"run {paths.run_id}\n  log dir: {paths.log_dir}\n  agents:  {agents}", flush=True)

    def event(self, ev: Any) -> None:
        if self.automation or self.t0 is None:
            return
        t = ev.ts - self.t0
        kind = ev.type
        msg = None
        if kind == "turn_started":
            msg = f"{ev.agent} is working (turn {ev.turn})"
        elif kind == "tool_called":
            msg = f"{ev.agent} {ev.summary}"
        elif kind == "answer":
            msg = f"{ev.agent} answered {ev.label}: {ascii_line(ev.content, 100)}"
        elif kind == "vote":
            msg = f"{ev.agent} voted for {ev.target}: {ascii_line(ev.reason, 80)}"
        elif kind == "agent_error":
            msg = f"{ev.agent} error ({ev.kind}): {ascii_line(ev.message, 160)}"
        elif kind == "agent_failed":
            msg = f"{ev.agent} FAILED ({ev.reason}): {ascii_line(ev.message, 160)}"
        elif kind == "winner":
            msg = f"winner: {ev.winner} (votes {ev.votes}){' after a tie' if ev.tie else ''}"
        elif kind == "model_call":
            tokens = f"{ev.prompt_tokens}+{ev.completion_tokens} tokens"
            msg = f"{ev.agent} {ev.provider}/{ev.model} {tokens} {ev.latency_s:.2f}s"
        if msg:
            _say(f"[{t:6.1f}s] {msg}", flush=True)

    def progress(self, message: str) -> None:
        _say(message, file=sys.stderr, flush=True)

    def finish(self, result: Any) -> None:
        dur = result.duration_s or 0.0
        final_text = ""
        if result.answer_file:
            try:
                final_text = Path(result.answer_file).read_text(encoding="utf-8")
            except OSError:
                final_text = ""
        written = None
        if self.output_file and result.exit_code == 0 and result.answer_file:
            from agent_image.protocol.automation import write_output_file

            try:
                written = write_output_file(self.output_file, final_text)
            except OSError as exc:
                _stderr(f"massgen-run: cannot write --output-file {self.output_file}: {exc}")
        if self.automation:
            from agent_image.protocol.automation import tail_lines

            for line in tail_lines(
                exit_code=result.exit_code,
                reason=result.reason,
                detail=result.detail,
                winner=result.winner,
                duration_s=result.duration_s,
                answer_file=result.answer_file,
                answer_text=final_text,
                n_agents=self.n_agents,
                output_file=written,
            ):
                self.out(line)
            return
        if result.exit_code == 0:
            _say(f"\nfinal answer ({result.winner}, {dur:.1f}s):\n\n{final_text.rstrip()}\n")
            _say(f"answer file: {result.answer_file}")
            if written:
                _say(f"output file: {written}")
        else:
            _say(f"\nrun ended: exit {result.exit_code} ({result.reason}): {result.detail}")
        _say(f"status:      {result.status_file}")

    n_agents = 0


def _stderr(msg: str) -> None:
    _say(msg, file=sys.stderr, flush=True)


def _docker_runtime(image: str | None, kind: str = "docker") -> tuple[Any, str]:
    """The Docker runtime and the agent image, building what is missing (progress on stderr).

    Raises:
        _PreflightFailed: preflight found a problem.
    """
    from .errors import BuildError, ContainerRuntimeError
    from .images import ensure_images, preflight
    from .runtime.docker import DockerRuntime

    if kind != "docker":
        return _remote_runtime(image, kind)

    try:
        runtime = DockerRuntime()
    except ContainerRuntimeError as exc:
        problems = preflight()
        raise _PreflightFailed(problems or [str(exc)]) from exc
    if image:
        return runtime, image
    problems = preflight(runtime)
    if problems:
        raise _PreflightFailed(problems)
    _reap(runtime)
    try:
        return runtime, ensure_images(runtime, progress=_stderr)
    except (BuildError, ContainerRuntimeError) as exc:
        raise _PreflightFailed([f"image build failed: {exc}"]) from exc


def _remote_runtime(image: str | None, kind: str) -> tuple[Any, str]:
    """A runtime sharing no filesystem, and its image (never built there: pushed with `image push`).

    Raises:
        _PreflightFailed: no such engine, or the image is not on it.
    """
    from .errors import ContainerRuntimeError
    from .images import agent_image_tag
    from .runtime.select import make_runtime

    try:
        runtime = make_runtime(kind)
        runtime.ping()
    except ValueError as exc:
        raise _PreflightFailed([str(exc)]) from exc
    except ContainerRuntimeError as exc:
        raise _PreflightFailed([f"no container engine answers at {runtime.endpoint} ({exc})"]) from exc
    tag = image or agent_image_tag()
    if not hasattr(runtime, "image_labels"):
        # A cluster pulls images itself: one it cannot pull is start_failed with the pod's events.
        _reap(runtime)
        return runtime, tag
    try:
        present = runtime.image_labels(tag) is not None
    except ContainerRuntimeError as exc:
        raise _PreflightFailed([f"cannot inspect images at {runtime.endpoint}: {exc}"]) from exc
    if not present:
        raise _PreflightFailed(
            [
                f"image {tag} is not on the engine at {runtime.endpoint}; copy it there with"
                f" `massgen-run image push --to {runtime.endpoint}`"
            ]
        )
    _reap(runtime)
    return runtime, tag


_HOUSEKEEPING: list[Any] = []  # futures of the reaper's work, waited for before the CLI exits
_HOUSEKEEPER: Any = None  # its one worker thread (jobs run in order)
HOUSEKEEPING_WAIT_S = 60.0


def _housekeep(job: Callable[[], object]) -> None:
    """Run `job` beside the run, in order with earlier jobs: reaping touches only other processes'
    sandboxes and disks (never this run's: its pid is alive), so the run need not wait for it
    (an engine call per foreign sandbox on a shared engine)."""
    global _HOUSEKEEPER
    if _HOUSEKEEPER is None:
        from concurrent.futures import ThreadPoolExecutor

        _HOUSEKEEPER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="massgen-reaper")
    _HOUSEKEEPING.append(_HOUSEKEEPER.submit(job))


def _housekeeping_done() -> None:
    from concurrent.futures import wait

    wait(_HOUSEKEEPING, timeout=HOUSEKEEPING_WAIT_S)
    for f in _HOUSEKEEPING:
        if f.done() and f.exception() is not None:
            _stderr(f"massgen-run: reaping left-behind sandboxes failed: {f.exception()}")
    _HOUSEKEEPING.clear()


def _reap(runtime: Any) -> None:
    """Finish and remove the sandboxes of massgen-run processes of this host that died.

    On a remote engine too: a sandbox is this host's when its log dir (a label) is here and says
    which pid supervised it; others' (another host's log dirs) are left alone.
    """

    def job() -> None:
        from .reaper import reap_orphans

        n = reap_orphans(runtime)
        if n:
            _stderr(f"massgen-run: reaped {n} sandbox(es) left behind by massgen-run processes that died")

    _housekeep(job)


def _record_unstartable(printer: _Printer, args: argparse.Namespace, logs_root: Path, detail: str) -> int:
    """Nothing can start (no engine, no image): still a log dir, a result.json and the usual lines."""
    from agent_image.protocol.result import Reason

    from .configs import resolve_config
    from .logdir import create_run_dirs
    from .materializer import Materializer
    from .verdict import Verdict

    paths = create_run_dirs(logs_root, logs_root.parent / "workspaces")
    mat = Materializer(paths)
    try:
        mat.status.meta.question = args.question
        try:
            config = resolve_config(args.config)[0]
        except Exception:  # noqa: BLE001 - the engine problem is the headline; the config is checked when it can run
            config = None
        printer.n_agents = len(config.agents) if config is not None else 0
        printer.prepared(paths, config, args.question)
        result = mat.finalize(Verdict(Reason.ENGINE_UNAVAILABLE, detail))
    finally:
        mat.close()
    printer.finish(result)
    return int(result.exit_code)


class _PreflightFailed(Exception):
    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


def cmd_run(argv: list[str]) -> int:
    try:
        return _cmd_run(argv)
    finally:
        _housekeeping_done()  # (before the result lines, when the run got that far)


def _cmd_run(argv: list[str]) -> int:
    args = _run_parser().parse_args(argv)
    import asyncio
    import signal

    printer = _Printer(args.automation, args.output_file)
    logs_root = (args.logs_root or default_logs_root()).absolute()
    try:
        kind = runtime_name(args.runtime)
    except ValueError as exc:  # $MASSGEN_RUNTIME names no runtime
        _stderr(f"massgen-run: {exc}")
        return 1
    # A running daemon takes the run, unless a runtime was asked for on the command line (the
    # daemon runs its own).
    daemon = daemon_client() if args.sandbox == "docker" and not args.image and not args.runtime else None
    if daemon is not None:
        from agent_image.client import ClientError, run_and_follow

        try:
            return run_and_follow(
                daemon,
                args.question,
                args.config,
                args.automation,
                {"logs_root": str(logs_root)},
                output_file=args.output_file,
            )
        except ClientError as exc:
            _stderr(f"massgen-run: {exc}")
            return exc.exit_code
        finally:
            daemon.close()
    # Only now: a run the daemon takes needs none of this (the run config's models, pydantic
    # among them, cost ~200 ms to import).
    from .lifecycle import Listener, RunControl, RunRequest
    from .runtime.local import LocalRuntime

    if args.sandbox == "none":
        _stderr("warning: --sandbox none runs the agents' commands directly on this host, without isolation")
        runtime: Any = LocalRuntime()
        image = None
    else:
        try:
            runtime, image = _docker_runtime(args.image, kind)
        except _PreflightFailed as exc:
            _stderr("massgen-run: cannot start a sandbox:")
            for p in exc.problems:
                _stderr(f"  - {p}")
            return _record_unstartable(printer, args, logs_root, "; ".join(exc.problems))
        from .reaper import reap_disks

        _housekeep(lambda: reap_disks(runtime, logs_root.parent / "workspaces"))
    req = RunRequest(
        question=args.question, config_source=args.config, logs_root=logs_root, sandbox=args.sandbox, image=image
    )

    class _L(Listener):
        def prepared(self, paths: Any, config: Any, question: str) -> None:
            printer.n_agents = len(config.agents) if config is not None else 0
            printer.prepared(paths, config, question)

        def config_notes(self, notes: Any) -> None:
            printer.config_notes(notes)

        def event(self, ev: Any) -> None:
            printer.event(ev)

        def progress(self, message: str) -> None:
            printer.progress(message)

    async def main() -> Any:
        from .core import Supervisor, size_thread_pool
        from .services import SocketServices

        control = RunControl()
        loop = asyncio.get_running_loop()
        size_thread_pool(loop)

        def on_signal(name: str) -> None:
            if control.interrupt.is_set():
                control.force.set()  # second signal: no more grace
            else:
                control.interrupt_reason = f"interrupted by {name}"
                control.interrupt.set()

        # SIGHUP too: a dropped ssh session must end the run properly, not orphan its sandbox.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, on_signal, sig.name)
        sup = Supervisor(runtime, image=image, services=SocketServices, default_sandbox=args.sandbox)
        record = await sup.submit(req, listener=_L(), control=control)
        assert record.task is not None
        return await record.task

    result = asyncio.run(main())
    _housekeeping_done()
    printer.finish(result)
    return int(result.exit_code)


# -- ops verbs (read the log dirs; the daemon adds live control later) -----------------------


def _find_run(logs_root: Path, run: str) -> Path:
    p = Path(run)
    if p.is_dir() and (p / "status.json").exists():
        return p
    matches = [d for d in iter_run_dirs(logs_root) if d.name == run or d.name.endswith(run)]
    if len(matches) != 1:
        raise SystemExit(
            f"massgen-run: {'no run' if not matches else 'more than one run'} matches {run!r} under {logs_root}"
        )
    return matches[0]


def cmd_ps(argv: list[str]) -> int:
    p = _Parser(prog="massgen-run ps", description="List runs under the logs root.")
    p.add_argument("--all", action="store_true", help="include finished runs")
    p.add_argument("--json", action="store_true", help="one JSON array")
    p.add_argument("--tree", action="store_true", help="nested runs under their parents (JSON: `children`)")
    p.add_argument("--logs-root", type=Path, default=None)
    args = p.parse_args(argv)
    # Reads status.json only (never events or logs): 1,000 finished runs list in well under a second.
    from .watch import prune, read_row, tree, tree_lines

    root = args.logs_root or default_logs_root()
    if args.tree:
        roots = prune(tree(root), keep_finished=args.all)
        if args.json:
            _say(json.dumps([r.tree_dict() for r in roots], indent=2))
            return 0
        lines = list(tree_lines(roots))
    else:
        rows = [r for r in map(read_row, iter_run_dirs(root)) if args.all or not r.finished]
        if args.json:
            _say(json.dumps([r.ps_dict() for r in rows], indent=2))
            return 0
        lines = [(r.run_id, r) for r in rows]
    import time

    from .watch import fmt_age, fmt_bytes

    now = time.time()
    width = max([40, *(len(label) + 1 for label, _ in lines)])
    out = [
        f"{'RUN ID':{width}} {'STATE':9} {'PHASE':13} {'EXIT':>4} {'ELAPSED':>8} {'AGE':>6} {'CPU':>6} {'MEM':>8} DEPTH"
    ]
    for label, r in lines:
        ex = "" if r.exit_code is None else str(r.exit_code)
        el = "" if r.elapsed_s is None else f"{r.elapsed_s:.1f}s"
        age = fmt_age(now - r.start_time if r.start_time else None)
        cpu = "" if r.cpu_percent is None else f"{r.cpu_percent:.0f}%"
        out.append(
            f"{label:{width}} {r.state:9} {r.phase!s:13} {ex:>4} {el:>8} {age:>6} {cpu:>6}"
            f" {fmt_bytes(r.memory_bytes):>8} {r.depth}"
        )
    _say("\n".join(out))
    return 0


def cmd_watch(argv: list[str]) -> int:
    p = _Parser(
        prog="massgen-run watch",
        description="A live table of runs under the logs root, redrawn when a status.json changes (Ctrl+C to quit).",
    )
    p.add_argument("--logs-root", type=Path, default=None, help="default ./.massgen/runs or $MASSGEN_LOGS_ROOT")
    p.add_argument("--once", action="store_true", help="print the table once and exit")
    args = p.parse_args(argv)
    from .watch import watch

    return watch((args.logs_root or default_logs_root()).absolute(), once=args.once)


def cmd_status(argv: list[str]) -> int:
    p = _Parser(prog="massgen-run status", description="Show one run's status.json.")
    p.add_argument("run", help="run id (or a unique suffix) or a log dir")
    p.add_argument("--json", action="store_true")
    p.add_argument("--logs-root", type=Path, default=None)
    args = p.parse_args(argv)
    d = _find_run(args.logs_root or default_logs_root(), args.run)
    st = read_status(d)
    if st is None:
        _say(f"massgen-run: {d}/status.json is missing or unreadable", file=sys.stderr)
        return 2
    if args.json:
        _say(json.dumps(st, indent=2))
        return 0
    run, co, res = st["run"], st["coordination"], st["results"]
    _say(f"run:      {d.name}  state={run['state']} exit={run['exit_code']} reason={run['reason']}")
    _say(f"phase:    {co['phase']} {co['completion_percentage']}%")
    for aid, a in st["agents"].items():
        _say(f"  {aid:16} {a['anon']:8} {a['status']:10} answers={a['answer_count']} turns={a['turns']}")
    _say(f"winner:   {res['winner']}")
    return 0


def cmd_stop(argv: list[str]) -> int:
    import signal

    p = _Parser(prog="massgen-run stop", description="Interrupt a running run (it ends with exit 4, INTERRUPTED).")
    p.add_argument("run", help="run id (or a unique suffix) or a log dir")
    p.add_argument("--logs-root", type=Path, default=None)
    args = p.parse_args(argv)
    d = _find_run(args.logs_root or default_logs_root(), args.run)
    run = (read_status(d) or {}).get("run", {})
    if run.get("state") == "finished":
        _say(f"{d.name} already finished (exit {run.get('exit_code')})")
        return 0
    daemon = daemon_client()
    if daemon is not None:
        from agent_image.client import ClientError

        try:
            daemon.request("POST", f"/v1/runs/{d.name}/stop")
            _say(f"stopping {d.name}")
            return 0
        except ClientError as exc:
            if exc.status != 404:
                _stderr(f"massgen-run stop: {exc}")
                return 2
        finally:
            daemon.close()
    pid = run.get("supervisor_pid")
    if not isinstance(pid, int):
        _stderr(f"massgen-run stop: no supervisor is known for {d.name}")
        return 2
    try:
        # The embedded supervisor is the massgen-run process following the run: SIGTERM makes
        # it stop the sandbox gracefully and record exit 4, exactly like Ctrl+C.
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        _stderr(f"massgen-run stop: the supervising process {pid} of {d.name} is gone")
        return 2
    _say(f"stopping {d.name}")
    return 0


def cmd_logs(argv: list[str]) -> int:
    p = _Parser(prog="massgen-run logs", description="Print a run's massgen.log.")
    p.add_argument("run")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing until the run finishes")
    p.add_argument("--logs-root", type=Path, default=None)
    args = p.parse_args(argv)
    d = _find_run(args.logs_root or default_logs_root(), args.run)
    from agent_image.client import print_log

    def finished() -> bool:
        st = read_status(d) or {}
        return st.get("run", {}).get("state") == "finished" and (d / "result.json").exists()

    return print_log(d / "massgen.log", follow=args.follow, finished=finished)


def cmd_image(argv: list[str]) -> int:
    p = _Parser(prog="massgen-run image", description="Build the sandbox images offline.")
    sub = p.add_subparsers(dest="action", required=True)
    b = sub.add_parser("build", help="build the base and agent images (what is missing)")
    b.add_argument("--force", action="store_true", help="rebuild even when present")
    push = sub.add_parser("push", help="copy images to another engine, offline (save/load)")
    push.add_argument("--to", default=None, help="target engine, e.g. tcp://HOST:2376 (default: $DOCKER_HOST)")
    push.add_argument("--from", dest="source", default="unix:///var/run/docker.sock", help="source engine")
    push.add_argument("--tls-verify", action="store_true", help="TLS with verification (or DOCKER_TLS_VERIFY=1)")
    push.add_argument("--cert-path", default=None, help="ca.pem, cert.pem, key.pem (or DOCKER_CERT_PATH)")
    push.add_argument("images", nargs="*", help="images to copy (default: the agent image the supervisor uses)")
    args = p.parse_args(argv)
    if args.action == "push":
        from .imagepush import push_images

        return push_images(args, _stderr, _say)
    from .errors import BuildError, ContainerRuntimeError
    from .images import ensure_images, preflight
    from .runtime.docker import DockerRuntime

    try:
        runtime = DockerRuntime()
    except ContainerRuntimeError as exc:
        for prob in preflight() or [str(exc)]:
            _stderr(f"massgen-run image build: {prob}")
        return 1
    problems = preflight(runtime)
    if problems:
        for prob in problems:
            _stderr(f"massgen-run image build: {prob}")
        return 1
    try:
        tag = ensure_images(runtime, progress=_stderr, force=args.force)
    except (BuildError, ContainerRuntimeError) as exc:
        _stderr(f"massgen-run image build: {exc}")
        return 2
    _say(tag)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if os.environ.get("MASSGEN_SUPERVISOR_SOCKET"):
        # Inside a run (also a --sandbox none one): nested runs go through the run's own socket.
        from agent_image.client import main as client_main

        return client_main(argv)
    if argv and argv[0] in ("dashboard", "report"):
        from .dashboard import _cli

        if argv[0] == "dashboard":
            return _cli.cmd_dashboard(argv[1:], _Parser, default_logs_root())
        return _cli.cmd_report(argv[1:], _Parser, _find_run, default_logs_root())
    if argv and argv[0] == "validate":
        from .validate import main as validate_main

        return validate_main(argv[1:], _Parser)
    if argv and argv[0] == "batch":
        from .batch.cli import main as batch_main

        return batch_main(argv[1:])
    if argv and argv[0] in VERBS:
        verbs = {"image": cmd_image, "ps": cmd_ps, "status": cmd_status, "logs": cmd_logs, "stop": cmd_stop}
        verbs["watch"] = cmd_watch
        return verbs[argv[0]](argv[1:])
    return cmd_run(argv)


if __name__ == "__main__":
    sys.exit(main())

"""`massgen-run` as a client of a supervisor socket: nested runs inside a sandbox, and the host
CLI when a daemon is running. Same lines, same exit codes as the embedded CLI.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from .protocol.automation import head_lines, tail_lines, terminal_safe

SOCKET_ENV = "MASSGEN_SUPERVISOR_SOCKET"
ORIGIN = "http://massgen-supervisor"
WAIT_STEP_S = 20.0
STOP_WAIT_S = 90.0
RECONNECT_S = float(os.environ.get("MASSGEN_RECONNECT_SECONDS", "60"))


def _say(*parts: object, **kw: Any) -> None:
    """print(), with everything that is not printable escaped: lines here carry sandbox text."""
    print(*(terminal_safe(str(p)) for p in parts), **kw)


class _Interrupted(Exception):
    """A signal arrived while the client was waiting."""


class ClientError(Exception):
    """The supervisor could not be reached or refused the request."""

    def __init__(self, message: str, status: int | None = None, *, exit_code: int = 2) -> None:
        self.status = status
        self.exit_code = exit_code  # 1 when nothing was started because the input was wrong
        super().__init__(message)


class SupervisorClient:
    def __init__(self, socket_path: str, timeout: float = 90.0) -> None:
        import httpx2

        self.socket_path = socket_path
        self._http = httpx2.Client(base_url=ORIGIN, transport=httpx2.HTTPTransport(uds=socket_path), timeout=timeout)

    def request(
        self, method: str, path: str, body: Any = None, params: dict[str, str] | None = None, *, reconnect: bool = True
    ) -> tuple[int, Any]:
        import httpx2

        give_up = time.monotonic() + (RECONNECT_S if reconnect else 0.0)
        while True:
            try:
                resp = self._http.request(method, path, json=body, params=params)
                break
            except httpx2.ConnectError as exc:
                # Nothing reached the supervisor (it is restarting and will re-bind this
                # socket): retrying is safe even for POST.
                if time.monotonic() > give_up:
                    raise ClientError(f"supervisor at {self.socket_path} unreachable: {exc}") from exc
                time.sleep(0.25)
            except Exception as exc:
                raise ClientError(f"supervisor at {self.socket_path} unreachable: {type(exc).__name__}: {exc}") from exc
        try:
            data = resp.json()
        except ValueError:
            data = {"error": "bad_response", "detail": resp.text[:200]}
        if resp.status_code >= 400:
            raise ClientError(f"{data.get('error', resp.status_code)}: {data.get('detail', '')}", resp.status_code)
        return resp.status_code, data

    def close(self) -> None:
        self._http.close()


class _Parser(argparse.ArgumentParser):
    """Usage errors are configuration errors: exit 1 (argparse's own 2 means 'execution error' here)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(1, f"{self.prog}: error: {message}\n")


def _config_body(config: str) -> dict[str, Any]:
    if config.startswith("@examples/"):
        return {"example": config.split("/", 1)[1]}
    path = Path(config).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        # Still submitted: the supervisor records the run as config_missing (exit 1) with a log
        # dir and result.json, so the output is the same as without a supervisor in between.
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return {"config_unreadable": f"cannot read config: {why}", "config_name": str(path.absolute())}
    from .protocol.loader import absolutize_context_paths

    return {"config_text": absolutize_context_paths(text), "config_name": str(path.resolve())}


def _out(line: str) -> None:
    _say(line, flush=True)


def run_and_follow(
    client: SupervisorClient,
    question: str,
    config: str,
    automation: bool,
    extra: dict[str, Any] | None = None,
    *,
    output_file: str | None = None,
) -> int:
    body = {"question": question, **_config_body(config), **(extra or {})}
    _, info = client.request("POST", "/v1/runs", body)
    run_id = info["run_id"]
    if automation:
        for line in head_lines(info["log_dir"], run_id, info["status_file"], info.get("agents"), question):
            _out(line)
    else:
        _out(f"run {run_id}\n  log dir: {info['log_dir']}\n  agents:  {', '.join(info.get('agents') or [])}")
    signals = {"count": 0}

    def on_signal(signum: int, _frame: Any) -> None:
        # Only raise here: the handler interrupts the blocking long-poll; the loop below does the
        # HTTP (never from inside a signal handler, on a client that may be mid-request).
        signals["count"] += 1
        raise _Interrupted()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        deadline = None
        lost_since: float | None = None
        stop_sent = False
        res: dict[str, Any]
        while True:
            try:
                if signals["count"] >= 2:
                    # Second signal: stop waiting now (the run is being stopped by the supervisor).
                    res = {
                        "exit_code": 4,
                        "reason": "interrupted",
                        "detail": f"stopped waiting; {run_id} is being stopped",
                    }
                    break
                if signals["count"] == 1 and not stop_sent:
                    stop_sent = True
                    with contextlib.suppress(ClientError):
                        SupervisorClient(client.socket_path).request("POST", f"/v1/runs/{run_id}/stop")
                status, res = client.request("GET", f"/v1/runs/{run_id}/result", params={"wait": str(WAIT_STEP_S)})
            except _Interrupted:
                client = SupervisorClient(client.socket_path)  # the old one was interrupted mid-request
                continue
            except ClientError as exc:
                if exc.status == 404:
                    res = {
                        "exit_code": 2,
                        "reason": "supervisor_lost",
                        "detail": f"the supervisor no longer knows {run_id}",
                    }
                    break
                if exc.status is not None:
                    raise
                # The supervisor went away (a daemon restart): keep trying to reattach; a
                # restarted daemon re-adopts the run and answers for it again.
                lost_since = lost_since or time.monotonic()
                if time.monotonic() - lost_since > RECONNECT_S:
                    res = {"exit_code": 2, "reason": "supervisor_lost", "detail": str(exc)}
                    break
                time.sleep(0.5)
                continue
            lost_since = None
            if status == 200:
                break
            if stop_sent:
                deadline = deadline or time.monotonic() + STOP_WAIT_S
                if time.monotonic() > deadline:
                    raise ClientError(f"run {run_id} did not stop within {STOP_WAIT_S:g}s")
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    answer = ""
    if res.get("answer_file"):
        try:
            answer = Path(res["answer_file"]).read_text(encoding="utf-8")
        except OSError:
            answer = ""
    n_agents = len(info.get("agents") or [])
    written = None
    if output_file and res["exit_code"] == 0 and res.get("answer_file"):
        from .protocol.automation import write_output_file

        try:
            written = write_output_file(output_file, answer)
        except OSError as exc:
            print(f"massgen-run: cannot write --output-file {output_file}: {exc}", file=sys.stderr, flush=True)
    if not automation:
        # Human mode: config warnings on stderr (automation keeps them in status.json/result.json).
        for w in res.get("config_warnings") or []:
            where = f"{w.get('file')}:{w.get('line')}" if w.get("line") else w.get("file", "")
            print(f"config warning: {where}: key={w.get('key')} {w.get('message')}", file=sys.stderr, flush=True)
    if automation:
        for line in tail_lines(
            exit_code=res["exit_code"],
            reason=res["reason"],
            detail=res.get("detail", ""),
            winner=res.get("winner"),
            duration_s=res.get("duration_s"),
            answer_file=res.get("answer_file"),
            answer_text=answer,
            n_agents=n_agents,
            output_file=written,
        ):
            _out(line)
    elif res["exit_code"] == 0:
        _out(f"\nfinal answer ({res.get('winner')}):\n\n{answer.rstrip()}\n\nanswer file: {res.get('answer_file')}")
    else:
        _out(f"\nrun ended: exit {res['exit_code']} ({res['reason']}): {res.get('detail', '')}")
    return int(res["exit_code"])


def main(argv: list[str], socket_path: str | None = None) -> int:
    sock = socket_path or os.environ.get(SOCKET_ENV)
    if not sock:
        _say(
            f"massgen-run: no supervisor here ({SOCKET_ENV} is not set); inside a sandbox this command "
            "starts nested runs through the run's supervisor socket",
            file=sys.stderr,
        )
        return 1
    if argv and argv[0] == "validate":
        # Nothing to ask the supervisor: the config is checked here, as the nested run would see it.
        from .validate import run_cli, validate_here

        return run_cli(argv[1:], validate_here, _Parser)
    verbs = {"ps", "status", "stop", "logs"}
    try:
        client = SupervisorClient(sock)
        if argv and argv[0] in verbs:
            return _verb(client, argv[0], argv[1:])
        p = _Parser(prog="massgen-run", description="Start a nested run through the supervisor.")
        p.add_argument("question")
        p.add_argument("--config", required=True, help="config file, or @examples/NAME")
        p.add_argument("--automation", action="store_true")
        p.add_argument("--sandbox", choices=("docker", "none"), help="ignored: nested runs use the parent's kind")
        p.add_argument("--output-file", default=None, metavar="PATH", help="also write the final answer to PATH")
        args = p.parse_args(argv)
        return run_and_follow(client, args.question, args.config, args.automation, output_file=args.output_file)
    except ClientError as exc:
        _say(f"massgen-run: {exc}", file=sys.stderr)
        return exc.exit_code


def _verb(client: SupervisorClient, verb: str, argv: list[str]) -> int:
    p = _Parser(prog=f"massgen-run {verb}")
    if verb != "ps":
        p.add_argument("run")
    p.add_argument("--json", action="store_true")
    p.add_argument("-f", "--follow", action="store_true")
    args = p.parse_args(argv)
    if verb == "ps":
        _, runs = client.request("GET", "/v1/runs")
        if args.json:
            _say(json.dumps(runs, indent=2))
        else:
            _say(f"{'RUN ID':40} {'STATE':9} {'PHASE':13} {'EXIT':>4} DEPTH")
            for r in runs:
                ex = "" if r["exit_code"] is None else str(r["exit_code"])
                _say(f"{r['run_id']:40} {r['state']:9} {r['phase']!s:13} {ex:>4} {r['depth']}")
        return 0
    if verb == "status":
        _, st = client.request("GET", f"/v1/runs/{args.run}/status")
        _say(json.dumps(st, indent=2))
        return 0
    if verb == "stop":
        _, info = client.request("POST", f"/v1/runs/{args.run}/stop")
        _say(f"stopping {info['run_id']}")
        return 0
    _, info = client.request("GET", f"/v1/runs/{args.run}")

    def finished() -> bool:
        return bool(client.request("GET", f"/v1/runs/{args.run}")[1]["state"] == "finished")

    return print_log(Path(info["log_dir"]) / "massgen.log", follow=args.follow, finished=finished)


def print_log(log_file: Path, *, follow: bool, finished: Callable[[], bool], poll_s: float = 0.5) -> int:
    """Print a run's massgen.log; with `follow`, keep printing until `finished()` (then a last read)."""
    pos = 0
    while True:
        done = follow and finished()
        try:
            with open(log_file, "rb") as fh:
                fh.seek(pos)
                chunk = fh.read()
            pos += len(chunk)
            sys.stdout.write(terminal_safe(chunk.decode("utf-8", "replace")))
            sys.stdout.flush()
        except FileNotFoundError:
            pass
        if not follow or done:
            return 0
        time.sleep(poll_s)

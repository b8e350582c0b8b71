"""`massgen-run dashboard` and `massgen-run report`: argument parsing and the printed lines."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

from ._server import is_loopback

DEFAULT_PORT = 8765


def parse_hostport(value: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """`PORT`, `HOST:PORT` or `[V6]:PORT`.

    Raises:
        argparse.ArgumentTypeError: not that shape, or the port is out of range.
    """
    host, sep, port = value.rpartition(":")
    if not sep:
        host, port = default_host, value
    host = host.strip("[]") or default_host
    try:
        n = int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: expected PORT or HOST:PORT") from None
    if not 0 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r}: port must be 0-65535")
    return host, n


def warn_if_exposed(host: str) -> None:
    if not is_loopback(host):
        print(
            f"warning: the dashboard listens on {host}, beyond this host; anyone who has its token can stop runs",
            file=sys.stderr,
            flush=True,
        )


def cmd_dashboard(argv: list[str], parser_cls: type[argparse.ArgumentParser], default_root: Path) -> int:
    p = parser_cls(
        prog="massgen-run dashboard",
        description="Serve the live web dashboard over a logs root (loopback only unless --host says otherwise). "
        "Prints one line, DASHBOARD: <url with the access token>; Ctrl+C stops it.",
    )
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"TCP port (default {DEFAULT_PORT}; 0: any free)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--logs-root", type=Path, default=None, help="default ./.massgen/runs or $MASSGEN_LOGS_ROOT")
    args = p.parse_args(argv)
    if not 0 <= args.port <= 65535:
        p.error("--port must be 0-65535")
    root = (args.logs_root or default_root).absolute()
    warn_if_exposed(args.host)
    from ._control import LocalControl
    from ._server import Dashboard

    async def main() -> int:
        dash = Dashboard(lambda: [root], control=LocalControl(), host=args.host, port=args.port)
        try:
            url = await dash.start()
        except OSError as exc:
            await dash.close()
            print(
                f"massgen-run dashboard: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}",
                file=sys.stderr,
            )
            return 1
        print(f"DASHBOARD: {url}", flush=True)
        if not root.is_dir():
            print(f"massgen-run dashboard: {root} does not exist yet; runs appear when it does", file=sys.stderr)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await dash.close()
        return 0

    return asyncio.run(main())


def cmd_report(argv: list[str], parser_cls: type[argparse.ArgumentParser], find_run: object, default_root: Path) -> int:
    p = parser_cls(
        prog="massgen-run report",
        description="Write one self-contained HTML file (no network, no external assets) with a run's page.",
    )
    p.add_argument("run", help="run id (or a unique suffix) or a log dir")
    p.add_argument(
        "-o", "--output", type=Path, default=None, help="file to write (default ./<run id>.html; - for stdout)"
    )
    p.add_argument("--logs-root", type=Path, default=None)
    args = p.parse_args(argv)
    assert callable(find_run)
    log_dir = find_run(args.logs_root or default_root, args.run)
    from ._report import render_report, write_report

    if args.output is not None and str(args.output) == "-":
        sys.stdout.write(render_report(log_dir))
        return 0
    out = args.output or Path.cwd() / f"{log_dir.name}.html"
    try:
        write_report(log_dir, out.absolute())
    except OSError as exc:
        print(f"massgen-run report: cannot write {out}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(f"REPORT: {out.absolute()}")
    return 0

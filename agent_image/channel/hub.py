"""The sandbox's end of the run channel: runs the engine, serves the API socket, replays the outbox.

`python3 -m agent_image.channel.hub --outbox DIR --api-socket PATH --link-socket PATH
--deadline UNIX --grace S [--orphan-after S] [--run-id ID] -- ENGINE ARGV...`; the container's
command for runtimes that share no filesystem with the supervisor. Stdlib only: it must start
fast and never import the engine. Behaviour and limits: docs/channel.md.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Coroutine
from typing import Any

from agent_image.channel import _tar, frames
from agent_image.channel.frames import Frame, FrameError, T

POLL_S = 0.02  # how often the outbox is looked at for new bytes
EXIT_POLL_S = 0.05  # how often the engine is looked at (and zombies reaped when the hub is PID 1)
PING_S = 1.0
SILENT_S = 10.0  # a link from which nothing arrives for this long is dropped
WRITE_STALL_S = 10.0  # a link whose writes do not drain for this long is dropped
HELLO_S = 10.0  # a link must say HELLO within this
HOLD_S = 30.0  # an API connection made while no link is up waits this long for one
MAX_STREAMS = 256  # API connections held or open at once; more are closed at once
LINK_HIGH = 4 << 20  # bytes queued for the link before senders wait for it to drain
STREAM_HIGH = 1 << 20  # bytes from the host queued for one API client before the hub waits for it
STREAM_STALL_S = 5.0  # ... and how long it waits (not reading the link) before cutting that stream
KILL_AFTER_S = 10.0  # past deadline + grace + this, the hub kills the engine itself
ORPHAN_S = 600.0  # after the engine has exited, the longest wait for a BYE
MAX_LOG_BACKLOG = 100  # LOG lines kept while no link is up, sent after the next WELCOME
READ_SIZE = 256 << 10


class LinkDown(Exception):
    """The link a sender was using is gone."""


def _spawn(tasks: set[asyncio.Task[Any]], coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
    task = asyncio.get_running_loop().create_task(coro)
    tasks.add(task)
    task.add_done_callback(tasks.discard)
    return task


class Stream:
    """One API connection bridged onto a link as stream `sid`."""

    def __init__(self, sid: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.sid = sid
        self.reader = reader
        self.writer = writer
        self.over = False  # CLOSE was sent or received: nothing more goes to the host

    def close(self) -> None:
        self.over = True
        self.writer.close()


class Link:
    """One connection to the link socket that has said HELLO."""

    def __init__(self, hub: Hub, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.hub = hub
        self.reader = reader
        self.writer = writer
        self.decoder = frames.Decoder()
        self.streams: dict[int, Stream] = {}
        self.puts: dict[int, _tar.Put] = {}
        self.gets: dict[int, asyncio.Task[Any]] = {}
        self.tasks: set[asyncio.Task[Any]] = set()
        self.closed = False
        self.acked = 0
        writer.transport.set_write_buffer_limits(high=LINK_HIGH)

    async def send(self, frame: bytes) -> None:
        if self.closed:
            raise LinkDown
        self.writer.write(frame)
        try:
            async with asyncio.timeout(WRITE_STALL_S):
                await self.writer.drain()
        except TimeoutError:
            self.close(f"writes stalled for {WRITE_STALL_S:g} s")
            raise LinkDown from None
        except ConnectionError:
            self.close("connection lost")
            raise LinkDown from None

    def send_nowait(self, frame: bytes) -> None:
        """For small frames off the data path (LOG): dropped rather than queued past 2 x LINK_HIGH."""
        if not self.closed and self.writer.transport.get_write_buffer_size() < 2 * LINK_HIGH:
            self.writer.write(frame)

    def close(self, why: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.hub.link_closed(self, why)
        for stream in list(self.streams.values()):
            stream.close()
        for put in self.puts.values():
            put.abort()
        current = asyncio.current_task()
        for task in [*self.tasks, *self.gets.values()]:
            if task is not current:
                task.cancel()
        self.writer.close()


class Hub:
    def __init__(self, ns: Any, engine_argv: list[str], run_id: str) -> None:
        self.outbox = os.path.join(ns.outbox, "events.jsonl")
        self.api_socket: str = ns.api_socket
        self.link_socket: str = ns.link_socket
        self.kill_at: float = ns.deadline + ns.grace + KILL_AFTER_S
        self.orphan_after: float = ns.orphan_after
        self.argv = engine_argv
        self.run_id = run_id
        self.spec: tuple[str, bytes] | None = None
        if getattr(ns, "spec_b64", None):
            self.spec = (os.path.join(ns.outbox, "spec.json"), base64.b64decode(ns.spec_b64, validate=True))
        self.engine: subprocess.Popen[bytes] | None = None
        self.exit: dict[str, Any] | None = None
        self.link: Link | None = None
        self.link_up = asyncio.Event()
        self.api_conns = 0
        self.over_cap = 0
        self.next_sid = 1
        self.backlog: collections.deque[str] = collections.deque(maxlen=MAX_LOG_BACKLOG)
        self.tasks: set[asyncio.Task[Any]] = set()
        self.done: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    # -- lifecycle ------------------------------------------------------------------------

    async def run(self) -> int:
        for path in (self.api_socket, self.link_socket):
            os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        old_umask = os.umask(0o177)  # the sockets are 0600 from the start, not after a chmod
        try:
            api = await asyncio.start_unix_server(self.on_api, self.api_socket)
            link = await asyncio.start_unix_server(self.on_link, self.link_socket)
        finally:
            os.umask(old_umask)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.on_signal, signum)
        _spawn(self.tasks, self.backstop())
        self.log(f"listening api={self.api_socket} link={self.link_socket} pid={os.getpid()}")
        if self.spec is not None:
            # Given on the command line: the engine starts now, its start-up overlapping the
            # supervisor's link (no PUT, no START to wait for).
            _write_atomically(*self.spec)  # a few KiB on a tmpfs, before anything else happens
            self.start_engine()
        try:
            return await self.done
        finally:
            for server in (api, link):
                server.close()
            current = self.link
            if current is not None:
                # Last frames (EXIT, LOGs) get a moment to leave before the link is closed.
                try:
                    async with asyncio.timeout(1.0):
                        await current.writer.drain()
                except (TimeoutError, ConnectionError):
                    pass
                current.close("the hub is exiting")
            for task in list(self.tasks):
                task.cancel()
            for path in (self.api_socket, self.link_socket):
                with contextlib.suppress(OSError):
                    os.unlink(path)

    def finish(self, code: int) -> None:
        if not self.done.done():
            self.done.set_result(code)

    def log(self, message: str) -> None:
        print(f"massgen-hub: {message}", file=sys.stderr, flush=True)
        line = message.encode()[: frames.MAX_PAYLOAD]
        if self.link is not None and not self.link.closed:
            self.link.send_nowait(frames.encode(T.LOG, 0, line))
        else:
            self.backlog.append(message)

    def on_signal(self, signum: int) -> None:
        if self.exit is not None:
            self.finish(self.exit["exit_code"])
        elif self.engine is None:
            self.log(f"signal {signum} before START: exiting")
            self.finish(128 + signum)
        elif self.exit is None:
            self.log(f"signal {signum}: forwarded to the engine's process group")
            self.kill_group(signum)

    def kill_group(self, signum: int) -> None:
        assert self.engine is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.engine.pid, signum)

    async def backstop(self) -> None:
        await asyncio.sleep(max(0.0, self.kill_at - time.time()))
        if self.exit is not None:
            return
        if self.engine is None:
            self.log("deadline passed and the engine was never started: exiting")
            self.finish(128 + signal.SIGKILL)
        else:
            self.log("deadline + grace passed: killing the engine's process group")
            self.kill_group(signal.SIGKILL)

    # -- the engine -----------------------------------------------------------------------

    def start_engine(self) -> None:
        if self.engine is not None or self.exit is not None:
            return
        try:
            self.engine = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            self.log(f"engine did not start: {exc}")
            self.engine_exited(127, None)
            return
        self.log(f"engine started pid={self.engine.pid}")
        _spawn(self.tasks, self.watch_engine(self.engine))

    async def watch_engine(self, engine: subprocess.Popen[bytes]) -> None:
        reaper = os.getpid() == 1  # then orphans are ours to reap, or they stay zombies
        status = None
        while status is None:
            await asyncio.sleep(EXIT_POLL_S)
            if not reaper:
                status = engine.poll()
                continue
            while True:
                try:
                    pid, raw = os.waitpid(-1, os.WNOHANG)  # noqa: ASYNC222  # WNOHANG: never blocks
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                if pid == engine.pid:
                    status = engine.returncode = os.waitstatus_to_exitcode(raw)
        if status < 0:
            self.engine_exited(128 - status, -status)
        else:
            self.engine_exited(status, None)
        # Whatever the engine left in its group (agents' background commands) goes with it.
        self.kill_group(signal.SIGKILL)

    def engine_exited(self, code: int, signum: int | None) -> None:
        # The engine is gone, so its events file is complete: its size tells the supervisor how
        # many bytes to wait for before BYE (EVENTS may still be on their way behind this frame).
        self.exit = {"exit_code": code, "signal": signum, "outbox_size": self.outbox_size()}
        self.log(f"engine exited code={code} signal={signum}")
        if self.link is not None and not self.link.closed:
            self.link.send_nowait(frames.encode_json(T.EXIT, self.exit))
        _spawn(self.tasks, self.orphan_timer(code))

    async def orphan_timer(self, code: int) -> None:
        await asyncio.sleep(self.orphan_after)
        self.log(f"no BYE within {self.orphan_after:g} s of the engine's exit: exiting")
        self.finish(code)

    def state(self) -> str:
        if self.exit is not None:
            return "exited"
        return "waiting" if self.engine is None else "running"

    # -- the link -------------------------------------------------------------------------

    async def on_link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = frames.Decoder()
        hello: Frame | None = None
        try:
            async with asyncio.timeout(HELLO_S):
                while hello is None:
                    data = await reader.read(READ_SIZE)
                    if not data:
                        break
                    hello = next(iter(decoder.feed(data)), None)
        except (TimeoutError, FrameError, ConnectionError):
            pass
        problem = self.check_hello(hello)
        if problem is not None:
            print(f"massgen-hub: link refused: {problem}", file=sys.stderr, flush=True)
            try:
                writer.write(frames.encode(T.LOG, 0, f"link refused: {problem}".encode()))
                async with asyncio.timeout(1.0):
                    await writer.drain()
            except (TimeoutError, ConnectionError):
                pass
            writer.close()
            return
        assert hello is not None
        have: int = hello.json()["have"]
        if self.link is not None:
            # Before the new link is current, so its LOG waits in the backlog, after WELCOME.
            self.link.close("replaced by a new link")
        link = Link(self, reader, writer)
        link.decoder = decoder  # it may already hold the frames that followed HELLO
        self.link = link
        self.link_up.set()
        size = self.outbox_size()
        welcome = {"v": frames.VERSION, "run_id": self.run_id, "state": self.state(), "exit": self.exit}
        try:
            await link.send(frames.encode_json(T.WELCOME, {**welcome, "outbox_size": size}))
            while self.backlog:
                link.send_nowait(frames.encode(T.LOG, 0, self.backlog.popleft().encode()[: frames.MAX_PAYLOAD]))
            if have > size:
                self.log(f"HELLO have={have} is past the outbox's {size} bytes: dropping the link")
                link.close("have past the outbox")
                return
            _spawn(link.tasks, self.pump_events(link, have))
            _spawn(link.tasks, self.pinger(link))
            await self.read_link(link)
        except LinkDown:
            pass
        except FrameError as exc:
            self.log(f"protocol error from the link: {exc}")
        finally:
            link.close("link ended")

    def check_hello(self, hello: Frame | None) -> str | None:
        if hello is None:
            return "no HELLO"
        if hello.type is not T.HELLO:
            return f"first frame is {hello.type.name}, not HELLO"
        try:
            doc = hello.json()
        except FrameError as exc:
            return str(exc)
        if doc.get("v") != frames.VERSION:
            return f"version {doc.get('v')!r}, this hub speaks {frames.VERSION}"
        if doc.get("run_id") != self.run_id:
            return "wrong run id"
        have = doc.get("have")
        if not isinstance(have, int) or isinstance(have, bool) or have < 0:
            return f"bad have {have!r}"
        return None

    def link_closed(self, link: Link, why: str) -> None:
        self.log(f"link closed: {why}")
        if self.link is link:
            self.link = None
            self.link_up.clear()

    def outbox_size(self) -> int:
        try:
            return os.stat(self.outbox).st_size
        except OSError:
            return 0

    async def pump_events(self, link: Link, offset: int) -> None:
        fd: int | None = None
        try:
            while True:
                if fd is None:
                    try:
                        fd = os.open(self.outbox, os.O_RDONLY | os.O_NOFOLLOW)
                    except OSError:
                        await asyncio.sleep(POLL_S)
                        continue
                size = os.fstat(fd).st_size
                if size < offset:
                    self.log(f"the outbox shrank to {size} bytes below {offset}: dropping the link")
                    link.close("outbox shrank")
                    return
                if size == offset:
                    await asyncio.sleep(POLL_S)
                    continue
                data = os.pread(fd, min(frames.EVENTS_CHUNK, size - offset), offset)
                if not data:
                    await asyncio.sleep(POLL_S)
                    continue
                await link.send(frames.encode_offset(T.EVENTS, offset, data))
                offset += len(data)
        except LinkDown:
            pass
        finally:
            if fd is not None:
                os.close(fd)

    async def pinger(self, link: Link) -> None:
        try:
            while True:
                await link.send(frames.encode(T.PING, 0, str(time.time()).encode()))
                await asyncio.sleep(PING_S)
        except LinkDown:
            pass

    async def read_link(self, link: Link) -> None:
        for frame in link.decoder.feed(b""):
            await self.dispatch(link, frame)
        while not link.closed:
            try:
                async with asyncio.timeout(SILENT_S):
                    data = await link.reader.read(READ_SIZE)
            except TimeoutError:
                link.close(f"nothing received for {SILENT_S:g} s")
                return
            except ConnectionError:
                data = b""
            if not data:
                link.close("the link closed")
                return
            for frame in link.decoder.feed(data):
                await self.dispatch(link, frame)

    async def dispatch(self, link: Link, f: Frame) -> None:
        if f.type is T.DATA:
            if f.sid & 1:
                stream = link.streams.get(f.sid)
                if stream is not None and not stream.over:
                    await self.to_client(link, stream, f.payload)
            elif f.sid in link.puts:
                await link.puts[f.sid].feed(f.payload)
        elif f.type is T.CLOSE:
            if f.sid & 1:
                stream = link.streams.get(f.sid)
                if stream is not None:
                    stream.close()
            elif f.sid in link.puts:
                _spawn(link.tasks, self.finish_put(link, f.sid, link.puts.pop(f.sid)))
            elif f.sid in link.gets:
                link.gets.pop(f.sid).cancel()
        elif f.type is T.PING:
            await link.send(frames.encode(T.PONG, f.sid, f.payload))
        elif f.type in (T.PONG,):
            pass
        elif f.type is T.ACK:
            link.acked = f.offset()[0]
        elif f.type in (T.PUT, T.GET):
            doc = f.json()
            if f.sid == 0 or f.sid & 1 or f.sid in link.puts or f.sid in link.gets:
                raise FrameError(f"{f.type.name} on sid {f.sid}, which is not a free even sid")
            if f.type is T.PUT:
                dest, read_only = doc.get("dest"), doc.get("read_only", False)
                if not isinstance(dest, str) or not os.path.isabs(dest) or not isinstance(read_only, bool):
                    raise FrameError(f"PUT: bad payload {doc!r}")
                link.puts[f.sid] = _tar.Put(asyncio.get_running_loop(), dest, read_only)
            else:
                path, max_bytes = doc.get("path"), doc.get("max_bytes")
                if not isinstance(path, str) or not os.path.isabs(path) or not isinstance(max_bytes, int):
                    raise FrameError(f"GET: bad payload {doc!r}")
                link.gets[f.sid] = _spawn(link.tasks, self.run_get(link, f.sid, path, max_bytes))
        elif f.type is T.START:
            self.start_engine()
        elif f.type is T.SIGNAL:
            signum = f.json().get("signal")
            if not isinstance(signum, int) or signum not in signal.valid_signals():
                raise FrameError(f"SIGNAL: bad signal {signum!r}")
            if self.engine is not None and self.exit is None:
                self.kill_group(signum)
            else:
                self.log(f"SIGNAL {signum} ignored: the engine is {self.state()}")
        elif f.type is T.BYE:
            if self.exit is not None:
                self.finish(self.exit["exit_code"])
            else:
                self.log(f"BYE ignored: the engine is {self.state()}")
        else:
            raise FrameError(f"{f.type.name} is not a frame the supervisor sends")

    async def finish_put(self, link: Link, sid: int, put: _tar.Put) -> None:
        result = await put.finish()
        if result.get("refused"):
            self.log(f"PUT {sid}: {result['refused']} member(s) refused: {'; '.join(result['skipped'][:5])}")
        with contextlib.suppress(LinkDown):
            await link.send(frames.encode_json(T.DONE, result, sid))

    async def run_get(self, link: Link, sid: int, path: str, max_bytes: int) -> None:
        get = _tar.Get(asyncio.get_running_loop(), path)
        sent = 0
        try:
            while True:
                item = await get.next()
                if isinstance(item, dict):
                    result = {**item, "bytes": sent} if item["ok"] else item
                    break
                if sent + len(item) > max_bytes:
                    result = {"ok": False, "error": f"over max_bytes ({max_bytes})"}
                    break
                await link.send(frames.encode(T.DATA, sid, item))
                sent += len(item)
            await link.send(frames.encode_json(T.DONE, result, sid))
        except LinkDown:
            pass
        finally:
            get.abort()
            link.gets.pop(sid, None)

    # -- API connections ------------------------------------------------------------------

    async def on_api(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.api_conns >= MAX_STREAMS:
            writer.transport.abort()
            self.over_cap += 1
            if self.over_cap in (1, 10, 100) or self.over_cap % 1000 == 0:
                self.log(f"API connections over {MAX_STREAMS}: refused {self.over_cap} so far")
            return
        self.api_conns += 1
        try:
            link = await self.wait_link()
            if link is None:
                self.log(f"API connection closed: no link within {HOLD_S:g} s")
                return
            await self.bridge(link, reader, writer)
        finally:
            self.api_conns -= 1
            writer.close()

    async def wait_link(self) -> Link | None:
        try:
            async with asyncio.timeout(HOLD_S):
                while self.link is None or self.link.closed:
                    await self.link_up.wait()
        except TimeoutError:
            return None
        return self.link

    async def bridge(self, link: Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sid = self.next_sid
        while sid in link.streams:
            sid = (sid + 2) & 0xFFFFFFFF
        self.next_sid = (sid + 2) & 0xFFFFFFFF
        stream = Stream(sid, reader, writer)
        writer.transport.set_write_buffer_limits(high=STREAM_HIGH)
        link.streams[sid] = stream
        try:
            await link.send(frames.encode(T.OPEN, sid))
            while not stream.over:
                try:
                    data = await reader.read(frames.DATA_CHUNK)
                except ConnectionError:
                    data = b""
                if stream.over:
                    break
                if not data:
                    # No half-close: a client's EOF ends the stream both ways (docs/channel.md).
                    stream.over = True
                    await link.send(frames.encode(T.CLOSE, sid))
                    break
                await link.send(frames.encode(T.DATA, sid, data))
        except LinkDown:
            pass
        finally:
            stream.close()
            if link.streams.get(sid) is stream:
                del link.streams[sid]

    async def to_client(self, link: Link, stream: Stream, data: bytes) -> None:
        if stream.writer.is_closing():
            return
        stream.writer.write(data)
        try:
            # Waiting here stops the hub reading the link (every stream and transfer waits), so
            # the wait is short: a client that does not read is cut, the others resume.
            async with asyncio.timeout(STREAM_STALL_S):
                await stream.writer.drain()
        except (TimeoutError, ConnectionError):
            if not stream.over:
                stream.close()
                self.log(f"API stream {stream.sid} cut: its client does not read")
                await link.send(frames.encode(T.CLOSE, stream.sid))


def _write_atomically(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def _parse(argv: list[str]) -> tuple[Any, list[str]]:
    import argparse

    if "--" not in argv or argv.index("--") == len(argv) - 1:
        sys.exit("massgen-hub: usage: ... -- ENGINE ARGV... (the engine's command is missing)")
    cut = argv.index("--")
    parser = argparse.ArgumentParser(prog="python3 -m agent_image.channel.hub")
    parser.add_argument("--outbox", required=True, help="the folder whose events.jsonl is replayed")
    parser.add_argument("--api-socket", required=True)
    parser.add_argument("--link-socket", required=True)
    parser.add_argument("--deadline", type=float, required=True, help="the run's deadline, UNIX seconds")
    parser.add_argument("--grace", type=float, required=True, help="seconds past the deadline the engine gets")
    parser.add_argument("--orphan-after", type=float, default=ORPHAN_S)
    parser.add_argument(
        "--spec-b64",
        default=None,
        help="the run's spec.json, base64: written to the outbox and the engine started at once (no START)",
    )
    parser.add_argument("--run-id", default=os.environ.get("MASSGEN_RUN_ID"))
    ns = parser.parse_args(argv[:cut])
    if ns.spec_b64 is not None:
        try:
            base64.b64decode(ns.spec_b64, validate=True)
        except (binascii.Error, ValueError) as exc:
            parser.error(f"--spec-b64 is not base64: {exc}")
    if not ns.run_id:
        parser.error("--run-id or MASSGEN_RUN_ID is required (HELLO is checked against it)")
    return ns, argv[cut + 1 :]


def main(argv: list[str] | None = None) -> int:
    ns, engine = _parse(sys.argv[1:] if argv is None else argv)

    async def amain() -> int:
        return await Hub(ns, engine, ns.run_id).run()

    return asyncio.run(amain())


if __name__ == "__main__":
    sys.exit(main())

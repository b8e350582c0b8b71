"""One run's channel, seen from the supervisor (docs/channel.md).

A link is a blocking `ByteStream` (the runtime's exec stream) served by two threads: a reader
that decodes frames and hands them to the event loop, and a writer that drains a queue. Data
producers that are threads (tar streams) wait on a byte budget, so a fast producer cannot queue
without bound; the event loop itself never blocks on the link.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import queue
import tarfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent_image.channel.frames import (
    DATA_CHUNK,
    VERSION,
    Decoder,
    Frame,
    FrameError,
    T,
    encode,
    encode_json,
    encode_offset,
)

from ..runtime.base import ByteStream
from .untar import extract_untrusted

log = logging.getLogger(__name__)

PING_S = 1.0
SILENT_S = 10.0  # a link that sends nothing (not even PONG) for this long is dropped and redialled
REDIAL_MIN_S = 0.2
REDIAL_MAX_S = 2.0
WRITE_BUDGET = 4 << 20  # bytes of DATA queued by producer threads before they wait
READ_CHUNK = 256 << 10
# What the sandbox may make us hold (its frames are untrusted): frames read but not yet handled
# on the event loop (the reader thread waits past it), bytes queued for one API stream whose
# host side does not read, and for all of them (the stream is cut past either), and API streams
# at once.
PENDING_BYTES = 8 << 20
STREAM_QUEUE_BYTES = 4 << 20
STREAMS_QUEUE_BYTES = 16 << 20  # the same for all of a run's streams together
MAX_STREAMS = 256


SANDBOX_TEXT = 2000  # characters of one sandbox-chosen text that reach massgen.log


def _clip(text: str | None) -> str:
    text = text or ""
    return text if len(text) <= SANDBOX_TEXT else text[:SANDBOX_TEXT] + f"... ({len(text)} characters)"


class ChannelLost(ConnectionError):
    """The link went down while an operation needed it."""


class TransferError(RuntimeError):
    """The sandbox refused or failed a file transfer (its DONE said why)."""


class _Link:
    """One connected ByteStream: reader and writer threads around it."""

    def __init__(self, stream: ByteStream, loop: asyncio.AbstractEventLoop, on_frame: Callable[[Frame], None]) -> None:
        self.stream = stream
        self.loop = loop
        self.on_frame = on_frame
        self.closed = asyncio.Event()
        self.last_rx = time.monotonic()
        self.error: str | None = None
        self._q: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._budget = threading.Condition()
        self._queued = 0
        self._dead = False
        self._pending = 0  # bytes of frames handed to the loop and not yet handled
        self._pending_cv = threading.Condition()

    def start(self) -> None:
        threading.Thread(target=self._read, name="channel-read", daemon=True).start()
        threading.Thread(target=self._write, name="channel-write", daemon=True).start()

    def send(self, frame: bytes) -> None:
        """Queue a frame (never blocks; from the event loop)."""
        if not self._dead:
            self._q.put(frame)

    def send_data_blocking(self, frame: bytes) -> None:
        """Queue a DATA frame from a producer thread, waiting while too much is queued.

        Raises:
            ChannelLost: the link died.
        """
        with self._budget:
            while self._queued > WRITE_BUDGET and not self._dead:
                self._budget.wait(0.5)
            if self._dead:
                raise ChannelLost("the link went down")
            self._queued += len(frame)
        self._q.put(frame)

    def close(self, why: str | None = None) -> None:
        if why and self.error is None:
            self.error = why
        self._dead = True
        self._q.put(None)
        with self._budget:
            self._budget.notify_all()
        with self._pending_cv:
            self._pending_cv.notify_all()
        self.stream.close()
        self.loop.call_soon_threadsafe(self.closed.set)

    def _read(self) -> None:
        dec = Decoder()
        try:
            while True:
                data = self.stream.read(READ_CHUNK)
                if not data:
                    break
                self.last_rx = time.monotonic()
                for frame in dec.feed(data):
                    with self._pending_cv:
                        # Backpressure: a sandbox sending faster than the loop handles its
                        # frames is read no faster (memory stays bounded).
                        while self._pending > PENDING_BYTES and not self._dead:
                            self._pending_cv.wait(0.5)
                            self.last_rx = time.monotonic()  # we are slow, the link is not silent
                        self._pending += len(frame.payload) + 9
                    self.loop.call_soon_threadsafe(self._handle, frame)
        except FrameError as exc:
            self.error = f"protocol error: {exc}"
        except (OSError, ValueError) as exc:
            self.error = f"read failed: {exc}"
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            self.loop.call_soon_threadsafe(self.close, self.error or "the sandbox closed the link")

    def hold(self, n: int) -> None:
        """Count `n` bytes of a handled frame as pending again, until `release` (a GET's data
        waiting for its extracting thread: the reader stops reading past PENDING_BYTES)."""
        with self._pending_cv:
            self._pending += n

    def release(self, n: int) -> None:
        """`n` held bytes are consumed (any thread)."""
        with self._pending_cv:
            self._pending -= n
            self._pending_cv.notify_all()

    def _handle(self, frame: Frame) -> None:
        with self._pending_cv:
            self._pending -= len(frame.payload) + 9
            self._pending_cv.notify_all()
        if not self._dead:
            self.on_frame(frame)

    def _write(self) -> None:
        while True:
            frame = self._q.get()
            if frame is None:
                return
            try:
                self.stream.write(frame)
            except (OSError, ValueError) as exc:
                with contextlib.suppress(RuntimeError):
                    self.loop.call_soon_threadsafe(self.close, f"write failed: {exc}")
                return
            finally:
                if frame[0] == T.DATA:
                    with self._budget:
                        self._queued = max(0, self._queued - len(frame))
                        self._budget.notify_all()


@dataclass
class _Transfer:
    sid: int
    done: asyncio.Future[dict[str, Any]]
    sink: queue.SimpleQueue[bytes | None] | None = None  # GET: bytes for the extracting thread
    received: int = 0
    max_bytes: int = 0
    link: _Link | None = None  # a GET's: holds the bytes in `sink` as pending on it
    finished: bool = False  # a GET's extraction is over: its further data is dropped


class _QueueReader:
    """What the extracting thread reads (`read`, `count`), fed from the event loop's DATA frames."""

    def __init__(self, q: queue.SimpleQueue[bytes | None], release: Callable[[int], None]) -> None:
        self._q = q
        self._release = release
        self._buf = b""
        self._eof = False
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        while not self._buf and not self._eof:
            chunk = self._q.get()
            if chunk is None:
                self._eof = True
            else:
                self._release(len(chunk))
                self._buf = chunk
        if n < 0:
            n = len(self._buf)
        out, self._buf = self._buf[:n], self._buf[n:]
        self.count += len(out)
        return out


class _DataWriter(io.RawIOBase):
    """A file the tarring thread writes; each chunk becomes DATA frames on one sid."""

    def __init__(self, link: _Link, sid: int) -> None:
        self._link = link
        self._sid = sid
        self.sent = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        data = bytes(b)
        for i in range(0, len(data), DATA_CHUNK):
            self._link.send_data_blocking(encode(T.DATA, self._sid, data[i : i + DATA_CHUNK]))
        self.sent += len(data)
        return len(data)


@dataclass
class _ApiStream:
    sid: int
    inbox: asyncio.Queue[bytes | None] = field(default_factory=asyncio.Queue)
    task: asyncio.Task[None] | None = None
    queued: int = 0  # bytes in `inbox`


class ChannelSession:
    """A run's channel: keeps a link up and does what the lifecycle asks through it.

    `open_link` (blocking, run in a thread) dials a new link; `mirror` is the host copy of the
    sandbox's events file (appended byte for byte, its size is what HELLO says we have);
    `api_socket` is the run's own host socket that the sandbox's API connections reach.
    """

    def __init__(
        self,
        run_id: str,
        open_link: Callable[[], ByteStream],
        mirror: Path,
        api_socket: Path | None,
        note: Callable[..., None] | None = None,
        max_mirror_bytes: int | None = None,
    ) -> None:
        self.run_id = run_id
        self._open_link = open_link
        self.mirror = mirror
        self.api_socket = api_socket
        # note(message, level, sandbox=...): `sandbox` marks text the sandbox chose (massgen.log
        # caps it in all, Materializer.log); each such text is cut to SANDBOX_TEXT characters here.
        self._note = note or (lambda msg, level, **_: log.log(logging.getLevelName(level.upper()), "%s", msg))
        self._max_mirror = max_mirror_bytes
        self._fd = os.open(mirror, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        self.have = os.fstat(self._fd).st_size
        self.welcome: dict[str, Any] | None = None
        self.exit: dict[str, Any] | None = None  # the engine's EXIT, once known
        self.outbox_size_at_exit: int | None = None
        self.connected = asyncio.Event()  # a link is up and has said WELCOME
        self.exited = asyncio.Event()  # the engine has exited (EXIT received)
        self.links = 0  # how many links were made (1 + redials)
        self.rx_events_bytes = 0
        self._link: _Link | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._next_sid = 2
        self._transfers: dict[int, _Transfer] = {}
        self._streams: dict[int, _ApiStream] = {}
        self._grew = asyncio.Event()
        self._truncated = False
        self._bye = False  # BYE sent: the hub exits and closes the link; nothing to redial

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start dialling (and redialling) in the background."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"channel-{self.run_id}")

    async def wait_connected(self, timeout: float) -> None:
        """Until a link has said WELCOME.

        Raises:
            ChannelLost: none came within `timeout` seconds.
        """
        try:
            async with asyncio.timeout(timeout):
                await self.connected.wait()
        except TimeoutError:
            raise ChannelLost(f"no link to the sandbox within {timeout:g}s") from None

    async def close(self) -> None:
        """Drop the link and stop redialling (the sandbox keeps running)."""
        self._closing = True
        if self._link is not None:
            self._link.close("closed by the supervisor")
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        for st in list(self._streams.values()):
            if st.task is not None:
                st.task.cancel()
        self._fail_transfers("the channel was closed")
        with contextlib.suppress(OSError):
            os.close(self._fd)

    async def _run(self) -> None:
        backoff = REDIAL_MIN_S
        while not self._closing:
            try:
                stream = await asyncio.to_thread(self._open_link)
            except Exception as exc:  # noqa: BLE001 - any failure to dial is retried, and said once per kind
                self._note(f"channel: dialling the sandbox failed ({exc}); retrying", "warning")
                await asyncio.sleep(backoff)
                backoff = min(REDIAL_MAX_S, backoff * 2)
                continue
            link = self._link = _Link(stream, asyncio.get_running_loop(), self._on_frame)
            self.links += 1
            link.start()
            link.send(encode_json(T.HELLO, {"v": VERSION, "run_id": self.run_id, "have": self.have}))
            pinger = asyncio.create_task(self._ping(link))
            try:
                await link.closed.wait()
            finally:
                pinger.cancel()
                self.connected.clear()
                self._link = None
                self._drop_streams()
                self._fail_transfers(f"the link went down ({link.error})")
            if self._closing or self._bye:
                return
            if self.welcome is not None:
                self._note(f"channel: link lost ({_clip(link.error)}); redialling", "warning", sandbox=True)
            backoff = REDIAL_MIN_S
            await asyncio.sleep(REDIAL_MIN_S)

    async def _ping(self, link: _Link) -> None:
        while not link.closed.is_set():
            await asyncio.sleep(PING_S)
            if time.monotonic() - link.last_rx > SILENT_S:
                link.close(f"nothing heard for {SILENT_S:g}s")
                return
            link.send(encode(T.PING, 0, b""))

    # -- frames ---------------------------------------------------------------------------------

    def _on_frame(self, frame: Frame) -> None:
        link = self._link
        if link is None:
            return
        try:
            self._dispatch(link, frame)
        except FrameError as exc:
            link.close(f"protocol error: {exc}")

    def _dispatch(self, link: _Link, frame: Frame) -> None:
        t = frame.type
        if t == T.EVENTS:
            offset, data = frame.offset()
            if offset != self.have:
                raise FrameError(f"EVENTS at offset {offset}, the mirror holds {self.have}")
            self._append(data)
            link.send(encode_offset(T.ACK, self.have))
        elif t == T.WELCOME:
            doc = frame.json()
            if doc.get("v") != VERSION or doc.get("run_id") != self.run_id:
                raise FrameError(f"WELCOME from another run or version: {doc.get('run_id')!r} v{doc.get('v')!r}")
            self.welcome = doc
            if isinstance(doc.get("exit"), dict):
                self._exited(doc["exit"])
            self.connected.set()
        elif t == T.EXIT:
            self._exited(frame.json())
        elif t == T.PING:
            link.send(encode(T.PONG, 0, frame.payload))
        elif t == T.LOG:
            self._note(f"sandbox hub: {_clip(frame.payload.decode('utf-8', 'replace'))}", "info", sandbox=True)
        elif t == T.OPEN:
            self._open_stream(link, frame.sid)
        elif t == T.DATA:
            self._data(frame)
        elif t == T.CLOSE:
            self._close(frame.sid)
        elif t == T.DONE:
            tr = self._transfers.pop(frame.sid, None)
            if tr is not None:
                if tr.sink is not None:
                    tr.sink.put(None)
                if not tr.done.done():
                    tr.done.set_result(frame.json())
        elif t != T.PONG:
            raise FrameError(f"unexpected {t.name} from the sandbox")

    def _exited(self, doc: dict[str, Any]) -> None:
        if self.exit is None:
            self.exit = doc
            size = doc.get("outbox_size")
            self.outbox_size_at_exit = size if isinstance(size, int) else None
            self.exited.set()

    def _append(self, data: bytes) -> None:
        if self._max_mirror is not None and self.have + len(data) > self._max_mirror:
            # A flood: the lifecycle stops the sandbox on the mirror's size; keep no more than
            # the cap (plus this frame) and stay in step with the offsets.
            if self._truncated:
                self.have += len(data)
                return
            self._truncated = True
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        self.have += len(data)
        self.rx_events_bytes += len(data)
        self._grew.set()

    async def wait_events(self, size: int, timeout: float) -> bool:
        """Until the mirror holds `size` bytes (True) or `timeout` passes (False)."""
        end = time.monotonic() + timeout
        while self.have < size:
            left = end - time.monotonic()
            if left <= 0:
                return False
            self._grew.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, 0.5)):
                    await self._grew.wait()
        return True

    # -- API streams: the sandbox's connections to its own socket -----------------------------

    def _open_stream(self, link: _Link, sid: int) -> None:
        if sid % 2 == 0 or sid in self._streams:
            raise FrameError(f"OPEN of stream {sid}")
        if len(self._streams) >= MAX_STREAMS:
            link.send(encode(T.CLOSE, sid))  # the hub caps them too; past it, refused here
            return
        st = _ApiStream(sid)
        self._streams[sid] = st
        st.task = asyncio.create_task(self._bridge(link, st))

    async def _bridge(self, link: _Link, st: _ApiStream) -> None:
        writer: asyncio.StreamWriter | None = None
        try:
            if self.api_socket is None:
                return
            reader, writer = await asyncio.open_unix_connection(str(self.api_socket))

            async def up() -> None:
                while (chunk := await st.inbox.get()) is not None:
                    st.queued -= len(chunk)
                    writer.write(chunk)
                    await writer.drain()
                with contextlib.suppress(OSError):
                    writer.write_eof()

            upward = asyncio.create_task(up())
            try:
                while chunk := await reader.read(DATA_CHUNK):
                    link.send(encode(T.DATA, st.sid, chunk))
            finally:
                upward.cancel()
        except OSError as exc:
            log.info("run_id=%s channel stream %d: %s", self.run_id, st.sid, exc)
        finally:
            if writer is not None:
                writer.close()
            if self._streams.pop(st.sid, None) is not None:
                link.send(encode(T.CLOSE, st.sid))

    def _data(self, frame: Frame) -> None:
        st = self._streams.get(frame.sid)
        if st is not None:
            st.queued += len(frame.payload)
            if st.queued > STREAM_QUEUE_BYTES or sum(s.queued for s in self._streams.values()) > STREAMS_QUEUE_BYTES:
                # The host side does not take it (a stalled request): cut the stream, not memory.
                self._streams.pop(frame.sid, None)
                if st.task is not None:
                    st.task.cancel()
                if self._link is not None:
                    self._link.send(encode(T.CLOSE, frame.sid))
                return
            st.inbox.put_nowait(frame.payload)
            return
        tr = self._transfers.get(frame.sid)
        if tr is not None and tr.sink is not None:
            tr.received += len(frame.payload)
            if tr.received > tr.max_bytes:
                # The sandbox sends more than it was asked for: stop reading it.
                self._transfers.pop(frame.sid, None)
                tr.sink.put(None)
                if not tr.done.done():
                    tr.done.set_exception(TransferError(f"the sandbox sent more than {tr.max_bytes} bytes"))
                return
            if tr.finished or tr.link is None:
                return
            tr.link.hold(len(frame.payload))
            tr.sink.put(frame.payload)

    def _close(self, sid: int) -> None:
        st = self._streams.get(sid)
        if st is not None:
            st.inbox.put_nowait(None)

    def _drop_streams(self) -> None:
        for st in list(self._streams.values()):
            if st.task is not None:
                st.task.cancel()
        self._streams.clear()

    # -- control --------------------------------------------------------------------------------

    def _require_link(self) -> _Link:
        link = self._link
        if link is None or not self.connected.is_set():
            raise ChannelLost("no link to the sandbox")
        return link

    def start_engine(self) -> None:
        """START (the hub ignores it once the engine runs).

        Raises:
            ChannelLost: no link.
        """
        self._require_link().send(encode(T.START))

    def signal(self, signum: int) -> bool:
        """Deliver `signum` to the engine's process group; False when there is no link."""
        link = self._link
        if link is None or not self.connected.is_set():
            return False
        link.send(encode_json(T.SIGNAL, {"signal": signum}))
        return True

    def bye(self) -> bool:
        """Tell the hub we have everything; False when there is no link."""
        link = self._link
        if link is None or not self.connected.is_set():
            return False
        self._bye = True
        link.send(encode(T.BYE))
        return True

    # -- files ------------------------------------------------------------------------------------

    def _sid(self) -> int:
        sid = self._next_sid
        self._next_sid += 2
        return sid

    async def put_tree(
        self, dest: str, *, source: Path | None = None, files: dict[str, bytes] | None = None, read_only: bool = False
    ) -> int:
        """Copy a host folder (or named in-memory files) into the sandbox at `dest`; bytes sent.

        Raises:
            ChannelLost: the link went down (nothing is retried: the caller decides).
            TransferError: the sandbox refused it.
        """
        link = self._require_link()
        sid = self._sid()
        done: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._transfers[sid] = _Transfer(sid, done)
        link.send(encode_json(T.PUT, {"dest": dest, "read_only": read_only}, sid))
        writer = _DataWriter(link, sid)

        def produce() -> None:
            with tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                if source is not None:
                    for entry in sorted(os.listdir(source)):
                        tar.add(source / entry, arcname=entry, recursive=True)
                for name, data in (files or {}).items():
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    info.mode = 0o644
                    info.mtime = int(time.time())
                    tar.addfile(info, io.BytesIO(data))

        try:
            await asyncio.to_thread(produce)
        except ChannelLost:
            self._transfers.pop(sid, None)
            raise
        link.send(encode(T.CLOSE, sid))
        doc = await done
        if not doc.get("ok"):
            raise TransferError(f"putting {dest} into the sandbox: {doc.get('error')}")
        return writer.sent

    async def get_tree(self, path: str, dest: Path, max_bytes: int, max_entries: int | None = None) -> int:
        """Copy the sandbox's folder `path` into the host folder `dest`; tar bytes received.

        What the sandbox sends is untrusted: extraction uses tarfile's `data` filter (no
        absolute paths, no `..`, no links leaving `dest`, no devices, no setuid bits), and
        writes nothing through a symlink (`untar.extract_untrusted`).

        Raises:
            ChannelLost: the link went down.
            TransferError: the sandbox refused it, or sent more than `max_bytes` (or
                `max_entries` members).
        """
        link = self._require_link()
        sid = self._sid()
        done: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        sink: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        tr = _Transfer(sid, done, sink=sink, max_bytes=max_bytes, link=link)
        self._transfers[sid] = tr
        await asyncio.to_thread(dest.mkdir, parents=True, exist_ok=True)

        def release_left() -> None:
            with contextlib.suppress(queue.Empty):
                while True:
                    chunk = sink.get_nowait()
                    if chunk is not None:
                        link.release(len(chunk))

        def extract() -> None:
            # The data filter's rules on any Python 3.11, and no write through a symlink whatever
            # the host's realpath does (untar.py).
            try:
                doc = extract_untrusted(_QueueReader(sink, link.release), str(dest), max_entries)
            finally:
                tr.finished = True
                release_left()
            if doc["refused"]:
                why = _clip(str(doc["skipped"][:3]))
                self._note(f"refused {doc['refused']} member(s) from the sandbox: {why}", "warning", sandbox=True)

        extracting = asyncio.ensure_future(asyncio.to_thread(extract))
        link.send(encode_json(T.GET, {"path": path, "max_bytes": max_bytes}, sid))
        try:
            either: list[asyncio.Future[Any]] = [done, extracting]
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if not done.done() and extracting.done() and extracting.exception() is not None:
                # Our side gave up (too many entries, a broken tar): cancel the GET, not wait for all of it.
                self._transfers.pop(sid, None)
                link.send(encode(T.CLOSE, sid))
                exc = extracting.exception()
                raise TransferError(f"extracting {path} from the sandbox: {exc}") from exc
            doc = await done
        except BaseException:
            sink.put(None)
            with contextlib.suppress(Exception):
                await extracting
            raise
        try:
            await extracting
        except (tarfile.TarError, OSError) as exc:
            if not doc.get("ok"):  # the sandbox's reason, not what its missing tar did to ours
                raise TransferError(f"getting {path} from the sandbox: {doc.get('error')}") from exc
            raise TransferError(f"extracting {path} from the sandbox: {exc}") from exc
        finally:
            release_left()  # a chunk the loop queued as the thread finished
        if not doc.get("ok"):
            raise TransferError(f"getting {path} from the sandbox: {doc.get('error')}")
        return tr.received

    def _fail_transfers(self, why: str) -> None:
        for tr in list(self._transfers.values()):
            if tr.sink is not None:
                tr.sink.put(None)
            if not tr.done.done():
                tr.done.set_exception(ChannelLost(why))
        self._transfers.clear()

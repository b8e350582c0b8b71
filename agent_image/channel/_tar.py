"""Tar streams into and out of the sandbox's folders for the channel's PUT and GET (stdlib only).

tarfile is blocking, so each transfer runs in its own daemon thread and meets the event loop
through a `_Pipe` of at most `PIPE_CHUNKS` chunks: neither side ever holds a whole tar in
memory, and a stalled side stalls the other instead of growing a buffer.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
import queue
import stat
import tarfile
import threading
from typing import Any

from agent_image.channel.frames import DATA_CHUNK

PIPE_CHUNKS = 16  # chunks (DATA frames) queued between the loop and a transfer's thread
THREAD_POLL_S = 0.5  # how often a blocked transfer thread looks whether it was aborted
MAX_SKIPPED = 100  # names of refused members reported in a PUT's DONE
# The image's Python is Debian's 3.11.2, older than tarfile's filters (3.11.4): there the hub
# applies its own copy of the `data` filter's rules (_data_filter_compat).
HAS_DATA_FILTER = hasattr(tarfile, "data_filter")
_TRUSTED: dict[str, Any] = {"filter": "fully_trusted"} if HAS_DATA_FILTER else {}


class Aborted(Exception):
    """The loop gave up on this transfer (the link went away, or the supervisor closed it)."""


class Refused(Exception):
    """A tar member the `data` filter does not let in (absolute, `..`, links out, devices)."""


class _Pipe:
    """A bounded queue between the event loop (async side) and one transfer thread (blocking side)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._q: queue.Queue[Any] = queue.Queue(PIPE_CHUNKS)
        self._loop = loop
        self._wake = asyncio.Event()
        self.aborted = False

    def _notify(self) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
            self._loop.call_soon_threadsafe(self._wake.set)

    async def put(self, item: Any) -> None:
        while not self.aborted:
            try:
                self._q.put_nowait(item)
                return
            except queue.Full:
                # Cleared then re-checked synchronously: a get() by the thread after the check
                # schedules _notify, which runs after we start waiting.
                self._wake.clear()
                if self._q.full():
                    await self._wake.wait()

    async def get(self) -> Any:
        while True:
            try:
                return self._q.get_nowait()
            except queue.Empty:
                self._wake.clear()
                if self._q.empty():
                    await self._wake.wait()

    def put_blocking(self, item: Any) -> None:
        while True:
            if self.aborted:
                raise Aborted
            try:
                self._q.put(item, timeout=THREAD_POLL_S)
                break
            except queue.Full:
                continue
        self._notify()

    def get_blocking(self) -> Any:
        while True:
            if self.aborted:
                raise Aborted
            try:
                item = self._q.get(timeout=THREAD_POLL_S)
                break
            except queue.Empty:
                continue
        self._notify()
        return item

    def abort(self) -> None:
        self.aborted = True
        self._wake.set()


class _Reader:
    """The file object tarfile reads a PUT's stream from (chunks from the pipe; None ends it)."""

    def __init__(self, pipe: _Pipe) -> None:
        self._pipe = pipe
        self._buf = memoryview(b"")
        self._eof = False
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        while not self._buf:
            if self._eof:
                return b""
            item = self._pipe.get_blocking()
            if item is None:
                self._eof = True
                return b""
            self._buf = memoryview(item)
            self.count += len(item)
        n = len(self._buf) if n < 0 else n
        out, self._buf = self._buf[:n], self._buf[n:]
        return out.tobytes()

    def drain(self) -> None:
        """Consume the rest of the stream, so the loop's put() never waits on a thread that is done."""
        while self.read(DATA_CHUNK):
            pass


class _Writer:
    """The file object tarfile writes a GET's stream to (DATA_CHUNK-sized chunks into the pipe)."""

    def __init__(self, pipe: _Pipe) -> None:
        self._pipe = pipe
        self._buf = bytearray()

    def write(self, data: bytes) -> int:
        self._buf += data
        while len(self._buf) >= DATA_CHUNK:
            self._pipe.put_blocking(bytes(self._buf[:DATA_CHUNK]))
            del self._buf[:DATA_CHUNK]
        return len(data)

    def flush(self) -> None:
        if self._buf:
            self._pipe.put_blocking(bytes(self._buf))
            self._buf.clear()


def _inside(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def _data_filter_compat(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    """tarfile.data_filter's rules (Python 3.12 docs, "Default named filters"), for Pythons without it."""
    name = member.name.lstrip("/")
    if os.path.isabs(name):
        raise Refused("absolute path")
    dest = os.path.realpath(dest)
    target = os.path.realpath(os.path.join(dest, name))
    if not _inside(target, dest):
        raise Refused("outside the destination")
    mode: int | None = member.mode & 0o755
    if member.isreg() or member.islnk():
        assert mode is not None
        if not mode & 0o100:
            mode &= ~0o111
        mode |= 0o600
    elif member.isdir() or member.issym():
        mode = None
    else:
        raise Refused("not a regular file, directory or link")
    if member.islnk() or member.issym():
        if os.path.isabs(member.linkname):
            raise Refused("link to an absolute path")
        base = os.path.join(dest, os.path.dirname(name)) if member.issym() else dest
        if not _inside(os.path.realpath(os.path.join(base, member.linkname)), dest):
            raise Refused("link outside the destination")
    safe = copy.copy(member)
    safe.name = name
    # No owner changes (-1 keeps chown a no-op even when the hub runs as root); directories and
    # symlinks keep the mode they are created with.
    safe.uid = safe.gid = -1
    safe.uname = safe.gname = ""
    safe.mode = 0o755 if mode is None else mode
    return safe


def check_member(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    """The member as it may be extracted into `dest` under the `data` filter's rules.

    Raises:
        Refused: it may not be.
    """
    if not HAS_DATA_FILTER:
        return _data_filter_compat(member, dest)
    try:
        return tarfile.data_filter(member, dest)
    except tarfile.FilterError as exc:
        raise Refused(str(exc)) from None


def make_read_only(root: str) -> None:
    """chmod a-w everything under `root`, and `root` itself when the sandbox's user owns it
    (symlinks are left alone). A mount point owned by root is left as it is: only its owner may
    chmod it, and a Kubernetes emptyDir is root's (mode 0777, group fsGroup) while the hub runs
    as the sandbox's user."""
    for parent, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            path = os.path.join(parent, name)
            st = os.lstat(path)
            if not stat.S_ISLNK(st.st_mode):
                os.chmod(path, stat.S_IMODE(st.st_mode) & ~0o222)
    st = os.stat(root)
    if st.st_uid == os.getuid():
        os.chmod(root, stat.S_IMODE(st.st_mode) & ~0o222)


def _extract(reader: _Reader, dest: str, read_only: bool) -> dict[str, Any]:
    skipped: list[str] = []
    refused = 0
    os.makedirs(dest, exist_ok=True)
    with tarfile.open(fileobj=reader, mode="r|*") as tf:  # type: ignore[call-overload]  # any object with read()
        for member in tf:
            try:
                safe = check_member(member, dest)
            except Refused as exc:
                refused += 1
                if len(skipped) < MAX_SKIPPED:
                    skipped.append(f"{member.name}: {exc}")
                continue
            if safe.isdir():
                # Made here rather than by tarfile, so a read-only mode in the tar never keeps
                # the folder's own members out (extractall defers directory modes for that).
                os.makedirs(os.path.join(dest, safe.name), exist_ok=True)
                continue
            tf.extract(safe, dest, set_attrs=True, **_TRUSTED)
    if read_only:
        make_read_only(dest)
    return {"ok": True, "bytes": reader.count, "skipped": skipped, "refused": refused}


def extract_stream(reader: Any, dest: str, *, read_only: bool = False) -> dict[str, Any]:
    """Extract a tar read from `reader` (`read(n)` and a `count` of bytes read) into `dest`
    under the `data` filter's rules, on any Python 3.11 (the supervisor's side uses it too).

    Returns DONE's document: ok, bytes, refused and the first skipped members.
    """
    return _extract(reader, dest, read_only)


def _archive(writer: _Writer, path: str) -> None:
    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        # Devices and fifos are left out (sockets tarfile skips itself); symlinks are stored as
        # links (tarfile lstat()s by default), never followed.
        return None if info.isdev() else info

    with tarfile.open(fileobj=writer, mode="w|") as tf:  # type: ignore[call-overload]  # any object with write()
        if os.path.isdir(path) and not os.path.islink(path):
            for name in sorted(os.listdir(path)):
                tf.add(os.path.join(path, name), arcname=name, filter=keep)
        else:
            tf.add(path, arcname=os.path.basename(path), filter=keep)
    writer.flush()


class Put:
    """One PUT: a thread extracting the tar the loop feeds it, chunk by chunk."""

    def __init__(self, loop: asyncio.AbstractEventLoop, dest: str, read_only: bool) -> None:
        self._loop = loop
        self._pipe = _Pipe(loop)
        self._done: asyncio.Future[dict[str, Any]] = loop.create_future()
        self._thread = threading.Thread(target=self._run, args=(dest, read_only), daemon=True, name="hub-put")
        self._thread.start()

    def _run(self, dest: str, read_only: bool) -> None:
        reader = _Reader(self._pipe)
        result: dict[str, Any]
        try:
            result = _extract(reader, dest, read_only)
        except Aborted:
            return
        except (tarfile.TarError, OSError, ValueError, EOFError) as exc:
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        try:
            reader.drain()
        except Aborted:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed
            self._loop.call_soon_threadsafe(self._resolve, result)

    def _resolve(self, result: dict[str, Any]) -> None:
        if not self._done.done():
            self._done.set_result(result)

    async def feed(self, data: bytes) -> None:
        """The next bytes of the tar (waits while the thread is PIPE_CHUNKS behind)."""
        await self._pipe.put(data)

    async def finish(self) -> dict[str, Any]:
        """The stream is over: the DONE payload once the extraction has finished."""
        await self._pipe.put(None)
        return await self._done

    def abort(self) -> None:
        self._pipe.abort()


class Get:
    """One GET: a thread writing `path` as a tar, read by the loop chunk by chunk."""

    def __init__(self, loop: asyncio.AbstractEventLoop, path: str) -> None:
        self._pipe = _Pipe(loop)
        self._thread = threading.Thread(target=self._run, args=(path,), daemon=True, name="hub-get")
        self._thread.start()

    def _run(self, path: str) -> None:
        try:
            _archive(_Writer(self._pipe), path)
            end: dict[str, Any] = {"ok": True}
        except Aborted:
            return
        except (tarfile.TarError, OSError, ValueError) as exc:
            end = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        with contextlib.suppress(Aborted):
            self._pipe.put_blocking(end)

    async def next(self) -> bytes | dict[str, Any]:
        """The next chunk of the tar, or the end as {"ok": true} / {"ok": false, "error"}."""
        item: bytes | dict[str, Any] = await self._pipe.get()
        return item

    def abort(self) -> None:
        self._pipe.abort()

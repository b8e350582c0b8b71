"""The supervisor's end of the run channel against a scripted hub over a socketpair.

What the sandbox sends is untrusted: offsets must match the mirror, tars are extracted under the
data filter's rules on any Python 3.11, and API streams are capped.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import os
import socket
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest

from agent_image.channel.frames import VERSION, Decoder, Frame, T, encode, encode_json, encode_offset
from supervisor.channel import ChannelSession
from supervisor.channel.session import MAX_STREAMS, PENDING_BYTES
from supervisor.channel.untar import extract_untrusted

RUN = "log_20261202_000000_000000_abcdef"


class _Sock:
    """One end of a socketpair as a ByteStream."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def read(self, n: int) -> bytes:
        try:
            return self.sock.recv(n)
        except OSError:
            return b""

    def write(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


class _Hub:
    """The test's side: reads the supervisor's frames, sends scripted ones."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.dec = Decoder()
        self.frames: list[Frame] = []

    async def expect(self, kind: T, timeout: float = 5.0) -> Frame:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            while True:
                for i, f in enumerate(self.frames):
                    if f.type == kind:
                        return self.frames.pop(i)
                data = await loop.sock_recv(self.sock, 65536)
                if not data:
                    raise EOFError(kind.name)
                self.frames.extend(self.dec.feed(data))

    async def send(self, data: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def welcome(self) -> dict[str, Any]:
        hello = (await self.expect(T.HELLO)).json()
        doc = {"v": VERSION, "run_id": RUN, "state": "running", "exit": None, "outbox_size": 0}
        await self.send(encode_json(T.WELCOME, doc))
        return hello


async def _session(
    tmp_path: Path, api_socket: Path | None = None, note: Any = None
) -> tuple[ChannelSession, list[_Hub]]:
    hubs: list[_Hub] = []

    def dial() -> _Sock:
        ours, theirs = socket.socketpair()
        theirs.setblocking(False)
        hubs.append(_Hub(theirs))
        return _Sock(ours)

    (tmp_path / "sandbox").mkdir(exist_ok=True)
    session = ChannelSession(RUN, dial, tmp_path / "sandbox" / "events.jsonl", api_socket, note=note)
    session.start()
    for _ in range(100):
        if hubs:
            break
        await asyncio.sleep(0.01)
    return session, hubs


def test_events_are_mirrored_exactly_and_a_wrong_offset_drops_the_link(tmp_path: Path) -> None:
    async def main() -> None:
        session, hubs = await _session(tmp_path)
        try:
            hello = await hubs[0].welcome()
            assert hello["have"] == 0
            await session.wait_connected(5)
            await hubs[0].send(encode_offset(T.EVENTS, 0, b'{"seq":0}\n'))
            ack = await hubs[0].expect(T.ACK)
            assert ack.offset()[0] == 10
            # A replay that does not start where the mirror ends is a broken (or hostile) peer.
            await hubs[0].send(encode_offset(T.EVENTS, 3, b"forged\n"))
            with pytest.raises(EOFError):
                await hubs[0].expect(T.ACK)
            for _ in range(300):  # redialled, saying how much it holds
                if len(hubs) > 1:
                    break
                await asyncio.sleep(0.01)
            assert (await hubs[1].welcome())["have"] == 10
            assert (tmp_path / "sandbox" / "events.jsonl").read_bytes() == b'{"seq":0}\n'
        finally:
            await session.close()

    asyncio.run(main())


def test_a_hostile_tar_from_the_sandbox_stays_inside_the_destination(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, kind, target in (
            ("ok.txt", tarfile.REGTYPE, ""),
            ("../escape.txt", tarfile.REGTYPE, ""),
            ("/abs.txt", tarfile.REGTYPE, ""),
            ("out", tarfile.SYMTYPE, "/etc"),
            ("up", tarfile.SYMTYPE, "../../.."),
            ("setuid", tarfile.REGTYPE, ""),
        ):
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = target
            data = b"x" if kind == tarfile.REGTYPE else b""
            info.size = len(data)
            info.mode = 0o4755 if name == "setuid" else 0o644
            tar.addfile(info, io.BytesIO(data))
    blob = buf.getvalue()
    dest = tmp_path / "ws" / "dest"

    async def main() -> None:
        session, hubs = await _session(tmp_path)
        try:
            await hubs[0].welcome()
            await session.wait_connected(5)
            job = asyncio.create_task(session.get_tree("/workspace", dest, 1 << 20))
            get = await hubs[0].expect(T.GET)
            assert get.json() == {"path": "/workspace", "max_bytes": 1 << 20}
            for i in range(0, len(blob), 4096):
                await hubs[0].send(encode(T.DATA, get.sid, blob[i : i + 4096]))
            await hubs[0].send(encode_json(T.DONE, {"ok": True, "bytes": len(blob)}, get.sid))
            assert await job == len(blob)
        finally:
            await session.close()

    asyncio.run(main())
    assert sorted(p.name for p in dest.iterdir()) == ["abs.txt", "ok.txt", "setuid"]
    assert not (tmp_path / "ws" / "escape.txt").exists()
    assert (dest / "setuid").stat().st_mode & 0o4000 == 0


def test_more_than_asked_for_is_refused(tmp_path: Path) -> None:
    async def main() -> None:
        session, hubs = await _session(tmp_path)
        try:
            await hubs[0].welcome()
            await session.wait_connected(5)
            job = asyncio.create_task(session.get_tree("/workspace", tmp_path / "d", 1000))
            get = await hubs[0].expect(T.GET)
            await hubs[0].send(encode(T.DATA, get.sid, b"\0" * 2000))
            with pytest.raises(RuntimeError, match="more than 1000 bytes"):
                await job
        finally:
            await session.close()

    asyncio.run(main())


def test_api_streams_past_the_cap_are_closed(tmp_path: Path) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # holds every connection open
        writer.close()

    async def main() -> None:
        api = tmp_path / "api.sock"
        server = await asyncio.start_unix_server(serve, str(api))
        session, hubs = await _session(tmp_path, api)
        try:
            await hubs[0].welcome()
            await session.wait_connected(5)
            extra = 2 * MAX_STREAMS + 1
            await hubs[0].send(b"".join(encode(T.OPEN, 2 * i + 1) for i in range(MAX_STREAMS + 1)))
            closed = await hubs[0].expect(T.CLOSE)
            assert closed.sid == extra  # the one past the cap, at once; the others stay open
        finally:
            await session.close()
            server.close()

    asyncio.run(main())


def _tar(members: list[tuple[str, bytes, str, bytes]]) -> bytes:
    """A tar of (name, type, linkname, data) members, in order (names may repeat)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, target, data in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = target
            info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    return buf.getvalue()


def _get_blob(tmp_path: Path, dest: Path, blob: bytes) -> None:
    async def main() -> None:
        session, hubs = await _session(tmp_path)
        try:
            await hubs[0].welcome()
            await session.wait_connected(5)
            job = asyncio.create_task(session.get_tree("/workspace", dest, 64 << 20))
            get = await hubs[0].expect(T.GET)
            for i in range(0, len(blob), 65536):
                await hubs[0].send(encode(T.DATA, get.sid, blob[i : i + 65536]))
            await hubs[0].send(encode_json(T.DONE, {"ok": True, "bytes": len(blob)}, get.sid))
            await job
        finally:
            await session.close()

    asyncio.run(main())


def _no_link_leaves(dest: Path) -> None:
    root = os.path.realpath(dest)
    for parent, dirs, files in os.walk(dest):
        for name in dirs + files:
            path = os.path.join(parent, name)
            if os.path.islink(path):
                real = os.path.realpath(path)
                assert os.path.commonpath([real, root]) == root, f"{path} -> {real}"


def test_a_tar_that_outgrows_realpath_cannot_write_outside_the_destination(tmp_path: Path) -> None:
    # CVE-2025-4517: symlinks whose expansion passes PATH_MAX stop os.path.realpath (as the data
    # filter of Pythons before 3.11.13 / 3.12.11 uses it), so a link out looks inside; a hard link
    # through it then overwrites a host file, and a file through it creates one.
    outer = tmp_path / "ws"
    dest = outer / "dest"
    dest.mkdir(parents=True)
    (outer / "flag").write_text("original")
    steps = "abcdefghijklmnop"
    comp = "d" * ((os.pathconf(outer, "PC_PATH_MAX") - len(str(dest)) - 1) // (len(steps) + 1))
    members: list[tuple[str, bytes, str, bytes]] = []
    path = ""
    for step in steps:
        members.append((os.path.join(path, comp), tarfile.DIRTYPE, "", b""))
        members.append((os.path.join(path, step), tarfile.SYMTYPE, comp, b""))
        path = os.path.join(path, comp)
    linkpath = os.path.join(*steps, "l" * 254)
    members += [
        (linkpath, tarfile.SYMTYPE, os.path.join(*[".."] * len(steps)), b""),
        ("escape", tarfile.SYMTYPE, os.path.join(linkpath, ".."), b""),
        ("flaglink", tarfile.LNKTYPE, "escape/flag", b""),
        ("flaglink", tarfile.REGTYPE, "", b"overwritten"),
        ("escape/newfile", tarfile.REGTYPE, "", b"new"),
    ]
    _get_blob(tmp_path, dest, _tar(members))
    assert (outer / "flag").read_text() == "original"
    assert sorted(os.listdir(outer)) == ["dest", "flag"]
    _no_link_leaves(dest)


def test_a_hard_link_to_a_refused_symlink_does_not_become_that_symlink(tmp_path: Path) -> None:
    # tarfile falls back to extracting a hard link's target member (unfiltered) when os.link
    # fails: a hard link to a refused `out -> /etc` would be made as that very symlink.
    dest = tmp_path / "ws" / "dest"
    members = [
        ("out", tarfile.SYMTYPE, "/etc", b""),
        ("h", tarfile.LNKTYPE, "out", b""),
        ("x", tarfile.DIRTYPE, "", b""),
        ("dot", tarfile.SYMTYPE, ".", b""),
        ("up", tarfile.SYMTYPE, "dot/..", b""),  # lexically inside, really dest's parent
        ("ok", tarfile.REGTYPE, "", b"ok"),
        ("ok-link", tarfile.SYMTYPE, "x/../ok", b""),
        ("ok-hard", tarfile.LNKTYPE, "ok", b""),
    ]
    _get_blob(tmp_path, dest, _tar(members))
    _no_link_leaves(dest)
    assert not (dest / "h").is_symlink()
    assert (dest / "ok-link").read_text() == "ok"  # links that stay inside are kept
    assert (dest / "ok-hard").read_text() == "ok"


class _Feed:
    """A reader over chunks made on demand (`count` as the session's reader has it)."""

    def __init__(self, chunks: Any) -> None:
        self._chunks = iter(chunks)
        self._buf = b""
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        if not self._buf:
            self._buf = next(self._chunks, b"")
        n = len(self._buf) if n < 0 else n
        out, self._buf = self._buf[:n], self._buf[n:]
        self.count += len(out)
        return out


def test_an_extended_header_too_large_to_hold_ends_the_extraction(tmp_path: Path) -> None:
    # tarfile reads a pax header whole into memory (and several copies while parsing it): one
    # claiming 1 GiB would cost the host that much, whatever the GET's byte cap.
    head = tarfile.TarInfo("././@PaxHeader")
    head.type = tarfile.XHDTYPE
    head.size = 1 << 30
    block = head.tobuf(format=tarfile.USTAR_FORMAT)
    reader = _Feed([block] + [b"9 a=b\n" * 10922] * 128)  # 8 MiB of it, then the end
    with pytest.raises(tarfile.ReadError, match="extended header"):
        extract_untrusted(reader, str(tmp_path / "d"))
    assert reader.count < 1 << 20


def test_the_members_read_are_not_kept(tmp_path: Path) -> None:
    # tarfile keeps the TarInfo of every member a stream has passed: a tar of millions of refused
    # (so free on disk) members would hold gigabytes of them.
    blob = _tar([(f"/dev/f{i}", tarfile.FIFOTYPE, "", b"") for i in range(2000)])
    live: list[int] = []

    def count() -> None:
        live.append(sum(isinstance(o, tarfile.TarInfo) for o in gc.get_objects()))

    def chunks() -> Any:
        parts = [blob[i : i + 10240] for i in range(0, len(blob), 10240)]
        yield from parts[:-1]
        count()  # every member but those of the last 10 KiB has been read
        yield parts[-1]

    doc = extract_untrusted(_Feed(chunks()), str(tmp_path))
    assert doc["refused"] == 2000
    assert live and live[0] < 50


def test_a_get_faster_than_its_extraction_is_read_no_faster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The GET's bytes waiting for the extracting thread were an unbounded queue: a sandbox
    # sending faster than the host extracts (tiny files, a slow disk, or a tar the extraction
    # stopped reading) made the host hold up to the byte cap (twice the disk budget, or 4 GiB).
    import supervisor.channel.session as session_mod

    held: list[int] = []

    def slow(reader: Any, dest: str, max_members: int | None = None) -> dict[str, Any]:
        while reader.read(65536):
            time.sleep(0.005)
        return {"ok": True, "refused": 0, "skipped": [], "bytes": reader.count}

    monkeypatch.setattr(session_mod, "extract_untrusted", slow)

    async def main() -> None:
        session, hubs = await _session(tmp_path)
        try:
            await hubs[0].welcome()
            await session.wait_connected(5)
            job = asyncio.create_task(session.get_tree("/workspace", tmp_path / "d", 1 << 30))
            get = await hubs[0].expect(T.GET)
            tr = session._transfers[get.sid]
            chunk = encode(T.DATA, get.sid, b"\0" * 65536)
            flood = asyncio.create_task(hubs[0].send(chunk * 768))  # 48 MiB
            for _ in range(30):
                await asyncio.sleep(0.05)
                assert tr.sink is not None
                held.append(tr.sink.qsize() * 65536)
            flood.cancel()
            job.cancel()
        finally:
            await session.close()

    asyncio.run(main())
    assert max(held) <= PENDING_BYTES + (1 << 20), max(held)


def test_the_hubs_log_frames_are_the_sandboxs_text_in_massgen_log(tmp_path: Path) -> None:
    # LOG frames (and errors quoting what the sandbox sent) were logged as the supervisor's own
    # lines: outside the 16 MiB cap on the sandbox's text in massgen.log, so a hub (or an agent
    # posing as one) could fill the host's disk through them as fast as it could send.
    from supervisor.logdir import create_run_dirs
    from supervisor.materializer import MAX_SANDBOX_LOG_BYTES, Materializer

    mat = Materializer(create_run_dirs(tmp_path / "runs", tmp_path / "ws"))
    n = MAX_SANDBOX_LOG_BYTES // 2000 + 2000

    async def main() -> None:
        session, hubs = await _session(tmp_path, note=mat.log)
        try:
            await hubs[0].welcome()
            await session.wait_connected(5)
            line = encode(T.LOG, 0, b"x" * 1999 + b"\n")
            for _ in range(0, n, 1000):
                await hubs[0].send(line * 1000)
            await hubs[0].send(encode(T.PING, 0, b"last"))
            await hubs[0].expect(T.PONG)
        finally:
            await session.close()

    asyncio.run(main())
    size = mat.paths.log_dir.joinpath("massgen.log").stat().st_size
    assert size < MAX_SANDBOX_LOG_BYTES * 1.2, size


def test_what_api_streams_queue_on_the_host_is_bounded_in_all(tmp_path: Path) -> None:
    # Each API stream may queue STREAM_QUEUE_BYTES for a host side that does not read (a slow
    # handler), and a run may hold MAX_STREAMS of them: 4 MiB x 256 = 1 GiB of the supervisor's
    # memory for one sandbox. The streams' queues are capped together as well.
    from supervisor.channel.session import STREAM_QUEUE_BYTES, STREAMS_QUEUE_BYTES

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(3600)  # reads nothing

    held: list[int] = []

    async def main() -> None:
        api = tmp_path / "api.sock"
        server = await asyncio.start_unix_server(serve, str(api))
        session, hubs = await _session(tmp_path, api)
        try:
            await hubs[0].welcome()
            await session.wait_connected(5)
            streams = 24
            await hubs[0].send(b"".join(encode(T.OPEN, 2 * i + 1) for i in range(streams)))
            chunk = b"\0" * 65536
            per = (STREAM_QUEUE_BYTES - (1 << 20)) // len(chunk)  # each stream stays under its own cap
            for _ in range(per):
                await hubs[0].send(b"".join(encode(T.DATA, 2 * i + 1, chunk) for i in range(streams)))
            await hubs[0].send(encode(T.PING, 0, b"last"))
            await hubs[0].expect(T.PONG, timeout=30)
            held.append(sum(st.queued for st in session._streams.values()))
        finally:
            await session.close()
            server.close()

    asyncio.run(main())
    assert held[0] <= STREAMS_QUEUE_BYTES + (1 << 20), held


def test_a_get_past_its_entry_limit_stops_before_the_entries_are_made(tmp_path: Path) -> None:
    # A nested run's snapshot from a linked parent counted its entries only once all were on the
    # host's disk: a tar of empty files (512 bytes each) within the byte cap made ~500 000 inodes
    # for each 256 MiB. The count is checked as the members come, and the GET is cancelled.
    blob = _tar([(f"f{i}", tarfile.REGTYPE, "", b"") for i in range(1000)])
    dest = tmp_path / "d"

    async def main() -> None:
        session, hubs = await _session(tmp_path)
        try:
            await hubs[0].welcome()
            await session.wait_connected(5)
            job = asyncio.create_task(session.get_tree("/workspace", dest, 64 << 20, max_entries=100))
            get = await hubs[0].expect(T.GET)
            await hubs[0].send(encode(T.DATA, get.sid, blob))  # no DONE: the host ends it
            with pytest.raises(RuntimeError, match="more than 100 entries"):
                await asyncio.wait_for(job, 10)
            assert (await hubs[0].expect(T.CLOSE)).sid == get.sid
        finally:
            await session.close()

    asyncio.run(main())
    assert len(list(dest.iterdir())) <= 100


def test_a_sparse_member_from_the_sandbox_is_refused(tmp_path: Path) -> None:
    # A 10 KiB tar with a GNU sparse member made a 1 TiB file on the host (a few blocks): whatever
    # reads or copies it whole afterwards (the write-back's change set, the tar of a child's log
    # dir into its parent) pays for the terabyte. The hub's tars hold no sparse member.
    info = tarfile.TarInfo("big")
    info.size = 512
    info.pax_headers = {"GNU.sparse.map": "0,512", "GNU.sparse.size": str(1 << 40), "GNU.sparse.numblocks": "1"}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(b"x" * 512))
        tar.addfile(tarfile.TarInfo("after"), io.BytesIO(b""))
    dest = tmp_path / "ws" / "dest"
    _get_blob(tmp_path, dest, buf.getvalue())
    assert sorted(p.name for p in dest.iterdir()) == ["after"]

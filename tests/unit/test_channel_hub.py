"""The run channel's sandbox side: the hub as a real subprocess, reached through a real link subprocess."""

from __future__ import annotations

import io
import itertools
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent_image.channel import _tar, frames
from agent_image.channel.frames import Frame, FrameError, T

pytestmark = pytest.mark.timeout(30)
RUN = "run-hub-1"
SLEEPER = "import time; time.sleep(60)"


class Link:
    """A link subprocess; frames from the hub land in a queue (PINGs are answered)."""

    def __init__(self, path: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent_image.channel.link", path], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        self.frames: queue.Queue[Frame | None] = queue.Queue()
        self.lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        decoder = frames.Decoder()
        while data := os.read(self.proc.stdout.fileno(), 1 << 16):
            for f in decoder.feed(data):
                if f.type is T.PING:
                    self.send(T.PONG, 0, f.payload)
                else:
                    self.frames.put(f)
        self.frames.put(None)

    def send(self, type_: T, sid: int = 0, payload: bytes = b"") -> None:
        assert self.proc.stdin is not None
        with self.lock:
            try:
                self.proc.stdin.write(frames.encode(type_, sid, payload))
                self.proc.stdin.flush()
            except (BrokenPipeError, ValueError):
                pass

    def send_json(self, type_: T, doc: dict[str, object], sid: int = 0) -> None:
        self.send(type_, sid, json.dumps(doc).encode())

    def next(self, timeout: float = 5.0) -> Frame | None:
        return self.frames.get(timeout=timeout)

    def expect(self, type_: T, sid: int | None = None, timeout: float = 5.0) -> Frame:
        """The next frame of that type (and sid); other frames are skipped, except EVENTS kept in `events`."""
        end = time.monotonic() + timeout
        while True:
            f = self.next(max(0.01, end - time.monotonic()))
            assert f is not None, f"link closed while waiting for {type_.name}"
            if f.type is type_ and (sid is None or f.sid == sid):
                return f

    def hello(self, have: int = 0, run_id: str = RUN) -> dict[str, object]:
        self.send_json(T.HELLO, {"v": 1, "run_id": run_id, "have": have})
        return self.expect(T.WELCOME).json()

    def closed(self, timeout: float = 5.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                if self.next(end - time.monotonic()) is None:
                    return True
            except queue.Empty:
                return False
        return False

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)


class Sandbox:
    def __init__(
        self, engine: str, *, kill_in: float = 60.0, orphan_after: float = 600.0, extra: tuple[str, ...] = ()
    ) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="hub", dir="/tmp"))
        self.outbox = self.root / "outbox"
        self.outbox.mkdir()
        self.events = self.outbox / "events.jsonl"
        self.api = str(self.root / "api.sock")
        self.link_path = str(self.root / "link.sock")
        deadline = time.time() + kill_in - 10.0  # the backstop is deadline + grace (0) + 10 s
        env = {**os.environ, "MASSGEN_RUN_ID": RUN, "OUTBOX": str(self.events)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent_image.channel.hub", "--outbox", str(self.outbox), "--api-socket", self.api]
            + ["--link-socket", self.link_path, "--deadline", str(deadline), "--grace", "0"]
            + ["--orphan-after", str(orphan_after), *extra, "--", sys.executable, "-c", engine],
            env=env,
        )
        self.links: list[Link] = []
        end = time.monotonic() + 5
        while not os.path.exists(self.link_path) or not os.path.exists(self.api):
            assert time.monotonic() < end and self.proc.poll() is None, "the hub did not start"
            time.sleep(0.01)

    def link(self) -> Link:
        link = Link(self.link_path)
        self.links.append(link)
        return link

    def client(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(self.api)
        s.settimeout(5)
        return s

    def close(self) -> None:
        for link in self.links:
            link.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)


@pytest.fixture
def sandboxes() -> Iterator[list[Sandbox]]:
    made: list[Sandbox] = []
    yield made
    for sb in made:
        sb.close()


def _sandbox(made: list[Sandbox], engine: str = SLEEPER, extra: tuple[str, ...] = (), **kw: float) -> Sandbox:
    sb = Sandbox(engine, extra=extra, **kw)
    made.append(sb)
    return sb


def _events(link: Link, until: int) -> list[tuple[int, bytes]]:
    got: list[tuple[int, bytes]] = []
    while not got or got[-1][0] + len(got[-1][1]) < until:
        got.append(link.expect(T.EVENTS).offset())
    return got


def test_decoder_takes_split_feeds_and_refuses_oversized_and_unknown_frames() -> None:
    """Frames split at any byte come out whole and in order; an unknown type or a length over 1 MiB is an error."""
    wire = frames.encode(T.DATA, 3, b"abc") + frames.encode_offset(T.EVENTS, 7, b"xy") + frames.encode(T.BYE)
    for cut in range(len(wire)):
        d = frames.Decoder()
        got = [*d.feed(wire[:cut]), *d.feed(wire[cut:])]
        assert next((f.type, f.sid, f.payload) for f in got) == (T.DATA, 3, b"abc")
        assert got[1].offset() == (7, b"xy") and got[2].type is T.BYE and d.pending == 0
    with pytest.raises(FrameError):
        list(frames.Decoder().feed(frames.HEADER.pack(int(T.DATA), 1, frames.MAX_PAYLOAD + 1)))
    with pytest.raises(FrameError):
        list(frames.Decoder().feed(frames.HEADER.pack(200, 1, 0)))
    with pytest.raises(FrameError):
        frames.encode(T.DATA, 1, b"x" * (frames.MAX_PAYLOAD + 1))


def test_handshake_and_a_wrong_run_id_is_refused(sandboxes: list[Sandbox]) -> None:
    """HELLO with the run id gets WELCOME (waiting, no exit); a wrong run id gets a LOG and the link closed."""
    sb = _sandbox(sandboxes)
    bad = sb.link()
    bad.send_json(T.HELLO, {"v": 1, "run_id": "someone-else", "have": 0})
    assert b"wrong run id" in bad.expect(T.LOG).payload
    assert bad.closed()
    welcome = sb.link().hello()
    assert welcome == {"v": 1, "run_id": RUN, "state": "waiting", "exit": None, "outbox_size": 0}


def test_events_replay_from_have_is_exact_across_a_reconnect(sandboxes: list[Sandbox]) -> None:
    """EVENTS offsets are contiguous from HELLO's have; a new link from a mid-line offset gets exactly the rest."""
    engine = (
        "import os, time\nfd = os.open(os.environ['OUTBOX'], os.O_WRONLY | os.O_APPEND | os.O_CREAT)\n"
        'for i in range(2000):\n    os.write(fd, b\'{"seq": %d, "pad": "%s"}\\n\' % (i, b\'x\' * (i % 300)))\n'
        "time.sleep(60)\n"
    )
    sb = _sandbox(sandboxes, engine)
    first = sb.link()
    first.hello()
    first.send(T.START)
    # Wait for the engine's last line: under load it may still be writing past any fixed size.
    final = sum(len(b'{"seq": %d, "pad": "%s"}\n' % (i, b"x" * (i % 300))) for i in range(2000))
    end = time.monotonic() + 30
    while (sb.events.stat().st_size if sb.events.exists() else 0) < final:
        assert time.monotonic() < end
        time.sleep(0.02)
    total = sb.events.stat().st_size
    assert total == final
    got = _events(first, total)
    assert got[0][0] == 0
    for (off, data), (nxt, _) in itertools.pairwise(got):
        assert nxt == off + len(data) and len(data) <= frames.EVENTS_CHUNK
    mirror = b"".join(d for _, d in got)
    assert mirror == sb.events.read_bytes()
    have = 123_457  # mid-line on purpose
    second = sb.link()
    assert second.hello(have=have)["outbox_size"] == total
    assert first.closed()  # replaced by the second link
    rest = _events(second, total)
    assert rest[0][0] == have and mirror[:have] + b"".join(d for _, d in rest) == sb.events.read_bytes()


def test_api_connections_are_bridged_and_held_while_no_link(sandboxes: list[Sandbox]) -> None:
    """A client connected before any link is held, then OPENed; host DATA reaches it; CLOSE ends it; a client EOF sends CLOSE."""
    sb = _sandbox(sandboxes)
    early = sb.client()
    early.sendall(b"GET /v1/runs HTTP/1.1\r\nHost: x\r\n\r\n")
    time.sleep(0.3)
    link = sb.link()
    link.hello()
    opened = link.expect(T.OPEN)
    assert opened.sid % 2 == 1
    assert link.expect(T.DATA, opened.sid).payload.startswith(b"GET /v1/runs HTTP/1.1")
    body = b'{"ok": true}'
    link.send(T.DATA, opened.sid, b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    link.send(T.CLOSE, opened.sid)
    reply = b""
    while chunk := early.recv(65536):
        reply += chunk
    assert reply.endswith(body) and reply.startswith(b"HTTP/1.1 200 OK")
    late = sb.client()
    sid = link.expect(T.OPEN).sid
    assert sid != opened.sid and sid % 2 == 1
    late.close()
    link.expect(T.CLOSE, sid)


def test_api_streams_are_capped(sandboxes: list[Sandbox]) -> None:
    """Past 256 concurrent API connections, new ones are closed at once; a freed slot is usable again."""
    sb = _sandbox(sandboxes)
    link = sb.link()
    link.hello()
    clients = [sb.client() for _ in range(256)]
    sids = {link.expect(T.OPEN).sid for _ in clients}
    assert len(sids) == 256
    extra = sb.client()
    assert extra.recv(10) == b""
    clients.pop().close()
    link.expect(T.CLOSE)
    again = sb.client()
    link.expect(T.OPEN)
    again.close()
    for c in clients:
        c.close()


def _tar_bytes() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:

        def add(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "", mode: int = 0o644) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.size, info.mode = kind, link, len(data), mode
            tf.addfile(info, io.BytesIO(data))

        add("sub", kind=tarfile.DIRTYPE, mode=0o755)
        add("sub/a.txt", b"alpha" * 50_000)
        add("run.sh", b"#!/bin/sh\n", mode=0o4777)
        add("inside", kind=tarfile.SYMTYPE, link="sub/a.txt")
        add("escape", kind=tarfile.SYMTYPE, link="../../../etc")
        add("abs", kind=tarfile.SYMTYPE, link="/etc/passwd")
        add("../up.txt", b"no")
    return buf.getvalue()


def test_put_then_get_roundtrip_keeps_links_inside_and_read_only(sandboxes: list[Sandbox]) -> None:
    """PUT extracts under the data filter (links out and .. refused, setuid dropped), read_only drops write bits; GET returns the tree."""
    sb = _sandbox(sandboxes)
    link = sb.link()
    link.hello()
    dest = sb.root / "ctx"
    tar = _tar_bytes()
    link.send_json(T.PUT, {"dest": str(dest), "read_only": True}, sid=2)
    for i in range(0, len(tar), 10_000):
        link.send(T.DATA, 2, tar[i : i + 10_000])
    link.send(T.CLOSE, 2)
    done = link.expect(T.DONE, 2).json()
    assert done["ok"] and done["bytes"] == len(tar) and done["refused"] == 3, done
    assert (dest / "sub/a.txt").read_bytes() == b"alpha" * 50_000
    assert os.readlink(dest / "inside") == "sub/a.txt"
    assert not os.path.lexists(dest / "escape") and not os.path.lexists(dest / "abs")
    assert not (sb.root / "up.txt").exists()
    assert (dest / "run.sh").stat().st_mode & 0o7777 == 0o555
    assert (dest / "sub/a.txt").stat().st_mode & 0o222 == 0 and dest.stat().st_mode & 0o222 == 0
    os.mkfifo(sb.root / "fifo")  # next to ctx: GET of the parent must skip it
    link.send_json(T.GET, {"path": str(sb.root), "max_bytes": 10 << 20}, sid=6)
    whole = b""
    while True:
        g = link.next()
        assert g is not None
        if g.type is T.DATA and g.sid == 6:
            whole += g.payload
        elif g.type is T.DONE and g.sid == 6:
            assert g.json() == {"ok": True, "bytes": len(whole)}
            break
    with tarfile.open(fileobj=io.BytesIO(whole)) as tf:
        members = {m.name: m for m in tf.getmembers()}
        assert "fifo" not in members
        assert members["ctx/inside"].issym() and members["ctx/inside"].linkname == "sub/a.txt"
        sub = tf.extractfile("ctx/sub/a.txt")
        assert sub is not None and sub.read() == b"alpha" * 50_000
    link.send_json(T.GET, {"path": str(dest), "max_bytes": 100_000}, sid=8)
    assert link.expect(T.DONE, 8).json() == {"ok": False, "error": "over max_bytes (100000)"}


def test_data_filter_copy_for_pythons_without_filters(tmp_path: Path) -> None:
    """The hub's own copy of the data filter (used on the image's 3.11.2) refuses what tarfile's refuses."""

    def info(name: str, kind: bytes = tarfile.REGTYPE, link: str = "", mode: int = 0o644) -> tarfile.TarInfo:
        i = tarfile.TarInfo(name)
        i.type, i.linkname, i.mode = kind, link, mode
        return i

    for bad in (
        info("../x"),
        info("a", tarfile.SYMTYPE, "../../x"),
        info("a", tarfile.SYMTYPE, "/etc"),
        info("d", tarfile.CHRTYPE),
    ):
        with pytest.raises(_tar.Refused):
            _tar._data_filter_compat(bad, str(tmp_path))
    (tmp_path / "out").symlink_to("/etc")
    with pytest.raises(_tar.Refused):
        _tar._data_filter_compat(info("out/passwd"), str(tmp_path))
    ok = _tar._data_filter_compat(info("/abs/f", mode=0o6777), str(tmp_path))
    assert ok.name == "abs/f" and ok.mode == 0o755
    assert _tar._data_filter_compat(info("f", mode=0o640), str(tmp_path)).mode == 0o640


def test_start_signal_exit_and_bye_exit_with_the_engines_code(sandboxes: list[Sandbox]) -> None:
    """START runs the engine; SIGNAL 15 reaches it; EXIT says 143/15; later WELCOMEs say so too; BYE ends the hub with 143."""
    sb = _sandbox(sandboxes)
    link = sb.link()
    link.hello()
    link.send(T.START)
    link.send(T.BYE)  # before EXIT: ignored
    time.sleep(0.3)
    link.send_json(T.SIGNAL, {"signal": int(signal.SIGTERM)})
    assert link.expect(T.EXIT).json() == {"exit_code": 143, "signal": 15, "outbox_size": 0}
    again = sb.link()
    assert again.hello()["exit"] == {"exit_code": 143, "signal": 15, "outbox_size": 0}
    again.send(T.BYE)
    assert sb.proc.wait(5) == 143


def test_exit_names_the_outbox_size_after_the_engines_last_write(sandboxes: list[Sandbox]) -> None:
    """An engine that writes its last events and exits at once: EXIT carries the events file's final
    size (the supervisor waits for that many bytes before BYE), and EVENTS deliver all of them."""
    engine = (
        "import os\nfd = os.open(os.environ['OUTBOX'], os.O_WRONLY | os.O_APPEND | os.O_CREAT)\n"
        'for i in range(400):\n    os.write(fd, b\'{"seq": %d, "pad": "%s"}\\n\' % (i, b\'y\' * 700))\n'
    )
    sb = _sandbox(sandboxes, engine)
    link = sb.link()
    link.hello()
    link.send(T.START)
    got: list[tuple[int, bytes]] = []
    exit_doc: dict[str, Any] | None = None
    end = time.monotonic() + 20
    while exit_doc is None or sum(len(d) for _, d in got) < exit_doc["outbox_size"]:
        assert time.monotonic() < end, (exit_doc, sum(len(d) for _, d in got))
        f = link.next()
        assert f is not None, "link closed"
        if f.type is T.EVENTS:
            got.append(f.offset())
        elif f.type is T.EXIT:
            exit_doc = f.json()
    final = sb.events.read_bytes()
    assert exit_doc == {"exit_code": 0, "signal": None, "outbox_size": len(final)}
    assert len(final) > 280_000
    assert b"".join(d for _, d in got) == final


def test_engine_exit_code_orphan_timeout_and_sigterm_before_start(sandboxes: list[Sandbox]) -> None:
    """An engine exiting 5 gives EXIT 5 and, with no BYE, the hub exits 5 after orphan-after; SIGTERM before START exits 143."""
    sb = _sandbox(sandboxes, "import sys; sys.exit(5)", orphan_after=0.5)
    link = sb.link()
    link.hello()
    link.send(T.START)
    assert link.expect(T.EXIT).json() == {"exit_code": 5, "signal": None, "outbox_size": 0}
    assert sb.proc.wait(5) == 5
    idle = _sandbox(sandboxes)
    idle.proc.send_signal(signal.SIGTERM)
    assert idle.proc.wait(5) == 143


def test_deadline_backstop_kills_an_engine_that_ignores_sigterm(sandboxes: list[Sandbox]) -> None:
    """Past deadline + grace + 10 s the hub SIGKILLs the engine's group, even one ignoring SIGTERM."""
    engine = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    sb = _sandbox(sandboxes, engine, kill_in=1.5)
    link = sb.link()
    link.hello()
    link.send(T.START)
    time.sleep(0.3)
    link.send_json(T.SIGNAL, {"signal": int(signal.SIGTERM)})
    assert link.expect(T.EXIT, timeout=5).json() == {"exit_code": 137, "signal": 9, "outbox_size": 0}


def test_a_new_link_replaces_the_old_one_and_closes_its_api_streams(sandboxes: list[Sandbox]) -> None:
    """A second valid HELLO takes over: the first link is closed, its API clients see EOF, new clients go to the new link."""
    sb = _sandbox(sandboxes)
    first = sb.link()
    first.hello()
    client = sb.client()
    first.expect(T.OPEN)
    second = sb.link()
    second.hello()
    assert first.closed()
    assert client.recv(10) == b""
    sb.client().sendall(b"ping")
    sid = second.expect(T.OPEN).sid
    assert second.expect(T.DATA, sid).payload == b"ping"


def test_spec_on_the_command_line_is_written_and_the_engine_starts_without_start(sandboxes: list[Sandbox]) -> None:
    """--spec-b64: spec.json is in the outbox before the engine runs, and the engine starts with no
    START (the first link finds it running or done); a value that is not base64 is a usage error."""
    import base64

    spec = b'{"run_id": "run-hub-1", "question": "q"}'
    engine = (
        "import os; d = os.path.dirname(os.environ['OUTBOX']); data = open(os.path.join(d, 'spec.json')).read();"
        " open(os.environ['OUTBOX'], 'a').write(data + '\\n')"
    )
    sb = _sandbox(sandboxes, engine, extra=("--spec-b64", base64.b64encode(spec).decode()))
    link = sb.link()
    welcome = link.hello()
    assert welcome["state"] in ("running", "exited"), welcome
    # (an engine that was quicker than the link is reported by the WELCOME itself)
    exit_doc = welcome["exit"] if welcome["state"] == "exited" else link.expect(T.EXIT).json()
    assert isinstance(exit_doc, dict)
    assert exit_doc["exit_code"] == 0, exit_doc
    assert sb.events.read_bytes() == spec + b"\n"
    assert (sb.outbox / "spec.json").read_bytes() == spec
    bad = subprocess.run(
        [sys.executable, "-m", "agent_image.channel.hub", "--outbox", "/tmp", "--api-socket", "/tmp/x.sock"]
        + ["--link-socket", "/tmp/y.sock", "--deadline", "0", "--grace", "0", "--run-id", RUN]
        + ["--spec-b64", "not base64!", "--", "true"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert bad.returncode == 2 and "--spec-b64 is not base64" in bad.stderr, bad.stderr


def test_read_only_leaves_a_mount_point_it_does_not_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-only PUT into a folder another user owns (a Kubernetes emptyDir is root's, mode 0777):
    everything in it loses its write bits, the folder itself is left (chmod would be EPERM)."""
    root = tmp_path / "ctx"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "f").write_text("x")
    root.chmod(0o777)
    _tar.make_read_only(str(root))
    assert (root.stat().st_mode & 0o777, (root / "sub" / "f").stat().st_mode & 0o222) == (0o555, 0)
    for p in (root / "sub" / "f", root / "sub", root):
        p.chmod(0o777)
    owner = root.stat().st_uid
    monkeypatch.setattr(os, "getuid", lambda: owner + 1)  # someone else's folder
    _tar.make_read_only(str(root))
    assert root.stat().st_mode & 0o777 == 0o777
    assert (root / "sub").stat().st_mode & 0o222 == 0 and (root / "sub" / "f").stat().st_mode & 0o222 == 0

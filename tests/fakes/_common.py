"""Shared machinery of the fake model servers: reply specs, faults, request log, the HTTP thread."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit


@dataclass(frozen=True)
class FakeToolCall:
    """A call the fake model makes; `arguments` given as a str go out verbatim (maybe bad JSON)."""

    name: str
    arguments: dict[str, Any] | str = field(default_factory=dict)
    id: str | None = None

    def arguments_json(self) -> str:
        return self.arguments if isinstance(self.arguments, str) else json.dumps(self.arguments)


@dataclass(frozen=True)
class Reply:
    """What the fake model answers. Token counts left as None are derived from text lengths."""

    text: str = ""
    tool_calls: Sequence[FakeToolCall] = ()
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int = 0
    thoughts_tokens: int = 0  # gemini only: reported as thoughtsTokenCount
    signature: str | None = None  # gemini only: thoughtSignature (base64) on the first functionCall
    chunk_size: int = 8  # streaming: characters of text / arguments per delta
    delay_s: float = 0.0  # before the first byte of the response


@dataclass(frozen=True)
class Fault:
    """An HTTP error answer (or a stall) instead of a reply."""

    status: int = 500
    message: str = "injected fault"
    retry_after: float | None = None  # sent as the Retry-After header (and Gemini RetryInfo)
    retry_header: bool = True  # False: Gemini's way, the wait only in the body's RetryInfo
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


Policy = Callable[["FakeRequest"], "Reply | Fault | str"]


class FakeRequest(dict):  # type: ignore[type-arg]  # the JSON body itself, plus what came with it
    """One recorded request: the JSON body (this dict) with path, headers and a text digest."""

    def __init__(
        self,
        body: dict[str, Any],
        *,
        method: str,
        path: str,
        query: dict[str, str],
        headers: dict[str, str],
        prompt_text: str = "",
        tool_names: Sequence[str] = (),
        stream: bool = False,
    ) -> None:
        super().__init__(body)
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers  # lower-cased names
        self.prompt_text = prompt_text  # every text of the conversation, joined by newlines
        self.tool_names = tuple(tool_names)
        self.stream = stream

    @property
    def body(self) -> dict[str, Any]:
        return dict(self)


@dataclass
class UsageTotals:
    """What the fake reported on the wire, summed over successful replies."""

    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def add(self, prompt: int, completion: int, cached: int) -> None:
        self.calls += 1
        self.prompt_tokens += prompt
        self.completion_tokens += completion
        self.cached_tokens += cached


def sequence(*items: Reply | Fault | str) -> Policy:
    """A policy answering with `items` in order, then repeating the last one."""
    queue = list(items)
    state = {"i": 0}

    def policy(_req: FakeRequest) -> Reply | Fault | str:
        i = min(state["i"], len(queue) - 1)
        state["i"] += 1
        return queue[i]

    return policy


def closed() -> int:
    """A loopback port where nothing listens (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def estimate_tokens(text: str) -> int:
    return max(1, len(text) // 4)


def split(text: str, size: int, *, at_least: int = 1) -> list[str]:
    """Cut `text` into pieces of `size` chars, and into at least `at_least` pieces when it can."""
    if not text:
        return []
    size = max(1, min(size, -(-len(text) // at_least)))
    return [text[i : i + size] for i in range(0, len(text), size)]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server | _UnixServer

    def log_message(self, format: str, *args: Any) -> None:  # stdlib signature
        return

    def do_GET(self) -> None:  # stdlib naming
        self.server.owner._dispatch(self, "GET")

    def do_POST(self) -> None:  # stdlib naming
        self.server.owner._dispatch(self, "POST")

    # -- writing helpers, used by the concrete servers ---------------------------------------

    def send_json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def start_sse(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def sse(self, data: str) -> None:
        payload = f"data: {data}\n\n".encode()
        self.wfile.write(f"{len(payload):x}\r\n".encode() + payload + b"\r\n")
        self.wfile.flush()

    def end_sse(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # a stalled handler must not hold up teardown
    owner: FakeServer


class _UnixServer(socketserver.ThreadingUnixStreamServer):
    """The same HTTP service on a unix socket, as the model gateway serves a sandbox."""

    daemon_threads = True
    block_on_close = False
    owner: FakeServer


class FakeServer:
    """Base of the fake upstreams: a loopback HTTP server in a thread, scripted by a policy.

    Every request is recorded in `requests`; faults queued with `faults` answer the first
    requests, then the policy answers. `usage` sums what successful replies reported. With
    `uds`, it listens on that unix socket path instead of a loopback port.
    """

    def __init__(
        self,
        policy: Policy | None = None,
        *,
        faults: Iterable[Fault] = (),
        api_key: str | None = None,
        uds: str | None = None,
    ) -> None:
        self.policy: Policy = policy or (lambda _req: Reply(text="ok"))
        self.api_key = api_key  # when set, any other key is refused as the real service would
        self.requests: list[FakeRequest] = []
        self.usage = UsageTotals()
        self._faults = collections.deque(faults)
        self._lock = threading.Lock()
        self.uds = uds
        self._httpd: _Server | _UnixServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> Self:
        httpd: _Server | _UnixServer = (
            _UnixServer(self.uds, _Handler) if self.uds else _Server(("127.0.0.1", 0), _Handler)
        )
        httpd.owner = self
        self._httpd = httpd
        # A short poll interval: teardown (shutdown) then returns at once, not after half a second.
        self._thread = threading.Thread(target=httpd.serve_forever, args=(0.02,), name=type(self).__name__, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.uds and os.path.exists(self.uds):
            os.unlink(self.uds)

    @property
    def port(self) -> int:
        assert isinstance(self._httpd, _Server), "use the fake, on TCP, as a context manager"
        return int(self._httpd.server_address[1])

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        raise NotImplementedError

    # -- scripting ---------------------------------------------------------------------------

    def add_faults(self, *faults: Fault) -> None:
        with self._lock:
            self._faults.extend(faults)

    def _record(self, req: FakeRequest) -> None:
        with self._lock:
            self.requests.append(req)

    def _decide(self, req: FakeRequest) -> Reply | Fault:
        # Under the lock so stateful policies see requests one at a time, in arrival order.
        with self._lock:
            if self._faults:
                return self._faults.popleft()
            out = self.policy(req)
        return Reply(text=out) if isinstance(out, str) else out

    def _count(self, prompt: int, completion: int, cached: int) -> None:
        with self._lock:
            self.usage.add(prompt, completion, cached)

    # -- request plumbing --------------------------------------------------------------------

    def _dispatch(self, h: _Handler, method: str) -> None:
        parts = urlsplit(h.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        headers = {k.lower(): v for k, v in h.headers.items()}
        body: dict[str, Any] = {}
        length = int(h.headers.get("Content-Length") or 0)
        if length:
            raw = h.rfile.read(length)
            try:
                body = json.loads(raw)
            except ValueError:
                h.send_json(400, {"error": {"message": "body is not JSON"}})
                return
        # A client that gave up (a timeout test) leaves nobody to answer.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.handle(h, method, parts.path, query, headers, body)

    def handle(
        self,
        h: _Handler,
        method: str,
        path: str,
        query: dict[str, str],
        headers: dict[str, str],
        body: dict[str, Any],
    ) -> None:
        raise NotImplementedError

    @staticmethod
    def _wait(seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)

    @staticmethod
    def _fault_headers(fault: Fault) -> dict[str, str]:
        headers = dict(fault.headers)
        if fault.retry_after is not None and fault.retry_header:
            ra = fault.retry_after
            headers["Retry-After"] = str(int(ra)) if float(ra).is_integer() else str(ra)
        return headers

"""`python3 -m agent_image.channel.link PATH`: a dumb pipe between stdin/stdout and the hub's link socket.

The supervisor execs this on every (re)connection, so it imports nothing that is not built into
the interpreter (`_socket`, `_thread`, not `socket`/`threading`, which pull in enum and more):
see docs/channel.md for its measured start-up. Exit 0 when either side closes, 1 when the
socket cannot be reached within CONNECT_S.
"""

import _socket
import _thread
import os
import sys
import time

CONNECT_S = 5.0  # the hub may still be starting: retry this long while its socket is missing
RETRY_S = 0.05
CHUNK = 256 << 10


def _connect(path: str) -> "_socket.socket":
    give_up = time.monotonic() + CONNECT_S
    while True:
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            if time.monotonic() >= give_up:
                os.write(2, f"massgen-link: cannot reach {path}: {exc}\n".encode())
                os._exit(1)
            time.sleep(RETRY_S)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _stdin_to_socket(sock: "_socket.socket") -> None:
    try:
        while True:
            data = os.read(0, CHUNK)
            if not data:
                break
            sock.sendall(data)
    except OSError:
        pass
    # Either side closing ends the link; exiting from this thread ends the other one too.
    os._exit(0)


def main() -> None:
    if len(sys.argv) != 2:
        os.write(2, b"usage: python3 -m agent_image.channel.link SOCKET\n")
        os._exit(2)
    sock = _connect(sys.argv[1])
    _thread.start_new_thread(_stdin_to_socket, (sock,))
    try:
        while True:
            data = sock.recv(CHUNK)
            if not data:
                break
            _write_all(1, data)
    except OSError:
        pass
    os._exit(0)


if __name__ == "__main__":
    main()

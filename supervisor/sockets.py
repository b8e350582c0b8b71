"""Socket paths and the daemon's: the per-user base, each run's short socket dir, private dirs.

`daemon_client` is how every host-side caller (the CLI, the dashboard) finds the running daemon.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent_image.client import SupervisorClient

SOCKET_IN_SANDBOX_DIR = "/run/massgen/api"
SOCKET_NAME = "api.sock"


def runtime_base() -> Path:
    """The per-user base for sockets: $XDG_RUNTIME_DIR/massgen, else /tmp/massgen-<uid> (short paths)."""
    runtime_dir = os.environ.get("XDG_RUNTIME_DIR")
    # ensure_private_dir refuses a squatted /tmp path (another owner, a symlink).
    return Path(runtime_dir) / "massgen" if runtime_dir else Path(f"/tmp/massgen-{os.getuid()}")  # noqa: S108


def socket_root() -> Path:
    """Short base dir for per-run sockets (unix socket paths are limited to ~107 bytes)."""
    env = os.environ.get("MASSGEN_SOCKET_DIR")
    return Path(env) if env else runtime_base() / "runs"


def ensure_private_dir(path: Path) -> Path:
    """Create (or accept) a directory only we own and only we can enter (mode 0700).

    Shared /tmp makes squatting possible: a directory someone else created, or a symlink, is
    refused rather than used.

    Raises:
        PermissionError: the directory exists but is not ours or is a symlink.
    """
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise PermissionError(f"{path} is not a directory owned by uid {os.getuid()}; refusing to use it")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def short_socket_dir(run_id: str) -> Path:
    """Deterministic per run, so a restarted supervisor re-binds the socket its sandbox mounted."""
    digest = hashlib.sha256(run_id.encode()).hexdigest()[:12]
    return socket_root() / digest


def default_socket() -> Path:
    """The daemon's API socket: ``$MASSGEN_DAEMON_SOCKET``, else ``supervisor.sock`` in the per-user base."""
    env = os.environ.get("MASSGEN_DAEMON_SOCKET")
    return Path(env) if env else runtime_base() / "supervisor.sock"


def daemon_client() -> SupervisorClient | None:
    """A client of the running daemon, or None when no daemon answers (then callers embed one)."""
    if os.environ.get("MASSGEN_NO_DAEMON"):
        return None
    sock = default_socket()
    if not sock.exists():
        return None
    from agent_image.client import ClientError, SupervisorClient

    client = SupervisorClient(str(sock), timeout=90)
    try:
        client.request("GET", "/v1/health", reconnect=False)
    except ClientError:
        client.close()
        return None
    return client

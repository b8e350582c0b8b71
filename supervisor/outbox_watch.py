"""Wakes a run's follower when its outbox events file changes: one inotify watch, one flag.

The outbox directory is writable by the sandbox, so whatever it does there must cost the
supervisor a bounded amount of memory. A recursive watchdog observer queued one Python event
object per file created (10^6 files grew the supervisor by hundreds of MiB); here the kernel
holds the queue (bounded by fs.inotify.max_queued_events, overflow is one event), the loop's
reader callback reads and discards it, and all it does is set one asyncio.Event (a pending
flag, not a queue). Until the engine has created the events file the directory is watched for
creations only; once the follower has the file open, only that inode is watched (through
/proc/self/fd, so a planted symlink or a renamed file changes nothing), and creating, renaming
or deleting other files in the outbox wakes no one.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
from pathlib import Path

__all__ = ["OutboxWatch"]

log = logging.getLogger(__name__)

IN_MODIFY = 0x00000002
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
READ_BYTES = 64 << 10  # per readable callback; level-triggered, so any rest comes next turn


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.inotify_init1  # noqa: B018 - probing: absent outside Linux
    except (OSError, AttributeError):
        return None
    return libc


class OutboxWatch:
    """A wake-up source for one run's follower; `start` returns False where inotify is unavailable.

    Without it the follower still polls (lifecycle.POLL_S), so a refused watch costs latency only.
    """

    def __init__(self, directory: Path, wake: asyncio.Event) -> None:
        self.directory = directory
        self.wake = wake
        self._fd: int | None = None
        self._wd: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._libc = _libc()
        self.on_file = False

    def start(self) -> bool:
        libc = self._libc
        if libc is None:
            return False
        fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            log.warning("inotify unavailable (%s); polling the outbox", os.strerror(ctypes.get_errno()))
            return False
        self._fd = fd
        if not self._add(os.fsencode(self.directory), IN_CREATE | IN_MOVED_TO | IN_ONLYDIR | IN_DONT_FOLLOW):
            self.close()
            return False
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(fd, self._readable)
        return True

    def _add(self, path: bytes, mask: int) -> bool:
        assert self._libc is not None and self._fd is not None
        wd = self._libc.inotify_add_watch(self._fd, path, mask)
        if wd < 0:
            log.warning("inotify watch on %s refused: %s; polling", os.fsdecode(path), os.strerror(ctypes.get_errno()))
            return False
        if self._wd is not None and self._wd != wd:
            self._libc.inotify_rm_watch(self._fd, self._wd)
        self._wd = wd
        return True

    def watch_file(self, fd: int) -> None:
        """From now on watch only the open events file (the inode behind `fd`), for writes."""
        if self._fd is None or self.on_file:
            return
        # /proc/self/fd/N resolves to the inode we hold, whatever the path now points to.
        self.on_file = self._add(f"/proc/self/fd/{fd}".encode(), IN_MODIFY)
        # Anything written between the follower's last read and this watch: look once more.
        self.wake.set()

    def _readable(self) -> None:
        assert self._fd is not None
        # The event records say nothing the follower needs: it re-reads the file from its offset.
        with contextlib.suppress(BlockingIOError, InterruptedError):
            os.read(self._fd, READ_BYTES)
        self.wake.set()

    def close(self) -> None:
        if self._fd is None:
            return
        if self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._fd)
        os.close(self._fd)  # drops the watches with it
        self._fd = None
        self._wd = None

"""Race-free read-only snapshots of directories a sandbox can write.

A nested run may read a folder of its parent's workspace. Bind-mounting that folder directly
would be racy: between our check and the engine's mount the parent's agents could swap a path
component for a symlink to a host directory. Instead the folder is copied into a folder only the
supervisor writes.

The source keeps changing while we copy it, so nothing is ever reached through a path: source
and destination are walked together with paired directory fds. Every source directory is opened
with O_NOFOLLOW relative to its parent's fd, every destination directory is created and opened
relative to its parent's fd, and files are created with O_EXCL|O_NOFOLLOW. Symlinks are skipped,
never recreated: a link in the destination is something a later swap in the source could make us
write through, and a child has no use for links into its parent's tree. Fifos, sockets and
devices are skipped too.
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import SnapshotError as SnapshotError  # also importable from here

DEFAULT_LIMIT_BYTES = 256 << 20
DEFAULT_LIMIT_ENTRIES = 100_000
MAX_DEPTH = 64
CHUNK = 1 << 20

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_SRC_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_DST_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# The entry changed between listing and opening (now a symlink, a file, or gone): skip it.
_RACED = {errno.ELOOP, errno.ENOTDIR, errno.ENOENT, errno.ENXIO, errno.EISDIR}


@dataclass
class SnapshotBudget:
    """Limits of one snapshot, and what it has copied so far (also when it failed part-way)."""

    limit_bytes: int = DEFAULT_LIMIT_BYTES
    limit_entries: int = DEFAULT_LIMIT_ENTRIES
    bytes: int = 0
    entries: int = 0
    dirs: int = 0

    def add_entry(self) -> None:
        self.entries += 1
        if self.entries > self.limit_entries:
            raise SnapshotError(f"more than {self.limit_entries} entries", "entries")

    def add_bytes(self, n: int) -> None:
        self.bytes += n
        if self.bytes > self.limit_bytes:
            raise SnapshotError(f"larger than {_mib(self.limit_bytes)}", "bytes")


def _mib(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n} bytes"


def _open_dir_nofollow(root: Path, rel_parts: list[str]) -> int:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in rel_parts:
            if part in ("", ".", ".."):
                raise SnapshotError(f"path component {part!r} not allowed")
            try:
                nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                raise SnapshotError(f"{part}: {exc.strerror} (symlinks are not followed)") from exc
            os.close(fd)
            fd = nfd
        return fd
    except BaseException:
        os.close(fd)
        raise


def _scan(fd: int) -> Iterator[tuple[str, str]]:
    """Yield (name, kind) for the entries of the directory open at `fd`; kind is dir, file or other.

    The kind is only what the listing said; the entry may be swapped before it is opened, so
    every open re-checks it. (A seam for tests, which replace entries right after listing.)
    """
    with os.scandir(fd) as it:
        for entry in it:
            try:
                if entry.is_symlink():
                    kind = "other"
                elif entry.is_dir(follow_symlinks=False):
                    kind = "dir"
                elif entry.is_file(follow_symlinks=False):
                    kind = "file"
                else:
                    kind = "other"
            except OSError:
                kind = "other"  # vanished while we looked
            yield entry.name, kind


def _copy_file(name: str, src_dir: int, dst_dir: int, budget: SnapshotBudget) -> None:
    try:
        src = os.open(name, _SRC_FILE_FLAGS, dir_fd=src_dir)
    except OSError as exc:
        if exc.errno in _RACED:
            return
        raise
    try:
        st = os.fstat(src)
        if not stat.S_ISREG(st.st_mode):
            return  # swapped for a fifo or device after listing
        if budget.bytes + st.st_size > budget.limit_bytes:  # fail before copying what cannot fit
            raise SnapshotError(f"larger than {_mib(budget.limit_bytes)}", "bytes")
        dst = os.open(name, _DST_FILE_FLAGS, 0o644, dir_fd=dst_dir)
        try:
            os.fchmod(dst, 0o755 if st.st_mode & stat.S_IXUSR else 0o644)
            while chunk := os.read(src, CHUNK):
                budget.add_bytes(len(chunk))  # counts what is read: the file may grow as we copy
                view = memoryview(chunk)
                while view:
                    view = view[os.write(dst, view) :]
        finally:
            os.close(dst)
    finally:
        os.close(src)


def _copy_dir(src_dir: int, dst_dir: int, depth: int, budget: SnapshotBudget) -> None:
    for name, kind in _scan(src_dir):
        budget.add_entry()
        if kind == "file":
            _copy_file(name, src_dir, dst_dir, budget)
        elif kind == "dir":
            if depth >= MAX_DEPTH:
                raise SnapshotError(f"deeper than {MAX_DEPTH} levels")
            try:
                src_sub = os.open(name, _DIR_FLAGS, dir_fd=src_dir)
            except OSError as exc:
                if exc.errno in _RACED:
                    continue  # swapped for a symlink (or removed) after listing
                raise
            try:
                os.mkdir(name, 0o755, dir_fd=dst_dir)
                budget.dirs += 1
                dst_sub = os.open(name, _DIR_FLAGS, dir_fd=dst_dir)
                try:
                    os.fchmod(dst_sub, 0o755)
                    _copy_dir(src_sub, dst_sub, depth + 1, budget)
                finally:
                    os.close(dst_sub)
            finally:
                os.close(src_sub)
        # symlinks, fifos, sockets, devices: skipped


def snapshot_dir(
    root: Path,
    rel: str,
    dest: Path,
    limit_bytes: int = DEFAULT_LIMIT_BYTES,
    limit_entries: int = DEFAULT_LIMIT_ENTRIES,
    budget: SnapshotBudget | None = None,
) -> int:
    """Copy `root/rel` (a directory) to `dest`, which must be new or empty; symlinks are skipped.

    With `budget`, its limits apply (instead of `limit_bytes`/`limit_entries`) and it counts
    what was copied, also when the copy fails part-way.

    Returns:
        Bytes copied.

    Raises:
        SnapshotError: a component of `rel` is a symlink or not a directory, `dest` is not an empty
            directory, or the copy exceeds the byte, entry or depth limit.
    """
    parts = [p for p in Path(rel).parts if p not in ("", ".")] if rel not in ("", ".") else []
    top = _open_dir_nofollow(root, parts)
    try:
        dest.mkdir(parents=True, exist_ok=True)
        try:
            out = os.open(dest, _DIR_FLAGS)
        except OSError as exc:
            raise SnapshotError(f"destination {dest}: {exc.strerror}") from exc
        try:
            if os.listdir(out):
                raise SnapshotError(f"destination {dest} is not empty")
            os.fchmod(out, 0o755)
            budget = budget or SnapshotBudget(limit_bytes, limit_entries)
            _copy_dir(top, out, 0, budget)
            return budget.bytes
        finally:
            os.close(out)
    finally:
        os.close(top)


async def snapshot_dir_async(
    root: Path,
    rel: str,
    dest: Path,
    limit_bytes: int = DEFAULT_LIMIT_BYTES,
    limit_entries: int = DEFAULT_LIMIT_ENTRIES,
    budget: SnapshotBudget | None = None,
) -> int:
    """`snapshot_dir` in a worker thread, so a large copy does not stall the event loop."""
    return await asyncio.to_thread(snapshot_dir, root, rel, dest, limit_bytes, limit_entries, budget)

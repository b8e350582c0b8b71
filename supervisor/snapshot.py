"""Race-free read-only snapshots of directories a sandbox can write.

A nested run may read a folder of its parent's workspace. Bind-mounting that folder directly
would be racy: between our check and the engine's mount the parent's agents could swap a path
component for a symlink to a host directory. Instead the folder is copied, walking from a
trusted root with O_NOFOLLOW at every step, into a folder only the supervisor writes.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

DEFAULT_LIMIT_BYTES = 256 << 20
CHUNK = 1 << 20


class SnapshotError(Exception):
    """The folder cannot be snapshotted safely (escape attempt, not a directory, too large)."""


def _open_dir_nofollow(root: Path, rel_parts: list[str]) -> int:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in rel_parts:
            if part in ("", ".", ".."):
                raise SnapshotError(f"path component {part!r} not allowed")
            try:
                nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except OSError as exc:
                raise SnapshotError(f"{part}: {exc.strerror} (symlinks are not followed)") from exc
            os.close(fd)
            fd = nfd
        return fd
    except BaseException:
        os.close(fd)
        raise


def snapshot_dir(root: Path, rel: str, dest: Path, limit_bytes: int = DEFAULT_LIMIT_BYTES) -> int:
    """Copy `root/rel` (a directory) to `dest`; symlinks are copied as links, never followed.

    Returns:
        Bytes copied.

    Raises:
        SnapshotError: a component is a symlink or not a directory, or the copy exceeds the limit.
    """
    parts = [p for p in Path(rel).parts if p not in ("", ".")] if rel not in ("", ".") else []
    top = _open_dir_nofollow(root, parts)
    total = 0
    dest.mkdir(parents=True, exist_ok=True)
    os.chmod(dest, 0o755)
    try:
        for dirpath, dirnames, filenames, dfd in os.fwalk(".", dir_fd=top, follow_symlinks=False):
            out_dir = dest / dirpath
            for name in dirnames:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    os.symlink(os.readlink(name, dir_fd=dfd), out_dir / name)
                else:
                    (out_dir / name).mkdir(mode=0o755, exist_ok=True)
            for name in filenames:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    os.symlink(os.readlink(name, dir_fd=dfd), out_dir / name)
                    continue
                if not stat.S_ISREG(st.st_mode):
                    continue  # fifos, sockets, devices: nothing a reader needs
                total += st.st_size
                if total > limit_bytes:
                    raise SnapshotError(f"larger than {limit_bytes >> 20} MiB")
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
                try:
                    if not stat.S_ISREG(os.fstat(fd).st_mode):
                        continue
                    with open(out_dir / name, "wb") as out:
                        while chunk := os.read(fd, CHUNK):
                            out.write(chunk)
                    os.chmod(out_dir / name, 0o644 | (0o111 if st.st_mode & 0o100 else 0))
                finally:
                    os.close(fd)
    finally:
        os.close(top)
    return total

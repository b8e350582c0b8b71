"""Measuring and copying folders a sandbox wrote, without following anything it planted.

Both walk with directory fds (`O_NOFOLLOW` at every step, names never joined into long paths),
so symlinks, deep nesting and odd names cannot send us outside the tree. The copy preserves
modes (without setuid/setgid), owners, times, symlinks (as links) and hard links (as links),
and keeps sparse files sparse: it is never larger than what the source filesystem holds.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

MAX_DEPTH = 128
CHUNK = 1 << 20
DIR_BYTES = 4096  # what a directory costs on the host, at least

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_SRC_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_DST_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_GONE = {errno.ENOENT, errno.ELOOP, errno.ENOTDIR, errno.ENXIO, errno.EISDIR}


@dataclass
class CopyStats:
    bytes: int = 0  # data and directories written
    inodes: int = 0  # entries created
    skipped: int = 0  # fifos, sockets, devices, entries deeper than MAX_DEPTH
    truncated: int = 0  # files cut short at the copy's byte limit
    links: dict[int, str] = field(default_factory=dict)  # source inode -> path below the destination


# -- measuring -------------------------------------------------------------------------------


@dataclass
class _Walk:
    limit_bytes: int
    limit_inodes: int
    bytes: int = 0
    inodes: int = 0
    seen: set[tuple[int, int]] = field(default_factory=set)

    @property
    def over(self) -> bool:
        return self.bytes > self.limit_bytes or self.inodes > self.limit_inodes


def walk_use(roots: Iterable[Path], limit_bytes: int, limit_inodes: int) -> tuple[int, int]:
    """Bytes (allocated blocks) and inodes below `roots`, the roots included.

    Stops as soon as `limit` is passed, so a walk costs at most the limit's inodes; a tree
    deeper than MAX_DEPTH counts as past the limit (nobody nests that deep but to hide).
    """
    walk = _Walk(limit_bytes, limit_inodes)
    for root in roots:
        try:
            fd = os.open(root, _DIR_FLAGS)
        except OSError:
            continue
        try:
            walk.inodes += 1
            walk.bytes += DIR_BYTES
            _walk(fd, 0, walk)
        finally:
            os.close(fd)
        if walk.over:
            break
    return walk.bytes, walk.inodes


def _walk(fd: int, depth: int, walk: _Walk) -> None:
    try:
        it = os.scandir(fd)
    except OSError:
        return
    with it:
        for entry in it:
            if walk.over:
                return
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue  # gone while we looked
            if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if key in walk.seen:
                    continue  # another name of a file already counted
                walk.seen.add(key)
            walk.inodes += 1
            walk.bytes += st.st_blocks * 512
            if stat.S_ISDIR(st.st_mode):
                if depth >= MAX_DEPTH:
                    walk.bytes = walk.limit_bytes + 1
                    return
                try:
                    sub = os.open(entry.name, _DIR_FLAGS, dir_fd=fd)
                except OSError:
                    continue
                try:
                    _walk(sub, depth + 1, walk)
                finally:
                    os.close(sub)


# -- copying ---------------------------------------------------------------------------------


def copy_tree(src: Path, dst: Path, stats: CopyStats, limit_bytes: int) -> None:
    """Copy the contents of folder `src` into the existing, empty folder `dst`.

    Files are cut short (and counted in `stats.truncated`) once `stats.bytes` would pass
    `limit_bytes`. The source must no longer change (its sandbox has exited).

    Raises:
        OSError: the destination could not be written.
    """
    sfd = os.open(src, _DIR_FLAGS)
    try:
        dfd = os.open(dst, _DIR_FLAGS)
        try:
            root_fd = os.dup(dfd)
            try:
                _copy_dir(sfd, dfd, root_fd, "", 0, stats, limit_bytes)
                _copy_meta(os.fstat(sfd), dfd)
            finally:
                os.close(root_fd)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)


def _copy_meta(st: os.stat_result, fd: int) -> None:
    os.fchmod(fd, stat.S_IMODE(st.st_mode) & ~(stat.S_ISUID | stat.S_ISGID))
    if os.geteuid() == 0:
        os.fchown(fd, st.st_uid, st.st_gid)
    os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))


def _copy_dir(sfd: int, dfd: int, root_fd: int, rel: str, depth: int, stats: CopyStats, limit: int) -> None:
    with os.scandir(sfd) as it:
        entries = [e.name for e in it]
    for name in entries:
        try:
            st = os.stat(name, dir_fd=sfd, follow_symlinks=False)
        except OSError:
            continue
        here = f"{rel}/{name}" if rel else name
        if stat.S_ISDIR(st.st_mode):
            if depth >= MAX_DEPTH:
                stats.skipped += 1
                continue
            os.mkdir(name, 0o700, dir_fd=dfd)
            stats.inodes += 1
            stats.bytes += DIR_BYTES
            s_sub = os.open(name, _DIR_FLAGS, dir_fd=sfd)
            try:
                d_sub = os.open(name, _DIR_FLAGS, dir_fd=dfd)
                try:
                    _copy_dir(s_sub, d_sub, root_fd, here, depth + 1, stats, limit)
                    _copy_meta(st, d_sub)
                finally:
                    os.close(d_sub)
            finally:
                os.close(s_sub)
        elif stat.S_ISREG(st.st_mode):
            if st.st_nlink > 1 and st.st_ino in stats.links:
                with contextlib.suppress(OSError):
                    os.link(stats.links[st.st_ino], name, src_dir_fd=root_fd, dst_dir_fd=dfd, follow_symlinks=False)
                    continue
            _copy_file(name, st, sfd, dfd, stats, limit)
            if st.st_nlink > 1:
                stats.links[st.st_ino] = here
        elif stat.S_ISLNK(st.st_mode):
            target = os.readlink(name, dir_fd=sfd)
            os.symlink(target, name, dir_fd=dfd)
            stats.inodes += 1
            if os.geteuid() == 0:
                os.chown(name, st.st_uid, st.st_gid, dir_fd=dfd, follow_symlinks=False)
            with contextlib.suppress(OSError):
                os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dfd, follow_symlinks=False)
        else:
            stats.skipped += 1  # fifos, sockets: nothing a workspace reader needs


def _copy_file(name: str, st: os.stat_result, sfd: int, dfd: int, stats: CopyStats, limit: int) -> None:
    try:
        src = os.open(name, _SRC_FLAGS, dir_fd=sfd)
    except OSError as exc:
        if exc.errno in _GONE:
            return
        raise
    try:
        dst = os.open(name, _DST_FLAGS, 0o600, dir_fd=dfd)
        stats.inodes += 1
        try:
            if _copy_data(src, dst, st.st_size, stats, limit):
                os.ftruncate(dst, st.st_size)
            else:
                stats.truncated += 1
            _copy_meta(st, dst)
        finally:
            os.close(dst)
    finally:
        os.close(src)


def _copy_data(src: int, dst: int, size: int, stats: CopyStats, limit: int) -> bool:
    """Copy the data extents only (holes stay holes); False when cut short at `limit`."""
    offset = 0
    while offset < size:
        try:
            data = os.lseek(src, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return True  # only a hole is left
            raise
        hole = os.lseek(src, data, os.SEEK_HOLE)
        pos = data
        while pos < hole:
            room = limit - stats.bytes
            if room <= 0:
                return False
            chunk = os.pread(src, min(CHUNK, hole - pos, room), pos)
            if not chunk:
                return True
            view = memoryview(chunk)
            at = pos
            while view:
                n = os.pwrite(dst, view, at)
                view = view[n:]
                at += n
            pos += len(chunk)
            stats.bytes += len(chunk)
        offset = hole
    return True

"""File access confined to the workspace and the context paths, immune to symlink escapes."""

from __future__ import annotations

import contextlib
import errno
import heapq
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# O_NOFOLLOW on every component we open: realpath() checked the path once, and walking it
# again without following links means a symlink swapped in afterwards fails instead of
# leading out of the sandbox.
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK  # a FIFO must not hang us
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC


class FileToolError(Exception):
    """A path or file operation the tools refuse; `str()` is the message shown to the model."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


@dataclass(frozen=True)
class _Root:
    real: str
    writable: bool


@dataclass(frozen=True)
class _Target:
    root: _Root
    parts: tuple[str, ...]  # components below root.real, none of them "." or ".."
    display: str


@dataclass(frozen=True)
class FileRead:
    display: str
    text: str
    size: int
    truncated: bool


@dataclass(frozen=True)
class FileWritten:
    display: str
    size: int
    created: bool


@dataclass(frozen=True)
class DirEntry:
    name: str
    type: str  # file | dir | symlink | other
    size: int | None  # bytes for files, None otherwise


@dataclass(frozen=True)
class DirListing:
    display: str
    entries: tuple[DirEntry, ...]
    total: int


def _entry_type(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "other"


class FileAccess:
    """Reads, writes and lists files under a workspace and a set of context paths.

    Paths are relative to the workspace or absolute. A path is resolved with
    `os.path.realpath` and must land inside the workspace or a context path; the most
    specific containing root decides whether writing is allowed.
    """

    def __init__(
        self,
        workspace: Path,
        context_paths: Sequence[tuple[Path, bool]] = (),
        *,
        max_file_bytes: int,
        max_list_entries: int = 500,
    ) -> None:
        self.workspace = os.path.realpath(workspace)
        roots = [_Root(self.workspace, True)]
        roots += [_Root(os.path.realpath(p), bool(w)) for p, w in context_paths]
        # Longest first, so a read-only context path nested in the workspace (or the
        # workspace nested in a context path) wins over its enclosing root.
        self._roots = sorted(roots, key=lambda r: len(r.real), reverse=True)
        self.max_file_bytes = max_file_bytes
        self.max_list_entries = max_list_entries

    def _display(self, real: str) -> str:
        if real == self.workspace:
            return "."
        if real.startswith(self.workspace + os.sep):
            return os.path.relpath(real, self.workspace)
        return real

    def resolve(self, raw: str, *, write: bool = False) -> _Target:
        """Map a user-supplied path to a root and components, refusing escapes.

        Raises:
            FileToolError: the path is empty, outside every root, or read-only for a write.
        """
        if not raw:
            raise FileToolError(repr(raw), "empty path")
        if "\0" in raw:
            raise FileToolError(repr(raw), "path contains a NUL byte")
        candidate = raw if os.path.isabs(raw) else os.path.join(self.workspace, raw)
        real = os.path.realpath(candidate)
        for root in self._roots:
            if real == root.real or real.startswith(root.real.rstrip(os.sep) + os.sep):
                break
        else:
            raise FileToolError(raw, "resolves outside the workspace and the context paths; access refused")
        if write and not root.writable:
            raise FileToolError(raw, f"is inside the read-only context path {root.real}")
        rel = os.path.relpath(real, root.real)
        parts = () if rel == "." else tuple(rel.split(os.sep))
        return _Target(root, parts, self._display(real))

    def _open_dir(self, target: _Target, parts: Sequence[str], *, create: bool) -> int:
        fd = os.open(target.root.real, _DIR_FLAGS)
        try:
            for part in parts:
                if create:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, 0o755, dir_fd=fd)
                try:
                    child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise FileToolError(target.display, f"component {part!r} is not a directory") from exc
                    raise
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd

    def read(self, raw: str) -> FileRead:
        """Read up to `max_file_bytes` of a regular file as UTF-8 (undecodable bytes replaced).

        Raises:
            FileToolError: refused path, missing file, not a regular file.
            OSError: any other I/O failure.
        """
        target = self.resolve(raw)
        if not target.parts:
            raise FileToolError(target.display, "is a directory; use list_files")
        try:
            dir_fd = self._open_dir(target, target.parts[:-1], create=False)
            try:
                fd = os.open(target.parts[-1], _READ_FLAGS, dir_fd=dir_fd)
            finally:
                os.close(dir_fd)
        except FileNotFoundError as exc:
            raise FileToolError(target.display, "no such file") from exc
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise FileToolError(target.display, "is a symlink; access refused") from exc
            raise
        with open(fd, "rb", closefd=True) as f:
            st = os.fstat(f.fileno())
            if stat.S_ISDIR(st.st_mode):
                raise FileToolError(target.display, "is a directory; use list_files")
            if not stat.S_ISREG(st.st_mode):
                raise FileToolError(target.display, "is not a regular file")
            os.set_blocking(f.fileno(), True)
            data = f.read(self.max_file_bytes + 1)
        truncated = len(data) > self.max_file_bytes
        data = data[: self.max_file_bytes]
        return FileRead(
            target.display,
            data.decode("utf-8", errors="replace"),
            size=max(st.st_size, len(data)),
            truncated=truncated,
        )

    def write(self, raw: str, content: str) -> FileWritten:
        """Create or overwrite a file with UTF-8 `content`, creating parent directories.

        Raises:
            FileToolError: refused path (outside, read-only, symlinked, a directory).
            OSError: any other I/O failure (disk full, permissions).
        """
        target = self.resolve(raw, write=True)
        if not target.parts:
            raise FileToolError(target.display, "is a directory")
        data = content.encode("utf-8")
        dir_fd = self._open_dir(target, target.parts[:-1], create=True)
        name = target.parts[-1]
        try:
            try:
                os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                created = False
            except FileNotFoundError:
                created = True
            try:
                fd = os.open(name, _WRITE_FLAGS, 0o644, dir_fd=dir_fd)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise FileToolError(target.display, "is a symlink; access refused") from exc
                if exc.errno == errno.EISDIR:
                    raise FileToolError(target.display, "is a directory") from exc
                raise
        finally:
            os.close(dir_fd)
        with open(fd, "wb", closefd=True) as f:
            f.write(data)
        return FileWritten(target.display, len(data), created)

    def list(self, raw: str = ".") -> DirListing:
        """List one level of a directory, sorted by name, at most `max_list_entries` entries.

        Raises:
            FileToolError: refused path, missing or not a directory.
            OSError: any other I/O failure.
        """
        target = self.resolve(raw)
        try:
            fd = self._open_dir(target, target.parts, create=False)
        except FileNotFoundError as exc:
            raise FileToolError(target.display, "no such directory") from exc
        try:
            total = 0
            names: list[str] = []
            with os.scandir(fd) as it:
                for entry in it:
                    total += 1
                    names.append(entry.name)
            kept = heapq.nsmallest(self.max_list_entries, names)
            entries = []
            for name in kept:
                try:
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue  # removed while we listed
                kind = _entry_type(st.st_mode)
                entries.append(DirEntry(name, kind, st.st_size if kind == "file" else None))
        finally:
            os.close(fd)
        return DirListing(target.display, tuple(entries), total)

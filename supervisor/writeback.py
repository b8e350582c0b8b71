"""`permission: write` context paths (MassGen's semantics): the winner writes a private copy; the
supervisor records the change set and applies it to the host path only when the run exits 0.

- Before the sandbox starts, each writable context folder is copied (symlinks skipped, bounded)
  next to the run's workspace; the copy is mounted read-write at the folder's host path, so paths
  mean the same inside and out. The host folder itself is never mounted writable.
- The engine's file tools write there only during the final presentation (a shell command can
  write the copy at any time; the copy is the boundary, never the host).
- At the end, the change set (added, changed and deleted regular files) goes to
  `final/<winner>/context/<n>/`: `changes.json`, `changes.diff` (unified diff) and `files/`.
- On exit 0 only, it is applied inside the host folder: symlinks in the copy are ignored, a path
  through a symlink (or a non-directory) on the host is refused, `protected_paths` are refused,
  and nothing outside the folder is touched. Nested runs never get writable context paths.
- The copy is the sandbox's: files are compared and copied a chunk at a time, and the change set
  keeps (and applies) at most the run's disk budget of them by apparent size.
"""

from __future__ import annotations

import difflib
import json
import os
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import SnapshotError
from .snapshot import snapshot_dir

MAX_DIFF_BYTES = 1 << 20  # text files above this are listed, not diffed
# What a change set may keep (and so apply) in all, by the files' apparent sizes: the sandbox
# writes the copy, so a sparse or huge file must not become that much host disk or memory.
# The lifecycle passes the run's disk budget.
DEFAULT_MAX_BYTES = 1 << 30
_CHUNK = 1 << 20


@dataclass
class WriteCopy:
    index: int  # position in orchestrator.context_paths
    host: Path  # the user's folder (resolved)
    copy: Path  # the private copy the sandbox writes
    protected: tuple[str, ...] = ()
    applied: list[str] = field(default_factory=list)
    refused: list[dict[str, str]] = field(default_factory=list)


def prepare(host: Path, copy: Path, index: int, protected: list[str], uid: int | None) -> WriteCopy:
    """Copy `host` to `copy` (symlinks skipped) and hand it to the sandbox's user.

    Raises:
        SnapshotError: the folder cannot be copied (not a directory, too large, a symlink).
    """
    if not host.is_dir():
        raise SnapshotError(f"{host}: permission: write needs a directory")
    snapshot_dir(host, ".", copy)
    if uid is not None:
        for dirpath, dirs, files in os.walk(copy):
            for name in (*dirs, *files):
                os.lchown(os.path.join(dirpath, name), uid, uid)
        os.chown(copy, uid, uid)
    return WriteCopy(index, host, copy, tuple(p.strip("/") for p in protected if p.strip("/")))


def _regular_files(root: Path) -> tuple[dict[str, Path], list[str]]:
    """Regular files under `root` by relative path, and the symlinks (never followed)."""
    files: dict[str, Path] = {}
    links: list[str] = []
    for dirpath, dirs, names in os.walk(root, followlinks=False):
        for name in list(dirs):
            if os.path.islink(os.path.join(dirpath, name)):
                links.append(os.path.relpath(os.path.join(dirpath, name), root))
                dirs.remove(name)
        for name in names:
            full = os.path.join(dirpath, name)
            mode = os.lstat(full).st_mode
            rel = os.path.relpath(full, root)
            if stat.S_ISLNK(mode):
                links.append(rel)
            elif stat.S_ISREG(mode):
                files[rel] = Path(full)
    return files, sorted(links)


def _open(path: Path) -> Any:
    return os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb")


def _read(path: Path) -> bytes:
    """A whole file: only for files known to be at most MAX_DIFF_BYTES (diffs)."""
    with _open(path) as fh:
        data: bytes = fh.read(MAX_DIFF_BYTES + 1)
        return data


def _size(path: Path) -> int:
    return os.lstat(path).st_size


def _same(a: Path, b: Path) -> bool:
    """Equal contents, compared a chunk at a time (never a whole file in memory)."""
    if _size(a) != _size(b):
        return False
    with _open(a) as fa, _open(b) as fb:
        while True:
            ca, cb = fa.read(_CHUNK), fb.read(_CHUNK)
            if ca != cb:
                return False
            if not ca:
                return True


def _copy(src: Path, dst: Path, limit: int) -> bool:
    """Stream `src` (no symlink followed) into a new `dst`; False (and no `dst`) past `limit` bytes."""
    copied = 0
    with _open(src) as fin, open(dst, "wb") as fout:
        while chunk := fin.read(_CHUNK):
            copied += len(chunk)
            if copied > limit:
                break
            fout.write(chunk)
    if copied > limit:
        dst.unlink()
        return False
    return True


def _protected(rel: str, protected: tuple[str, ...]) -> bool:
    return any(rel == p or rel.startswith(p + "/") for p in protected)


def _host_target_ok(root: Path, rel: str) -> str | None:
    """Why `root/rel` may not be written, or None: every existing component must be a real
    directory (the last a regular file or absent), so nothing resolves outside `root`."""
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return "not a plain relative path"
    cur = root
    for i, part in enumerate(parts):
        cur = cur / part
        try:
            mode = os.lstat(cur).st_mode
        except FileNotFoundError:
            return None
        if stat.S_ISLNK(mode):
            return "a symlink on the host path"
        last = i == len(parts) - 1
        if not last and not stat.S_ISDIR(mode):
            return "a non-directory on the host path"
        if last and not stat.S_ISREG(mode):
            return "not a regular file on the host"
    return None


def _diff(rel: str, old_path: Path | None, new_path: Path | None) -> list[str]:
    if max(_size(p) if p is not None else 0 for p in (old_path, new_path)) > MAX_DIFF_BYTES:
        return [f"Files a/{rel} and b/{rel} differ (over {MAX_DIFF_BYTES} bytes)\n"]
    old = _read(old_path) if old_path is not None else None
    new = _read(new_path) if new_path is not None else None
    try:
        a = (old or b"").decode("utf-8").splitlines(keepends=True)
        b = (new or b"").decode("utf-8").splitlines(keepends=True)
    except UnicodeDecodeError:
        return [f"Binary files a/{rel} and b/{rel} differ\n"]
    return list(
        difflib.unified_diff(
            a, b, fromfile="/dev/null" if old is None else f"a/{rel}", tofile="/dev/null" if new is None else f"b/{rel}"
        )
    )


def record_and_apply(wc: WriteCopy, dest: Path, apply: bool, max_bytes: int = DEFAULT_MAX_BYTES) -> dict[str, Any]:
    """Write the change set to `dest` (final/<winner>/context/<n>/) and, with `apply`, into the host folder.

    Files are compared, kept and applied a chunk at a time; files past `max_bytes` in all (by
    their apparent sizes, in path order) are refused: neither kept nor applied.

    Returns:
        The change set as written to `dest/changes.json`.
    """
    new_files, new_links = _regular_files(wc.copy)
    old_files, _ = _regular_files(wc.host)
    added = sorted(set(new_files) - set(old_files))
    deleted = sorted(set(old_files) - set(new_files))
    changed = sorted(r for r in set(new_files) & set(old_files) if not _same(new_files[r], old_files[r]))
    dest.mkdir(parents=True, exist_ok=True)
    diff: list[str] = []
    refused = [{"path": rel, "why": "a symlink in the copy: ignored"} for rel in new_links]
    todo: list[tuple[str, Path | None]] = []
    kept_bytes = 0
    for rel in (*added, *changed, *deleted):
        new = new_files.get(rel)
        kept: Path | None = None
        if new is not None:
            kept = dest / "files" / rel
            kept.parent.mkdir(parents=True, exist_ok=True)
            size = _size(new)
            if kept_bytes + size > max_bytes or not _copy(new, kept, max_bytes - kept_bytes):
                refused.append({"path": rel, "why": f"over the change set's {max_bytes} byte limit: not kept"})
                continue
            kept_bytes += _size(kept)
        diff += _diff(rel, old_files.get(rel), kept)
        if _protected(rel, wc.protected):
            refused.append({"path": rel, "why": "under protected_paths"})
            continue
        why = _host_target_ok(wc.host, rel)
        if why is not None:
            refused.append({"path": rel, "why": why})
            continue
        todo.append((rel, kept))
    applied: list[str] = []
    if apply:
        for rel, content in todo:
            target = wc.host / rel
            if _host_target_ok(wc.host, rel) is not None:  # checked again, just before writing
                refused.append({"path": rel, "why": "the host path changed during the run"})
                continue
            if content is None:
                os.unlink(target)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                if _host_target_ok(wc.host, rel) is not None:
                    refused.append({"path": rel, "why": "the host path changed during the run"})
                    continue
                tmp = target.parent / f".{target.name}.massgen-tmp"
                with _open(content) as fin, open(tmp, "wb") as fout:
                    shutil.copyfileobj(fin, fout, _CHUNK)
                os.replace(tmp, target)
            applied.append(rel)
    doc = {
        "context_path": str(wc.host),
        "index": wc.index,
        "added": added,
        "changed": changed,
        "deleted": deleted,
        "applied": applied,
        "refused": refused,
        "applied_to_host": apply,
    }
    (dest / "changes.diff").write_text("".join(diff), encoding="utf-8")
    (dest / "changes.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    wc.applied, wc.refused = applied, refused
    return doc


def discard(wc: WriteCopy) -> None:
    shutil.rmtree(wc.copy, ignore_errors=True)

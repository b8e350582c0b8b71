"""Snapshots of sandbox-writable folders for nested runs: copied without ever following a symlink."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from supervisor import snapshot
from supervisor.errors import SnapshotError
from supervisor.snapshot import snapshot_dir, snapshot_dir_async


def _tree(top: Path) -> dict[str, str]:
    """Every entry below `top` (relative path -> kind), without following links."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            kind = "link" if p.is_symlink() else "dir" if p.is_dir() else "file"
            out[str(p.relative_to(top))] = kind
    return out


def test_copies_files_and_dirs_and_skips_symlinks(tmp_path: Path) -> None:
    """Files and subfolders are copied; symlinks (to dirs, files, or dangling) are skipped, not recreated."""
    root = tmp_path / "ws"
    (root / "data" / "sub").mkdir(parents=True)
    (root / "data" / "a.txt").write_text("A")
    (root / "data" / "sub" / "b.txt").write_text("B")
    (root / "data" / "run.sh").write_text("#!/bin/sh\n")
    (root / "data" / "run.sh").chmod(0o700)
    (root / "data" / "etc").symlink_to("/etc")
    (root / "data" / "passwd").symlink_to("/etc/passwd")
    (root / "data" / "sub" / "dangling").symlink_to("/nonexistent")
    os.mkfifo(root / "data" / "fifo")
    n = snapshot_dir(root, "data", tmp_path / "snap")
    assert n == 2 + len("#!/bin/sh\n")
    snap = tmp_path / "snap"
    assert _tree(snap) == {"a.txt": "file", "run.sh": "file", "sub": "dir", "sub/b.txt": "file"}
    assert (snap / "a.txt").read_text() == "A"
    assert (snap / "sub" / "b.txt").read_text() == "B"
    assert (snap / "run.sh").stat().st_mode & 0o777 == 0o755
    assert (snap / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (snap / "sub").stat().st_mode & 0o777 == 0o755


def test_symlinked_component_is_refused(tmp_path: Path) -> None:
    """A path component swapped for a symlink (even to a real folder) is refused, never copied through."""
    root = tmp_path / "ws"
    root.mkdir()
    outside = tmp_path / "outside"
    (outside / "data").mkdir(parents=True)
    (outside / "data" / "secret").write_text("s")
    (root / "agent").symlink_to(outside)
    with pytest.raises(SnapshotError):
        snapshot_dir(root, "agent/data", tmp_path / "snap")
    assert not (tmp_path / "snap" / "secret").exists()


def test_dotdot_and_files_and_size_limit_are_refused(tmp_path: Path) -> None:
    """`..` components, a file instead of a folder, and copies past the size limit are refused."""
    root = tmp_path / "ws"
    (root / "d").mkdir(parents=True)
    (root / "d" / "big").write_bytes(b"x" * 2048)
    (root / "f").write_text("x")
    for rel in ("../ws", "f"):
        with pytest.raises(SnapshotError):
            snapshot_dir(root, rel, tmp_path / f"snap{len(rel)}")
    with pytest.raises(SnapshotError, match="larger than"):
        snapshot_dir(root, "d", tmp_path / "snap-big", limit_bytes=1024)


def test_entry_and_depth_limits_are_refused(tmp_path: Path) -> None:
    """Too many entries or too deep a tree is refused rather than walked without end."""
    root = tmp_path / "ws"
    (root / "many").mkdir(parents=True)
    for i in range(20):
        (root / "many" / f"f{i}").write_text("x")
    with pytest.raises(SnapshotError, match="more than 10 entries"):
        snapshot_dir(root, "many", tmp_path / "snap-many", limit_entries=10)
    assert snapshot_dir(root, "many", tmp_path / "snap-many-ok", limit_entries=20) == 20

    deep = root / "deep"
    p = deep
    for _ in range(snapshot.MAX_DEPTH):
        p = p / "d"
    p.mkdir(parents=True)
    snapshot_dir(root, "deep", tmp_path / "snap-deep-ok")  # exactly MAX_DEPTH levels: fine
    (p / "d").mkdir()
    with pytest.raises(SnapshotError, match="deeper than"):
        snapshot_dir(root, "deep", tmp_path / "snap-deep")


def test_destination_must_be_empty(tmp_path: Path) -> None:
    """A non-empty destination, or one that is a symlink, is refused (files are created with O_EXCL)."""
    root = tmp_path / "ws"
    (root / "d").mkdir(parents=True)
    (root / "d" / "a").write_text("A")
    dest = tmp_path / "snap"
    dest.mkdir()
    (dest / "a").write_text("old")
    with pytest.raises(SnapshotError, match="not empty"):
        snapshot_dir(root, "d", dest)
    assert (dest / "a").read_text() == "old"
    (tmp_path / "linkdest").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(SnapshotError):
        snapshot_dir(root, "d", tmp_path / "linkdest")
    assert not list((tmp_path / "elsewhere").iterdir())


def _swap_after_listing(monkeypatch: pytest.MonkeyPatch, name: str, swap: Callable[[], None]) -> None:
    """Make the walk see a stale listing: `swap()` runs after the listing that contains `name`."""
    real_scan = snapshot._scan

    def scan(fd: int) -> Iterator[tuple[str, str]]:
        entries = list(real_scan(fd))
        if any(n == name for n, _ in entries):
            swap()
        yield from entries

    monkeypatch.setattr(snapshot, "_scan", scan)


def test_symlink_swapped_for_real_dir_mid_walk_writes_nothing_outside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reported race: `a` is listed as a symlink to a host folder, then swapped for a real folder
    holding attacker files. The link is never recreated in dest, so nothing can be written through it."""
    root = tmp_path / "ws"
    work = root / "work"
    work.mkdir(parents=True)
    (work / "keep.txt").write_text("k")
    target = tmp_path / "host-etc"
    target.mkdir()
    (work / "a").symlink_to(target)

    def swap() -> None:
        (work / "a").unlink()
        (work / "a").mkdir()
        (work / "a" / "pwned.txt").write_text("written by the sandbox\n")

    _swap_after_listing(monkeypatch, "a", swap)
    dest = tmp_path / "snap"
    snapshot_dir(root, "work", dest)
    assert list(target.iterdir()) == []
    assert _tree(dest) == {"keep.txt": "file"}


def test_dir_swapped_for_symlink_mid_walk_is_not_followed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`a` is listed as a real folder, then swapped for a symlink to a host folder: the open with
    O_NOFOLLOW fails, the entry is skipped, and nothing of the host folder is copied or touched."""
    root = tmp_path / "ws"
    work = root / "work"
    (work / "a").mkdir(parents=True)
    (work / "b.txt").write_text("B")
    target = tmp_path / "host-etc"
    target.mkdir()
    (target / "shadow").write_text("secret")

    def swap() -> None:
        (work / "a").rmdir()
        (work / "a").symlink_to(target)
        (work / "b.txt").unlink()
        (work / "b.txt").symlink_to(target / "shadow")

    _swap_after_listing(monkeypatch, "a", swap)
    dest = tmp_path / "snap"
    assert snapshot_dir(root, "work", dest) == 0
    assert _tree(dest) == {}
    assert _tree(target) == {"shadow": "file"}
    assert (target / "shadow").read_text() == "secret"


def test_file_swapped_for_fifo_mid_walk_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file swapped for a fifo after listing is skipped without blocking on the open."""
    root = tmp_path / "ws"
    (root / "w").mkdir(parents=True)
    (root / "w" / "f").write_text("x")

    def swap() -> None:
        (root / "w" / "f").unlink()
        os.mkfifo(root / "w" / "f")

    _swap_after_listing(monkeypatch, "f", swap)
    assert snapshot_dir(root, "w", tmp_path / "snap") == 0
    assert _tree(tmp_path / "snap") == {}


def test_async_variant(tmp_path: Path) -> None:
    """snapshot_dir_async copies the same way in a worker thread."""
    root = tmp_path / "ws"
    (root / "d").mkdir(parents=True)
    (root / "d" / "a").write_text("AB")
    assert asyncio.run(snapshot_dir_async(root, "d", tmp_path / "snap")) == 2
    assert (tmp_path / "snap" / "a").read_text() == "AB"

"""Snapshots of sandbox-writable folders for nested runs: copied without ever following a symlink."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from supervisor.snapshot import SnapshotError, snapshot_dir


def test_copies_files_dirs_and_keeps_symlinks_as_links(tmp_path: Path) -> None:
    """Files and subfolders are copied; a symlink inside is recreated as a link, not followed."""
    root = tmp_path / "ws"
    (root / "data" / "sub").mkdir(parents=True)
    (root / "data" / "a.txt").write_text("A")
    (root / "data" / "sub" / "b.txt").write_text("B")
    (root / "data" / "etc").symlink_to("/etc")
    n = snapshot_dir(root, "data", tmp_path / "snap")
    assert n == 2
    assert (tmp_path / "snap" / "a.txt").read_text() == "A"
    assert (tmp_path / "snap" / "sub" / "b.txt").read_text() == "B"
    assert os.readlink(tmp_path / "snap" / "etc") == "/etc"
    assert not (tmp_path / "snap" / "etc" / "passwd").is_file() or (tmp_path / "snap" / "etc").is_symlink()


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
    with pytest.raises(SnapshotError):
        snapshot_dir(root, "d", tmp_path / "snap-big", limit_bytes=1024)

"""permission: write change sets: recorded with a diff, applied only inside the host folder and only when asked."""

from __future__ import annotations

import json
import os
from pathlib import Path

from supervisor.writeback import WriteCopy, discard, prepare, record_and_apply


def _setup(tmp_path: Path, protected: list[str] | None = None) -> tuple[Path, Path, Path]:
    host, outside = tmp_path / "host", tmp_path / "outside"
    (host / "docs").mkdir(parents=True)
    (host / "secret").mkdir()
    outside.mkdir()
    (host / "a.txt").write_text("a\n")
    (host / "docs" / "b.txt").write_text("b\n")
    (host / "secret" / "s.txt").write_text("s\n")
    (host / "gone.txt").write_text("bye\n")
    (outside / "o.txt").write_text("o\n")
    os.symlink(outside, host / "host-link")  # a symlink already in the host folder: not copied
    wc = prepare(host, tmp_path / "copy", 0, protected or [], None)
    return host, outside, wc.copy


def test_change_set_is_recorded_and_applied_inside_the_folder(tmp_path: Path) -> None:
    """Edits, additions and deletions apply; a diff and the new files are kept; symlinks never follow."""
    host, outside, copy = _setup(tmp_path, protected=["secret"])
    assert not (copy / "host-link").exists()
    (copy / "a.txt").write_text("A\n")
    (copy / "docs" / "new.txt").write_text("new\n")
    (copy / "secret" / "s.txt").write_text("leak\n")
    (copy / "gone.txt").unlink()
    os.symlink(outside / "o.txt", copy / "planted")
    doc = record_and_apply(WriteCopy(0, host, copy, ("secret",)), tmp_path / "final", apply=True)
    assert (host / "a.txt").read_text() == "A\n" and (host / "docs" / "new.txt").read_text() == "new\n"
    assert not (host / "gone.txt").exists()
    assert (host / "secret" / "s.txt").read_text() == "s\n"  # protected
    assert (outside / "o.txt").read_text() == "o\n" and not (host / "planted").exists()
    assert sorted(doc["applied"]) == ["a.txt", "docs/new.txt", "gone.txt"]
    assert {r["path"]: r["why"] for r in doc["refused"]} == {
        "planted": "a symlink in the copy: ignored",
        "secret/s.txt": "under protected_paths",
    }
    diff = (tmp_path / "final" / "changes.diff").read_text()
    assert "--- a/a.txt" in diff and "-a\n" in diff and "+A\n" in diff and "+++ /dev/null" in diff
    assert json.loads((tmp_path / "final" / "changes.json").read_text())["applied_to_host"] is True


def test_nothing_is_applied_without_apply_and_host_symlinks_are_refused(tmp_path: Path) -> None:
    """apply=False records only; a path that goes through a symlink on the host is refused."""
    host, outside, copy = _setup(tmp_path)
    (copy / "a.txt").write_text("A\n")
    (copy / "host-link").mkdir()  # in the copy a real folder, on the host a symlink to outside
    (copy / "host-link" / "o.txt").write_text("overwritten\n")
    wc = WriteCopy(0, host, copy)
    doc = record_and_apply(wc, tmp_path / "rec", apply=False)
    assert (host / "a.txt").read_text() == "a\n" and doc["applied"] == []
    doc = record_and_apply(wc, tmp_path / "rec2", apply=True)
    assert (outside / "o.txt").read_text() == "o\n"
    assert {"path": "host-link/o.txt", "why": "a symlink on the host path"} in doc["refused"]
    discard(wc)
    assert not copy.exists()


def test_huge_or_sparse_files_are_refused_by_the_size_limit_without_being_read(tmp_path: Path) -> None:
    """The sandbox writes the copy: a 64 GiB sparse file and files past the change set's limit are
    refused (neither kept nor applied), never read whole; what fits is kept, diffed and applied."""
    import tracemalloc

    host, _outside, copy = _setup(tmp_path)
    with open(copy / "sparse.bin", "wb") as fh:
        fh.truncate(64 << 30)
    (copy / "big.bin").write_bytes(os.urandom(3 << 20))
    (copy / "a.txt").write_text("A\n")
    tracemalloc.start()
    try:
        doc = record_and_apply(WriteCopy(0, host, copy), tmp_path / "final", apply=True, max_bytes=2 << 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, peak
    why = {r["path"]: r["why"] for r in doc["refused"]}
    assert why["sparse.bin"].startswith("over the change set's") and why["big.bin"] == why["sparse.bin"]
    assert doc["applied"] == ["a.txt"]
    assert (host / "a.txt").read_text() == "A\n"
    assert not (host / "sparse.bin").exists() and not (host / "big.bin").exists()
    kept = tmp_path / "final" / "files"
    assert sorted(p.name for p in kept.rglob("*") if p.is_file()) == ["a.txt"]


def test_a_change_past_the_first_chunk_of_a_same_size_file_is_found(tmp_path: Path) -> None:
    """Contents are compared a chunk at a time: a file whose size is unchanged but whose last byte
    differs is a change, streamed into the host folder exactly."""
    host, _outside, copy = _setup(tmp_path)
    data = bytearray(os.urandom(3 << 20))
    (host / "blob.bin").write_bytes(bytes(data))
    (copy / "blob.bin").write_bytes(bytes(data))
    (copy / "same.bin").write_bytes(b"x" * 10)
    (host / "same.bin").write_bytes(b"x" * 10)
    data[-1] ^= 0xFF
    (copy / "blob.bin").write_bytes(bytes(data))
    doc = record_and_apply(WriteCopy(0, host, copy), tmp_path / "final", apply=True)
    assert doc["changed"] == ["blob.bin"]
    assert (host / "blob.bin").read_bytes() == bytes(data)
    assert "Files a/blob.bin and b/blob.bin differ" in (tmp_path / "final" / "changes.diff").read_text()

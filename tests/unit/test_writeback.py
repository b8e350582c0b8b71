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

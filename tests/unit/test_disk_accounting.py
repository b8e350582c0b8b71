"""Disk budgets without mounts: the config keys, the accounting tree, measuring and copying folders."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from agent_image.protocol.config import SandboxConfig
from agent_image.protocol.events import AnswerSubmitted, FinalAnswer
from agent_image.protocol.loader import ConfigError, parse_config_text
from agent_image.protocol.result import Reason, exit_code_for
from supervisor import diskquota
from supervisor.diskaccount import BLOCK, DiskAccount, measure_logdir
from supervisor.diskcopy import MAX_DEPTH, CopyStats, copy_tree, walk_use
from supervisor.diskquota import DiskUse, Mode, RunDisk, quota_mode
from supervisor.errors import SnapshotError
from supervisor.snapshot import SnapshotBudget, snapshot_dir

MiB = 1 << 20


# -- config ------------------------------------------------------------------------------------


def test_disk_defaults_to_one_gib_and_an_inode_per_8_kib() -> None:
    """No sandbox.disk: 1 GiB and 131072 inodes; a smaller disk scales its default inodes."""
    assert (SandboxConfig().disk_bytes, SandboxConfig().disk_inode_count) == (1 << 30, 131072)
    small = SandboxConfig(disk="64m")
    assert (small.disk_bytes, small.disk_inode_count) == (64 * MiB, 8192)


@pytest.mark.parametrize(("value", "expected"), [("512m", 512 * MiB), ("2GiB", 2 << 30), (64 * MiB, 64 * MiB)])
def test_disk_takes_human_sizes_like_memory(value: str | int, expected: int) -> None:
    """sandbox.disk parses like sandbox.memory: 512m, 2GiB or a byte count."""
    assert SandboxConfig(disk=value).disk_bytes == expected


def test_disk_too_small_or_too_many_inodes_is_a_config_error_naming_the_key() -> None:
    """Below 16m, or more inodes than one per KiB: config_invalid with the key in the message."""
    agents = "agents: [{id: a, backend: {type: scripted}}]\n"
    with pytest.raises(ConfigError) as small:
        parse_config_text(agents + "sandbox: {disk: 1m}\n", "c.yaml")
    assert "disk must be at least 16m" in str(small.value)
    with pytest.raises(ConfigError) as many:
        parse_config_text(agents + "sandbox: {disk: 16m, disk_inodes: 100000}\n", "c.yaml")
    assert "disk_inodes: at most one inode per KiB" in str(many.value)


def test_disk_quota_exceeded_is_an_execution_error() -> None:
    """disk_quota_exceeded exits 2."""
    assert exit_code_for(Reason.DISK_QUOTA_EXCEEDED) == 2


def test_context_paths_are_bounded() -> None:
    """A config listing more than 32 context paths is refused before anything is copied."""
    paths = ", ".join("{path: /workspace}" for _ in range(33))
    with pytest.raises(ConfigError, match="context_paths"):
        parse_config_text(
            f"agents: [{{id: a, backend: {{type: scripted}}}}]\norchestrator: {{context_paths: [{paths}]}}\n", "c.yaml"
        )


# -- the accounting tree ---------------------------------------------------------------------------


def test_a_childs_charge_counts_against_its_parent_and_the_root() -> None:
    """A grandchild's folders count in its parent's and the root's totals and reduce what they have left."""
    root = DiskAccount("r", DiskUse(100 * MiB, 1000))
    child = DiskAccount("c", DiskUse(50 * MiB, 500), parent=root)
    grand = DiskAccount("g", DiskUse(20 * MiB, 100), parent=child)
    root.folders = DiskUse(10 * MiB, 10)
    grand.folders = DiskUse(15 * MiB, 50)
    assert child.total() == DiskUse(15 * MiB, 50)
    assert root.total() == DiskUse(25 * MiB, 60)
    assert root.remaining() == DiskUse(75 * MiB, 940)
    assert root.over() is None and grand.over() is None
    grand.folders = DiskUse(95 * MiB, 50)  # a nested run filling far past its parents' budgets
    assert "nested runs 95.0 MiB" in (root.over() or "")
    assert child.over() is not None


def test_snapshots_charge_the_parent_and_full_filesystems_are_over() -> None:
    """Snapshot bytes and entries count for the run that asked for them; a full filesystem is over at once."""
    acct = DiskAccount("r", DiskUse(10 * MiB, 100))
    acct.charge_snapshot(DiskUse(6 * MiB, 60))
    acct.charge_snapshot(DiskUse(1 * MiB, 50))
    assert acct.total() == DiskUse(7 * MiB, 110)
    assert "snapshots 7.0 MiB, 110 inodes" in (acct.over() or "")
    fresh = DiskAccount("f", DiskUse(10 * MiB, 100))
    fresh.full = True
    assert "filesystem is full" in (fresh.over() or "")


def test_answers_in_the_log_dir_count_once_per_label(tmp_path: Path) -> None:
    """Each answer file costs its blocks and two inodes; rewriting a label does not count twice."""
    acct = DiskAccount("r", DiskUse(10 * MiB, 100))
    for content in ("x" * 10, "y" * 5000):
        acct.note_event(AnswerSubmitted(seq=1, ts=0, agent="a", label="agent1.1", content=content))
    acct.note_event(FinalAnswer(seq=2, ts=0, agent="a", content="z"))
    acct.refresh_logdir(tmp_path)
    base = measure_logdir(tmp_path, {})
    assert acct.logdir - base == DiskUse(2 * BLOCK + BLOCK + 2 * BLOCK, 4)


def test_log_dir_files_are_measured(tmp_path: Path) -> None:
    """massgen.log and events.jsonl count with their size in the log dir's charge."""
    before = measure_logdir(tmp_path, {})
    (tmp_path / "massgen.log").write_bytes(b"x" * (3 * MiB))
    (tmp_path / "events.jsonl").write_bytes(b"e" * MiB)
    after = measure_logdir(tmp_path, {})
    assert after.bytes - before.bytes >= 4 * MiB and after.inodes == before.inodes + 2


# -- measuring and copying -------------------------------------------------------------------------


def test_walk_counts_hard_links_once_and_stops_past_the_limit(tmp_path: Path) -> None:
    """Hard links are one inode; a walk stops as soon as the limit is passed."""
    (tmp_path / "f").write_bytes(b"x" * 100_000)
    for i in range(50):
        os.link(tmp_path / "f", tmp_path / f"l{i}")
    used, inodes = walk_use([tmp_path], 1 << 40, 1 << 40)
    assert inodes == 2 and used < 200_000
    for i in range(100):
        (tmp_path / f"e{i}").touch()
    _, inodes = walk_use([tmp_path], 1 << 40, 10)
    assert 10 < inodes < 20


def test_a_tree_deeper_than_max_depth_counts_as_past_the_limit(tmp_path: Path) -> None:
    """Nesting past MAX_DEPTH to hide data from the walk makes it report past the limit."""
    d = tmp_path
    for _ in range(MAX_DEPTH + 2):
        d = d / "d"
    d.mkdir(parents=True)
    used, _ = walk_use([tmp_path], 10 * MiB, 1 << 40)
    assert used > 10 * MiB


def test_copy_keeps_sparse_files_sparse_links_as_links_and_skips_fifos(tmp_path: Path) -> None:
    """A 1 GiB sparse file copies as a hole; hard links and symlinks stay links; setuid is dropped; fifos skipped."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "sub").mkdir(parents=True)
    dst.mkdir()
    with open(src / "sparse", "wb") as fh:
        fh.truncate(1 << 30)
        fh.seek(MiB)
        fh.write(b"data")
    (src / "sub" / "f").write_text("hello")
    os.chmod(src / "sub" / "f", 0o4755)
    os.link(src / "sub" / "f", src / "hard")
    os.symlink("/etc/passwd", src / "link")
    os.mkfifo(src / "fifo")
    stats = CopyStats()
    copy_tree(src, dst, stats, 10 * MiB)
    assert (dst / "sparse").stat().st_size == 1 << 30 and (dst / "sparse").stat().st_blocks * 512 < 2 * MiB
    assert (dst / "hard").stat().st_ino == (dst / "sub" / "f").stat().st_ino
    assert os.readlink(dst / "link") == "/etc/passwd"
    assert not (dst / "fifo").exists() and stats.skipped == 1
    assert stat.S_IMODE((dst / "sub" / "f").stat().st_mode) == 0o755
    assert stats.bytes < 2 * MiB


def test_copy_stops_at_its_byte_limit(tmp_path: Path) -> None:
    """Files past the copy's limit are cut short and counted, never copied whole."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    for i in range(4):
        (src / f"f{i}").write_bytes(os.urandom(MiB))
    stats = CopyStats()
    copy_tree(src, dst, stats, 2 * MiB + 10)
    assert stats.bytes <= 2 * MiB + 10 and stats.truncated >= 2
    assert sum((dst / f"f{i}").stat().st_size for i in range(4)) <= 2 * MiB + 10


def test_snapshot_budget_counts_a_failed_copy_and_names_the_limit(tmp_path: Path) -> None:
    """A snapshot past its byte limit says which limit, and its budget holds what was copied."""
    (tmp_path / "d").mkdir()
    for i in range(5):
        (tmp_path / "d" / f"f{i}").write_bytes(b"x" * 1000)
    budget = SnapshotBudget(2500, 100)
    with pytest.raises(SnapshotError) as exc:
        snapshot_dir(tmp_path, "d", tmp_path / "snap", budget=budget)
    assert exc.value.limit == "bytes" and budget.bytes <= 2500 and budget.entries >= 2


# -- modes -------------------------------------------------------------------------------------------


def test_quota_mode_polls_when_told_or_not_root(monkeypatch: pytest.MonkeyPatch) -> None:
    """MASSGEN_DISK_QUOTA=poll polls; a non-root supervisor polls and says why."""
    assert quota_mode({"MASSGEN_DISK_QUOTA": "poll"}) == (Mode.POLL, "MASSGEN_DISK_QUOTA=poll")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    mode, why = quota_mode({})
    assert mode == Mode.POLL and "not root" in why


def test_a_remote_engine_cannot_see_our_mounts(monkeypatch: pytest.MonkeyPatch) -> None:
    """DOCKER_HOST over tcp: the budget is polled (a mount there would not be the sandbox's)."""
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(shutil, "which", lambda tool: f"/sbin/{tool}")
    mode, why = quota_mode({"DOCKER_HOST": "tcp://10.0.0.1:2375"})
    assert mode == Mode.POLL and "remote" in why


def test_a_polled_disk_is_past_its_budget_once_the_folders_are(tmp_path: Path) -> None:
    """Poll mode: use() walks workspace and outbox; past the budget it says so; release removes nothing."""
    ws, out = tmp_path / "ws", tmp_path / "out"
    ws.mkdir()
    out.mkdir()
    disk = RunDisk("r", tmp_path, ws, out, DiskUse(2 * MiB, 100), Mode.POLL, "test")
    (ws / "a").write_bytes(os.urandom(MiB))
    assert disk.use()[1] is False
    (out / "b").write_bytes(os.urandom(2 * MiB))
    used, over = disk.use()
    assert over and used.bytes > 2 * MiB
    assert disk.release().bytes >= 3 * MiB and (ws / "a").exists() and (out / "b").exists()


def test_sweep_leaves_disks_of_live_owners_and_live_runs_alone(tmp_path: Path) -> None:
    """A disk whose owner process lives, or whose run still has a container, is kept; an orphan's state goes."""
    ws_root = tmp_path / "workspaces"
    runs = {
        "log_20260101_000000_000001_aaaaaa": os.getpid(),  # owner alive
        "log_20260101_000000_000002_bbbbbb": 2**22 + 1,  # owner gone, container alive
        "log_20260101_000000_000003_cccccc": 2**22 + 1,  # owner gone, nothing left: an orphan
    }
    for run_id, pid in runs.items():
        (ws_root / run_id).mkdir(parents=True)
        disk = RunDisk(run_id, tmp_path / run_id, ws_root / run_id, tmp_path / "out", DiskUse(MiB, 10), Mode.MOUNT)
        disk.owner_pid = pid
        disk.disks.mkdir(exist_ok=True)
        disk._write_state()
    diskquota.sweep(ws_root, lambda run_id: run_id.endswith("bbbbbb"))
    left = sorted(p.name for p in (ws_root / diskquota.DISKS_DIR).iterdir())
    assert left == [f"{r}.json" for r in list(runs)[:2]]


def test_sweep_reclaims_this_processs_own_disks_only_when_asked(tmp_path: Path) -> None:
    """reclaim_own (a batch with nothing in flight): disks this process owns go, unless the run is
    live; another live owner's disk stays either way."""
    ws_root = tmp_path / "workspaces"
    runs = {
        "log_20260101_000000_000001_aaaaaa": os.getpid(),  # ours, nothing running: reclaimed
        "log_20260101_000000_000002_bbbbbb": os.getpid(),  # ours, its container alive: kept
        "log_20260101_000000_000003_cccccc": 1,  # another live process's (init): kept
    }
    for run_id, pid in runs.items():
        (ws_root / run_id).mkdir(parents=True)
        disk = RunDisk(run_id, tmp_path / run_id, ws_root / run_id, tmp_path / "out", DiskUse(MiB, 10), Mode.MOUNT)
        disk.owner_pid = pid
        disk.disks.mkdir(exist_ok=True)
        disk._write_state()
    diskquota.sweep(ws_root, lambda run_id: run_id.endswith("bbbbbb"))
    assert len(list((ws_root / diskquota.DISKS_DIR).iterdir())) == 3  # without it: all kept
    diskquota.sweep(ws_root, lambda run_id: run_id.endswith("bbbbbb"), reclaim_own=True)
    left = sorted(p.name for p in (ws_root / diskquota.DISKS_DIR).iterdir())
    assert left == [f"{r}.json" for r in list(runs)[1:]]

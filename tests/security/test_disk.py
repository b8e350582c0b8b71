"""Disk budgets from inside real sandboxes: dd and inode floods end in ENOSPC and disk_quota_exceeded."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from supervisor.diskquota import DISKS_DIR, DiskUse, Mode, RunDisk, mount_points
from supervisor.runtime.base import LABEL_RUN, Mount
from supervisor.runtime.docker import DockerRuntime
from tests.cli_helpers import load, massgen_run, parse_lines, start_cli, write_config
from tests.docker.conftest import Sandboxes

MiB = 1 << 20


def _host_use(*roots: Path) -> tuple[int, int]:
    """Allocated bytes and inodes below `roots` on the host (hard links counted once)."""
    seen: set[int] = set()
    used, inodes = 0, 0
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in [*dirnames, *filenames]:
                st = os.lstat(os.path.join(dirpath, name))
                if st.st_ino in seen:
                    continue
                seen.add(st.st_ino)
                used += st.st_blocks * 512
                inodes += 1
    return used, inodes


def _run(
    tmp_path: Path, image: str, config: str, *, timeout: float = 120, **env: str
) -> tuple[dict[str, str], dict[str, Any]]:
    cfg = write_config(tmp_path, config)
    t0 = time.monotonic()
    p = massgen_run(["--automation", "--image", image, "--config", str(cfg), "q"], tmp_path, timeout=timeout, **env)
    elapsed = time.monotonic() - t0
    f = parse_lines(p.stdout)
    assert "LOG_DIR" in f, p.stdout + p.stderr
    result = load(Path(f["LOG_DIR"]) / "result.json")
    result["_elapsed"] = elapsed
    result["_stdout"] = p.stdout + p.stderr
    result["_rc"] = p.returncode
    return f, result


def _assert_released(runtime: DockerRuntime, tmp_path: Path, run_id: str) -> None:
    """No container, mount, image or state file of the run is left behind."""
    assert runtime.list_owned({LABEL_RUN: run_id}) == []
    disks = tmp_path / ".massgen" / "workspaces" / DISKS_DIR
    left = sorted(p.name for p in disks.iterdir()) if disks.exists() else []
    assert left == [], left
    assert not any(run_id in m for m in mount_points())


FILL_WORKSPACE = """\
agents:
  - id: a
    backend:
      type: scripted
      steps:
        - {shell: "dd if=/dev/zero of=/workspace/fill bs=1M count=400; sleep 60", timeout: 120}
        - answer: never
sandbox: {disk: 32m, stop_grace_seconds: 5}
"""


def test_dd_past_the_budget_into_the_workspace_ends_the_run_disk_quota_exceeded(
    runtime: DockerRuntime, agent_image: str, tmp_path: Path
) -> None:
    """dd of 400 MiB into /workspace with a 32 MiB budget: exit 2 disk_quota_exceeded, at most 32 MiB on the host."""
    f, res = _run(tmp_path, agent_image, FILL_WORKSPACE)
    assert (res["_rc"], res["exit_code"], res["reason"]) == (2, 2, "disk_quota_exceeded"), res
    assert "filesystem is full" in res["detail"]
    assert res["_elapsed"] < 40  # stopped when the budget was hit, not at the 60 s sleep's end
    workspace = tmp_path / ".massgen" / "workspaces" / f["RUN_ID"]
    fill = workspace / "fill"
    # The workspace is readable at its usual path after the run, and holds what fitted.
    assert 16 * MiB < fill.stat().st_size <= 32 * MiB
    used, _ = _host_use(workspace, Path(f["LOG_DIR"]))
    assert used <= 32 * MiB + 2 * MiB
    st = load(f["STATUS_FILE"])
    assert st["disk"]["mode"] == "mount" and st["disk"]["budget_bytes"] == 32 * MiB
    assert (st["run"]["state"], st["run"]["reason"]) == ("finished", "disk_quota_exceeded")
    _assert_released(runtime, tmp_path, f["RUN_ID"])


def test_dd_past_the_budget_into_the_outbox_ends_the_run_disk_quota_exceeded(
    runtime: DockerRuntime, agent_image: str, tmp_path: Path
) -> None:
    """dd into the outbox (the one host folder of the log dir a sandbox writes) is bounded by the same budget."""
    config = FILL_WORKSPACE.replace("/workspace/fill", "/run/massgen/outbox/fill")
    f, res = _run(tmp_path, agent_image, config)
    assert (res["exit_code"], res["reason"]) == (2, "disk_quota_exceeded"), res
    fill = Path(f["LOG_DIR"]) / "sandbox" / "fill"
    assert fill.stat().st_size <= 32 * MiB
    used, _ = _host_use(Path(f["LOG_DIR"]), tmp_path / ".massgen" / "workspaces" / f["RUN_ID"])
    assert used <= 32 * MiB + 2 * MiB
    _assert_released(runtime, tmp_path, f["RUN_ID"])


def test_an_inode_flood_is_bounded_by_disk_inodes(runtime: DockerRuntime, agent_image: str, tmp_path: Path) -> None:
    """A million empty files with disk_inodes 2000: exit 2 disk_quota_exceeded, at most 2000 inodes on the host."""
    config = """\
    agents:
      - id: a
        backend:
          type: scripted
          steps:
            - shell: |-
                python3 -c "
                for i in range(10**6): open(f'/workspace/f{i}', 'w').close()
                " ; sleep 60
              timeout: 120
            - answer: never
    sandbox: {disk: 64m, disk_inodes: 2000}
    """
    f, res = _run(tmp_path, agent_image, config)
    assert (res["exit_code"], res["reason"]) == (2, "disk_quota_exceeded"), res
    assert res["_elapsed"] < 40
    workspace = tmp_path / ".massgen" / "workspaces" / f["RUN_ID"]
    _, inodes = _host_use(workspace)
    assert 1000 < inodes <= 2000
    _assert_released(runtime, tmp_path, f["RUN_ID"])


def test_polled_budget_where_mounting_is_off_still_ends_the_run(
    runtime: DockerRuntime, agent_image: str, tmp_path: Path
) -> None:
    """MASSGEN_DISK_QUOTA=poll (as without privileges): the run still ends disk_quota_exceeded; status and log say polled."""
    config = FILL_WORKSPACE.replace("count=400", "count=64").replace("disk: 32m", "disk: 16m")
    f, res = _run(tmp_path, agent_image, config, MASSGEN_DISK_QUOTA="poll")
    assert (res["exit_code"], res["reason"]) == (2, "disk_quota_exceeded"), res
    st = load(f["STATUS_FILE"])
    assert st["disk"]["mode"] == "poll" and st["disk"]["detail"] == "MASSGEN_DISK_QUOTA=poll"
    log = (Path(f["LOG_DIR"]) / "massgen.log").read_text()
    assert "polled every 1s" in log
    _assert_released(runtime, tmp_path, f["RUN_ID"])


@pytest.fixture
def disks(tmp_path: Path) -> Iterator[list[RunDisk]]:
    """RunDisks made by a test; released in teardown whatever happened."""
    made: list[RunDisk] = []
    yield made
    for d in made:
        d.release()


def _disk(tmp_path: Path, name: str, budget: DiskUse, disks: list[RunDisk]) -> RunDisk:
    ws = tmp_path / "workspaces" / f"log_20260101_000000_000000_{name}"
    log_dir = tmp_path / "runs" / ws.name
    (log_dir / "sandbox").mkdir(parents=True)
    ws.mkdir(parents=True)
    disk = RunDisk.create(ws.name, log_dir, ws, log_dir / "sandbox", budget, (10001, 10001))
    disks.append(disk)
    assert disk.mode == Mode.MOUNT, disk.detail
    return disk


def test_writes_past_the_budget_fail_with_enospc_inside_and_other_runs_are_unaffected(
    sandboxes: Sandboxes, tmp_path: Path, disks: list[RunDisk]
) -> None:
    """In a full sandbox dd fails with ENOSPC; a second run's sandbox writes its own 20 MiB meanwhile."""
    full = _disk(tmp_path, "aaaaaa", DiskUse(24 * MiB, 1024), disks)
    other = _disk(tmp_path, "bbbbbb", DiskUse(64 * MiB, 1024), disks)

    def mounts(d: RunDisk) -> tuple[Mount, ...]:
        return (Mount(d.workspace, "/workspace", read_only=False), Mount(d.outbox, "/outbox", read_only=False))

    info, out = sandboxes.run(
        "sh",
        "-c",
        "dd if=/dev/zero of=/workspace/x bs=1M count=100 2>&1; echo rc=$?;"
        " dd if=/dev/zero of=/outbox/y bs=1M count=1 2>&1; echo rc=$?",
        mounts=mounts(full),
    )
    assert info.exit_code == 0, out
    assert "No space left on device" in out and "rc=1" in out, out
    used, full_now = full.use()
    assert full_now and used.bytes <= 24 * MiB
    assert full.image.stat().st_blocks * 512 <= 24 * MiB  # the host holds at most the budget
    info, out = sandboxes.run(
        "sh", "-c", "dd if=/dev/zero of=/workspace/x bs=1M count=20 2>&1; echo rc=$?", mounts=mounts(other)
    )
    assert "rc=0" in out, out
    assert other.use() == (other.use()[0], False)
    copied = full.release()
    assert (full.workspace / "x").stat().st_size <= 24 * MiB and copied.bytes <= 24 * MiB + MiB
    assert not full.image.exists() and str(full.mount) not in mount_points()


NESTED_PARENT = """\
agents:
  - id: a
    backend:
      type: scripted
      steps:
        - shell: |-
            mkdir -p {blob_dir} && head -c {size} /dev/urandom > {blob_dir}/blob
            cat > /workspace/child.yaml <<'EOF'
            {child}
            EOF
            massgen-run --automation --config /workspace/child.yaml q > /workspace/child.txt 2>&1; echo "rc=$?"
            cat /workspace/child.txt
          timeout: 120
          save_as: out
        - answer: "{{{{out}}}}"
        - vote: auto
sandbox: {{disk: {disk}}}
"""


def _child(paths: list[str]) -> str:
    entries = ", ".join(f"{{path: {p}}}" for p in paths)
    return (
        "agents: [{id: c, backend: {type: scripted, steps: [{answer: ok}, {vote: auto}]}}]\n"
        f"            orchestrator: {{context_paths: [{entries}]}}"
    )


def test_a_child_listing_the_workspace_ten_times_gets_one_snapshot_counted_against_the_parent(
    runtime: DockerRuntime, agent_image: str, tmp_path: Path
) -> None:
    """Ten entries of /workspace: one copy (context/0), and the parent's disk charge holds it once."""
    config = NESTED_PARENT.format(size=4 * MiB, blob_dir="/workspace", child=_child(["/workspace"] * 10), disk="256m")
    f, res = _run(tmp_path, agent_image, config, timeout=180)
    assert res["exit_code"] == 0, res
    answer = (Path(res["answer_file"])).read_text()
    assert "rc=0" in answer, answer
    [child] = list((Path(f["LOG_DIR"]) / "children").iterdir())
    assert sorted(p.name for p in (child / "context").iterdir()) == ["0"]
    assert (child / "context" / "0" / "blob").stat().st_size == 4 * MiB
    disk = load(f["STATUS_FILE"])["disk"]
    # the parent's workspace (4 MiB) + one snapshot (4 MiB) + logs; ten snapshots would be 44 MiB
    assert 8 * MiB <= disk["used_bytes"] < 16 * MiB, disk
    _assert_released(runtime, tmp_path, f["RUN_ID"])


def test_snapshots_past_the_parents_budget_refuse_the_child_disk_quota_exceeded(
    runtime: DockerRuntime, agent_image: str, tmp_path: Path
) -> None:
    """Three distinct 20 MiB snapshots with 64 MiB for the parent: the child ends exit 2 disk_quota_exceeded."""
    child = _child(["/workspace", "/workspace/agent_a", "/workspace/agent_a/d"])
    config = NESTED_PARENT.format(size=20 * MiB, blob_dir="/workspace/agent_a/d", child=child, disk="64m")
    f, _res = _run(tmp_path, agent_image, config, timeout=180)
    answer = (Path(f["LOG_DIR"]) / "final" / "a" / "answer.txt").read_text()
    assert "FAILED: disk_quota_exceeded: " in answer and "rc=2" in answer, answer
    [child_dir] = list((Path(f["LOG_DIR"]) / "children").iterdir())
    assert load(child_dir / "result.json")["reason"] == "disk_quota_exceeded"
    _assert_released(runtime, tmp_path, f["RUN_ID"])


def test_the_disk_of_a_killed_cli_is_released_by_the_next_run_with_its_workspace(
    runtime: DockerRuntime, agent_image: str, tmp_path: Path
) -> None:
    """kill -9 of massgen-run mid-run: the next massgen-run's reaper copies the workspace back and unmounts."""
    cfg = write_config(
        tmp_path,
        """\
        agents:
          - id: a
            backend: {type: scripted, steps: [{shell: "echo kept > /workspace/kept.txt; sleep 300", timeout: 600}]}
        """,
    )
    proc, log_dir = start_cli(["--automation", "--image", agent_image, "--config", str(cfg), "q"], tmp_path)
    workspace = tmp_path / ".massgen" / "workspaces" / log_dir.name
    deadline = time.monotonic() + 60
    while not (workspace / "kept.txt").exists():
        assert time.monotonic() < deadline, "the sandbox never wrote its file"
        time.sleep(0.05)
    assert str(workspace) in mount_points()
    proc.kill()
    proc.communicate(timeout=30)
    p = massgen_run(["--automation", "--config", "@examples/quickstart", "q"], tmp_path)  # no --image: it reaps
    assert p.returncode == 0, p.stdout + p.stderr
    assert load(log_dir / "result.json")["reason"] == "supervisor_lost"
    assert (workspace / "kept.txt").read_text() == "kept\n"
    _assert_released(runtime, tmp_path, log_dir.name)

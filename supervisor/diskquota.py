"""Per-run disk budgets: a run's workspace and outbox on a size-limited filesystem of its own.

Mount mode (the supervisor is root, loop devices work, the engine shares our mount namespace):
each run gets a sparse image `<workspaces root>/.disks/<run_id>.img` of exactly its budget,
formatted ext4 with its inode budget (no journal, lazy inode tables: ~20 ms) and loop-mounted
`nosuid,nodev` at `.disks/<run_id>/`; its `workspace/` and `outbox/` are bind-mounted over the
run's usual host folders, so everything else (the engine's mounts, the follower, users reading
the workspace live) is unchanged. The kernel enforces the budget: a write past it fails with
ENOSPC inside the sandbox, and the image never holds more than its size on the host. When the
run ends, after its container exited, the contents are copied back to the usual folders (sparse
files stay sparse, hard links stay links, so the copy is never larger than what the filesystem
held), everything is unmounted and the image deleted.

Poll mode (no root, no loop devices, the supervisor in a container of its own): the same folders
are walked every `WALK_INTERVAL_S` and the run is stopped once past its budget; a sandbox can
slip through by what it writes between two walks.

Each run's mounts are described in `.disks/<run_id>.json` (written before anything is mounted),
so a supervisor that crashed, the reaper, or a restarted daemon can find and release them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import shutil
import stat
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from .diskcopy import CopyStats, copy_tree, walk_use
from .errors import DiskError
from .logdir import RUN_ID_RE, atomic_write_json

log = logging.getLogger(__name__)

DISKS_DIR = ".disks"
FULL_SLACK_BYTES = 1 << 20  # less free than this for the sandbox's uid: the filesystem is full
WALK_INTERVAL_S = 1.0  # poll mode: how often the folders are measured
MKFS_TIMEOUT_S = 60.0
MOUNT_TIMEOUT_S = 30.0
_MS_BIND = 4096
_MNT_DETACH = 2
_STATE_VERSION = 1


class Mode(StrEnum):
    MOUNT = "mount"
    POLL = "poll"


@dataclass(frozen=True)
class DiskUse:
    """Bytes and inodes on the host."""

    bytes: int = 0
    inodes: int = 0

    def __add__(self, other: DiskUse) -> DiskUse:
        return DiskUse(self.bytes + other.bytes, self.inodes + other.inodes)

    def __sub__(self, other: DiskUse) -> DiskUse:
        return DiskUse(max(0, self.bytes - other.bytes), max(0, self.inodes - other.inodes))

    def exceeds(self, budget: DiskUse) -> bool:
        return self.bytes > budget.bytes or self.inodes > budget.inodes

    def cap(self, other: DiskUse) -> DiskUse:
        return DiskUse(min(self.bytes, other.bytes), min(self.inodes, other.inodes))

    def describe(self) -> str:
        return f"{self.bytes / (1 << 20):.1f} MiB, {self.inodes} inodes"


# -- how budgets can be enforced in this process ---------------------------------------------

_unmountable: str | None = None  # set once a mount was refused for lack of privileges
_lock = threading.Lock()


def disabled(environ: dict[str, str] | None = None) -> bool:
    """`MASSGEN_DISK_QUOTA=off`: no disk budget at all (for benchmarks and debugging; runs warn)."""
    env = os.environ if environ is None else environ
    return env.get("MASSGEN_DISK_QUOTA", "").strip().lower() == "off"


def quota_mode(environ: dict[str, str] | None = None) -> tuple[Mode, str]:
    """Mount or poll, and why not mount (empty when mounting).

    `$MASSGEN_DISK_QUOTA` forces one (`mount`, `poll`; `off` is `disabled`); `auto` (the default) mounts when the
    supervisor is root, the tools exist and the container engine shares its mount namespace
    (a bind mount the engine cannot see would leave the sandbox writing to the host's disk).
    """
    env = os.environ if environ is None else environ
    choice = env.get("MASSGEN_DISK_QUOTA", "auto").strip().lower() or "auto"
    if choice == "poll":
        return Mode.POLL, "MASSGEN_DISK_QUOTA=poll"
    if _unmountable is not None:
        return Mode.POLL, _unmountable
    if os.geteuid() != 0:
        return Mode.POLL, "the supervisor is not root (loop mounts need root)"
    for tool in ("mkfs.ext4", "mount"):
        if shutil.which(tool) is None:
            return Mode.POLL, f"{tool} not found"
    if choice == "mount":
        return Mode.MOUNT, ""
    problem = _engine_namespace_problem(env)
    return (Mode.POLL, problem) if problem else (Mode.MOUNT, "")


def _engine_namespace_problem(env: Any) -> str:
    host = env.get("DOCKER_HOST", "")
    if host and not host.startswith("unix://"):
        return f"the container engine is remote (DOCKER_HOST={host})"
    try:
        pid = int(Path("/var/run/docker.pid").read_text().strip())
        theirs = os.stat(f"/proc/{pid}/ns/mnt").st_ino
    except (OSError, ValueError):
        if Path("/.dockerenv").exists():
            return "the supervisor runs in a container (the engine would not see its mounts)"
        return ""  # no pid file to compare with: a host install, as far as we can tell
    if theirs != os.stat("/proc/self/ns/mnt").st_ino:
        return "the container engine runs in another mount namespace"
    return ""


# -- mount helpers ---------------------------------------------------------------------------

_libc: Any = None


def _c() -> Any:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _bind(source: Path, target: Path) -> None:
    if _c().mount(str(source).encode(), str(target).encode(), None, _MS_BIND, None) != 0:
        err = ctypes.get_errno()
        raise DiskError("bind", target, os.strerror(err))


def _umount(target: Path) -> None:
    """Unmount; a busy mount is detached lazily (the kernel frees it when its last user goes)."""
    if _c().umount2(str(target).encode(), 0) == 0:
        return
    err = ctypes.get_errno()
    if err == errno.EINVAL:
        return  # not a mount point (any more)
    if err == errno.EBUSY and _c().umount2(str(target).encode(), _MNT_DETACH) == 0:
        log.warning("unmounted %s lazily: still busy", target)
        return
    if err == errno.ENOENT:
        return
    raise DiskError("umount", target, os.strerror(err))


def mount_points() -> set[str]:
    """Every mount point in our namespace (decoded from /proc/self/mountinfo)."""
    points = set()
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            parts = line.split(" ")
            if len(parts) > 4:
                points.add(parts[4].encode().decode("unicode_escape"))
    return points


def _run(cmd: list[str], timeout: float, op: str, path: Path) -> None:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DiskError(op, path, str(exc)) from exc
    if p.returncode != 0:
        raise DiskError(op, path, (p.stderr or p.stdout).strip()[-300:] or f"exit {p.returncode}")


def _private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise DiskError("mkdir", path, f"not a directory owned by uid {os.geteuid()}")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


# -- one run's disk ----------------------------------------------------------------------------


@dataclass
class RunDisk:
    """Where a run's workspace and outbox live, what they use, and how to give them back."""

    run_id: str
    log_dir: Path
    workspace: Path
    outbox: Path
    budget: DiskUse
    mode: Mode
    detail: str = ""  # why polled
    owner_pid: int = 0

    @property
    def disks(self) -> Path:
        return self.workspace.parent / DISKS_DIR

    @property
    def image(self) -> Path:
        return self.disks / f"{self.run_id}.img"

    @property
    def mount(self) -> Path:
        return self.disks / self.run_id

    @property
    def state_file(self) -> Path:
        return self.disks / f"{self.run_id}.json"

    # -- setup ---------------------------------------------------------------------------

    @classmethod
    def create(
        cls, run_id: str, log_dir: Path, workspace: Path, outbox: Path, budget: DiskUse, owner: tuple[int, int]
    ) -> RunDisk:
        """Give the run a filesystem of its own (or, where that is not possible, a polled budget).

        Blocking (about 30 ms); `owner` is the uid:gid the sandbox runs as.
        """
        mode, detail = quota_mode()
        disk = cls(run_id, log_dir, workspace, outbox, budget, mode, detail, os.getpid())
        if mode == Mode.MOUNT:
            try:
                disk._mount_new(owner)
            except DiskError as exc:
                disk._undo()
                disk.mode, disk.detail = Mode.POLL, f"mounting failed: {exc.detail}"
                if "permission denied" in exc.detail.lower() or "not permitted" in exc.detail.lower():
                    global _unmountable
                    with _lock:
                        _unmountable = f"mounting is not permitted here ({exc.detail[:120]})"
                log.warning("run_id=%s disk budget polled: %s", run_id, exc)
        return disk

    def _mount_new(self, owner: tuple[int, int]) -> None:
        _private_dir(self.disks)
        try:
            fd = os.open(self.image, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise DiskError("create", self.image, exc.strerror or str(exc)) from exc
        try:
            os.ftruncate(fd, self.budget.bytes)  # sparse: blocks are allocated as the sandbox writes
        finally:
            os.close(fd)
        # Written before anything is mounted: whoever finds it can always undo what follows.
        self._write_state()
        _run(
            [
                "mkfs.ext4",
                "-q",
                "-F",
                "-b",
                "4096",
                "-N",
                str(self.budget.inodes),
                "-m",
                "0",  # no blocks reserved for root: the budget is the sandbox's
                "-O",
                "^has_journal",  # a run's scratch filesystem: a crash discards it anyway
                "-E",
                f"lazy_itable_init=1,lazy_journal_init=1,root_owner={owner[0]}:{owner[1]}",
                str(self.image),
            ],
            MKFS_TIMEOUT_S,
            "mkfs",
            self.image,
        )
        self.mount.mkdir(mode=0o700, exist_ok=True)
        # noinit_itable: a fresh sparse image reads as zeros already; zeroing the inode tables
        # in the background would only allocate host blocks for nothing.
        _run(
            ["mount", "-t", "ext4", "-o", "loop,nosuid,nodev,noinit_itable", str(self.image), str(self.mount)],
            MOUNT_TIMEOUT_S,
            "mount",
            self.mount,
        )
        for name, target in (("workspace", self.workspace), ("outbox", self.outbox)):
            inner = self.mount / name
            inner.mkdir(mode=0o755)
            os.chown(inner, *owner)
            _bind(inner, target)

    def _write_state(self) -> None:
        atomic_write_json(
            self.state_file,
            {
                "version": _STATE_VERSION,
                "run_id": self.run_id,
                "log_dir": str(self.log_dir),
                "workspace": str(self.workspace),
                "outbox": str(self.outbox),
                "budget_bytes": self.budget.bytes,
                "budget_inodes": self.budget.inodes,
                "owner_pid": self.owner_pid,
            },
        )

    @classmethod
    def find(cls, run_id: str, workspace: Path) -> RunDisk | None:
        """The disk a run was given, from its state file (None: it had none, or it was released).

        The returned disk is owned by this process from now on (a restarted daemon re-adopting it).
        """
        state_file = workspace.parent / DISKS_DIR / f"{run_id}.json"
        try:
            fd = os.open(state_file, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with os.fdopen(fd, "rb") as fh:
                data = json.loads(fh.read(1 << 16))
            disk = cls(
                run_id,
                Path(data["log_dir"]),
                Path(data["workspace"]),
                Path(data["outbox"]),
                DiskUse(int(data["budget_bytes"]), int(data["budget_inodes"])),
                Mode.MOUNT,
                owner_pid=int(data.get("owner_pid", 0)),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if disk.workspace != workspace or data.get("run_id") != run_id:
            return None
        if str(disk.mount) not in mount_points():
            # Not mounted (any more): nothing to measure there; `recover` can still copy it back.
            disk.mode, disk.detail = Mode.POLL, "its filesystem is no longer mounted"
        return disk

    def adopt(self) -> None:
        """Record this process as the disk's owner (for the reaper's liveness check)."""
        self.owner_pid = os.getpid()
        with contextlib.suppress(OSError):
            self._write_state()

    # -- use ----------------------------------------------------------------------------------

    def _fs_use(self) -> tuple[DiskUse, bool]:
        s = os.statvfs(self.mount)
        used = DiskUse((s.f_blocks - s.f_bfree) * s.f_frsize, s.f_files - s.f_ffree)
        full = s.f_bavail * s.f_frsize < FULL_SLACK_BYTES or s.f_favail == 0
        return used, full

    def use(self) -> tuple[DiskUse, bool]:
        """What the workspace and outbox use now, and whether the run hit its budget.

        Blocking: a statvfs when mounted, a walk of both folders when polled (stopped as soon
        as the budget is passed, so it costs at most the budget's inodes).
        """
        if self.mode == Mode.MOUNT:
            try:
                used, full = self._fs_use()
            except OSError:
                return DiskUse(), False
            return used, full
        used = DiskUse(*walk_use([self.workspace, self.outbox], self.budget.bytes, self.budget.inodes))
        return used, used.exceeds(self.budget)

    # -- release --------------------------------------------------------------------------------

    def release(self) -> DiskUse:
        """Give the folders back as plain host folders and delete the image; idempotent.

        Call only once no sandbox can write the folders any more (its container has exited).
        Returns what the folders hold on the host afterwards.

        Raises:
            DiskError: copying or unmounting failed (the state file is kept: a later release retries).
        """
        used = self.give_back()
        self.teardown()
        return used

    def give_back(self) -> DiskUse:
        """The first half of `release`: the folders are plain host folders again, with their contents.

        The run's own filesystem stays mounted (out of sight) until `teardown`, which can run
        while the container is being removed.

        Raises:
            DiskError: as release.
        """
        if self.mode == Mode.POLL:
            return DiskUse(*walk_use([self.workspace, self.outbox], 1 << 62, 1 << 62))
        points = mount_points()
        stats = CopyStats()
        if str(self.mount) in points:
            used, _ = self._fs_use()
            # Never more than the filesystem held (plus its directories), whatever links or
            # sparse files the sandbox left: the copy stops there.
            limit = used.bytes + (1 << 20)
            for name, target in (("outbox", self.outbox), ("workspace", self.workspace)):
                self._give_back(self.mount / name, target, points, stats, limit)
        for target in (self.outbox, self.workspace):
            if str(target) in points:
                _umount(target)
        if stats.skipped or stats.truncated:
            log.warning(
                "run_id=%s copy-out skipped %d entries (special files or too deep), truncated %d",
                self.run_id,
                stats.skipped,
                stats.truncated,
            )
        return DiskUse(stats.bytes, stats.inodes)

    def teardown(self) -> None:
        """The second half of `release`: unmount the run's filesystem, delete its image and state.

        Raises:
            DiskError: unmounting failed.
        """
        if self.mode == Mode.MOUNT:
            points = mount_points()
            for target in (self.outbox, self.workspace, self.mount):
                if str(target) in points:
                    _umount(target)
            self._undo()
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.state_file)

    def _give_back(self, inner: Path, target: Path, points: set[str], stats: CopyStats, limit: int) -> None:
        """Copy `inner` next to `target`, unmount the bind over `target`, rename the copy into place."""
        tmp = target.parent / f".{target.name}.copy"
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(mode=0o755)
        try:
            copy_tree(inner, tmp, stats, limit)
        except OSError as exc:
            log.error("run_id=%s copying %s back failed: %s; its image %s is kept", self.run_id, inner, exc, self.image)
            shutil.rmtree(tmp, ignore_errors=True)
            raise DiskError("copy", inner, str(exc)) from exc
        if str(target) in points:
            _umount(target)
        try:
            os.rename(tmp, target)  # onto the empty folder the bind mount covered
        except OSError:
            # Something was in the folder underneath: keep it and move the copy's entries in.
            for entry in os.listdir(tmp):
                os.replace(tmp / entry, target / entry)
            os.rmdir(tmp)

    def _undo(self) -> None:
        """Remove the image, the mount point and the state file (everything must be unmounted)."""
        for path in (self.image, self.state_file):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        with contextlib.suppress(FileNotFoundError, OSError):
            os.rmdir(self.mount)


def recover(run_id: str, workspace: Path) -> DiskUse | None:
    """Release a run's disk left behind by a supervisor that is gone; None when there is none.

    For a disk whose filesystem is no longer mounted (the host rebooted) the image is mounted
    read-only first, so the workspace is still copied back.
    """
    disk = RunDisk.find(run_id, workspace)
    if disk is None:
        return None
    if disk.mode == Mode.POLL:
        if not disk.image.exists():
            disk._undo()
            return None
        try:
            disk.mount.mkdir(mode=0o700, exist_ok=True)
            _run(
                ["mount", "-t", "ext4", "-o", "loop,ro,nosuid,nodev,noexec", str(disk.image), str(disk.mount)],
                MOUNT_TIMEOUT_S,
                "mount",
                disk.mount,
            )
        except DiskError as exc:
            log.error("run_id=%s cannot mount the left-behind image %s: %s (kept)", run_id, disk.image, exc)
            return None
        disk.mode = Mode.MOUNT
    try:
        return disk.release()
    except DiskError as exc:
        log.error("run_id=%s could not release its disk: %s", run_id, exc)
        return None


def owner_alive(run_id: str, workspace: Path) -> bool:
    """Whether the process that owns a run's disk still exists."""
    disk = RunDisk.find(run_id, workspace)
    if disk is None or disk.owner_pid <= 0:
        return False
    try:
        os.kill(disk.owner_pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep(workspaces_root: Path, live: Callable[[str], bool], *, reclaim_own: bool = False) -> int:
    """Release the disks under `workspaces_root` whose owner process is gone and whose run is not live.

    With `reclaim_own`, disks this process owns count as orphans too (for a caller with no run
    of its own in flight any more: what it still owns was left by a run that ended without
    releasing it, e.g. an adopted one that never had a sandbox).

    Returns:
        How many were released.
    """
    try:
        names = os.listdir(workspaces_root / DISKS_DIR)
    except OSError:
        return 0
    released = 0
    for name in names:
        run_id = name.removesuffix(".json")
        if not name.endswith(".json") or not RUN_ID_RE.match(run_id):
            continue
        workspace = workspaces_root / run_id
        if live(run_id):
            continue
        if owner_alive(run_id, workspace):
            disk = RunDisk.find(run_id, workspace) if reclaim_own else None
            if disk is None or disk.owner_pid != os.getpid():
                continue
        if recover(run_id, workspace) is not None:
            released += 1
            log.warning("released the disk run %s left behind", run_id)
    return released

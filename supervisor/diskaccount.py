"""What a run is charged against its disk budget: its folders, its log dir, snapshots, children.

A run's charge is its workspace and outbox (its filesystem, or a walk of them), the files the
supervisor writes for it in its log dir, the snapshots made for the nested runs it started,
and the whole charge of each of those nested runs. A nested run's budget is at most what its
parent has left, and every run checks its own charge, so the root's budget bounds the tree.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from agent_image.protocol.events import AnswerSubmitted, FinalAnswer

from .diskquota import DiskUse, Mode, RunDisk

BLOCK = 4096
_LOG_FILES = (
    "status.json",
    "result.json",
    "config.yaml",
    "events.jsonl",
    "massgen.log",
    "telemetry.jsonl",
    ".follow.json",
)
_LOG_DIRS = 6  # the log dir itself, agents/, final/, children/, context/, sandbox/ (the mount point)


def _blocks(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


class DiskAccount:
    """One run's disk budget and charge; a node of its tree's accounts."""

    def __init__(self, run_id: str, budget: DiskUse, parent: DiskAccount | None = None) -> None:
        self.run_id = run_id
        self.budget = budget
        self.parent = parent
        self.children: list[DiskAccount] = []
        self.disk: RunDisk | None = None
        self.folders = DiskUse()  # workspace + outbox, as last measured (after release: as copied back)
        self.full = False  # the run's filesystem refused a write (or would refuse the next)
        self.logdir = DiskUse()
        self.snapshots = DiskUse()  # made for this run's nested runs
        self._answers: dict[str, int] = {}
        self.released = False  # its folders were given back (their use is final)
        self.torn_down = False
        if parent is not None:
            parent.children.append(self)

    @property
    def mode(self) -> Mode:
        return self.disk.mode if self.disk is not None else Mode.POLL

    def own(self) -> DiskUse:
        return self.folders + self.logdir + self.snapshots

    def total(self) -> DiskUse:
        use = self.own()
        for child in self.children:
            use = use + child.total()
        return use

    def remaining(self) -> DiskUse:
        return self.budget - self.total()

    # -- what the run is charged -------------------------------------------------------------

    def note_event(self, ev: Any) -> None:
        """Answers the materializer writes into the log dir (a listener of accepted events)."""
        if isinstance(ev, AnswerSubmitted):
            self._answers[f"{ev.agent}/{ev.label}"] = _blocks(len(ev.content.encode()))
        elif isinstance(ev, FinalAnswer):
            self._answers[f"final/{ev.agent}"] = _blocks(len(ev.content.encode()))

    def charge_snapshot(self, use: DiskUse) -> None:
        self.snapshots = self.snapshots + use

    def measure(self, log_dir: Path) -> None:
        """Refresh the folders' use and the log dir's (blocking: a statvfs or a walk, a few stats)."""
        if self.disk is not None and not self.released:
            self.folders, self.full = self.disk.use()
        self.refresh_logdir(log_dir)

    def refresh_logdir(self, log_dir: Path) -> None:
        self.logdir = measure_logdir(log_dir, self._answers)

    def over(self) -> str | None:
        """Why the run is past its budget, or None."""
        if self.full:
            return (
                f"the run's filesystem is full ({self.budget.bytes >> 20} MiB, {self.budget.inodes} inodes:"
                " sandbox.disk, sandbox.disk_inodes)"
            )
        total = self.total()
        if total.exceeds(self.budget):
            nested = total - self.own()
            return (
                f"the run uses {total.describe()} of its disk budget {self.budget.describe()}"
                f" (workspace and outbox {self.folders.describe()}, log dir {self.logdir.describe()},"
                f" snapshots {self.snapshots.describe()}, nested runs {nested.describe()})"
            )
        return None


def measure_logdir(log_dir: Path, answers: dict[str, int]) -> DiskUse:
    """The supervisor's own files in a log dir (children and context snapshots are charged elsewhere)."""
    used = DiskUse(_LOG_DIRS * BLOCK, _LOG_DIRS)
    for name in _LOG_FILES:
        try:
            st = os.stat(log_dir / name, follow_symlinks=False)
        except OSError:
            continue
        used = used + DiskUse(max(st.st_blocks * 512, _blocks(st.st_size)), 1)
    # each answer: its file and its label folder
    return used + DiskUse(sum(answers.values()) + BLOCK * len(answers), 2 * len(answers))

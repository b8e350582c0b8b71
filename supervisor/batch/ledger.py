"""`items.jsonl`: the append-only, fsynced ledger of attempt ends, and what it says per item."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

LEDGER_SCHEMA_VERSION = 1


class ItemState(StrEnum):
    PASS = "pass"  # noqa: S105 - every assertion held (a state, not a password)
    FAIL = "fail"  # the behaviour under test: a wrong answer, timeout, budget, no answer
    ERROR = "error"  # the harness could not give the item a fair run
    SKIPPED = "skipped"  # never run: deadline, batch budget, filter
    INTERRUPTED = "interrupted"  # stopped by the user; re-run on resume


# States that settle an item: a resumed batch never runs it again.
VERDICTS = frozenset({ItemState.PASS, ItemState.FAIL})


@dataclass(frozen=True)
class Ledger:
    """One line per attempt end. Writes are one `write(2)` of a whole line, then fdatasync.

    fdatasync is enough for durability here: an append changes the file size, which is
    metadata needed to read the data back, so it is flushed too (without the inode's times).
    """

    path: Path

    def load(self) -> list[dict[str, Any]]:
        """Every complete line; a torn last line (the batch was killed mid-write) is cut off."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        if end < len(data):
            with open(self.path, "r+b") as fh:
                fh.truncate(end)
                os.fsync(fh.fileno())
        out = []
        for raw in data[:end].splitlines():
            try:
                rec = json.loads(raw)
            except ValueError:
                continue  # never written by us whole; ignore rather than fail the batch
            if isinstance(rec, dict) and isinstance(rec.get("item"), str):
                out.append(rec)
        return out

    def append(self, rec: dict[str, Any]) -> None:
        line = (json.dumps(rec, sort_keys=True, ensure_ascii=True, separators=(",", ":")) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(line)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fdatasync(fd)
        finally:
            os.close(fd)


def latest(records: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The last attempt of every item (the ledger is in append order)."""
    out: dict[str, dict[str, Any]] = {}
    for r in records:
        out[r["item"]] = r
    return out


def attempts(records: Iterable[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in records:
        out[r["item"]] = out.get(r["item"], 0) + 1
    return out


def known_run_ids(records: Iterable[dict[str, Any]]) -> set[str]:
    return {r["run_id"] for r in records if r.get("run_id")}

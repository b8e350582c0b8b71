"""A run's row: what the ops views (ps, watch, the dashboard) show of its status.json.

Read leniently: status.json is ours, but a field of the wrong type (an old or damaged file)
leaves that field unset rather than failing the whole listing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .logdir import read_status

__all__ = ["RunRow", "as_int", "as_num", "as_str", "read_row", "row_from_status", "section"]


def section(doc: dict[str, Any], name: str) -> dict[str, Any]:
    value = doc.get(name)
    return value if isinstance(value, dict) else {}


def as_num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def as_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def as_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


@dataclass
class RunRow:
    """One run as the ops views list it (ps, watch, the dashboard), from its status.json alone."""

    run_id: str
    log_dir: Path
    state: str = "unknown"
    phase: str | None = None
    percent: int | None = None
    exit_code: int | None = None
    reason: str | None = None
    start_time: float | None = None
    elapsed_s: float | None = None
    depth: int = 0
    parent_run_id: str | None = None
    agents: tuple[str, ...] = ()
    winner: str | None = None
    tokens: int = 0
    cost_usd: float = 0.0
    cpu_percent: float | None = None
    memory_bytes: int | None = None
    question: str = ""
    sandbox: str | None = None
    children: list[RunRow] = field(default_factory=list)  # filled by tree listings (ps --tree, watch)

    @property
    def finished(self) -> bool:
        return self.state == "finished"

    @property
    def live(self) -> bool:
        return self.state in ("queued", "starting", "running")

    def ps_dict(self) -> dict[str, Any]:
        """`massgen-run ps --json`'s fields."""
        return {
            "run_id": self.run_id,
            "state": self.state,
            "phase": self.phase,
            "exit_code": self.exit_code,
            "reason": self.reason,
            "elapsed_s": self.elapsed_s,
            "started_at": self.start_time,
            "cpu_percent": self.cpu_percent,
            "memory_bytes": self.memory_bytes,
            "depth": self.depth,
        }

    def tree_dict(self) -> dict[str, Any]:
        """`massgen-run ps --tree --json`'s fields, children nested."""
        return {
            **self.ps_dict(),
            "parent_run_id": self.parent_run_id,
            "log_dir": str(self.log_dir),
            "children": [c.tree_dict() for c in self.children],
        }


def row_from_status(log_dir: Path, st: dict[str, Any] | None) -> RunRow:
    """The row of a status.json document (None or a malformed field: state "unknown", field unset)."""
    row = RunRow(run_id=log_dir.name, log_dir=log_dir)
    if st is None:
        return row
    run, co, meta = section(st, "run"), section(st, "coordination"), section(st, "meta")
    res, container, tel = section(st, "results"), section(st, "container"), section(st, "telemetry")
    totals = section(tel, "totals")
    row.state = as_str(run.get("state")) or "unknown"
    row.phase = as_str(co.get("phase"))
    row.percent = as_int(co.get("completion_percentage"))
    row.exit_code = as_int(run.get("exit_code"))
    row.reason = as_str(run.get("reason"))
    row.start_time = as_num(meta.get("start_time")) or as_num(run.get("started_at"))
    row.elapsed_s = as_num(meta.get("elapsed_seconds"))
    row.depth = as_int(run.get("depth")) or 0
    row.parent_run_id = as_str(run.get("parent_run_id"))
    agents = st.get("agents")
    row.agents = tuple(str(a) for a in agents) if isinstance(agents, dict) else ()
    row.winner = as_str(res.get("winner"))
    row.tokens = as_int(totals.get("total_tokens")) or 0
    row.cost_usd = as_num(totals.get("cost_usd")) or 0.0
    row.cpu_percent = as_num(container.get("cpu_percent"))
    row.memory_bytes = as_int(container.get("memory_bytes"))
    row.question = (as_str(meta.get("question")) or "")[:300]
    row.sandbox = as_str(run.get("sandbox"))
    return row


def read_row(log_dir: Path) -> RunRow:
    """The row for one log dir; a missing or unreadable status.json gives state "unknown"."""
    return row_from_status(log_dir, read_status(log_dir))

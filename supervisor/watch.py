"""`massgen-run watch` (a live table of runs) and the log-dir run listing it shares with `ps`.

Everything here reads log directories only: `<root>/<run_id>/status.json`, and nested runs
under `<log_dir>/children/<child_id>/`. The watcher re-reads a status.json only when watchdog
reports it replaced (the materializer writes it with os.replace), plus a light fallback pass
every few seconds that looks for new run dirs and re-reads unfinished runs, so a missed
inotify event (or an exhausted inotify watch limit) costs seconds, not correctness.
"""

from __future__ import annotations

import os
import queue
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .logdir import STATUS_NAME, iter_run_dirs
from .runrows import RunRow, read_row

__all__ = ["RunRow", "RunTable", "read_row", "tree", "watch"]

STATUS = STATUS_NAME
FALLBACK_S = 5.0  # light rescan when no event came
TICK_S = 1.0  # re-render (ages move) without reading anything
MIN_RENDER_S = 0.1


def tree(logs_root: Path) -> list[RunRow]:
    """Top-level runs under `logs_root`, each with its `children` filled in, recursively."""

    def load(log_dir: Path, level: int) -> RunRow:
        row = read_row(log_dir)
        if level < 32:  # a bound against a pathological (symlinked) layout
            row.children = [load(c, level + 1) for c in iter_run_dirs(log_dir / "children")]
        return row

    return [load(d, 0) for d in iter_run_dirs(logs_root)]


def prune(rows: list[RunRow], keep_finished: bool) -> list[RunRow]:
    """Drop finished runs unless asked, keeping a finished ancestor of anything still shown."""
    out = []
    for r in rows:
        r.children = prune(r.children, keep_finished)
        if keep_finished or not r.finished or r.children:
            out.append(r)
    return out


# -- formatting --------------------------------------------------------------------------------


def fmt_age(seconds: float | None) -> str:
    if seconds is None:
        return ""
    s = int(max(0.0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return ""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return ""  # pragma: no cover - the loop always returns


def tree_lines(rows: list[RunRow]) -> Iterator[tuple[str, RunRow]]:
    """(ASCII tree prefix + run id, row) in depth-first order."""

    def walk(nodes: list[RunRow], prefix: str) -> Iterator[tuple[str, RunRow]]:
        for i, r in enumerate(nodes):
            last = i == len(nodes) - 1
            yield f"{prefix}{'`-- ' if last else '|-- '}{r.run_id}", r
            yield from walk(r.children, prefix + ("    " if last else "|   "))

    for r in rows:
        yield r.run_id, r
        yield from walk(r.children, "")


# -- the live table ----------------------------------------------------------------------------


class RunTable:
    """Rows keyed by status.json path; refreshed one file at a time."""

    def __init__(self, logs_root: Path) -> None:
        self.root = logs_root
        self.rows: dict[Path, RunRow] = {}
        self.reads = 0  # status.json reads so far (tests check that events cost one read each)

    def _read(self, log_dir: Path) -> RunRow:
        self.reads += 1
        return read_row(log_dir)

    def _discover(self, directory: Path) -> None:
        for d in iter_run_dirs(directory):
            key = d / STATUS
            known = key in self.rows
            if not known and key.exists():
                self.rows[key] = self._read(d)
            row = self.rows.get(key)
            # A known finished run has no new children; a newly found one may have any.
            if row is not None and (not known or not row.finished):
                self._discover(d / "children")

    def full_scan(self) -> None:
        self.rows.clear()
        self._discover(self.root)

    def fallback(self) -> None:
        """New run dirs anywhere unfinished; re-read unfinished runs (finished ones do not change)."""
        for key, row in list(self.rows.items()):
            if not row.finished:
                self.rows[key] = self._read(key.parent)
        self._discover(self.root)

    def changed(self, status_path: Path) -> None:
        """One status.json was replaced (or removed)."""
        try:
            status_path.relative_to(self.root)
        except ValueError:
            return
        if status_path.exists():
            self.rows[status_path] = self._read(status_path.parent)
        else:
            self.rows.pop(status_path, None)

    def ordered(self) -> list[tuple[str, RunRow]]:
        """Tree order, newest top-level run first, children under their parent."""
        by_dir = {row.log_dir: row for row in self.rows.values()}
        for row in by_dir.values():
            row.children = []
        roots = []
        for row in sorted(by_dir.values(), key=lambda r: r.run_id):
            parent = by_dir.get(row.log_dir.parent.parent) if row.log_dir.parent.name == "children" else None
            if parent is not None:
                parent.children.append(row)
            else:
                roots.append(row)
        roots.sort(key=lambda r: r.run_id, reverse=True)
        return list(tree_lines(roots))


def render(table: RunTable, now: float, max_rows: int | None = None) -> Any:
    from rich import box
    from rich.table import Table

    ordered = table.ordered()
    live = sum(1 for _, r in ordered if not r.finished)
    t = Table(
        title=f"massgen runs under {table.root}  ({live} live, {len(ordered)} total)",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    for name, justify in (
        ("RUN ID", "left"),
        ("STATE", "left"),
        ("PHASE", "left"),
        ("%", "right"),
        ("AGE", "right"),
        ("CPU", "right"),
        ("MEM", "right"),
        ("DEPTH", "right"),
    ):
        t.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    shown = ordered if max_rows is None else ordered[: max(1, max_rows)]
    for label, r in shown:
        style = {"running": "green", "queued": "yellow", "starting": "cyan"}.get(r.state)
        if r.finished and r.exit_code not in (None, 0):
            style = "red"
        state = r.state if not r.finished or r.exit_code is None else f"{r.state} ({r.exit_code})"
        t.add_row(
            label,
            state,
            r.phase or "",
            "" if r.percent is None else str(r.percent),
            fmt_age(now - r.start_time if r.start_time else None),
            "" if r.cpu_percent is None or r.finished else f"{r.cpu_percent:.1f}%",
            "" if r.finished else fmt_bytes(r.memory_bytes),
            str(r.depth),
            style=style,
        )
    if len(shown) < len(ordered):
        t.caption = f"... {len(ordered) - len(shown)} more runs not shown (massgen-run ps --all --tree)"
        t.caption_justify = "left"
    return t


def _start_observer(root: Path, changes: queue.SimpleQueue[Path]) -> Any:
    """A recursive watchdog observer that only queues status.json paths; None when it cannot run."""
    from watchdog.events import FileSystemEventHandler
    from watchdog.observers import Observer

    class _Handler(FileSystemEventHandler):
        # Runs on watchdog's thread: hand the path over, touch nothing else.
        def on_any_event(self, event: Any) -> None:
            for p in (event.src_path, getattr(event, "dest_path", "")):
                if p and os.path.basename(p) == STATUS:
                    changes.put(Path(os.fsdecode(p)))

    # watchdog's recursive inotify warns when a new run's subdirs appear faster than it walks
    # them (it re-registers the same watch); harmless, but it would scribble over the live table.
    warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"watchdog\.")
    observer = Observer()
    try:
        observer.schedule(_Handler(), str(root), recursive=True)
        observer.start()
    except OSError:  # e.g. the inotify watch limit: the fallback pass still keeps the table right
        return None
    return observer


def watch(logs_root: Path, *, once: bool = False, console: Any = None) -> int:
    from rich.console import Console
    from rich.live import Live

    if console is None:
        console = Console() if sys.stdout.isatty() else Console(width=160)
    table = RunTable(logs_root)
    if once:
        table.full_scan()
        console.print(render(table, time.time()))
        return 0
    changes: queue.SimpleQueue[Path] = queue.SimpleQueue()
    # Watch first, then scan: a status.json replaced in between is queued, never missed.
    watching = logs_root.is_dir()  # once tried, never again: a refused watch stays refused
    observer = _start_observer(logs_root, changes) if watching else None
    table.full_scan()
    next_fallback = time.monotonic() + FALLBACK_S

    def max_rows() -> int:
        height: int = console.size.height
        return max(1, height - 8)

    try:
        with Live(render(table, time.time(), max_rows()), console=console, auto_refresh=False) as live:
            while True:
                if not watching and logs_root.is_dir():
                    watching = True
                    observer = _start_observer(logs_root, changes)
                    table.full_scan()
                timeout = max(0.0, min(TICK_S, next_fallback - time.monotonic()))
                paths: set[Path] = set()
                try:
                    paths.add(changes.get(timeout=timeout))
                    time.sleep(MIN_RENDER_S)  # coalesce a burst of writes into one render
                    while True:
                        paths.add(changes.get_nowait())
                except queue.Empty:
                    pass
                for p in paths:
                    table.changed(p)
                if time.monotonic() >= next_fallback:
                    table.fallback()
                    next_fallback = time.monotonic() + FALLBACK_S
                live.update(render(table, time.time(), max_rows()), refresh=True)
    except KeyboardInterrupt:
        return 0
    finally:
        if observer is not None:
            observer.stop()
            observer.join(timeout=5)

"""The live side: watchdog file changes -> the run index -> server-sent events to open pages.

watchdog's thread only hands paths to the event loop (`call_soon_threadsafe`); the loop
coalesces a burst of changes for `COALESCE_S`, re-reads the status.json files that changed
(off the loop), and pushes one message per changed run to the runs pages and freshly
rendered sections to the pages of those runs. A light fallback pass every `FALLBACK_S`
finds runs whose events watchdog missed (an inotify limit, a root that appeared later).
Each subscriber has a bounded queue: a page that stops reading is dropped (its browser
reconnects with where it was), never buffered without end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..runrows import RunRow
from ._data import (
    STATUS,
    BatchRow,
    Redactor,
    RunFiles,
    RunIndex,
    iter_batch_dirs,
    load_detail,
    log_since,
    read_batch,
    read_row,
)
from ._render import batch_row_html, run_row_html, run_sections

log = logging.getLogger(__name__)

COALESCE_S = 0.05
FALLBACK_S = 2.0
QUEUE_MAX = 256
RING_MAX = 4096
MAX_SUBSCRIBERS = 128
MIN_RENDER_GAP_S = 0.25  # a followed run's sections are pushed at most this often
_RUN_FILES = {STATUS, "events.jsonl", "telemetry.jsonl", "result.json"}
_LOG = "massgen.log"


def _reread(dirs: list[Path], scan: Callable[[], list[RunRow]]) -> tuple[list[RunRow], list[RunRow]]:
    """The fallback pass's reads (a worker thread): unfinished runs again, and new ones."""
    return [read_row(d) for d in dirs], scan()


@dataclass(eq=False)
class Subscriber:
    """One open page's stream: its queue of (event name, JSON text) and what it follows."""

    run_dir: Path | None = None
    log_offset: int = 0
    queue: asyncio.Queue[tuple[str, str] | None] = field(default_factory=lambda: asyncio.Queue(QUEUE_MAX))
    sent: dict[str, str] = field(default_factory=dict)
    closed: bool = False

    def push(self, event: str, data: str) -> bool:
        if self.closed:
            return False
        try:
            self.queue.put_nowait((event, data))
            return True
        except asyncio.QueueFull:
            self.close()
            return False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        while not self.queue.empty():
            self.queue.get_nowait()
        self.queue.put_nowait(None)


class Hub:
    """The run index, kept current from file changes, and the pages listening to it."""

    def __init__(
        self,
        roots: Callable[[], Iterable[Path]],
        redact: Redactor,
        *,
        can_stop: Callable[[RunRow], bool] = lambda _r: False,
        fallback_s: float = FALLBACK_S,
        batch_roots: Callable[[], Iterable[Path]] | None = None,
    ) -> None:
        self._roots = roots
        # `massgen-run batch` writes <logs root>/../batches/<name>/ by default (its runs in runs/).
        self._batch_roots = batch_roots or (lambda: {r.absolute().parent / "batches" for r in self._roots()})
        self.batches: dict[Path, BatchRow] = {}
        self._batch_dirs_seen: set[Path] = set()  # the batch roots being watched
        self._dirty_batch: set[Path] = set()
        self.redact = redact
        self.can_stop = can_stop
        self.fallback_s = fallback_s
        self.index = RunIndex()
        self.gen = 0
        self.ring: deque[tuple[int, Path]] = deque(maxlen=RING_MAX)
        self.subs: set[Subscriber] = set()
        self._observers: list[Any] = []
        self._watched: set[Path] = set()
        self._dirty_status: set[Path] = set()
        self._dirty_detail: set[Path] = set()
        self._dirty_log: set[Path] = set()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._files: dict[Path, RunFiles] = {}  # incremental readers of the runs pages follow
        self._next_render: dict[Path, float] = {}  # monotonic time a run's sections may be pushed again
        self._render_later: set[Path] = set()
        self.pushes = 0  # messages queued so far (the benchmark reads it)

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self._add_roots()
        self._tasks = [
            asyncio.create_task(self._flush_loop(), name="dashboard-flush"),
            asyncio.create_task(self._fallback_loop(), name="dashboard-fallback"),
        ]

    async def stop(self) -> None:
        for sub in list(self.subs):
            sub.close()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = []
        observers, self._observers = self._observers, []

        def stop_all() -> None:
            for o in observers:
                o.stop()
            for o in observers:
                o.join(timeout=5)

        await asyncio.to_thread(stop_all)

    async def _watch(self, root: Path) -> None:
        # Watch first, then scan: a status.json replaced in between is queued, never missed.
        if not any(root.is_relative_to(w) for w in self._watched):
            obs = await asyncio.to_thread(self._observe, root)
            if obs is not None:
                self._observers.append(obs)
        self._watched.add(root)

    async def _add_roots(self) -> None:
        for broot in {b.absolute() for b in self._batch_roots()} - self._batch_dirs_seen:
            if broot.is_dir():
                await self._watch(broot)
                self._batch_dirs_seen.add(broot)
        if self._batch_dirs_seen:
            await self._refresh_batches(discover=True)
        roots = [*self._roots(), *(b / "runs" for b in self.batches)]
        new = [r.absolute() for r in roots if r.absolute() not in self.index.roots and r.is_dir()]
        for root in new:
            self.index.add_root(root)
            await self._watch(root)
        if new:
            rows = await asyncio.to_thread(self._scanner())
            for row in rows:
                self._store(row)

    async def _refresh_batches(self, dirs: Iterable[Path] = (), *, discover: bool = False) -> None:
        """Re-read the given batch dirs (and, with `discover`, every unfinished or new one)."""
        want = set(dirs)
        if discover:
            want |= {d for d, b in self.batches.items() if b.state != "finished"}

        broots, known = list(self._batch_dirs_seen) if discover else [], set(self.batches)

        def read() -> list[tuple[Path, BatchRow | None]]:
            found = set(want)
            for broot in broots:
                found |= {d for d in iter_batch_dirs(broot) if d not in known}
            return [(d, read_batch(d)) for d in found]

        import json

        for d, row in await asyncio.to_thread(read):
            if row is None or self.batches.get(d) == row:
                continue
            self.batches[d] = row
            data = json.dumps({"id": row.key, "html": batch_row_html(row)})
            for sub in [s for s in self.subs if s.run_dir is None]:
                sub.push("batch", data)

    def _scanner(self) -> Callable[[], list[RunRow]]:
        """A scan for new runs to run on a worker thread, over a copy taken here on the loop
        (the index itself only changes on the loop)."""
        scratch = RunIndex(self.index.roots)
        scratch.rows = dict(self.index.rows)
        return scratch.scan

    def _observe(self, root: Path) -> Any:
        from watchdog.events import FileCreatedEvent, FileModifiedEvent, FileMovedEvent, FileSystemEventHandler
        from watchdog.observers import Observer

        hub = self
        assert self._loop is not None
        loop: asyncio.AbstractEventLoop = self._loop

        class _Handler(FileSystemEventHandler):
            # watchdog's thread: filter by name, hand the path to the loop, touch nothing else.
            def on_any_event(self, event: Any) -> None:
                for p in (event.src_path, getattr(event, "dest_path", "")):
                    if not p:
                        continue
                    p = os.fsdecode(p)
                    name = os.path.basename(p)
                    if name in _RUN_FILES or name == _LOG:
                        with contextlib.suppress(RuntimeError):  # the loop closed under us
                            loop.call_soon_threadsafe(hub._note, Path(p))

        warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"watchdog\.")
        observer = Observer()
        try:
            # Only writes and renames: watchdog's default mask includes opens and closes, and
            # its own walk of a big tree (opening every directory) then overflows the inotify
            # queue, which makes it walk again, and so on.
            observer.schedule(
                _Handler(),
                str(root),
                recursive=True,
                event_filter=[FileMovedEvent, FileModifiedEvent, FileCreatedEvent],
            )
            observer.start()
        except OSError as exc:  # e.g. the inotify watch limit: the fallback pass keeps pages right
            log.warning("dashboard: cannot watch %s (%s); updates come from the %gs rescan", root, exc, self.fallback_s)
            return None
        return observer

    # -- changes -------------------------------------------------------------------------------

    def _note(self, path: Path) -> None:
        log_dir = path.parent
        name = path.name
        if name == STATUS and log_dir.parent in self._batch_dirs_seen:
            self._dirty_batch.add(log_dir)
        elif name == STATUS:
            self._dirty_status.add(log_dir)
        elif name == _LOG:
            self._dirty_log.add(log_dir)
        else:
            self._dirty_detail.add(log_dir)
        self._wake.set()

    def _store(self, row: RunRow) -> None:
        self.index.put(row)
        self.gen += 1
        self.ring.append((self.gen, row.log_dir))
        self._publish_row(row)

    def row_message(self, row: RunRow) -> dict[str, Any]:
        root = self.index.root_of(row)
        parent = self.index.rows.get(row.log_dir.parent.parent) if row.log_dir.parent.name == "children" else None
        return {
            "id": row.run_id,
            "root": root.run_id,
            "parent": parent.run_id if parent is not None else "",
            "gen": self.gen,
            "html": run_row_html(row, root.run_id, time.time()),
        }

    def _publish_row(self, row: RunRow) -> None:
        import json

        listeners = [s for s in self.subs if s.run_dir is None]
        if not listeners:
            return
        data = json.dumps(self.row_message(row))
        for s in listeners:
            if s.push("row", data):
                self.pushes += 1

    async def _flush_loop(self) -> None:
        while True:
            await self._wake.wait()
            await asyncio.sleep(COALESCE_S)  # one pass for a burst of writes
            self._wake.clear()
            status, self._dirty_status = self._dirty_status, set()
            detail, self._dirty_detail = self._dirty_detail, set()
            logs, self._dirty_log = self._dirty_log, set()
            batches, self._dirty_batch = self._dirty_batch, set()
            try:
                if batches:
                    await self._refresh_batches(batches)
                await self._apply(status, detail, logs)
            except Exception:
                log.exception("dashboard: update failed")

    async def _apply(self, status: set[Path], detail: set[Path], logs: set[Path]) -> None:
        # A new run shows up with its first massgen.log line; its status.json comes later.
        fresh = {d for d in logs | detail if d not in self.index.rows}
        wanted = [d for d in status | fresh if self.index.inside(d)]
        if wanted:
            rows = await asyncio.to_thread(lambda: [read_row(d) for d in wanted])
            for row in rows:
                if row.state != "unknown" and self.index.rows.get(row.log_dir) != row:
                    self._store(row)
        followed = {s.run_dir for s in self.subs if s.run_dir is not None}
        now = time.monotonic()
        for d in followed & (status | detail):
            wait = self._next_render.get(d, 0.0) - now
            if wait > 0:
                # Rendered a moment ago: once more when the pause is over, with everything since.
                if d not in self._render_later:
                    self._render_later.add(d)
                    asyncio.get_running_loop().call_later(wait, self._render_due, d)
                continue
            t0 = time.monotonic()
            await self.push_run(d)
            # A big run costs more to render and to send: pages get it less often (4x its cost).
            self._next_render[d] = time.monotonic() + max(MIN_RENDER_GAP_S, 4 * (time.monotonic() - t0))
        for d in followed & logs:
            await self.push_log(d)

    def _render_due(self, log_dir: Path) -> None:
        self._render_later.discard(log_dir)
        self._dirty_detail.add(log_dir)
        self._wake.set()

    async def _fallback_loop(self) -> None:
        while True:
            await asyncio.sleep(self.fallback_s)
            try:
                await self._add_roots()
                unfinished = [d for d, r in self.index.rows.items() if not r.finished]

                rows, added = await asyncio.to_thread(_reread, unfinished, self._scanner())
                for row in [*rows, *added]:
                    if row.state != "unknown" and self.index.rows.get(row.log_dir) != row:
                        self._store(row)
                        if any(s.run_dir == row.log_dir for s in self.subs):
                            self._render_due(row.log_dir)  # through the flush loop and its pacing
            except Exception:
                log.exception("dashboard: rescan failed")

    # -- pages ---------------------------------------------------------------------------------

    def subscribe(self, run_dir: Path | None = None, log_offset: int = 0) -> Subscriber | None:
        if len(self.subs) >= MAX_SUBSCRIBERS:
            return None
        sub = Subscriber(run_dir=run_dir, log_offset=log_offset)
        self.subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        sub.closed = True
        self.subs.discard(sub)
        if sub.run_dir is not None and not any(s.run_dir == sub.run_dir for s in self.subs):
            self._files.pop(sub.run_dir, None)
            self._next_render.pop(sub.run_dir, None)

    def replay(self, sub: Subscriber, since: int) -> None:
        """Rows changed after generation `since` (the page's), or `reload` if the ring lost them."""
        import json

        if since > self.gen or (self.ring and since < self.ring[0][0] - 1) or (not self.ring and since < self.gen):
            sub.push("reload", "{}")
            return
        seen: set[Path] = set()
        for gen, d in reversed(self.ring):
            if gen <= since:
                break
            if d in seen:
                continue
            seen.add(d)
            row = self.index.rows.get(d)
            if row is not None:
                sub.push("row", json.dumps(self.row_message(row)))

    async def render_run(self, log_dir: Path) -> dict[str, str]:
        row = self.index.rows.get(log_dir) or RunRow(run_id=log_dir.name, log_dir=log_dir)
        index, redact, can_stop = self.index, self.redact, self.can_stop(row)
        followed = any(s.run_dir == log_dir for s in self.subs)
        files = self._files.setdefault(log_dir, RunFiles(log_dir)) if followed else None

        def build() -> dict[str, str]:
            return run_sections(load_detail(row, index, redact, files), can_stop=can_stop)

        return await asyncio.to_thread(build)

    async def push_run(self, log_dir: Path) -> None:
        import json

        subs = [s for s in self.subs if s.run_dir == log_dir]
        if not subs:
            return
        sections = await self.render_run(log_dir)
        for s in subs:
            changed = {k: v for k, v in sections.items() if s.sent.get(k) != v}
            if changed:
                s.sent.update(changed)
                if s.push("sections", json.dumps(changed)):
                    self.pushes += 1

    async def push_log(self, log_dir: Path, only: Subscriber | None = None) -> None:
        import json

        for s in [only] if only is not None else [s for s in self.subs if s.run_dir == log_dir]:
            text, offset, reset = await asyncio.to_thread(log_since, log_dir, s.log_offset, self.redact)
            s.log_offset = offset
            if text:
                s.push("log", json.dumps({"text": text, "offset": offset, "reset": reset}))

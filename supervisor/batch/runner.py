"""Running a batch: the plan against the ledger, admission, retries, deadline, budget, signals, reports."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SupervisorError
from ..logdir import RUN_ID_RE, atomic_write
from .assertions import RunFacts, classify, read_facts
from .backends import BackendError, DaemonBackend, EmbeddedBackend, RunLost, daemon_socket
from .grading import GradeContext, grade, reap_graders
from .ledger import VERDICTS, ItemState, Ledger, attempts, known_run_ids, latest
from .reports import (
    BatchExit,
    Ending,
    ReportSpec,
    annotation_lines,
    dumps,
    plan_to_json,
    render_junit,
    render_md,
    summarize,
)
from .spec import Batch, Item, Variant, config_text, shard_items

log = logging.getLogger(__name__)

BATCH_SCHEMA_VERSION = 1
STATUS_EVERY_S = 1.0
STATUS_MIN_GAP_S = 0.25  # live status.json writes are coalesced to at most one per this
BUDGET_POLL_S = 1.0
MEMORY_SHARE = 0.8  # of the host's RAM that sandboxes' memory limits may add up to
CPU_OVERCOMMIT = 16.0  # sandboxes mostly wait on models: their cpu limits may add up to this x cores
DEFAULT_START_RATE = 8.0  # container starts per second
FORCE_WAIT_S = 15.0  # after a second signal, how long in-flight items may take to end
CI_VARS = (
    "CI",
    "GITHUB_ACTIONS",
    "GITHUB_REPOSITORY",
    "GITHUB_SHA",
    "GITHUB_REF",
    "GITHUB_RUN_ID",
    "GITHUB_RUN_ATTEMPT",
    "GITHUB_WORKFLOW",
    "GITHUB_JOB",
    "GITLAB_CI",
    "CI_PIPELINE_ID",
    "CI_COMMIT_SHA",
    "BUILDKITE_BUILD_ID",
    "BUILD_ID",
)


class BatchError(SupervisorError):
    """The batch cannot start (spec, preflight, a changed spec, a locked dir): exit 1."""


@dataclass
class Options:
    batch_dir: Path
    max_parallel: int | None = None
    start_rate: float = DEFAULT_START_RATE
    allow_changed: bool = False
    shard: tuple[int, int] | None = None
    image: str | None = None
    automation: bool = False


@dataclass
class InFlight:
    item: Item
    attempt: int
    run_id: str
    log_dir: Path
    started: float
    memory: int
    cpus: float


@dataclass
class Progress:
    """The live numbers (status.json and the progress line)."""

    counts: dict[str, int] = field(default_factory=dict)
    spent_cost: float = 0.0
    spent_tokens: int = 0
    spent_calls: int = 0
    done_this_run: int = 0
    started_at: float = field(default_factory=time.time)


def slug(label: str) -> str:
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in label)[:60]
    return f"{safe}-{hashlib.sha256(label.encode()).hexdigest()[:6]}"


def _git_sha() -> str | None:
    repo = Path(__file__).resolve().parent.parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _tool_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("massgen-sandbox")
    except PackageNotFoundError:
        return "unknown"


def _pricing_hash() -> str | None:
    from ..pricing import DEFAULT_PRICING_FILE

    path = Path(os.environ.get("MASSGEN_PRICING_FILE") or DEFAULT_PRICING_FILE)
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    except OSError:
        return None


def item_cost_bound(v: Variant) -> float | None:
    """The most one item of this config can cost: 0 without models, its own budget, else unknown."""
    if not v.config.needs_models():
        return 0.0
    return v.config.sandbox.budget.max_cost_usd


def preflight_problems(batch: Batch) -> list[str]:
    """What makes the batch unrunnable before anything starts."""
    problems: list[str] = []
    if batch.spec.budget.max_cost_usd is not None:
        from ..pricing import Pricing

        try:
            pricing = Pricing.load()
        except Exception as exc:  # noqa: BLE001 - a broken pricing file is a preflight error, named
            return [f"pricing: {exc}"]
        for v in batch.variants.values():
            for a in v.config.agents:
                b = a.backend
                if b.type != "scripted" and pricing.price(b.type, b.model or "") is None:
                    problems.append(
                        f"config {v.label}: agent {a.id} uses {b.type}/{b.model}, which has no price: "
                        "a cost budget cannot be enforced (add it to the pricing file)"
                    )
    rubrics = {
        a.model
        for a in (
            *batch.spec.assert_,
            *(x for v in batch.variants.values() for x in v.assertions),
            *(x for q in batch.questions.values() for x in q.assertions),
        )
        if a.type == "llm_rubric"
    }
    if rubrics:
        from ..gateway import upstreams_from_env

        try:
            has_key = "openai" in upstreams_from_env()
        except Exception:  # noqa: BLE001 - a broken keys file is a preflight error, named
            has_key = False
        if not has_key:
            problems.append("llm_rubric needs OPENAI_API_KEY (or an openai entry in $MASSGEN_KEYS_FILE) on the host")
        if batch.spec.grading_budget.max_cost_usd is not None:
            from ..pricing import Pricing

            for m in sorted(rubrics):
                if Pricing.load().price("openai", m) is None:
                    problems.append(f"llm_rubric model openai/{m} has no price: grading_budget cannot be enforced")
    import psutil

    mem_cap = psutil.virtual_memory().total * MEMORY_SHARE
    cpu_cap = (os.cpu_count() or 1) * CPU_OVERCOMMIT
    for v in batch.variants.values():
        sb = v.config.sandbox
        if sb.memory_bytes > mem_cap:
            problems.append(f"config {v.label}: sandbox.memory {sb.memory} exceeds what this host can admit")
        if sb.cpus > cpu_cap:
            problems.append(f"config {v.label}: sandbox.cpus {sb.cpus:g} exceeds what this host can admit")
    return problems


class BatchRunner:
    """One invocation of `massgen-run batch SPEC`: resumes what the batch dir says, runs the rest."""

    def __init__(self, batch: Batch, opts: Options, *, out: Callable[[str], None], err: Callable[[str], None]) -> None:
        self.batch = batch
        self.opts = opts
        self.out = out
        self.err = err
        d = opts.batch_dir
        self.dir = d
        self.runs_root = d / "runs"
        self.ledger = Ledger(d / "items.jsonl")
        self.plan = shard_items(batch.items, opts.shard)
        self.by_id = {it.id: it for it in self.plan}
        self.records: list[dict[str, Any]] = []
        self.latest: dict[str, dict[str, Any]] = {}
        self.attempts: dict[str, int] = {}
        self.inflight: dict[str, InFlight] = {}
        self.stopped_for: dict[str, str] = {}
        self.stopping: str | None = None
        self.forced = False
        self.stop_event = asyncio.Event()
        self.progress = Progress()
        self.backend: Any = None
        self.grade_ctx: GradeContext | None = None
        self.max_parallel = opts.max_parallel or batch.spec.max_parallel
        self.deadline: float | None = None
        self._last_start = 0.0
        self._start_lock = asyncio.Lock()
        self._admit = asyncio.Condition()
        self._status_written = 0.0
        self._lock_fd: int | None = None
        self.progress_cb: Callable[[BatchRunner], None] | None = None
        self.adoptable: set[str] = set()
        self.config_paths: dict[str, Path] = {}
        self.image: str | None = None
        self.budget_root: Any = None
        self.supervisor_id = f"batch-{hashlib.sha256(str(d.resolve()).encode()).hexdigest()[:12]}"

    # -- the batch dir --------------------------------------------------------------------

    def lock(self) -> None:
        """Only one process runs a batch dir at a time.

        Raises:
            BatchError: another batch process holds it.
        """
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise BatchError(f"another batch process is running in {self.dir}") from exc
        self._lock_fd = fd

    def check_fingerprint(self) -> dict[str, Any] | None:
        """The previous batch.json, refusing a changed spec unless --allow-changed.

        Raises:
            BatchError: the spec changed and --allow-changed was not given, or the dir is another shard's.
        """
        path = self.dir / "batch.json"
        try:
            prev: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise BatchError(f"{path} is unreadable ({exc}); use a new --batch-dir") from exc
        if prev.get("fingerprint") != self.batch.fingerprint and not self.opts.allow_changed:
            raise BatchError(
                f"the spec changed since this batch dir was started (fingerprint {prev.get('fingerprint')} -> "
                f"{self.batch.fingerprint}); pass --allow-changed to run only the changed items,"
                " or use a new --batch-dir"
            )
        shard = list(self.opts.shard) if self.opts.shard else None
        if prev.get("shard") != shard:
            raise BatchError(f"{self.dir} holds shard {prev.get('shard')}, not {shard}; use a batch dir per shard")
        return prev

    def write_batch_json(self, prev: dict[str, Any] | None, image: str | None, supervisor: str) -> None:
        history = list(prev.get("fingerprints", [])) if prev else []
        if not history or history[-1] != self.batch.fingerprint:
            history.append(self.batch.fingerprint)
        image_id = None
        if image and self.grade_ctx is not None and self.grade_ctx.runtime is not None:
            with contextlib.suppress(Exception):
                image_id = self.grade_ctx.runtime._docker.images.get(image).id
        doc = {
            "schema_version": BATCH_SCHEMA_VERSION,
            "name": self.batch.name,
            "fingerprint": self.batch.fingerprint,
            "fingerprints": history,
            "shard": list(self.opts.shard) if self.opts.shard else None,
            "created_at": prev.get("created_at") if prev else time.time(),
            "items_planned": len(self.plan),
            "spec": self.batch.resolved(),
            "report": ReportSpec.from_batch(self.batch).to_json(),
            "plan": plan_to_json(self.plan),
            "provenance": {
                "tool_version": _tool_version(),
                "git_sha": _git_sha(),
                "python": sys.version.split()[0],
                "image": image,
                "image_id": image_id,
                "pricing_sha256": _pricing_hash(),
                "supervisor": supervisor,
                "ci": {k: os.environ[k] for k in CI_VARS if k in os.environ},
            },
        }
        atomic_write(self.dir / "batch.json", json.dumps(doc, indent=2, sort_keys=True) + "\n")

    def write_configs(self) -> dict[str, Path]:
        cdir = self.dir / "configs"
        cdir.mkdir(exist_ok=True)
        paths = {}
        for v in self.batch.variants.values():
            p = cdir / f"{slug(v.label)}.yaml"
            text = config_text(v)
            if not p.exists() or p.read_text(encoding="utf-8") != text:
                atomic_write(p, text)
            paths[v.label] = p.resolve()
        return paths

    def load_ledger(self) -> None:
        self.records = self.ledger.load()
        planned = [r for r in self.records if r["item"] in self.by_id]
        self.latest = latest(planned)
        self.attempts = attempts(planned)
        for rec in self.latest.values():
            self._count(rec)

    def _count(self, rec: dict[str, Any]) -> None:
        self.progress.spent_cost += float(rec.get("cost_usd") or 0.0)
        self.progress.spent_tokens += int(rec.get("tokens") or 0)
        self.progress.spent_calls += int(rec.get("calls") or 0)

    def todo(self) -> list[Item]:
        return [it for it in self.plan if self.latest.get(it.id, {}).get("state") not in VERDICTS]

    def orphan_dirs(self) -> dict[str, list[Path]]:
        """Log dirs of planned items that the ledger has no line for: in flight when a batch died."""
        known = known_run_ids(self.records)
        out: dict[str, list[Path]] = {}
        for it in self.plan:
            d = self.runs_root / it.id
            if not d.is_dir():
                continue
            for sub in sorted(d.iterdir()):
                if RUN_ID_RE.match(sub.name) and sub.name not in known and sub.is_dir() and not sub.is_symlink():
                    out.setdefault(it.id, []).append(sub)
        return out

    # -- status and reports -----------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        c = {s.value: 0 for s in ItemState}
        c["pending"] = 0
        c["running"] = 0
        for it in self.plan:
            if it.id in self.inflight:
                c["running"] += 1
            elif it.id in self.latest:
                c[self.latest[it.id]["state"]] += 1
            else:
                c["pending"] += 1
        return c

    def write_status(self, *, final: bool = False, exit_code: int | None = None, force: bool = False) -> None:
        """The live status.json: coalesced, replaced atomically; fsynced only when final.

        It is a projection of the ledger and the in-flight runs, rewritten on every resume;
        items.jsonl is the durable record, so live writes skip the two fsyncs an
        atomic_write costs (tens of ms on a busy disk, for every item).
        """
        now = time.time()
        if not (final or force) and now - self._status_written < STATUS_MIN_GAP_S:
            return
        self._status_written = now
        c = self.counts()
        done = self.progress.done_this_run
        elapsed = now - self.progress.started_at
        left = c["pending"] + c["running"] + c["error"] + c["interrupted"] + c["skipped"]
        eta = elapsed / done * left if done and not final else None
        live_cost, live_tokens, live_calls = self._live_spend()
        doc = {
            "schema_version": BATCH_SCHEMA_VERSION,
            "batch": self.batch.name,
            "batch_dir": str(self.dir),
            "fingerprint": self.batch.fingerprint,
            "state": "finished" if final else "running",
            "stopping": self.stopping,
            "ending": self.stopping if final else None,
            "exit_code": exit_code,
            "pid": os.getpid(),
            "supervisor": getattr(self.backend, "kind", None),
            "started_at": self.progress.started_at,
            "updated_at": now,
            "elapsed_s": round(elapsed, 3),
            "eta_s": None if eta is None else round(eta, 1),
            "items": len(self.plan),
            "counts": c,
            "spend": {
                "cost_usd": round(self.progress.spent_cost + live_cost, 8),
                "tokens": self.progress.spent_tokens + live_tokens,
                "calls": self.progress.spent_calls + live_calls,
            },
            "budget": self.batch.spec.budget.model_dump(),
            "deadline": self.deadline,
            "in_flight": [
                {
                    "item": f.item.id,
                    "config": f.item.config,
                    "question": f.item.question,
                    "repeat": f.item.repeat,
                    "attempt": f.attempt,
                    "run_id": f.run_id,
                    "log_dir": str(f.log_dir),
                    "started_at": f.started,
                }
                for f in self.inflight.values()
            ],
        }
        text = json.dumps(doc, indent=2, sort_keys=True) + "\n"
        if final:
            atomic_write(self.dir / "status.json", text)
        else:
            _replace(self.dir / "status.json", text)

    def _live_spend(self) -> tuple[float, int, int]:
        cost, tokens, calls = 0.0, 0, 0
        for f in self.inflight.values():
            try:
                st = json.loads((f.log_dir / "status.json").read_text(encoding="utf-8"))
                tot = st["telemetry"]["totals"]
            except (OSError, ValueError, KeyError, TypeError):
                continue
            cost += float(tot.get("cost_usd") or 0.0)
            tokens += int(tot.get("total_tokens") or 0)
            calls += int(tot.get("calls") or 0)
        return cost, tokens, calls

    def write_reports(self, ending: Ending) -> dict[str, Any]:
        rs = ReportSpec.from_batch(self.batch)
        summary = summarize(rs, self.plan, self.latest, ending)
        write_reports(self.dir, rs, self.plan, self.latest, summary, ending)
        return summary

    # -- running ------------------------------------------------------------------------------

    async def open_backend(self) -> None:
        from ..errors import BuildError, ContainerRuntimeError

        sock = None if self.opts.image else daemon_socket()
        runtime = None
        image = self.opts.image
        try:
            from ..runtime.docker import DockerRuntime

            runtime = DockerRuntime()
        except ContainerRuntimeError as exc:
            raise BatchError(f"the container engine is unavailable: {exc}") from exc
        if sock is not None:
            self.backend = DaemonBackend(sock)
            if image is None:
                from ..images import agent_image_tag

                image = agent_image_tag()
        else:
            if image is None:
                from ..images import ensure_images, preflight

                problems = preflight(runtime)
                if problems:
                    raise BatchError("; ".join(problems))
                try:
                    image = await asyncio.to_thread(ensure_images, runtime, progress=self.err)
                except (BuildError, ContainerRuntimeError) as exc:
                    raise BatchError(f"image build failed: {exc}") from exc
            self.backend = EmbeddedBackend(runtime, image, self.supervisor_id)
        await self.backend.open()
        if isinstance(self.backend, EmbeddedBackend):
            self.budget_root = self._budget_root()
            self.backend.sup.budget_root = self.budget_root
        from .rubric import RubricGrader

        self.grade_ctx = GradeContext(
            runtime,
            image,
            f"{self.supervisor_id}-grader",
            self.dir / "grading",
            RubricGrader(self.batch.spec.grading_budget),
        )
        with contextlib.suppress(Exception):
            await asyncio.to_thread(reap_graders, runtime, self.grade_ctx.grader_label)
        self.image = image

    async def sweep_disks(self, *, reclaim_own: bool = False) -> None:
        """Release the run disks a killed batch process left mounted under this batch dir.

        Whatever the backend: a disk whose owner process is alive (the daemon's, or this
        process's adopted runs) or whose sandbox still exists is left alone; with `reclaim_own`
        (once no item is in flight) this process's own are released too.
        """
        runtime = self.grade_ctx.runtime if self.grade_ctx is not None else None
        if runtime is not None:
            await asyncio.to_thread(sweep_disks, runtime, self.dir, reclaim_own=reclaim_own)

    def _budget_root(self) -> Any:
        """The batch as an ancestor in the gateway's budget tree (embedded runs): calls are refused
        at the gateway once the batch is spent, seeded with what finished items spent."""
        b = self.batch.spec.budget
        if b.max_cost_usd is None and b.max_tokens is None and b.max_calls is None:
            return None
        from ..gateway import BudgetMeter, ChainMeter

        root = ChainMeter(BudgetMeter(b.max_tokens, b.max_cost_usd, b.max_calls))
        total = root.own.total
        total.calls = self.progress.spent_calls
        total.cost_usd = self.progress.spent_cost
        total.prompt_tokens = self.progress.spent_tokens  # `tokens` is prompt + completion
        return root

    async def _admit_item(self, v: Variant) -> bool:
        """Wait for a slot, for the start rate, and for memory/cpu room; False when the batch stops."""
        import psutil

        mem_cap = psutil.virtual_memory().total * MEMORY_SHARE
        cpu_cap = (os.cpu_count() or 1) * CPU_OVERCOMMIT
        need_mem, need_cpu = v.config.sandbox.memory_bytes, v.config.sandbox.cpus
        async with self._admit:
            while True:
                if self.stopping:
                    return False
                used_mem = sum(f.memory for f in self.inflight.values())
                used_cpu = sum(f.cpus for f in self.inflight.values())
                room = used_mem + need_mem <= mem_cap and used_cpu + need_cpu <= cpu_cap
                if len(self.inflight) < self.max_parallel and (room or not self.inflight):
                    break
                await self._admit.wait()
        async with self._start_lock:
            gap = 1.0 / self.opts.start_rate if self.opts.start_rate > 0 else 0.0
            wait = self._last_start + gap - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            self._last_start = time.monotonic()
        return not self.stopping

    async def _release(self) -> None:
        async with self._admit:
            self._admit.notify_all()

    def _budget_exceeded(self) -> str | None:
        b = self.batch.spec.budget
        if b.max_cost_usd is None and b.max_tokens is None and b.max_calls is None:
            return None  # (reading every in-flight status.json for nothing costs CPU per second)
        cost, tokens, calls = self._live_spend()
        cost += self.progress.spent_cost
        tokens += self.progress.spent_tokens
        calls += self.progress.spent_calls
        if b.max_cost_usd is not None and cost >= b.max_cost_usd:
            return f"cost ${cost:.4f} reached the batch budget ${b.max_cost_usd:g}"
        if b.max_tokens is not None and tokens >= b.max_tokens:
            return f"{tokens} tokens reached the batch budget {b.max_tokens}"
        if b.max_calls is not None and calls >= b.max_calls:
            return f"{calls} calls reached the batch budget {b.max_calls}"
        return None

    async def stop_all(self, why: str) -> None:
        if self.stopping is None:
            self.stopping = why
            self.err(f"massgen-run batch: stopping ({why}); in-flight items are stopped, no new ones start")
        self.stop_event.set()
        for f in list(self.inflight.values()):
            self.stopped_for.setdefault(f.item.id, why)
            await self.backend.stop(f.run_id, f"batch {why}", force=self.forced)
        async with self._admit:
            self._admit.notify_all()

    async def _settle(
        self,
        item: Item,
        attempt: int,
        run_id: str | None,
        log_dir: Path | None,
        facts: RunFacts | None,
        lost: str | None = None,
    ) -> dict[str, Any]:
        """Grade one ended attempt and append its ledger line."""
        rec: dict[str, Any] = {
            "v": BATCH_SCHEMA_VERSION,
            "item": item.id,
            "config": item.config,
            "question": item.question,
            "repeat": item.repeat,
            "attempt": attempt,
            "run_id": run_id,
            "log_dir": str(log_dir) if log_dir else None,
            "ended_at": round(time.time(), 3),
        }
        assertions_out: list[dict[str, Any]] = []
        if facts is None:
            state, retryable, reason, why = ItemState.ERROR, True, "supervisor_lost", lost or "the run has no result"
        elif facts.exit_code == 0:
            q = self.batch.questions[item.question]
            assert self.grade_ctx is not None
            outcomes = await grade(
                self.batch.assertions_for(item), facts, q.expected, q.question, self.grade_ctx, item.id
            )
            assertions_out = [o.as_dict() for o in outcomes]
            failed = [o for o in outcomes if not o.passed]
            broken = [o for o in outcomes if o.harness_error]
            state = ItemState.ERROR if broken else ItemState.FAIL if failed else ItemState.PASS
            retryable = False
            reason = "grader_error" if broken else "assertion_failed" if failed else "completed"
            why = "; ".join(f"{o.type}: {o.detail}" for o in (broken or failed))[:1000]
            rec["grading_cost_usd"] = self.grade_ctx.rubric.spend_of(item.id) if self.grade_ctx.rubric else 0.0
        else:
            state, retryable, reason = classify(facts)
            why = facts.detail[:1000]
            stopped = self.stopped_for.get(item.id)
            root = self.budget_root
            if facts.reason == "budget_exceeded" and root is not None and root.own.budget_error() is not None:
                # The gateway refused a call because the batch is spent, not this item's own budget.
                state, reason, why = ItemState.SKIPPED, "budget_exhausted", "the batch budget was spent in flight"
                self.stopped_for.setdefault(item.id, "budget")
            elif state == ItemState.INTERRUPTED and stopped in ("deadline", "budget"):
                state, reason = ItemState.SKIPPED, "deadline" if stopped == "deadline" else "budget_exhausted"
                why = f"stopped in flight: batch {stopped} reached"
        rec.update(
            {
                "state": state.value,
                "reason": reason,
                "retryable": retryable,
                "why": why,
                "exit_code": facts.exit_code if facts else None,
                "run_reason": facts.reason if facts else None,
                "winner": facts.winner if facts else None,
                "answer_preview": (" ".join((facts.answer or "").split())[:200]) if facts else None,
                "assertions": assertions_out,
                "duration_s": facts.duration_s if facts else None,
                "cost_usd": facts.cost_usd if facts else 0.0,
                "tokens": facts.tokens if facts else 0,
                "calls": facts.calls if facts else 0,
            }
        )
        self.ledger.append(rec)
        if rec["reason"] == "budget_exhausted" and self.stopping is None:
            await self.stop_all("budget")
        self.records.append(rec)
        self.latest[item.id] = rec
        self.attempts[item.id] = attempt
        self._count(rec)
        self.progress.done_this_run += 1
        return rec

    async def _follow(self, item: Item, attempt: int, run_id: str, log_dir: Path) -> dict[str, Any]:
        v = self.batch.variants[item.config]
        self.inflight[item.id] = InFlight(
            item, attempt, run_id, log_dir, time.time(), v.config.sandbox.memory_bytes, v.config.sandbox.cpus
        )
        if self.stopping:
            self.stopped_for.setdefault(item.id, self.stopping)
            await self.backend.stop(run_id, f"batch {self.stopping}")
        self.write_status()
        lost = None
        try:
            await self.backend.wait(run_id, log_dir)
        except RunLost as exc:
            lost = exc.detail
        facts = await asyncio.to_thread(read_facts, log_dir)
        try:
            return await self._settle(item, attempt, run_id, log_dir, facts, lost)
        finally:
            self.inflight.pop(item.id, None)
            await self._release()
            self.write_status()
            self.on_item()

    async def run_item(self, item: Item, adopted: list[Path]) -> None:
        attempt = self.attempts.get(item.id, 0)
        max_attempts = self.batch.spec.retry.max_attempts
        tries = 0  # attempts in this invocation: a resumed batch gives errored items a fresh budget
        v = self.batch.variants[item.config]
        for log_dir in adopted:
            attempt += 1
            tries += 1
            facts = await asyncio.to_thread(read_facts, log_dir)
            if facts is not None:
                rec = await self._settle(item, attempt, log_dir.name, log_dir, facts)
                self.on_item()
            elif log_dir.name in self.adoptable:
                rec = await self._follow(item, attempt, log_dir.name, log_dir)
            else:
                rec = await self._settle(
                    item, attempt, log_dir.name, log_dir, None, "the supervisor of this run is gone"
                )
            if rec["state"] in VERDICTS or not rec["retryable"]:
                return
        while not self.stopping and tries < max_attempts:
            if tries:
                backoff = self.batch.spec.retry.backoff_s * 2 ** (tries - 1)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop_event.wait(), backoff)
                if self.stopping:
                    return
            if not await self._admit_item(v):
                return
            if self._budget_exceeded() is not None:
                await self.stop_all("budget")
                return
            attempt += 1
            tries += 1
            q = self.batch.questions[item.question]
            try:
                run_id, log_dir = await self.backend.start(
                    q.question, self.config_paths[item.config], self.runs_root / item.id
                )
            except BackendError as exc:
                rec = await self._settle(item, attempt, None, None, None, f"could not start: {exc.detail}")
                if not exc.transient:
                    rec["retryable"] = False
                await self._release()
                self.on_item()
                continue
            rec = await self._follow(item, attempt, run_id, log_dir)
            if rec["state"] in VERDICTS or not rec["retryable"]:
                return

    def on_item(self) -> None:
        """Called after every ledger line: live status and progress."""
        if self.progress_cb is not None:
            self.progress_cb(self)

    async def _watch(self) -> None:
        """Deadline, batch budget and the periodic status write."""
        while True:
            await asyncio.sleep(min(STATUS_EVERY_S, BUDGET_POLL_S))
            if self.stopping is None:
                if self.deadline is not None and time.time() >= self.deadline:
                    await self.stop_all("deadline")
                else:
                    why = self._budget_exceeded()
                    if why is not None:
                        self.err(f"massgen-run batch: {why}")
                        await self.stop_all("budget")
            self.write_status(force=True)
            if self.progress_cb is not None:
                self.progress_cb(self)

    async def execute(self) -> Ending:
        """Adopt what was in flight, run what is left; returns how it ended."""
        loop = asyncio.get_running_loop()
        stops: set[asyncio.Task[None]] = set()  # the loop keeps only weak references to tasks

        def on_signal(name: str) -> None:
            if self.stopping == "interrupted" or self.forced:
                self.forced = True
                self.err(f"massgen-run batch: second {name}: killing in-flight items")
            task = loop.create_task(self.stop_all("interrupted"))
            stops.add(task)
            task.add_done_callback(stops.discard)

        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, on_signal, sig.name)
        orphans = self.orphan_dirs()
        self.adoptable = (
            await self.backend.adopt(self.runs_root, [self.runs_root / i for i in orphans]) if orphans else set()
        )
        await self.sweep_disks()
        queue = deque(it for it in self.todo() if it.id not in orphans)
        adopted = [(self.by_id[i], dirs) for i, dirs in orphans.items()]
        if self.batch.deadline_s is not None:
            self.deadline = time.time() + self.batch.deadline_s
        watcher = asyncio.create_task(self._watch())

        async def worker() -> None:
            while queue and not self.stopping:
                await self.run_item(queue.popleft(), [])

        tasks = [asyncio.create_task(self.run_item(it, dirs)) for it, dirs in adopted]
        tasks += [asyncio.create_task(worker()) for _ in range(self.max_parallel)]
        try:
            pending = set(tasks)
            while pending:
                done, pending = await asyncio.wait(pending, timeout=1.0)
                for t in done:
                    t.result()  # a bug of ours surfaces here (the reports are still written)
                if self.forced and pending:
                    # Second signal: the runs were told to die; do not wait on a sandbox that
                    # will not. Whatever is left is re-adopted by the next batch process.
                    _done, pending = await asyncio.wait(pending, timeout=FORCE_WAIT_S)
                    for t in pending:
                        t.cancel()
                    await asyncio.gather(*pending, return_exceptions=True)
                    pending = set()
        finally:
            for t in tasks:
                t.cancel()
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.remove_signal_handler(sig)
        # No item is in flight now: a disk still mounted (one an adopted run took over but never
        # used, say) is released here, not left for the next run in this logs root to sweep.
        await self.sweep_disks(reclaim_own=True)
        return Ending(self.stopping if self.stopping in ("interrupted", "deadline", "budget") else None)


def sweep_disks(runtime: Any, batch_dir: Path, *, reclaim_own: bool = False) -> int:
    """`reaper.reap_disks` over the batch's item runs (their workspaces are `runs/workspaces/`)."""
    from ..reaper import reap_disks

    return reap_disks(runtime, batch_dir / "runs" / "workspaces", reclaim_own=reclaim_own)


def _replace(path: Path, text: str) -> None:
    """Readers see the old file or the new one, never a torn one (no fsync: see write_status)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_reports(
    batch_dir: Path,
    batch: ReportSpec,
    plan: list[Item],
    latest_: dict[str, dict[str, Any]],
    summary: dict[str, Any],
    ending: Ending | None = None,
) -> None:
    """summary.json, summary.md (+ $GITHUB_STEP_SUMMARY) and junit.xml, each written atomically."""
    atomic_write(batch_dir / "summary.json", dumps(summary))
    md = render_md(summary)
    atomic_write(batch_dir / "summary.md", md)
    atomic_write(batch_dir / "junit.xml", render_junit(batch, plan, latest_, summary, ending))
    step = os.environ.get("GITHUB_STEP_SUMMARY")
    if step:
        with contextlib.suppress(OSError), open(step, "a", encoding="utf-8") as fh:
            fh.write(md + "\n")


def exit_code(summary: dict[str, Any], *, gate_exit_code: int, no_gate: bool) -> int:
    code = int(summary["exit_code"])
    if code == BatchExit.GATE:
        return 0 if no_gate else gate_exit_code
    return code


def gh_annotations(summary: dict[str, Any]) -> list[str]:
    return annotation_lines(summary) if os.environ.get("GITHUB_ACTIONS") == "true" else []

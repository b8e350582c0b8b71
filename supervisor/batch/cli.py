"""`massgen-run batch`: run a spec (resuming its batch dir), `status`, `report`, `merge`."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from .reports import BatchExit

USAGE = """\
massgen-run batch SPEC [--batch-dir DIR] [options]     run (or resume) a batch
massgen-run batch status DIR [--json]                  live counts, in-flight items, spend, ETA
massgen-run batch report DIR [--format md|json|junit]  print a report (re-derived from items.jsonl)
massgen-run batch merge OUT DIR [DIR ...]              merge the batch dirs of --shard runs
"""
EPILOG = """\
exit codes: 0 every gate passed; 1 spec or preflight error, nothing started; 2 item errors
above max_item_errors; 3 deadline or batch budget reached; 4 interrupted (re-run to resume);
10 complete but a gate failed (--gate-exit-code N, --no-gate)
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(1, f"{self.prog}: error: {message}\n")


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _out(msg: str) -> None:
    print(msg, flush=True)


def _ascii(text: str, limit: int = 200) -> str:
    one = " ".join(str(text).split())
    if len(one) > limit:
        one = one[:limit] + "..."
    return one.encode("ascii", "backslashreplace").decode("ascii")


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError("--shard takes i/n, e.g. 1/4") from None
    if not 1 <= i <= n:
        raise argparse.ArgumentTypeError("--shard i/n needs 1 <= i <= n")
    return i, n


def _run_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="massgen-run batch",
        usage=USAGE,
        description="Run configs x questions x repeats, each item in its own sandbox; resumable, gated, reported.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("spec", type=Path, help="the batch spec (batch.yaml)")
    p.add_argument("--batch-dir", type=Path, default=None, help="default ./.massgen/batches/<spec name>")
    p.add_argument("--max-parallel", type=int, default=None, help="items at once (default: the spec's, else 4)")
    p.add_argument("--start-rate", type=float, default=None, help="container starts per second (default 8)")
    p.add_argument("--allow-changed", action="store_true", help="resume after the spec changed: run only changed items")
    p.add_argument("--shard", type=_shard, default=None, help="run shard i of n (1-based); merge with `batch merge`")
    p.add_argument("--dry-run", action="store_true", help="print the plan and a cost upper bound; start nothing")
    p.add_argument("--automation", action="store_true", help="~10 parseable lines (BATCH_DIR first) and nothing else")
    p.add_argument("--gate-exit-code", type=int, default=BatchExit.GATE, help="exit code when a gate fails (10)")
    p.add_argument("--no-gate", action="store_true", help="exit 0 even when a gate fails (reports still say so)")
    p.add_argument("--image", default=None, help="agent image (default: built automatically; forces embedding)")
    return p


def _default_dir(spec: Path) -> Path:
    return Path.cwd() / ".massgen" / "batches" / spec.stem


class _View:
    """Automation lines or a live human view of one batch invocation."""

    def __init__(self, automation: bool, total: int) -> None:
        self.automation = automation
        self.total = total
        self.tty = sys.stderr.isatty() and not automation
        self.t0 = time.monotonic()
        self._last_draw = 0.0
        self._last_done = -1

    def head(self, batch_dir: Path, batch: Any, plan: int, done: int, supervisor: str) -> None:
        shape = f"{len(batch.variants)} configs x {len(batch.questions)} questions x {batch.spec.repeats} repeats"
        if self.automation:
            _out(f"BATCH_DIR: {batch_dir}")
            _out(f"BATCH: {_ascii(batch.name, 100)}")
            _out(f"STATUS_FILE: {batch_dir / 'status.json'}")
            _out(f"ITEMS: {plan} ({shape}; {done} done, {plan - done} to run)")
            _out(f"SUPERVISOR: {supervisor}")
            _out("[Batch in progress - monitor status.json for real-time updates]")
        else:
            print(f"batch {batch.name}: {plan} items ({shape}); {done} done, {plan - done} to run", flush=True)
            print(f"  batch dir:  {batch_dir}\n  supervisor: {supervisor}", flush=True)

    def tick(self, runner: Any) -> None:
        if self.automation:
            return
        c = runner.counts()
        done = c["pass"] + c["fail"] + c["error"] + c["skipped"] + c["interrupted"]
        now = time.monotonic()
        if not self.tty:
            # Not a terminal (a CI log): a line per 10% of progress, never a redraw.
            step = max(1, self.total // 10)
            if done != self._last_done and (done % step == 0 or done == self.total):
                self._last_done = done
                print(self._line(runner, c, done), flush=True)
            return
        if now - self._last_draw < 0.2 and done != self.total:
            return
        self._last_draw = now
        width = 24
        filled = int(width * done / self.total) if self.total else width
        bar = "#" * filled + "." * (width - filled)
        sys.stderr.write(f"\r[{bar}] {self._line(runner, c, done)}\x1b[K")
        sys.stderr.flush()

    def _line(self, runner: Any, c: dict[str, int], done: int) -> str:
        elapsed = time.monotonic() - self.t0
        n = runner.progress.done_this_run
        left = c["pending"] + c["running"]
        eta = f" ETA {elapsed / n * left:.0f}s" if n and left else ""
        spend = runner.progress.spent_cost + runner._live_spend()[0]
        return (
            f"{done}/{self.total} pass {c['pass']} fail {c['fail']} error {c['error']} skipped {c['skipped']}"
            f" running {c['running']} ${spend:.4f} {elapsed:.0f}s{eta}"
        )

    def tail(self, batch_dir: Path, summary: dict[str, Any], code: int, annotations: list[str]) -> None:
        c = summary["counts"]
        elapsed = time.monotonic() - self.t0
        gates = summary["gates"]
        failed = [f"{g['gate']} {g['target']} ({g['detail']})" for g in gates if not g["passed"]]
        gate_line = "none" if not gates else "passed" if not failed else "FAILED: " + "; ".join(failed)
        rate = summary["pass_rate"]
        ci = summary["wilson95"]
        rate_s = "n/a" if rate is None else f"{rate:.1%}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")
        why = summary["exit_reason"]
        if code == 0:
            last = f"COMPLETED: {c['items']} items, {elapsed:.1f}s"
        elif code == BatchExit.INTERRUPTED:
            last = f"INTERRUPTED: {_ascii(why)} (re-run the same command to resume)"
        elif code == BatchExit.DEADLINE_OR_BUDGET:
            last = f"STOPPED: {_ascii(why)}"
        else:
            last = f"FAILED: {_ascii(why)}"
        if self.tty:
            sys.stderr.write("\n")
        if self.automation:
            _out(f"RESULTS: {c['pass']} pass, {c['fail']} fail, {c['error']} error, {c['skipped']} skipped")
            _out(f"PASS_RATE: {rate_s}")
            _out(f"GATES: {_ascii(gate_line, 300)}")
            _out(f"SUMMARY_FILE: {batch_dir / 'summary.md'}")
            _out(f"JUNIT_FILE: {batch_dir / 'junit.xml'}")
        else:
            print(
                f"\n{c['pass']} pass, {c['fail']} fail, {c['error']} error, {c['skipped']} skipped; pass rate {rate_s}"
            )
            for lab, v in summary["configs"].items():
                mr = v["macro_pass_rate"]
                print(f"  {lab:30} {v['passes']}/{v['n']} pass, macro {'n/a' if mr is None else f'{mr:.1%}'}")
            for cmp in summary["comparisons"]:
                print(
                    f"  {cmp['candidate']} vs {cmp['baseline']}: diff {cmp['diff']},"
                    f" Holm p={cmp['p_holm']:.4g}: {cmp['verdict']}"
                )
            print(f"gates: {gate_line}")
            print(f"reports: {batch_dir / 'summary.md'}  {batch_dir / 'junit.xml'}")
        for line in annotations:
            _out(line)
        _out(last)


def cmd_run(argv: list[str]) -> int:
    args = _run_parser().parse_args(argv)
    from .runner import BatchError, BatchRunner, Options, exit_code, gh_annotations, item_cost_bound, preflight_problems
    from .spec import SpecError, load_batch

    spec_path = args.spec.absolute()
    batch_dir = (args.batch_dir or _default_dir(spec_path)).absolute()

    def refuse(kind: str, problems: list[str]) -> int:
        _err(f"massgen-run batch: {kind}:")
        for p in problems:
            _err(f"  - {p}")
        if args.automation:
            _out(f"BATCH_DIR: {batch_dir}")
            _out(f"FAILED: {kind.replace(' ', '_')}: {_ascii(problems[0])}")
        return BatchExit.SPEC

    try:
        batch = load_batch(spec_path)
    except SpecError as exc:
        return refuse("spec error", [str(p) for p in exc.problems])
    problems = preflight_problems(batch)
    if args.max_parallel is not None and args.max_parallel < 1:
        problems.append("--max-parallel must be at least 1")
    if problems:
        return refuse("preflight error", problems)
    opts = Options(
        batch_dir=batch_dir,
        max_parallel=args.max_parallel,
        allow_changed=args.allow_changed,
        shard=args.shard,
        image=args.image,
        automation=args.automation,
    )
    if args.start_rate is not None:
        opts.start_rate = args.start_rate
    runner = BatchRunner(batch, opts, out=_out, err=_err)
    if args.dry_run:
        return _dry_run(runner, batch, item_cost_bound)
    try:
        runner.lock()
        prev = runner.check_fingerprint()
    except BatchError as exc:
        return refuse("batch dir refused", [str(exc)])
    runner.load_ledger()
    runner.config_paths = runner.write_configs()
    view = _View(args.automation, len(runner.plan))
    runner.progress_cb = view.tick
    todo, orphans = runner.todo(), runner.orphan_dirs()
    from .reports import Ending

    if not todo and not orphans:
        _sweep_disks(batch_dir)
        if prev is None or prev.get("fingerprint") != batch.fingerprint:
            runner.write_batch_json(prev, None, "none")
        done = len(runner.plan)
        view.head(batch_dir, batch, len(runner.plan), done, "none")
        if not args.automation:
            print("already complete: every item has a verdict; reports re-derived from items.jsonl")
        else:
            _err("massgen-run batch: already complete")
        summary = runner.write_reports(Ending(None))
        code = exit_code(summary, gate_exit_code=args.gate_exit_code, no_gate=args.no_gate)
        runner.write_status(final=True, exit_code=code)
        view.tail(batch_dir, summary, code, gh_annotations(summary))
        return code

    async def main() -> tuple[dict[str, Any], int]:
        try:
            await runner.open_backend()
        except BatchError as exc:
            raise _Refused(str(exc)) from exc
        ending = Ending("interrupted")
        try:
            runner.write_batch_json(prev, runner.image, runner.backend.kind)
            done = len(runner.plan) - len(todo)
            view.head(batch_dir, batch, len(runner.plan), done, runner.backend.kind)
            runner.write_status()
            ending = await runner.execute()
        finally:
            # Every exit path writes the reports, a bug of ours included.
            summary = runner.write_reports(ending)
            code = exit_code(summary, gate_exit_code=args.gate_exit_code, no_gate=args.no_gate)
            runner.write_status(final=True, exit_code=code)
            await runner.backend.close(grace=5 if runner.forced else 30)
            if runner.grade_ctx is not None and runner.grade_ctx.rubric is not None:
                await runner.grade_ctx.rubric.close()
        return summary, code

    try:
        summary, code = asyncio.run(main())
    except _Refused as exc:
        return refuse("preflight error", [str(exc)])
    except KeyboardInterrupt:
        # Ctrl+C before the batch's own handlers were installed (building images, say).
        summary = runner.write_reports(Ending("interrupted"))
        code = BatchExit.INTERRUPTED
        runner.write_status(final=True, exit_code=code)
    view.tail(batch_dir, summary, code, gh_annotations(summary))
    return code


class _Refused(Exception):
    pass


def _sweep_disks(batch_dir: Path) -> None:
    """Nothing is left to run, but a killed batch may have left run disks mounted: release them."""
    if not (batch_dir / "runs" / "workspaces").is_dir():
        return
    from ..errors import ContainerRuntimeError
    from ..runtime.docker import DockerRuntime
    from .runner import sweep_disks

    try:
        sweep_disks(DockerRuntime(), batch_dir)
    except ContainerRuntimeError as exc:
        # (the reports come from items.jsonl and need no engine; the next run sweeps)
        _err(f"massgen-run batch: run disks not swept, the container engine is unavailable: {exc}")


def _dry_run(runner: Any, batch: Any, cost_bound: Any) -> int:
    plan = runner.plan
    print(f"batch {batch.name}: {len(plan)} items (fingerprint {batch.fingerprint}); nothing is started")
    total: float | None = 0.0
    for label, v in batch.variants.items():
        n = sum(1 for it in plan if it.config == label)
        bound = cost_bound(v)
        total = None if bound is None or total is None else total + bound * n
        b = "unbounded (no sandbox.budget.max_cost_usd)" if bound is None else f"<= ${bound * n:.4f}"
        kinds = sorted({a.backend.type + (f"/{a.backend.model}" if a.backend.model else "") for a in v.config.agents})
        print(f"  {label:30} {n:5} items  {', '.join(kinds)}  cost {b}")
    mp = runner.max_parallel
    print(f"questions: {len(batch.questions)}; repeats: {batch.spec.repeats}; max parallel: {mp}")
    bud = batch.spec.budget.max_cost_usd
    if total is None:
        print("cost upper bound: unbounded" + (f" (the batch budget ${bud:g} caps it)" if bud else ""))
    else:
        cap = min(total, bud) if bud else total
        print(f"cost upper bound: ${cap:.4f}")
    if batch.deadline_s:
        print(f"deadline: {batch.deadline_s:g}s")
    return 0


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cmd_status(argv: list[str]) -> int:
    p = _Parser(prog="massgen-run batch status", description="Show a batch dir's live status.json.")
    p.add_argument("dir", type=Path)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    st = _read_json(args.dir / "status.json")
    if st is None:
        _err(f"massgen-run batch status: {args.dir}/status.json is missing or unreadable")
        return 1
    alive = st.get("state") == "running" and _pid_alive(st.get("pid"))
    if st.get("state") == "running" and not alive:
        st["state"] = "dead"  # the batch process is gone: re-run the same command to resume
    if args.json:
        print(json.dumps(st, indent=2, sort_keys=True))
        return 0
    c = st.get("counts", {})
    print(
        f"batch {st.get('batch')}  state={st.get('state')}  exit={st.get('exit_code')}"
        f"  supervisor={st.get('supervisor')}"
    )
    print(
        f"items {st.get('items')}: pass {c.get('pass', 0)} fail {c.get('fail', 0)} error {c.get('error', 0)}"
        f" skipped {c.get('skipped', 0)} interrupted {c.get('interrupted', 0)} running {c.get('running', 0)}"
        f" pending {c.get('pending', 0)}"
    )
    sp = st.get("spend", {})
    eta = st.get("eta_s")
    print(
        f"spend ${sp.get('cost_usd', 0):.4f}, {sp.get('tokens', 0)} tokens, {sp.get('calls', 0)} calls;"
        f" elapsed {st.get('elapsed_s')}s" + (f", ETA {eta:.0f}s" if eta else "")
    )
    for f in st.get("in_flight", []):
        print(f"  running {f['config']}/{f['question']}#r{f['repeat']} attempt {f['attempt']}  {f['run_id']}")
    if st["state"] == "dead":
        print("the batch process is gone; run the same `massgen-run batch` command to resume")
    return 0


def _load_dir(d: Path) -> tuple[dict[str, Any], Any, list[Any], dict[str, dict[str, Any]]]:
    from .ledger import Ledger, latest
    from .reports import ReportSpec, plan_from_json

    doc = _read_json(d / "batch.json")
    if doc is None or "report" not in doc:
        raise SystemExit(f"massgen-run batch: {d}/batch.json is missing or not a batch dir")
    rs = ReportSpec.from_json(doc["report"])
    plan = plan_from_json(doc["plan"])
    ids = {it.id for it in plan}
    recs = [r for r in Ledger(d / "items.jsonl").load() if r["item"] in ids]
    return doc, rs, plan, latest(recs)


def _ending(d: Path) -> Any:
    from .reports import Ending

    st = _read_json(d / "status.json") or {}
    ending = st.get("ending")
    return Ending(ending if ending in ("interrupted", "deadline", "budget") else None)


def cmd_report(argv: list[str]) -> int:
    p = _Parser(prog="massgen-run batch report", description="Print a report derived from items.jsonl.")
    p.add_argument("dir", type=Path)
    p.add_argument("--format", choices=("md", "json", "junit"), default="md")
    args = p.parse_args(argv)
    from .reports import dumps, render_junit, render_md, summarize

    _doc, rs, plan, lat = _load_dir(args.dir)
    ending = _ending(args.dir)
    summary = summarize(rs, plan, lat, ending)
    if args.format == "json":
        sys.stdout.write(dumps(summary))
    elif args.format == "md":
        sys.stdout.write(render_md(summary))
    else:
        sys.stdout.write(render_junit(rs, plan, lat, summary, ending))
    return 0


def cmd_merge(argv: list[str]) -> int:
    p = _Parser(
        prog="massgen-run batch merge", description="Merge shard batch dirs into one (reports over all of them)."
    )
    p.add_argument("out", type=Path, help="a new (or empty) batch dir for the merged batch")
    p.add_argument("dirs", type=Path, nargs="+", help="the shards' batch dirs")
    p.add_argument("--gate-exit-code", type=int, default=BatchExit.GATE)
    p.add_argument("--no-gate", action="store_true")
    args = p.parse_args(argv)
    from ..logdir import atomic_write
    from .ledger import Ledger
    from .reports import Ending, plan_from_json, plan_to_json, summarize
    from .runner import exit_code, write_reports

    loaded = [_load_dir(d) for d in args.dirs]
    fps = {rs.fingerprint for _d, rs, _p, _l in loaded}
    if len(fps) != 1:
        _err(f"massgen-run batch merge: the dirs hold different specs (fingerprints {', '.join(sorted(fps))})")
        return BatchExit.SPEC
    if (args.out / "items.jsonl").exists():
        _err(f"massgen-run batch merge: {args.out} already holds a batch; merge into a new dir")
        return BatchExit.SPEC
    doc0, rs = loaded[0][0], loaded[0][1]
    plan: dict[str, Any] = {}
    for _d, _rs, pl, _l in loaded:
        for it in pl:
            plan[it.id] = it
    items = sorted(plan.values(), key=lambda i: i.index)
    args.out.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(args.out / "items.jsonl")
    lat: dict[str, dict[str, Any]] = {}
    for d in args.dirs:
        ids = {it.id for it in plan_from_json((_read_json(d / "batch.json") or {}).get("plan", []))}
        for rec in Ledger(d / "items.jsonl").load():
            if rec["item"] in ids:
                ledger.append(rec)
                lat[rec["item"]] = rec
    shards = [doc.get("shard") for doc, *_ in loaded]
    merged = {**doc0, "shard": None, "merged_from": [str(d.absolute()) for d in args.dirs], "shards": shards}
    merged["plan"] = plan_to_json(items)
    merged["items_planned"] = len(items)
    atomic_write(args.out / "batch.json", json.dumps(merged, indent=2, sort_keys=True) + "\n")
    ends = [_ending(d).stopped for d in args.dirs]
    stopped = next((e for e in ("interrupted", "deadline", "budget") if e in ends), None)
    summary = summarize(rs, items, lat, Ending(stopped))
    write_reports(args.out, rs, items, lat, summary, Ending(stopped))
    code = exit_code(summary, gate_exit_code=args.gate_exit_code, no_gate=args.no_gate)
    c = summary["counts"]
    print(
        f"merged {len(args.dirs)} dirs into {args.out}: {c['items']} items,"
        f" {c['pass']} pass, {c['fail']} fail, {c['error']} error"
    )
    print(f"exit {code}: {summary['exit_reason']}")
    return code


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        _run_parser().print_help()
        return 0
    verbs = {"status": cmd_status, "report": cmd_report, "merge": cmd_merge}
    if argv and argv[0] in verbs:
        return verbs[argv[0]](argv[1:])
    if argv and argv[0] == "run":
        argv = argv[1:]
    return cmd_run(argv)

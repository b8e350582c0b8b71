"""Reports derived from the ledger: summary.json, summary.md, junit.xml (xunit2), gates, annotations.

`summary.json` depends only on the plan and the items' verdicts (never on timings or run ids),
so a resumed batch, a merged set of shards and an uninterrupted batch write the same bytes.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any
from xml.sax.saxutils import quoteattr

from . import stats
from .ledger import ItemState
from .spec import Batch, Compare, Gates, Item, MinPassRate

SUMMARY_SCHEMA_VERSION = 1
MAX_SUMMARY_MD_BYTES = 1 << 20
MAX_ANNOTATIONS = 10
# XML 1.0 forbids most C0 controls, surrogates and U+FFFE/U+FFFF even when escaped.
_ILLEGAL_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


class BatchExit:
    OK = 0
    SPEC = 1
    ITEM_ERRORS = 2
    DEADLINE_OR_BUDGET = 3
    INTERRUPTED = 4
    GATE = 10


@dataclass(frozen=True)
class ReportSpec:
    """What the reports need from a spec; kept in batch.json so reports never re-read the spec."""

    name: str
    fingerprint: str
    seed: int
    repeats: int
    labels: tuple[str, ...]
    questions: tuple[tuple[str, tuple[str, ...]], ...]  # (id, tags) in spec order
    pass_k: tuple[int, ...]
    bootstrap_samples: int
    alpha: float
    gates: Gates
    compare: tuple[Compare, ...]
    max_item_errors: int

    @classmethod
    def from_batch(cls, b: Batch) -> ReportSpec:
        return cls(
            name=b.name,
            fingerprint=b.fingerprint,
            seed=b.spec.seed,
            repeats=b.spec.repeats,
            labels=tuple(b.variants),
            questions=tuple((q.id, q.tags) for q in b.questions.values()),
            pass_k=tuple(b.pass_k),
            bootstrap_samples=b.spec.stats.bootstrap_samples,
            alpha=b.spec.stats.alpha,
            gates=b.spec.gates,
            compare=tuple(b.spec.compare),
            max_item_errors=b.spec.max_item_errors,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "fingerprint": self.fingerprint,
            "seed": self.seed,
            "repeats": self.repeats,
            "labels": list(self.labels),
            "questions": [[q, list(t)] for q, t in self.questions],
            "pass_k": list(self.pass_k),
            "bootstrap_samples": self.bootstrap_samples,
            "alpha": self.alpha,
            "gates": self.gates.model_dump(by_alias=True, mode="json"),
            "compare": [c.model_dump() for c in self.compare],
            "max_item_errors": self.max_item_errors,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ReportSpec:
        return cls(
            name=d["name"],
            fingerprint=d["fingerprint"],
            seed=int(d["seed"]),
            repeats=int(d["repeats"]),
            labels=tuple(d["labels"]),
            questions=tuple((q, tuple(t)) for q, t in d["questions"]),
            pass_k=tuple(d["pass_k"]),
            bootstrap_samples=int(d["bootstrap_samples"]),
            alpha=float(d["alpha"]),
            gates=Gates.model_validate(d["gates"]),
            compare=tuple(Compare.model_validate(c) for c in d["compare"]),
            max_item_errors=int(d["max_item_errors"]),
        )

    def tags_of(self, qid: str) -> tuple[str, ...]:
        return dict(self.questions)[qid]


def plan_to_json(items: list[Item]) -> list[dict[str, Any]]:
    return [
        {"item": i.id, "config": i.config, "question": i.question, "repeat": i.repeat, "index": i.index} for i in items
    ]


def plan_from_json(rows: list[dict[str, Any]]) -> list[Item]:
    return [Item(r["item"], r["config"], r["question"], int(r["repeat"]), int(r["index"])) for r in rows]


@dataclass(frozen=True)
class Ending:
    """How the batch process ended (what the ledger alone cannot say)."""

    stopped: str | None = None  # None (ran out of work) | "interrupted" | "deadline" | "budget"


def effective_latest(
    items: list[Item], latest: dict[str, dict[str, Any]], ending: Ending | None
) -> dict[str, dict[str, Any]]:
    """The ledger's last attempts, plus `skipped` for items a deadline or budget kept from starting
    (those never get a ledger line: a re-run with more time or money runs them)."""
    if ending is None or ending.stopped not in ("deadline", "budget"):
        return latest
    reason = "deadline" if ending.stopped == "deadline" else "budget_exhausted"
    out = dict(latest)
    for it in items:
        if it.id not in out:
            out[it.id] = {
                "state": "skipped",
                "reason": reason,
                "why": f"not started: the batch {ending.stopped} was reached",
            }
    return out


def item_states(items: list[Item], latest: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Each planned item's state: its last attempt's, or pending when it has none."""
    return {it.id: latest[it.id]["state"] if it.id in latest else "pending" for it in items}


def _rate(p: int, n: int) -> float | None:
    return p / n if n else None


def _r(x: float | None, nd: int = 6) -> float | None:
    return None if x is None else round(x, nd)


def _ci(ci: tuple[float, float] | None) -> list[float | None] | None:
    return None if ci is None else [_r(ci[0]), _r(ci[1])]


def summarize(
    batch: ReportSpec, items: list[Item], latest: dict[str, dict[str, Any]], ending: Ending
) -> dict[str, Any]:
    """The whole verdict of a batch (or a shard), from its plan and the ledger's last attempts."""
    seed = batch.seed
    boot, alpha = batch.bootstrap_samples, batch.alpha
    latest = effective_latest(items, latest, ending)
    states = item_states(items, latest)
    counts = {s: 0 for s in ("pass", "fail", "error", "skipped", "interrupted", "pending")}
    for s in states.values():
        counts[s] = counts.get(s, 0) + 1
    # (config, question) -> [pass flags by repeat]
    cells: dict[tuple[str, str], dict[int, bool]] = defaultdict(dict)
    cell_other: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    cost_by_config: dict[str, float] = defaultdict(float)
    for it in sorted(items, key=lambda i: i.id):
        rec = latest.get(it.id)
        st = states[it.id]
        if rec is not None:
            cost_by_config[it.config] += float(rec.get("cost_usd") or 0.0)
        if st in (ItemState.PASS, ItemState.FAIL):
            cells[(it.config, it.question)][it.repeat] = st == ItemState.PASS
        else:
            cell_other[(it.config, it.question)][st] += 1
    labels = [lab for lab in batch.labels if any(it.config == lab for it in items)]
    qids = [q for q, _t in batch.questions if any(it.question == q for it in items)]
    cell_rows: list[dict[str, Any]] = []
    for lab in labels:
        for q in qids:
            if not any(it.config == lab and it.question == q for it in items):
                continue
            flags = cells.get((lab, q), {})
            n, c = len(flags), sum(flags.values())
            cell_rows.append(
                {
                    "config": lab,
                    "question": q,
                    "n": n,
                    "passes": c,
                    "pass_rate": _r(_rate(c, n)),
                    "wilson95": _ci(stats.wilson(c, n)),
                    "unstable": 0 < c < n,
                    "pass_at_k": {str(k): _r(stats.pass_at_k(n, c, k)) for k in batch.pass_k},
                    "pass_hat_k": {str(k): _r(stats.pass_hat_k(n, c, k)) for k in batch.pass_k},
                    "other": dict(sorted(cell_other.get((lab, q), {}).items())),
                }
            )
    configs: dict[str, Any] = {}
    for lab in labels:
        rows = [r for r in cell_rows if r["config"] == lab]
        n = sum(r["n"] for r in rows)
        c = sum(r["passes"] for r in rows)
        per_q = [r["passes"] / r["n"] for r in rows if r["n"]]
        macro = sum(per_q) / len(per_q) if per_q else None
        cfg_states = [states[it.id] for it in items if it.config == lab]
        cost = cost_by_config.get(lab, 0.0)
        configs[lab] = {
            "items": len(cfg_states),
            "n": n,
            "passes": c,
            "fails": n - c,
            "errors": cfg_states.count("error"),
            "skipped": cfg_states.count("skipped"),
            "pass_rate": _r(_rate(c, n)),
            "wilson95": _ci(stats.wilson(c, n)),
            "macro_pass_rate": _r(macro),
            "macro_bootstrap95": _ci(stats.bootstrap_mean(per_q, f"{seed}:macro:{lab}", boot, alpha)),
            "cost_usd": _r(cost, 8),
            "cost_per_pass_usd": _r(cost / c, 8) if c else None,
        }
    tags: dict[str, Any] = {}
    for tag in sorted({t for q in qids for t in batch.tags_of(q)}):
        tq = {q for q in qids if tag in batch.tags_of(q)}
        rows = [r for r in cell_rows if r["question"] in tq]
        n = sum(r["n"] for r in rows)
        c = sum(r["passes"] for r in rows)
        tags[tag] = {"n": n, "passes": c, "pass_rate": _r(_rate(c, n)), "wilson95": _ci(stats.wilson(c, n))}
    comparisons = _comparisons(batch, labels, cells, configs)
    total_n = counts["pass"] + counts["fail"]
    total_cost = sum(cost_by_config.values())
    summary: dict[str, Any] = {
        "schema_version": SUMMARY_SCHEMA_VERSION,
        "batch": batch.name,
        "fingerprint": batch.fingerprint,
        "seed": seed,
        "counts": {"items": len(items), **counts},
        "pass_rate": _r(_rate(counts["pass"], total_n)),
        "wilson95": _ci(stats.wilson(counts["pass"], total_n)),
        "cost_usd": _r(total_cost, 8),
        "grading_cost_usd": _r(
            sum(
                float(latest[i.id].get("grading_cost_usd") or 0.0)
                for i in sorted(items, key=lambda x: x.id)
                if i.id in latest
            ),
            8,
        ),
        "configs": configs,
        "tags": tags,
        "cells": cell_rows,
        "comparisons": comparisons,
    }
    summary["gates"] = evaluate_gates(batch, summary)
    summary["gates_passed"] = all(g["passed"] for g in summary["gates"])
    summary["failures"] = _failures(items, latest, states)
    state, code, why = _exit(batch, summary, ending)
    summary["state"] = state
    summary["exit_code"] = code
    summary["exit_reason"] = why
    return summary


def _comparisons(
    batch: ReportSpec, labels: list[str], cells: dict[tuple[str, str], dict[int, bool]], configs: dict[str, Any]
) -> list[dict[str, Any]]:
    pairs: list[tuple[str, str]] = [(c.baseline, c.candidate) for c in batch.compare]
    out: list[dict[str, Any]] = []
    for g in batch.gates.no_regression:
        if (g.baseline, g.candidate) not in pairs:
            pairs.append((g.baseline, g.candidate))
    for base, cand in pairs:
        if base not in labels or cand not in labels:
            continue
        diffs: list[float] = []
        b01 = b10 = 0  # baseline passed & candidate failed; baseline failed & candidate passed
        n_pairs = 0
        for q, _tags in batch.questions:
            fa, fb = cells.get((base, q), {}), cells.get((cand, q), {})
            common = sorted(set(fa) & set(fb))
            if not common:
                continue
            n_pairs += len(common)
            diffs.append(sum(fb[r] - fa[r] for r in common) / len(common))
            for r in common:
                b01 += fa[r] and not fb[r]
                b10 += fb[r] and not fa[r]
        boot = stats.paired_bootstrap(
            diffs, f"{batch.seed}:compare:{base}:{cand}", batch.bootstrap_samples, batch.alpha
        )
        single = batch.repeats == 1
        if single:
            p = stats.mcnemar_exact(b01, b10)
            method = "mcnemar_exact"
        else:
            p = boot[1] if boot else 1.0
            method = "paired_bootstrap"
        out.append(
            {
                "baseline": base,
                "candidate": cand,
                "questions": len(diffs),
                "pairs": n_pairs,
                "discordant": {"baseline_only": b01, "candidate_only": b10},
                "diff": _r(sum(diffs) / len(diffs)) if diffs else None,
                "bootstrap95": _ci(boot[0]) if boot else None,
                "p_value": _r(p, 10),
                "method": method,
                "cost_per_pass_usd": {
                    "baseline": configs[base]["cost_per_pass_usd"],
                    "candidate": configs[cand]["cost_per_pass_usd"],
                },
            }
        )
    adjusted = stats.holm([c["p_value"] for c in out])
    for c, p in zip(out, adjusted, strict=True):
        c["p_holm"] = _r(p, 10)
        if c["diff"] is None or p >= batch.alpha:
            c["verdict"] = "inconclusive"
        else:
            c["verdict"] = "better" if c["diff"] > 0 else "worse" if c["diff"] < 0 else "inconclusive"
    return out


def evaluate_gates(batch: ReportSpec, summary: dict[str, Any]) -> list[dict[str, Any]]:
    g = batch.gates
    out: list[dict[str, Any]] = []

    def gate(name: str, target: str, threshold: float, value: float | None, passed: bool, detail: str) -> None:
        out.append(
            {"gate": name, "target": target, "threshold": threshold, "value": value, "passed": passed, "detail": detail}
        )

    mpr = g.min_pass_rate
    if mpr is not None:
        m = mpr if isinstance(mpr, MinPassRate) else MinPassRate.model_validate({"global": mpr})
        if m.global_ is not None:
            v = summary["pass_rate"]
            gate("min_pass_rate", "global", m.global_, v, v is not None and v >= m.global_, f"pass rate {_pct(v)}")
        for lab, th in sorted(m.configs.items()):
            v = summary["configs"].get(lab, {}).get("pass_rate")
            gate("min_pass_rate", f"config:{lab}", th, v, v is not None and v >= th, f"{lab} pass rate {_pct(v)}")
        for tag, th in sorted(m.tags.items()):
            v = summary["tags"].get(tag, {}).get("pass_rate")
            gate("min_pass_rate", f"tag:{tag}", th, v, v is not None and v >= th, f"tag {tag} pass rate {_pct(v)}")
    if g.min_item_pass_rate is not None:
        th = g.min_item_pass_rate
        below = [r for r in summary["cells"] if r["n"] and r["pass_rate"] < th]
        worst = min((r["pass_rate"] for r in summary["cells"] if r["n"]), default=None)
        names = ", ".join(f"{r['config']}/{r['question']}" for r in below[:5])
        gate(
            "min_item_pass_rate",
            "every config/question",
            th,
            worst,
            not below,
            f"{len(below)} below {_pct(th)}" + (f": {names}" if names else ""),
        )
    for nr in g.no_regression:
        comp = next(
            (c for c in summary["comparisons"] if c["baseline"] == nr.baseline and c["candidate"] == nr.candidate), None
        )
        target = f"{nr.candidate} vs {nr.baseline}"
        if comp is None or comp["diff"] is None:
            gate("no_regression", target, -nr.delta, None, False, "no paired verdicts to compare")
            continue
        if nr.mode == "non_inferior":
            lo = comp["bootstrap95"][0] if comp["bootstrap95"] else None
            ok = lo is not None and lo >= -nr.delta - 1e-12
            gate(
                "no_regression",
                target,
                -nr.delta,
                lo,
                ok,
                f"lower 95% bound of the difference {lo} (margin {nr.delta})",
            )
        else:
            worse = comp["p_holm"] < batch.alpha and comp["diff"] < -nr.delta
            gate(
                "no_regression",
                target,
                -nr.delta,
                comp["diff"],
                not worse,
                f"difference {comp['diff']}, Holm p={comp['p_holm']:.4g}",
            )
    if g.max_cost_usd is not None:
        v = summary["cost_usd"]
        gate("max_cost_usd", "batch", g.max_cost_usd, v, v <= g.max_cost_usd, f"spent ${v:.4f}")
    return out


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1%}"


def _failures(items: list[Item], latest: dict[str, dict[str, Any]], states: dict[str, str]) -> list[dict[str, Any]]:
    out = []
    for it in items:
        st = states[it.id]
        if st in ("pass", "pending"):
            continue
        rec = latest[it.id]
        out.append(
            {
                "item": it.id,
                "config": it.config,
                "question": it.question,
                "repeat": it.repeat,
                "state": st,
                "reason": rec.get("reason"),
                "detail": rec.get("why", "")[:300],
            }
        )
    return out


def _exit(batch: ReportSpec, summary: dict[str, Any], ending: Ending) -> tuple[str, int, str]:
    c = summary["counts"]
    if ending.stopped == "interrupted" or (ending.stopped is None and c["interrupted"]):
        return "interrupted", BatchExit.INTERRUPTED, "interrupted"
    if ending.stopped in ("deadline", "budget"):
        return ending.stopped, BatchExit.DEADLINE_OR_BUDGET, f"batch {ending.stopped} reached"
    if c["pending"]:
        return "incomplete", BatchExit.INTERRUPTED, f"{c['pending']} items not run"
    if c["error"] > batch.max_item_errors:
        return "complete", BatchExit.ITEM_ERRORS, f"{c['error']} item errors (max_item_errors {batch.max_item_errors})"
    if not summary["gates_passed"]:
        failed = [f"{g['gate']} {g['target']}" for g in summary["gates"] if not g["passed"]]
        return "complete", BatchExit.GATE, "gate failed: " + "; ".join(failed)
    return "complete", BatchExit.OK, "all gates passed"


# -- renderings -----------------------------------------------------------------------------


def _md(text: Any) -> str:
    s = "" if text is None else str(text)
    s = _ILLEGAL_XML.sub("", s).replace("\n", " ").replace("|", "\\|")
    return s.replace("<", "&lt;").replace(">", "&gt;")


def _fmt_ci(ci: list[float | None] | None) -> str:
    if not ci or ci[0] is None:
        return "-"
    return f"[{ci[0]:.2f}, {ci[1]:.2f}]"


def render_md(summary: dict[str, Any], max_cells: int = 400) -> str:
    """GitHub-flavoured Markdown, everything model-written escaped, kept under 1 MiB."""
    c = summary["counts"]
    icon = "PASSED" if summary["exit_code"] == 0 else "FAILED"
    lines = [
        f"## Batch `{_md(summary['batch'])}`: {icon} ({_md(summary['exit_reason'])})",
        "",
        f"{c['items']} items: **{c['pass']} pass**, {c['fail']} fail, {c['error']} error, {c['skipped']} skipped"
        + (f", {c['interrupted']} interrupted" if c["interrupted"] else "")
        + (f", {c['pending']} not run" if c["pending"] else "")
        + f". Pass rate {_pct(summary['pass_rate'])} {_fmt_ci(summary['wilson95'])}, cost ${summary['cost_usd']:.4f}.",
        "",
        "| config | n | pass | pass rate (Wilson 95%) | macro (bootstrap 95%) | errors | skipped | cost/pass |",
        "|---|---:|---:|---|---|---:|---:|---:|",
    ]
    for lab, v in summary["configs"].items():
        cpp = "-" if v["cost_per_pass_usd"] is None else f"${v['cost_per_pass_usd']:.4f}"
        lines.append(
            f"| {_md(lab)} | {v['n']} | {v['passes']} | {_pct(v['pass_rate'])} {_fmt_ci(v['wilson95'])} "
            f"| {_pct(v['macro_pass_rate'])} {_fmt_ci(v['macro_bootstrap95'])}"
            f" | {v['errors']} | {v['skipped']} | {cpp} |"
        )
    if summary["comparisons"]:
        lines += [
            "",
            "| candidate vs baseline | diff | 95% CI | p | Holm p | verdict |",
            "|---|---:|---|---:|---:|---|",
        ]
        for cmp in summary["comparisons"]:
            diff = "-" if cmp["diff"] is None else f"{cmp['diff']:+.3f}"
            lines.append(
                f"| {_md(cmp['candidate'])} vs {_md(cmp['baseline'])} | {diff} | {_fmt_ci(cmp['bootstrap95'])} "
                f"| {cmp['p_value']:.4g} ({cmp['method']}) | {cmp['p_holm']:.4g} | **{cmp['verdict']}** |"
            )
    if summary["gates"]:
        lines += ["", "| gate | target | threshold | value | result |", "|---|---|---:|---:|---|"]
        for g in summary["gates"]:
            val = "-" if g["value"] is None else f"{g['value']:.4g}"
            lines.append(
                f"| {g['gate']} | {_md(g['target'])} | {g['threshold']:.4g} | {val} "
                f"| {'pass' if g['passed'] else '**FAIL**'}: {_md(g['detail'])} |"
            )
    unstable = [r for r in summary["cells"] if r["unstable"]]
    if unstable:
        lines += ["", f"Unstable (passed some repeats, not all): {len(unstable)}"]
    fails = summary["failures"]
    if fails:
        lines += [
            "",
            "<details><summary>Failed and errored items</summary>",
            "",
            "| config | question | repeat | state | reason |",
            "|---|---|---:|---|---|",
        ]
        for f in fails[:200]:
            lines.append(
                f"| {_md(f['config'])} | {_md(f['question'])} | {f['repeat']} | {f['state']}"
                f" | {_md(f['reason'])}: {_md(f['detail'][:160])} |"
            )
        if len(fails) > 200:
            lines.append(f"| ... | {len(fails) - 200} more | | | |")
        lines += ["", "</details>"]
    cells = summary["cells"]
    lines += [
        "",
        "<details><summary>Per config and question</summary>",
        "",
        "| config | question | n | pass | Wilson 95% |",
        "|---|---|---:|---:|---|",
    ]
    for r in cells[:max_cells]:
        lines.append(
            f"| {_md(r['config'])} | {_md(r['question'])} | {r['n']} | {r['passes']} | {_fmt_ci(r['wilson95'])} |"
        )
    if len(cells) > max_cells:
        lines.append(f"| ... | {len(cells) - max_cells} more in summary.json | | | |")
    lines += ["", "</details>", ""]
    text = "\n".join(lines)
    while len(text.encode()) > MAX_SUMMARY_MD_BYTES and max_cells > 0:
        return render_md(summary, max_cells // 2)
    return text


def _x(text: Any) -> str:
    return _ILLEGAL_XML.sub("", "" if text is None else str(text))


def _xa(text: Any) -> str:
    return quoteattr(_x(text))


def _xt(text: Any) -> str:
    return _x(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def render_junit(
    batch: ReportSpec,
    items: list[Item],
    latest: dict[str, dict[str, Any]],
    summary: dict[str, Any],
    ending: Ending | None = None,
) -> str:
    """xunit2: one suite per config; <failure> wrong answers, <error> harness errors, <skipped> not run."""
    latest = effective_latest(items, latest, ending)
    states = item_states(items, latest)
    suites = []
    totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "time": 0.0}
    for lab in summary["configs"]:
        cases = []
        n = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "time": 0.0}
        for it in items:
            if it.config != lab:
                continue
            rec = latest.get(it.id, {})
            st = states[it.id]
            t = float(rec.get("duration_s") or 0.0)
            n["tests"] += 1
            n["time"] += t
            name = f"{it.question}#r{it.repeat}"
            body = ""
            if st == "fail":
                n["failures"] += 1
                body = _outcome("failure", rec)
            elif st in ("error", "interrupted"):
                n["errors"] += 1
                body = _outcome("error", rec)
            elif st in ("skipped", "pending"):
                n["skipped"] += 1
                why = rec.get("why") or ("not run" if st == "pending" else "skipped")
                body = f"<skipped type={_xa(rec.get('reason') or st)} message={_xa(why)}/>"
            cls = _xa(f"{batch.name}.{lab}")
            cases.append(f'    <testcase classname={cls} name={_xa(name)} time="{t:.3f}">{body}</testcase>')
        for k in n:
            totals[k] += n[k]
        props = "".join(
            f"<property name={_xa(k)} value={_xa(v)}/>"
            for k, v in (("config", lab), ("fingerprint", batch.fingerprint), ("seed", batch.seed))
        )
        suites.append(
            f'  <testsuite name={_xa(lab)} tests="{n["tests"]}" failures="{n["failures"]}" errors="{n["errors"]}"'
            f' skipped="{n["skipped"]}" time="{n["time"]:.3f}">\n    <properties>{props}</properties>\n'
            + "\n".join(cases)
            + "\n  </testsuite>"
        )
    head = (
        f'<?xml version="1.0" encoding="utf-8"?>\n<testsuites name={_xa(batch.name)} tests="{totals["tests"]}"'
        f' failures="{totals["failures"]}" errors="{totals["errors"]}" skipped="{totals["skipped"]}"'
        f' time="{totals["time"]:.3f}">\n'
    )
    return head + "\n".join(suites) + "\n</testsuites>\n"


def _outcome(tag: str, rec: dict[str, Any]) -> str:
    attrs = f"type={_xa(rec.get('reason'))} message={_xa(rec.get('why', '')[:500])}"
    return f"<{tag} {attrs}>{_xt(_case_text(rec))}</{tag}>"


def _case_text(rec: dict[str, Any]) -> str:
    parts = [f"reason: {rec.get('reason')}", f"run: {rec.get('log_dir')}"]
    for a in rec.get("assertions") or []:
        parts.append(f"{'PASS' if a.get('pass') else 'FAIL'} {a.get('type')}: {a.get('detail')}")
    if rec.get("answer_preview"):
        parts.append(f"answer: {rec['answer_preview']}")
    return "\n".join(parts)


def annotation_lines(summary: dict[str, Any]) -> list[str]:
    """GitHub workflow commands for at most 10 failed or errored items."""
    out = []
    for f in summary["failures"][:MAX_ANNOTATIONS]:
        level = "error"
        title = f"{f['config']} / {f['question']} #r{f['repeat']}: {f['state']}"
        msg = f"{f['reason']}: {f['detail']}"
        out.append(f"::{level} title={_gh(title, prop=True)}::{_gh(msg)}")
    more = len(summary["failures"]) - MAX_ANNOTATIONS
    if more > 0:
        out.append(f"::notice title=batch::{more} more failed items in summary.md")
    return out


def _gh(text: str, prop: bool = False) -> str:
    s = text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    if prop:
        s = s.replace(":", "%3A").replace(",", "%2C")
    return s


def dumps(summary: dict[str, Any]) -> str:
    return json.dumps(summary, indent=2, sort_keys=True, ensure_ascii=True) + "\n"

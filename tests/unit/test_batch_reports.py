"""Batch reports from a ledger: counts, statistics, comparisons, gates, exit codes, JUnit, Markdown."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import xmlschema

from supervisor.batch.assertions import RunFacts, check, classify
from supervisor.batch.ledger import ItemState, Ledger, latest
from supervisor.batch.reports import (
    BatchExit,
    Ending,
    ReportSpec,
    annotation_lines,
    render_junit,
    render_md,
    summarize,
)
from supervisor.batch.spec import Compare, Gates, Item, NumberClose, Regex

XSD = Path(__file__).resolve().parent.parent / "data" / "junit-xunit2.xsd"


def _spec(**kw: Any) -> ReportSpec:
    base: dict[str, Any] = {
        "name": "t",
        "fingerprint": "f" * 16,
        "seed": 7,
        "repeats": 1,
        "labels": ("a", "b"),
        "questions": tuple((f"q{i}", ("even",) if i % 2 == 0 else ("odd",)) for i in range(10)),
        "pass_k": (1,),
        "bootstrap_samples": 2000,
        "alpha": 0.05,
        "gates": Gates(),
        "compare": (Compare(baseline="a", candidate="b"),),
        "max_item_errors": 0,
    }
    base.update(kw)
    return ReportSpec(**base)


def _plan(rs: ReportSpec) -> list[Item]:
    items: list[Item] = []
    for lab in rs.labels:
        for q, _t in rs.questions:
            for r in range(rs.repeats):
                items.append(Item(f"{lab}-{q}-{r}", lab, q, r, len(items)))
    return items


def _ledger(items: list[Item], state_of: Any) -> dict[str, dict[str, Any]]:
    recs = []
    for it in items:
        st = state_of(it)
        if st is None:
            continue
        recs.append(
            {
                "item": it.id,
                "config": it.config,
                "question": it.question,
                "repeat": it.repeat,
                "state": st,
                "reason": "completed" if st == "pass" else "assertion_failed",
                "why": "" if st == "pass" else "number_close: got 4, expected 5 \x07<b>",
                "cost_usd": 0.01,
                "duration_s": 1.5,
                "log_dir": f"/x/{it.id}",
            }
        )
    return latest(recs)


def test_single_repeat_comparison_matches_hand_mcnemar() -> None:
    """a passes all 10, b fails 6 (q0..q5): discordant 6/0, exact McNemar p = 2/64, Holm p the same
    (one comparison), b is worse; Wilson intervals and macro rates as by hand."""
    rs = _spec()
    items = _plan(rs)
    lat = _ledger(items, lambda it: "fail" if it.config == "b" and int(it.question[1:]) < 6 else "pass")
    s = summarize(rs, items, lat, Ending(None))
    assert s["counts"] == {"items": 20, "pass": 14, "fail": 6, "error": 0, "skipped": 0, "interrupted": 0, "pending": 0}
    assert s["configs"]["a"]["pass_rate"] == 1.0 and s["configs"]["b"]["pass_rate"] == 0.4
    assert s["configs"]["b"]["wilson95"] == pytest.approx([0.168180, 0.687326], abs=1e-6)
    assert s["configs"]["b"]["macro_pass_rate"] == 0.4
    assert s["configs"]["b"]["cost_per_pass_usd"] == pytest.approx(0.1 / 4)
    (cmp,) = s["comparisons"]
    assert cmp["method"] == "mcnemar_exact"
    assert cmp["discordant"] == {"baseline_only": 6, "candidate_only": 0}
    assert cmp["p_value"] == pytest.approx(2 / 64)
    assert cmp["p_holm"] == pytest.approx(2 / 64)
    assert cmp["diff"] == pytest.approx(-0.6)
    assert cmp["verdict"] == "worse"
    assert s["tags"]["even"]["n"] == 10 and s["tags"]["even"]["passes"] == 7
    assert s["exit_code"] == BatchExit.OK


def test_holm_makes_a_borderline_comparison_inconclusive() -> None:
    """Two comparisons with raw p 2/64 and 0.0625: Holm doubles the smallest (0.0625): both inconclusive."""
    rs = _spec(
        labels=("a", "b", "c"),
        compare=(Compare(baseline="a", candidate="b"), Compare(baseline="a", candidate="c")),
    )
    items = _plan(rs)

    def st(it: Item) -> str:
        n = int(it.question[1:])
        if (it.config == "b" and n < 6) or (it.config == "c" and n < 5):
            return "fail"
        return "pass"

    s = summarize(rs, items, _ledger(items, st), Ending(None))
    ab, ac = s["comparisons"]
    assert ab["p_value"] == pytest.approx(2 / 64) and ac["p_value"] == pytest.approx(2 / 32)
    assert ab["p_holm"] == pytest.approx(2 * 2 / 64) and ac["p_holm"] == pytest.approx(2 * 2 / 64)
    assert ab["verdict"] == ac["verdict"] == "inconclusive"


def test_gates_and_exit_codes() -> None:
    """min_pass_rate per config and tag, min_item_pass_rate, no_regression and max_cost_usd; exit 10 when
    one fails; errors above max_item_errors exit 2; interrupted 4; deadline/budget 3 (pending -> skipped)."""
    gates = Gates.model_validate(
        {
            "min_pass_rate": {"global": 0.5, "configs": {"a": 0.9}, "tags": {"odd": 0.9}},
            "min_item_pass_rate": 0.5,
            "no_regression": [{"baseline": "a", "candidate": "b", "mode": "non_inferior", "delta": 0.1}],
            "max_cost_usd": 1.0,
        }
    )
    rs = _spec(gates=gates)
    items = _plan(rs)
    lat = _ledger(items, lambda it: "fail" if it.config == "b" and it.question in ("q1", "q3") else "pass")
    s = summarize(rs, items, lat, Ending(None))
    by = {(g["gate"], g["target"]): g for g in s["gates"]}
    assert by[("min_pass_rate", "global")]["passed"]
    assert by[("min_pass_rate", "config:a")]["passed"]
    assert not by[("min_pass_rate", "tag:odd")]["passed"]  # odd: 8 of 10
    assert not by[("min_item_pass_rate", "every config/question")]["passed"]
    assert not by[("no_regression", "b vs a")]["passed"]  # lower bound well below -0.1
    assert by[("max_cost_usd", "batch")]["passed"]  # 20 x $0.01
    assert s["exit_code"] == BatchExit.GATE and not s["gates_passed"]

    lat2 = _ledger(items, lambda it: "error" if it.question == "q0" else "pass")
    assert summarize(rs, items, lat2, Ending(None))["exit_code"] == BatchExit.ITEM_ERRORS
    assert summarize(_spec(max_item_errors=2), items, lat2, Ending(None))["exit_code"] == BatchExit.OK
    half = _ledger(items, lambda it: "pass" if it.config == "a" else None)
    s3 = summarize(_spec(), items, half, Ending("interrupted"))
    assert s3["exit_code"] == BatchExit.INTERRUPTED and s3["counts"]["pending"] == 10
    s4 = summarize(_spec(), items, half, Ending("budget"))
    assert s4["exit_code"] == BatchExit.DEADLINE_OR_BUDGET and s4["state"] == "budget"
    assert s4["counts"]["skipped"] == 10 and s4["counts"]["pending"] == 0
    assert {f["reason"] for f in s4["failures"]} == {"budget_exhausted"}
    root = ET.fromstring(render_junit(_spec(), items, half, s4, Ending("budget")))
    assert root.get("skipped") == "10"


def test_junit_is_xunit2_and_counts_equal_the_ledger(tmp_path: Path) -> None:
    """junit.xml validates against the xunit2 schema, its counts equal the ledger's, illegal XML
    characters are stripped, and <failure>/<error>/<skipped> map fail/error/skipped."""
    rs = _spec()
    items = _plan(rs)
    states = {0: "fail", 1: "error", 2: "skipped", 3: "interrupted"}
    lat = _ledger(items, lambda it: states.get(int(it.question[1:]), "pass") if it.config == "b" else "pass")
    del lat["b-q9-0"]  # never ran
    s = summarize(rs, items, lat, Ending(None))
    xml = render_junit(rs, items, lat, s)
    p = tmp_path / "junit.xml"
    p.write_text(xml)
    xmlschema.XMLSchema(str(XSD)).validate(str(p))
    root = ET.fromstring(xml)
    assert root.get("tests") == "20" and root.get("failures") == "1" and root.get("errors") == "2"
    assert root.get("skipped") == "2"
    b = next(ts for ts in root if ts.get("name") == "b")
    assert len(b.findall("testcase/failure")) == 1
    assert len(b.findall("testcase/error")) == 2
    assert len(b.findall("testcase/skipped")) == 2
    assert "\x07" not in xml
    assert all(tc.find("properties") is None for tc in root.iter("testcase"))


def test_markdown_escapes_and_stays_small() -> None:
    """summary.md renders tables, escapes HTML a model wrote, and stays under 1 MiB for 100k cells."""
    rs = _spec()
    items = _plan(rs)
    lat = _ledger(items, lambda it: "fail" if it.config == "b" else "pass")
    md = render_md(summarize(rs, items, lat, Ending(None)))
    assert "| a | 10 | 10 |" in md and "<b>" not in md and "&lt;b&gt;" in md
    big = summarize(rs, items, lat, Ending(None))
    big["cells"] = big["cells"] * 10_000
    assert len(render_md(big).encode()) < 1 << 20


def test_annotations_at_most_ten() -> None:
    """GitHub annotations: 10 errors for failed items, then one notice; properties escaped."""
    rs = _spec()
    items = _plan(rs)
    s = summarize(rs, items, _ledger(items, lambda it: "fail" if it.config == "b" else "pass"), Ending(None))
    s["failures"] = s["failures"] * 2
    lines = annotation_lines(s)
    assert len(lines) == 11 and all(x.startswith("::error title=") for x in lines[:10])
    assert lines[-1].startswith("::notice")
    assert "%3A" in lines[0].split("::")[1]


def test_summary_is_deterministic_and_order_free() -> None:
    """The same verdicts in any ledger order give byte-identical summaries."""
    rs = _spec(repeats=3, pass_k=(1, 3))
    items = _plan(rs)
    lat = _ledger(items, lambda it: "fail" if (it.repeat + int(it.question[1:])) % 3 == 0 else "pass")
    rev = dict(reversed(list(lat.items())))
    a = json.dumps(summarize(rs, items, lat, Ending(None)), sort_keys=True)
    b = json.dumps(summarize(rs, items, rev, Ending(None)), sort_keys=True)
    assert a == b
    s = json.loads(a)
    cell = next(c for c in s["cells"] if c["config"] == "a" and c["question"] == "q0")
    assert cell["n"] == 3 and cell["passes"] == 2 and cell["unstable"]
    assert cell["pass_at_k"]["3"] == 1.0 and cell["pass_hat_k"]["3"] == 0.0
    assert cell["pass_at_k"]["1"] == pytest.approx(2 / 3, abs=1e-6)


def test_ledger_cuts_a_torn_last_line(tmp_path: Path) -> None:
    """A line half-written when the batch was killed is cut off; whole lines survive."""
    led = Ledger(tmp_path / "items.jsonl")
    led.append({"item": "a", "state": "pass"})
    with open(led.path, "ab") as fh:
        fh.write(b'{"item": "b", "sta')
    assert [r["item"] for r in led.load()] == ["a"]
    assert led.path.read_bytes().endswith(b"}\n")
    led.append({"item": "c", "state": "fail"})
    assert [r["item"] for r in led.load()] == ["a", "c"]


def _facts(**kw: Any) -> RunFacts:
    base: dict[str, Any] = {"log_dir": "/x", "run_id": "r", "exit_code": 0, "reason": "completed"}
    base.update(kw)
    return RunFacts(**base)


def test_classification_retries_only_transient_reasons() -> None:
    """supervisor_lost, engine_unavailable, a sandbox that never started and an unreachable upstream are
    retried errors; timeout, no_answer, agent_failed, oom and budget_exceeded are failures, never retried."""
    assert classify(_facts(exit_code=2, reason="supervisor_lost")) == (ItemState.ERROR, True, "supervisor_lost")
    assert classify(_facts(exit_code=1, reason="engine_unavailable"))[1] is True
    assert classify(_facts(exit_code=2, reason="container_crashed", events=0)) == (
        ItemState.ERROR,
        True,
        "container_start_failed",
    )
    assert classify(_facts(exit_code=2, reason="container_crashed", events=5))[1] is False
    down = _facts(exit_code=2, reason="backend_error", agent_errors=["cannot reach 127.0.0.1:9: connection refused"])
    assert classify(down) == (ItemState.ERROR, True, "upstream_unavailable")
    bad = _facts(exit_code=2, reason="backend_error", agent_errors=["HTTP 400 from x: bad request"])
    assert classify(bad)[0] == ItemState.FAIL
    for reason in ("timeout", "no_answer", "agent_failed", "oom", "budget_exceeded"):
        st, retry, _ = classify(_facts(exit_code=2, reason=reason))
        assert st == ItemState.FAIL and not retry, reason
    assert classify(_facts(exit_code=4, reason="interrupted"))[0] == ItemState.INTERRUPTED


def test_answer_and_run_assertions() -> None:
    """Each assertion kind on a hand-made run."""
    from supervisor.batch.spec import (
        Consensus,
        Contains,
        Equals,
        JsonSchema,
        MinAnswers,
        NoAgentErrors,
        VotesFor,
        WinnerIn,
    )

    f = _facts(answer="  The answer is\n 42.  ", winner="a", votes={"a": 2, "b": 1}, answers=3)
    assert check(Equals(type="equals", value="the answer is 42."), f, None).passed
    assert not check(Equals(type="equals", normalize=False, value="the answer is 42."), f, None).passed
    assert check(Contains(type="contains"), f, 42).passed
    assert check(Contains(type="contains", value="ANSWER", ignore_case=True), f, None).passed
    assert check(Regex(type="regex", pattern=r"\b42\b"), f, None).passed
    assert check(NumberClose(type="number_close"), f, 42).passed
    assert not check(NumberClose(type="number_close", value=41.9, abs_tol=0.05), f, None).passed
    assert check(NumberClose(type="number_close", value=41.9, abs_tol=0.2), f, None).passed
    assert check(NumberClose(type="number_close", extract=r"is\s+(\d+)"), f, "42").passed
    js = JsonSchema.model_validate({"type": "json_schema", "schema": {"type": "object", "required": ["x"]}})
    assert check(js, _facts(answer='{"x": 1}'), None).passed
    assert check(js, _facts(answer='Here:\n```json\n{"x": 1}\n```'), None).passed
    out = check(js, _facts(answer='{"y": 1}'), None)
    assert not out.passed and "'x' is a required property" in out.detail
    assert not check(js, _facts(answer="nope"), None).passed
    assert check(WinnerIn(type="winner_in", agents=["a"]), f, None).passed
    assert not check(Consensus(type="consensus"), f, None).passed
    assert check(Consensus(type="consensus", min_share=0.6), f, None).passed
    assert check(MinAnswers(type="min_answers", count=3), f, None).passed
    assert check(NoAgentErrors(type="no_agent_errors"), f, None).passed
    assert not check(NoAgentErrors(type="no_agent_errors"), _facts(agent_errors=["x"]), None).passed
    assert check(VotesFor(type="votes_for", agent="b", min=1), f, None).passed
    assert not check(VotesFor(type="votes_for", agent="b", min=2), f, None).passed


def test_reports_on_disk_and_github_outputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """write_reports writes summary.json/.md and junit.xml and appends summary.md to
    $GITHUB_STEP_SUMMARY; annotations are printed only when GITHUB_ACTIONS=true."""
    from supervisor.batch.runner import exit_code, gh_annotations, write_reports

    rs = _spec()
    items = _plan(rs)
    lat = _ledger(items, lambda it: "fail" if it.config == "b" else "pass")
    s = summarize(rs, items, lat, Ending(None))
    step = tmp_path / "step.md"
    step.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(step))
    write_reports(tmp_path, rs, items, lat, s)
    assert json.loads((tmp_path / "summary.json").read_text()) == s
    assert step.read_text().startswith("earlier step\n## Batch `t`")
    xmlschema.XMLSchema(str(XSD)).validate(str(tmp_path / "junit.xml"))
    monkeypatch.delenv("GITHUB_ACTIONS", raising=False)
    assert gh_annotations(s) == []
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    assert len(gh_annotations(s)) == 10
    gated = {**s, "exit_code": BatchExit.GATE}
    assert exit_code(gated, gate_exit_code=10, no_gate=False) == 10
    assert exit_code(gated, gate_exit_code=77, no_gate=False) == 77
    assert exit_code(gated, gate_exit_code=10, no_gate=True) == 0
    assert exit_code({**s, "exit_code": 3}, gate_exit_code=10, no_gate=True) == 3

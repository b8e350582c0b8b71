"""`massgen-run batch` end to end: real sandboxes, kill -9 and resume, gates, SIGINT, graders."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import xmlschema

from supervisor.diskquota import mount_points
from supervisor.runtime.base import LABEL_SUPERVISOR
from tests.cli_helpers import REPO, cli_env, load, massgen_run, parse_lines

pytestmark = pytest.mark.docker

DATA = REPO / "tests" / "data" / "batch"
XSD = REPO / "tests" / "data" / "junit-xunit2.xsd"
Z2 = 1.959963984540054**2


def _batch(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return massgen_run(["batch", *args], cwd, timeout=timeout)


def _start(args: list[str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "supervisor.cli", "batch", *args],
        cwd=cwd,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _ledger(d: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (d / "items.jsonl").read_text().splitlines()]


def _wait(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _supervisor_id(d: Path) -> str:
    return f"batch-{hashlib.sha256(str(d.resolve()).encode()).hexdigest()[:12]}"


def _copy_spec(dest: Path, extra: str = "", **replace: str) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("good.yaml", "flaky.yaml", "questions.jsonl"):
        shutil.copy(DATA / name, dest / name)
    text = (DATA / "batch.yaml").read_text()
    for a, b in replace.items():
        text = text.replace(a, b)
    (dest / "batch.yaml").write_text(text + extra)
    return dest / "batch.yaml"


@pytest.fixture(scope="module")
def reference(
    tmp_path_factory: pytest.TempPathFactory, agent_image: str
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """The 60-item example batch, uninterrupted."""
    d = tmp_path_factory.mktemp("ref") / "batch"
    res = _batch([str(DATA / "batch.yaml"), "--batch-dir", str(d), "--automation"], REPO)
    return d, res


@pytest.mark.timeout(900)
def test_batch_counts_statistics_and_reports(reference: tuple[Path, Any], runtime: Any) -> None:
    """2 scripted configs x 10 questions x 3 repeats: counts, Wilson intervals and the comparison match
    a hand computation, junit.xml is xunit2 with the ledger's counts, summary.md renders, nothing is left."""
    d, res = reference
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == f"BATCH_DIR: {d}"
    assert len(lines) <= 14 and lines[-1].startswith("COMPLETED: 60 items")
    kv = parse_lines(res.stdout)
    assert kv["RESULTS"] == "45 pass, 15 fail, 0 error, 0 skipped"
    s = load(d / "summary.json")
    assert s["counts"]["items"] == 60 and s["state"] == "complete" and s["exit_code"] == 0
    good, flaky = s["configs"]["good"], s["configs"]["flaky"]
    assert (good["n"], good["passes"], flaky["n"], flaky["passes"]) == (30, 30, 30, 15)
    # Wilson 30/30: lower = 30 / (30 + z²); 15/30: 0.5 -+ z*sqrt(.25/30 + z²/3600) / (1 + z²/30)
    assert good["wilson95"][0] == pytest.approx(30 / (30 + Z2), abs=1e-6) and good["wilson95"][1] == 1.0
    half = 1.959963984540054 * (0.25 / 30 + Z2 / 3600) ** 0.5 / (1 + Z2 / 30)
    assert flaky["wilson95"] == pytest.approx([0.5 - half, 0.5 + half], abs=1e-6)
    assert flaky["macro_pass_rate"] == 0.5
    cells = {(c["config"], c["question"]): c for c in s["cells"]}
    odd = cells[("flaky", "q02")]  # 2+3 = 5, rounded down to 4 every time
    assert (odd["n"], odd["passes"], odd["unstable"]) == (3, 0, False)
    assert odd["wilson95"] == pytest.approx([0.0, 3 * Z2 / 3 / (3 + Z2)], abs=1e-6)
    assert odd["pass_at_k"] == {"1": 0.0, "3": 0.0} and cells[("flaky", "q01")]["pass_hat_k"]["3"] == 1.0
    (cmp,) = s["comparisons"]
    assert cmp["method"] == "paired_bootstrap" and cmp["diff"] == -0.5
    assert cmp["discordant"] == {"baseline_only": 15, "candidate_only": 0}
    # 5 questions at -1, 5 at 0: a resample's mean is >= 0 only if all 10 draws are zeros (0.5^10)
    assert cmp["p_value"] <= 0.02 and cmp["verdict"] == "worse"
    assert cmp["bootstrap95"][0] == pytest.approx(-0.8, abs=0.1) and cmp["bootstrap95"][1] == pytest.approx(
        -0.2, abs=0.1
    )
    assert s["gates"] and s["gates_passed"]

    recs = _ledger(d)
    assert len(recs) == 60 and Counter(r["state"] for r in recs) == {"pass": 45, "fail": 15}
    xmlschema.XMLSchema(str(XSD)).validate(str(d / "junit.xml"))
    root = ET.parse(d / "junit.xml").getroot()
    assert (root.get("tests"), root.get("failures"), root.get("errors")) == ("60", "15", "0")
    assert len(root.findall(".//testcase/failure")) == sum(r["state"] == "fail" for r in recs)
    md = (d / "summary.md").read_text()
    assert "| flaky | 30 | 15 |" in md and "**worse**" in md
    st = load(d / "status.json")
    assert st["state"] == "finished" and st["exit_code"] == 0 and st["counts"]["pass"] == 45
    bj = load(d / "batch.json")
    assert bj["fingerprint"] == s["fingerprint"] and bj["provenance"]["image"]
    assert runtime.list_owned({LABEL_SUPERVISOR: _supervisor_id(d)}) == []

    again = _batch([str(DATA / "batch.yaml"), "--batch-dir", str(d), "--automation"], REPO, timeout=120)
    assert again.returncode == 0 and "already complete" in again.stderr
    assert len(_ledger(d)) == 60


@pytest.mark.timeout(900)
def test_kill_9_then_resume_gives_identical_reports(reference: tuple[Path, Any], tmp_path: Path, runtime: Any) -> None:
    """kill -9 of the batch mid-way, then the same command: no item with a verdict re-runs, no duplicate
    line, the runs in flight are re-adopted (not started again), and summary.json equals the
    uninterrupted batch's byte for byte."""
    ref_dir, _ = reference
    d = tmp_path / "batch"
    args = [str(DATA / "batch.yaml"), "--batch-dir", str(d), "--automation"]
    proc = _start(args, REPO)
    try:
        _wait(lambda: (d / "items.jsonl").exists() and len(_ledger(d)) >= 10, 300, "10 items")
        _wait(lambda: load(d / "status.json")["in_flight"], 60, "an item in flight")
    finally:
        proc.kill()
        proc.wait(30)
    before = _ledger(d)
    known = {r["run_id"] for r in before}
    in_flight = {
        sub.name: item.name
        for item in (d / "runs").iterdir()
        if item.name != "workspaces"
        for sub in item.iterdir()
        if sub.name not in known
    }
    assert in_flight, "nothing was in flight when the batch was killed"

    res = _batch(args, REPO)
    assert res.returncode == 0, res.stdout + res.stderr
    after = _ledger(d)
    assert after[: len(before)] == before  # append-only
    assert len({r["run_id"] for r in after}) == len(after)  # no duplicate line
    assert len({(r["item"], r["attempt"]) for r in after}) == len(after)
    verdicts = [r for r in after if r["state"] in ("pass", "fail")]
    assert len(verdicts) == 60 and len({r["item"] for r in verdicts}) == 60  # one verdict each
    before_items = {r["item"] for r in before}
    assert all(r["item"] not in before_items for r in after[len(before) :])  # nothing with a verdict re-ran
    by_run = {r["run_id"]: r for r in after}
    adopted = 0
    for run_id, item in in_flight.items():
        rec = by_run[run_id]
        assert rec["item"] == item
        if rec["state"] in ("pass", "fail"):
            # the orphaned run was followed to its end, and not started again
            adopted += 1
            assert [p.name for p in (d / "runs" / item).iterdir()] == [run_id]
        else:
            # killed between making its log dir and starting its container: that attempt is
            # recorded lost (transient) and the item ran again
            assert (rec["state"], rec["reason"], rec["retryable"]) == ("error", "supervisor_lost", True)
            assert not (Path(rec["log_dir"]) / "result.json").exists() or rec["exit_code"] == 2
    assert adopted >= 1, "no run in flight was re-adopted"
    assert (d / "summary.json").read_bytes() == (ref_dir / "summary.json").read_bytes()
    root = ET.parse(d / "junit.xml").getroot()
    assert (root.get("tests"), root.get("failures"), root.get("errors")) == ("60", "15", "0")
    assert runtime.list_owned({LABEL_SUPERVISOR: _supervisor_id(d)}) == []
    assert _mounts_below(d) == []  # the killed batch's run disks were released, none left mounted


def _mounts_below(d: Path) -> list[str]:
    below = f"{d}/"
    return sorted(m for m in mount_points() if m.startswith(below))


def test_a_complete_batch_releases_run_disks_a_killed_batch_left(tmp_path: Path, agent_image: str) -> None:
    """A run disk whose process died with it (the state a kill -9 leaves) in a batch dir with nothing
    left to run: "already complete" still releases it (workspace copied back, unmounted, image gone)."""
    spec = tmp_path / "batch.yaml"
    spec.write_text(
        "configs:\n  quick: '@examples/quickstart'\nquestions:\n  - {id: q1, question: 'What is 2+2?'}\n"
        "assert:\n  - type: contains\n    value: '4'\n"
    )
    d = tmp_path / "batch"
    args = [str(spec), "--batch-dir", str(d), "--automation", "--image", agent_image]
    res = _batch(args, tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    run_id = "log_20260101_000000_000000_dead01"
    ws = d / "runs" / "workspaces" / run_id
    log_dir = d / "runs" / "x" / run_id
    made = (
        "import sys; from pathlib import Path; from supervisor.diskquota import DiskUse, Mode, RunDisk\n"
        "ws, log = Path(sys.argv[1]), Path(sys.argv[2]); (log / 'sandbox').mkdir(parents=True); ws.mkdir()\n"
        "disk = RunDisk.create(ws.name, log, ws, log / 'sandbox', DiskUse(64 << 20, 4096), (10001, 10001))\n"
        "assert disk.mode == Mode.MOUNT, disk.detail\n"
        "(ws / 'kept.txt').write_text('kept')\n"  # the process exits without releasing it
    )
    subprocess.run([sys.executable, "-c", made, str(ws), str(log_dir)], cwd=REPO, env=cli_env(), check=True)
    assert str(ws) in _mounts_below(d)
    res = _batch(args, tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "already complete" in res.stderr
    assert _mounts_below(d) == []
    assert (ws / "kept.txt").read_text() == "kept"  # given back as a plain folder
    assert not (d / "runs" / "workspaces" / ".disks" / f"{run_id}.json").exists()


@pytest.mark.timeout(300)
def test_gate_failure_exits_10_and_a_changed_spec_is_refused(reference: tuple[Path, Any], tmp_path: Path) -> None:
    """A stricter gate on a finished batch: refused without --allow-changed (exit 1), then exit 10 with
    nothing re-run; --gate-exit-code and --no-gate change only the exit code."""
    ref_dir, _ = reference
    d = tmp_path / "batch"
    shutil.copytree(ref_dir, d)
    spec = _copy_spec(tmp_path / "spec", **{"      good: 0.9\n": "      good: 0.9\n      flaky: 0.9\n"})
    res = _batch([str(spec), "--batch-dir", str(d), "--automation"], REPO, timeout=120)
    assert res.returncode == 1 and "--allow-changed" in res.stderr
    assert res.stdout.splitlines()[0] == f"BATCH_DIR: {d}"
    res = _batch([str(spec), "--batch-dir", str(d), "--automation", "--allow-changed"], REPO, timeout=120)
    assert res.returncode == 10, res.stdout + res.stderr
    assert "GATES: FAILED: min_pass_rate config:flaky" in res.stdout
    assert res.stdout.splitlines()[-1].startswith("FAILED: gate failed")
    assert len(_ledger(d)) == 60
    assert load(d / "summary.json")["exit_code"] == 10
    args = [str(spec), "--batch-dir", str(d)]
    assert _batch([*args, "--gate-exit-code", "7"], REPO, timeout=120).returncode == 7
    assert _batch([*args, "--no-gate"], REPO, timeout=120).returncode == 0
    rep = massgen_run(["batch", "report", str(d), "--format", "json"], REPO)
    assert rep.returncode == 0 and json.loads(rep.stdout)["gates_passed"] is False


def test_spec_error_exits_1_naming_where(tmp_path: Path) -> None:
    """A spec error exits 1 before anything starts, naming file, line and key; no batch dir is made."""
    spec = _copy_spec(tmp_path, **{"repeats: 3": "repeats: 3\nrepeat: 2"})
    d = tmp_path / "out"
    res = _batch([str(spec), "--batch-dir", str(d), "--automation"], tmp_path, timeout=60)
    assert res.returncode == 1
    assert f"{spec}:9: key=repeat unknown key" in res.stderr
    assert res.stdout.splitlines() == [f"BATCH_DIR: {d}", f"FAILED: spec_error: {spec}:9: key=repeat unknown key"]
    assert not d.exists()


SLOW = """\
agents:
  - id: slow
    backend:
      type: scripted
      steps:
        - shell: sleep 3; python3 -c "print({{question}})"
          save_as: r
        - answer: "{{r}}"
        - vote: auto
          reason: ok
sandbox:
  memory: 256m
"""


@pytest.mark.timeout(600)
def test_sigint_exits_4_then_resumes(tmp_path: Path, agent_image: str, runtime: Any) -> None:
    """SIGINT stops in-flight items (recorded interrupted), starts nothing new, writes the reports and
    exits 4; the same command then re-runs what was interrupted or never started and exits 0."""
    (tmp_path / "slow.yaml").write_text(SLOW)
    qs = "".join(json.dumps({"id": f"q{i}", "question": f"{i}+1", "expected": i + 1}) + "\n" for i in range(6))
    (tmp_path / "qs.jsonl").write_text(qs)
    spec = tmp_path / "batch.yaml"
    spec.write_text(
        "configs:\n  slow: slow.yaml\nquestions: qs.jsonl\nassert:\n  - type: number_close\nmax_parallel: 2\n"
    )
    d = tmp_path / "batch"
    args = [str(spec), "--batch-dir", str(d), "--automation"]
    proc = _start(args, tmp_path)
    _wait(lambda: (d / "status.json").exists() and len(load(d / "status.json")["in_flight"]) == 2, 120, "2 in flight")
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 4, out + err
    assert out.splitlines()[-1].startswith("INTERRUPTED:")
    recs = _ledger(d)
    assert recs and all(r["state"] == "interrupted" for r in recs), recs
    s = load(d / "summary.json")
    assert s["state"] == "interrupted" and s["counts"]["pending"] + s["counts"]["interrupted"] == 6
    assert load(d / "status.json")["exit_code"] == 4
    ET.parse(d / "junit.xml")

    res = _batch(args, tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    final = {r["item"]: r for r in _ledger(d)}
    assert len(final) == 6 and all(r["state"] == "pass" for r in final.values())
    assert all(final[r["item"]]["attempt"] == 2 for r in recs)
    assert runtime.list_owned({LABEL_SUPERVISOR: _supervisor_id(d)}) == []


GRADED = """\
configs:
  c: ../good.yaml
questions:
  - id: q
    question: 2+2
    expected: 4
assert:
  - type: equals
  - type: command
    run: test "$(cat "$ANSWER_FILE")" = 4 && test "$EXPECTED" = 4
  - type: command
    run: echo pwned > "$ANSWER_FILE"
  - type: command
    run: echo pwned > /etc/pwned
  - type: command
    run: touch "$WORKSPACE/new"
  - type: command
    run: python3 -c "import socket; socket.create_connection(('1.1.1.1', 53), 2)"
  - type: command
    run: test "$(ls /sys/class/net)" = lo
"""


@pytest.mark.timeout(300)
def test_command_graders_run_in_their_own_read_only_container(tmp_path: Path, agent_image: str, runtime: Any) -> None:
    """A command grader sees the answer and workspace read-only in its own container without network:
    writing its copy or the image fails, connecting out fails, only `lo` exists; the host is untouched."""
    for name in ("good.yaml",):
        shutil.copy(DATA / name, tmp_path / name)
    (tmp_path / "s").mkdir()
    spec = tmp_path / "s" / "batch.yaml"
    spec.write_text(GRADED)
    d = tmp_path / "batch"
    res = _batch([str(spec), "--batch-dir", str(d), "--automation"], tmp_path, timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr  # no gates: a failed item is a verdict, not an error
    (rec,) = _ledger(d)
    outcomes = [(a["type"], a["pass"]) for a in rec["assertions"]]
    assert outcomes == [
        ("equals", True),
        ("command", True),
        ("command", False),
        ("command", False),
        ("command", False),
        ("command", False),
        ("command", True),
    ], rec["assertions"]
    assert rec["state"] == "fail"
    assert all("Read-only file system" in rec["assertions"][i]["detail"] for i in (2, 3, 4))
    assert "unreachable" in rec["assertions"][5]["detail"].lower()
    answer = Path(rec["log_dir"]) / "final" / rec["winner"] / "answer.txt"
    assert answer.read_text().strip() == "4"
    assert not Path("/etc/pwned").exists()
    copy = d / "grading" / rec["item"] / rec["run_id"]
    assert (copy / "answer.txt").read_text().strip() == "4" and not (copy / "workspace" / "new").exists()
    assert runtime.list_owned({LABEL_SUPERVISOR: _supervisor_id(d) + "-grader"}) == []


def test_merged_shards_equal_the_unsharded_report(reference: tuple[Path, Any], tmp_path: Path) -> None:
    """The reference batch's items split into --shard 1/2 and 2/2 dirs (by the shard rule) and merged:
    summary.json is byte-identical to the unsharded one; merging a dir of another spec is refused."""
    from supervisor.batch.reports import plan_from_json, plan_to_json
    from supervisor.batch.spec import shard_items

    ref_dir, _ = reference
    doc = load(ref_dir / "batch.json")
    plan = plan_from_json(doc["plan"])
    recs = _ledger(ref_dir)
    shards = []
    for i in (1, 2):
        part = shard_items(plan, (i, 2))
        ids = {it.id for it in part}
        sd = tmp_path / f"shard{i}"
        sd.mkdir()
        (sd / "batch.json").write_text(json.dumps({**doc, "shard": [i, 2], "plan": plan_to_json(part)}))
        (sd / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs if r["item"] in ids))
        shards.append(sd)
    res = massgen_run(["batch", "merge", str(tmp_path / "merged"), *map(str, shards)], REPO)
    assert res.returncode == 0, res.stdout + res.stderr
    assert (tmp_path / "merged" / "summary.json").read_bytes() == (ref_dir / "summary.json").read_bytes()
    other = tmp_path / "other"
    other.mkdir()
    (other / "batch.json").write_text(json.dumps({**doc, "report": {**doc["report"], "fingerprint": "x" * 16}}))
    (other / "items.jsonl").write_text("")
    bad = massgen_run(["batch", "merge", str(tmp_path / "m2"), str(shards[0]), str(other)], REPO)
    assert bad.returncode == 1 and "different specs" in bad.stderr


def test_status_report_and_dry_run(reference: tuple[Path, Any], tmp_path: Path) -> None:
    """`batch status --json` reads the live status; `batch report` re-derives the same summary;
    `--dry-run` prints the plan and a cost bound and creates nothing."""
    ref_dir, _ = reference
    st = massgen_run(["batch", "status", str(ref_dir), "--json"], REPO)
    assert st.returncode == 0 and json.loads(st.stdout)["state"] == "finished"
    rep = massgen_run(["batch", "report", str(ref_dir), "--format", "json"], REPO)
    assert rep.returncode == 0 and rep.stdout == (ref_dir / "summary.json").read_text()
    md = massgen_run(["batch", "report", str(ref_dir), "--format", "md"], REPO)
    assert md.stdout == (ref_dir / "summary.md").read_text()
    junit = massgen_run(["batch", "report", str(ref_dir), "--format", "junit"], REPO)
    assert ET.fromstring(junit.stdout).get("tests") == "60"
    d = tmp_path / "dry"
    dry = _batch([str(DATA / "batch.yaml"), "--batch-dir", str(d), "--dry-run"], REPO, timeout=60)
    assert dry.returncode == 0 and "60 items" in dry.stdout and "cost upper bound: $0.0000" in dry.stdout
    assert not d.exists()


@pytest.mark.timeout(300)
def test_deadline_stops_the_batch_exit_3_and_skips_the_rest(tmp_path: Path, agent_image: str) -> None:
    """A batch deadline reached mid-batch: the item in flight is stopped and recorded skipped
    (reason deadline), nothing else starts, the reports say so, exit 3; a re-run finishes the rest."""
    (tmp_path / "slow.yaml").write_text(SLOW)
    qs = "".join(json.dumps({"id": f"q{i}", "question": f"{i}+1", "expected": i + 1}) + "\n" for i in range(4))
    (tmp_path / "qs.jsonl").write_text(qs)
    spec = tmp_path / "batch.yaml"
    spec.write_text(
        "configs:\n  slow: slow.yaml\nquestions: qs.jsonl\nassert:\n  - type: number_close\n"
        "max_parallel: 1\ndeadline: 6s\n"
    )
    d = tmp_path / "batch"
    res = _batch([str(spec), "--batch-dir", str(d), "--automation"], tmp_path, timeout=200)
    assert res.returncode == 3, res.stdout + res.stderr
    assert res.stdout.splitlines()[-1].startswith("STOPPED: batch deadline reached")
    s = load(d / "summary.json")
    assert s["state"] == "deadline" and s["counts"]["pending"] == 0
    assert s["counts"]["pass"] + s["counts"]["skipped"] == 4 and s["counts"]["skipped"] >= 2
    recs = _ledger(d)
    assert all(r["state"] in ("pass", "skipped") for r in recs)
    assert any(r["state"] == "skipped" and r["reason"] == "deadline" for r in recs)
    root = ET.parse(d / "junit.xml").getroot()
    skipped = root.get("skipped")
    assert skipped is not None
    assert int(skipped) == s["counts"]["skipped"]


@pytest.mark.timeout(600)
def test_real_shards_merge_into_the_unsharded_report(tmp_path: Path, agent_image: str) -> None:
    """`--shard 1/2` and `--shard 2/2` run disjoint halves; `batch merge` of the two equals the unsharded
    batch's summary.json byte for byte; a shard dir refuses another shard's flag."""
    spec = tmp_path / "batch.yaml"
    shutil.copy(DATA / "good.yaml", tmp_path / "good.yaml")
    shutil.copy(DATA / "flaky.yaml", tmp_path / "flaky.yaml")
    spec.write_text(
        "configs:\n  good: good.yaml\n  flaky: flaky.yaml\n"
        "questions:\n  - {id: a, question: 1+1, expected: 2}\n  - {id: b, question: 2+3, expected: 5}\n"
        "  - {id: c, question: 3+3, expected: 6}\n"
        "assert:\n  - type: number_close\ncompare:\n  - {baseline: good, candidate: flaky}\nmax_parallel: 3\n"
    )
    whole = _batch([str(spec), "--batch-dir", str(tmp_path / "whole")], tmp_path)
    assert whole.returncode == 0, whole.stdout + whole.stderr
    parts = []
    for i in (1, 2):
        sd = tmp_path / f"s{i}"
        res = _batch([str(spec), "--batch-dir", str(sd), "--shard", f"{i}/2", "--no-gate"], tmp_path)
        assert res.returncode == 0, res.stdout + res.stderr
        parts.append(sd)
    ids = [{r["item"] for r in _ledger(sd)} for sd in parts]
    assert ids[0] and ids[1] and not ids[0] & ids[1] and len(ids[0] | ids[1]) == 6
    refused = _batch([str(spec), "--batch-dir", str(parts[0]), "--shard", "2/2"], tmp_path, timeout=60)
    assert refused.returncode == 1 and "shard" in refused.stderr
    merged = massgen_run(["batch", "merge", str(tmp_path / "merged"), *map(str, parts)], tmp_path)
    assert merged.returncode == 0, merged.stdout + merged.stderr
    assert (tmp_path / "merged" / "summary.json").read_bytes() == (tmp_path / "whole" / "summary.json").read_bytes()

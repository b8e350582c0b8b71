"""Ops views over log dirs: `ps` (flat, --tree, --json, 1,000 runs under a second) and `watch`'s run table."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from contextlib import redirect_stdout, suppress
from pathlib import Path
from typing import Any

import pytest

from agent_image.protocol.status import ContainerSection, Phase, RunState, Status
from supervisor.cli import cmd_ps
from supervisor.logdir import atomic_write_json
from supervisor.watch import RunTable, _start_observer, fmt_age, fmt_bytes, render
from tests.cli_helpers import REPO, cli_env

T0 = 1_790_000_000.0


def run_id(n: int) -> str:
    return f"log_20260101_120000_{n:06d}_{n % 0xFFFFFF:06x}"


def status_doc(rid: str, state: RunState, *, depth: int = 0, parent: str | None = None, **extra: Any) -> dict[str, Any]:
    """A realistic status.json (two agents, container, telemetry) for one run."""
    st = Status()
    st.meta.run_id = st.meta.session_id = rid
    st.meta.question = "What is 2+2?"
    st.meta.start_time = extra.get("start_time", T0)
    st.meta.elapsed_seconds = 6.1
    st.run.state = state
    st.run.depth = depth
    st.run.parent_run_id = parent
    st.run.sandbox = "docker"
    if state == RunState.FINISHED:
        st.run.exit_code, st.run.reason = extra.get("exit_code", 0), extra.get("reason", "completed")
        st.coordination.phase, st.coordination.completion_percentage = Phase.DONE, 100
    else:
        st.coordination.phase, st.coordination.completion_percentage = Phase.VOTING, 60
    st.container = ContainerSection(
        id="c" * 64,
        image="massgen-sandbox/agent:x",
        runtime="runc",
        state="running" if state != RunState.FINISHED else "exited",
        cpu_percent=extra.get("cpu"),
        memory_bytes=extra.get("mem"),
    )
    doc = st.model_dump(mode="json")
    doc["agents"] = {
        a: {
            "anon": f"agent{i + 1}",
            "backend": "scripted",
            "model": None,
            "status": "done",
            "answer_count": 1,
            "latest_answer_label": f"agent{i + 1}.1",
            "vote_cast": None,
            "turns": 2,
            "errors": 0,
            "last_activity": T0,
            "error": None,
        }
        for i, a in enumerate(("agent_a", "agent_b"))
    }
    return doc


def make_run(parent_dir: Path, rid: str, state: RunState, **kw: Any) -> Path:
    d = parent_dir / rid
    for sub in ("sandbox", "children", "agents", "final"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    atomic_write_json(d / "status.json", status_doc(rid, state, **kw))
    return d


def ps(*args: str) -> str:
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert cmd_ps(list(args)) == 0
    return buf.getvalue()


@pytest.fixture
def nested(tmp_path: Path) -> Path:
    """root: A finished (child A1 finished), B running (child B1 running with grandchild B1x finished), C finished."""
    root = tmp_path / "runs"
    a = make_run(root, run_id(1), RunState.FINISHED)
    make_run(a / "children", run_id(2), RunState.FINISHED, depth=1, parent=run_id(1))
    b = make_run(root, run_id(3), RunState.RUNNING)
    b1 = make_run(b / "children", run_id(4), RunState.RUNNING, depth=1, parent=run_id(3))
    make_run(b1 / "children", run_id(5), RunState.FINISHED, depth=2, parent=run_id(4), exit_code=3, reason="timeout")
    make_run(root, run_id(6), RunState.FINISHED)
    (root / "not_a_run").mkdir()
    return root


def test_ps_lists_top_level_runs_and_hides_finished_without_all(nested: Path) -> None:
    """Flat ps shows only top-level runs; finished ones only with --all; --json has the same rows."""
    out = ps("--logs-root", str(nested))
    assert run_id(3) in out and run_id(1) not in out and run_id(4) not in out
    out_all = ps("--all", "--logs-root", str(nested))
    assert [ln.split()[0] for ln in out_all.splitlines()[1:]] == [run_id(1), run_id(3), run_id(6)]
    rows = json.loads(ps("--all", "--json", "--logs-root", str(nested)))
    assert [r["run_id"] for r in rows] == [run_id(1), run_id(3), run_id(6)]
    assert set(rows[0]) == {
        "run_id",
        "state",
        "phase",
        "exit_code",
        "reason",
        "elapsed_s",
        "started_at",
        "cpu_percent",
        "memory_bytes",
        "depth",
    }


def test_ps_tree_shows_the_hierarchy(nested: Path) -> None:
    """--tree --all draws children under parents with ASCII connectors, in depth-first order."""
    lines = ps("--tree", "--all", "--logs-root", str(nested)).splitlines()
    assert len(lines) == 7 and lines[0].split()[:3] == ["RUN", "ID", "STATE"]
    assert lines[1].split()[:2] == [run_id(1), "finished"]
    assert lines[2].startswith(f"`-- {run_id(2)}")
    assert lines[3].startswith(run_id(3))
    assert lines[4].startswith(f"`-- {run_id(4)}")
    assert lines[5].startswith(f"    `-- {run_id(5)}")
    assert lines[6].startswith(run_id(6))


def test_ps_tree_json_nests_children_and_prunes_finished(nested: Path) -> None:
    """--tree --json nests `children`; without --all finished runs go, unless a shown run is under them."""
    full = json.loads(ps("--tree", "--json", "--all", "--logs-root", str(nested)))
    assert [r["run_id"] for r in full] == [run_id(1), run_id(3), run_id(6)]
    b = full[1]
    assert [c["run_id"] for c in b["children"]] == [run_id(4)]
    grandchild = b["children"][0]["children"][0]
    assert grandchild["run_id"] == run_id(5) and grandchild["depth"] == 2 and grandchild["exit_code"] == 3
    assert grandchild["parent_run_id"] == run_id(4) and grandchild["children"] == []
    live = json.loads(ps("--tree", "--json", "--logs-root", str(nested)))
    assert [r["run_id"] for r in live] == [run_id(3)]
    assert [c["run_id"] for c in live[0]["children"]] == [run_id(4)]
    assert live[0]["children"][0]["children"] == []


def test_ps_tree_keeps_a_finished_parent_of_a_live_child(tmp_path: Path) -> None:
    """A live child is never orphaned from the view: its finished parent stays in the tree."""
    root = tmp_path / "runs"
    p = make_run(root, run_id(1), RunState.FINISHED)
    make_run(p / "children", run_id(2), RunState.RUNNING, depth=1)
    rows = json.loads(ps("--tree", "--json", "--logs-root", str(root)))
    assert rows[0]["run_id"] == run_id(1) and rows[0]["children"][0]["run_id"] == run_id(2)


def test_ps_survives_missing_and_corrupt_status(tmp_path: Path) -> None:
    """A run dir without (or with a broken) status.json is listed as unknown, not a crash."""
    root = tmp_path / "runs"
    (root / run_id(1)).mkdir(parents=True)
    (root / run_id(2)).mkdir()
    (root / run_id(2) / "status.json").write_text("{not json")
    (root / run_id(3)).mkdir()
    (root / run_id(3) / "status.json").write_text("[1, 2]")
    rows = json.loads(ps("--json", "--logs-root", str(root)))
    assert [(r["run_id"], r["state"]) for r in rows] == [(run_id(i), "unknown") for i in (1, 2, 3)]
    assert json.loads(ps("--json", "--tree", "--logs-root", str(tmp_path / "missing"))) == []


@pytest.fixture(scope="module")
def thousand(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1,000 finished top-level runs with realistic status.json files, 100 of them with a child."""
    root = tmp_path_factory.mktemp("thousand") / "runs"
    for i in range(1000):
        d = make_run(root, run_id(i), RunState.FINISHED)
        if i % 10 == 0:
            make_run(d / "children", run_id(100_000 + i), RunState.FINISHED, depth=1, parent=run_id(i))
    return root


@pytest.mark.parametrize("extra", [[], ["--tree"], ["--json"], ["--tree", "--json"]])
def test_ps_over_1000_finished_runs_under_a_second(thousand: Path, extra: list[str]) -> None:
    """The real CLI (a fresh interpreter, imports included) lists 1,000 finished runs in under 1 s."""
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "supervisor.cli", "ps", "--all", *extra, "--logs-root", str(thousand)],
            cwd=REPO,
            env=cli_env(),
            capture_output=True,
            text=True,
            timeout=30,
        )
        best = min(best, time.perf_counter() - t0)
        assert proc.returncode == 0, proc.stderr
    if "--json" in extra:
        rows = json.loads(proc.stdout)
        assert len(rows) == 1000
        if "--tree" in extra:
            assert sum(len(r["children"]) for r in rows) == 100
    else:
        assert len(proc.stdout.splitlines()) == 1 + 1000 + (100 if "--tree" in extra else 0)
    assert best < 1.0, f"ps took {best:.2f}s over 1,000 runs"


# -- watch ---------------------------------------------------------------------------------------


def test_run_table_rereads_only_the_changed_file(nested: Path) -> None:
    """A full scan reads each status once; an event reads one file; the fallback re-reads only unfinished runs."""
    table = RunTable(nested)
    table.full_scan()
    assert table.reads == 6
    assert {r.run_id for r in table.rows.values()} == {run_id(i) for i in range(1, 7)}
    b1 = nested / run_id(3) / "children" / run_id(4)
    atomic_write_json(b1 / "status.json", status_doc(run_id(4), RunState.FINISHED, depth=1))
    table.changed(b1 / "status.json")
    assert table.reads == 7
    assert table.rows[b1 / "status.json"].finished
    table.fallback()  # only run 3 is still unfinished
    assert table.reads == 8
    new = make_run(nested, run_id(7), RunState.QUEUED)
    table.fallback()  # run 3 again, plus the new dir
    assert table.reads == 10 and (new / "status.json") in table.rows
    table.changed(nested.parent / "elsewhere" / "status.json")
    assert table.reads == 10
    (new / "status.json").unlink()
    table.changed(new / "status.json")
    assert (new / "status.json") not in table.rows


def test_run_table_orders_newest_first_with_children_under_parents(nested: Path) -> None:
    """Top-level runs newest first; each child right under its parent, with a tree prefix."""
    table = RunTable(nested)
    table.full_scan()
    labels = [label for label, _ in table.ordered()]
    assert labels == [
        run_id(6),
        run_id(3),
        f"`-- {run_id(4)}",
        f"    `-- {run_id(5)}",
        run_id(1),
        f"`-- {run_id(2)}",
    ]


def test_render_shows_columns_and_caps_rows(tmp_path: Path) -> None:
    """The table has run id, state, phase, %, age, cpu, mem, depth; a row cap adds a caption."""
    from rich.console import Console

    root = tmp_path / "runs"
    make_run(root, run_id(1), RunState.RUNNING, cpu=12.34, mem=300 << 20, start_time=T0)
    make_run(root, run_id(2), RunState.FINISHED, exit_code=2, reason="oom")
    table = RunTable(root)
    table.full_scan()
    console = Console(width=160, record=True, file=io.StringIO())
    console.print(render(table, T0 + 75))
    text = console.export_text()
    for header in ("RUN ID", "STATE", "PHASE", "%", "AGE", "CPU", "MEM", "DEPTH"):
        assert header in text
    line = next(ln for ln in text.splitlines() if run_id(1) in ln).split()
    assert line == [run_id(1), "running", "voting", "60", "1m15s", "12.3%", "300.0MiB", "0"]
    assert "finished (2)" in text
    console = Console(width=160, record=True, file=io.StringIO())
    console.print(render(table, T0, max_rows=1))
    capped = console.export_text()
    assert run_id(2) in capped and run_id(1) not in capped and "1 more runs not shown" in capped


def test_formatters() -> None:
    """Ages and sizes read like `docker ps`/`docker stats`."""
    assert [fmt_age(x) for x in (None, -3, 5, 75, 3700)] == ["", "0s", "5s", "1m15s", "1h01m"]
    assert [fmt_bytes(x) for x in (None, 512, 2048, 5 << 30)] == ["", "512B", "2.0KiB", "5.0GiB"]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # watchdog re-registering fast-created subdirs
def test_observer_queues_only_status_json_replacements(tmp_path: Path) -> None:
    """Watchdog's callback hands over status.json paths (also nested, also via os.replace) and nothing else."""
    import queue

    root = tmp_path / "runs"
    root.mkdir()
    changes: queue.SimpleQueue[Path] = queue.SimpleQueue()
    observer = _start_observer(root, changes)
    assert observer is not None
    try:
        d = make_run(root, run_id(1), RunState.RUNNING)
        (d / "events.jsonl").write_text("{}\n")
        child = make_run(d / "children", run_id(2), RunState.RUNNING, depth=1)
        seen: set[Path] = set()
        deadline = time.monotonic() + 10
        while {d / "status.json", child / "status.json"} - seen and time.monotonic() < deadline:
            with suppress(queue.Empty):
                seen.add(changes.get(timeout=0.2))
        assert seen == {d / "status.json", child / "status.json"}
    finally:
        observer.stop()
        observer.join(timeout=5)


def test_watch_once_prints_one_table(nested: Path) -> None:
    """`massgen-run watch --once` prints every run (nested ones too) with its state, and exits 0."""
    proc = subprocess.run(
        [sys.executable, "-m", "supervisor.cli", "watch", "--once", "--logs-root", str(nested)],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert "\x1b[" not in proc.stdout
    for i in range(1, 7):
        assert run_id(i) in proc.stdout
    row = next(ln for ln in proc.stdout.splitlines() if run_id(5) in ln)
    assert "finished (3)" in row and row.split()[-1] == "2"


def test_watch_usage_errors_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    """`massgen-run watch` is parsed by the CLI like every verb: an unknown option is a usage error, exit 1."""
    from supervisor.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["watch", "--no-such-option"])
    assert exc.value.code == 1
    assert "massgen-run watch: error:" in capsys.readouterr().err


def test_run_listings_skip_symlinks_and_names_that_are_not_run_ids(nested: Path, tmp_path: Path) -> None:
    """ps, watch and the daemon's scan list only real run dirs: a symlinked or misnamed folder is not a run."""
    from supervisor.logdir import iter_run_dirs, walk_run_dirs

    elsewhere = make_run(tmp_path / "elsewhere", run_id(9), RunState.RUNNING)
    (nested / run_id(8)).symlink_to(elsewhere, target_is_directory=True)
    (nested / "log_not_an_id").mkdir()
    top = [d.name for d in iter_run_dirs(nested)]
    assert top == [run_id(1), run_id(3), run_id(6)]
    assert [d.name for d in walk_run_dirs(nested)] == [run_id(i) for i in (1, 2, 3, 4, 5, 6)]
    assert run_id(8) not in ps("--all")

"""Nested runs through the real CLI: children in sibling containers, policy refusals, scoping, subtree stop."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from supervisor.errors import ContainerRuntimeError
from supervisor.runtime.base import LABEL_LOG_DIR, LABEL_PARENT, LABEL_RUN
from supervisor.runtime.docker import DockerHandle, DockerRuntime
from tests.cli_helpers import cli_env, load, massgen_run, parse_lines

pytestmark = pytest.mark.docker

CHILDREN_IN_SANDBOX = "/run/massgen/children"

# Reduces `massgen-run ps --json` (a list) or `status RUN --json` (a document) to one line.
SUMMARIZE = """\
import json, sys
data = json.load(sys.stdin)
if isinstance(data, list):
    print(" ".join(sorted(f"{r['run_id']}:{r['depth']}:{r['parent_run_id']}" for r in data)) or "none")
else:
    print(data["meta"]["run_id"], data["run"]["state"], data["run"]["exit_code"], data["run"]["depth"])
"""

# Child configs, mounted read-only in the parent's sandbox at their host path (@CTX@).
CHILD_CONFIGS = {
    "sleepy.yaml": """\
        agents:
          - id: c
            backend:
              type: scripted
              steps:
                - {shell: "sleep 2", timeout: 30}
                - answer: "slept for {{question}}"
                - vote: auto
        """,
    "forever.yaml": """\
        agents:
          - id: c
            backend: {type: scripted, steps: [{shell: "sleep 300", timeout: 600}, {answer: never}]}
        timeout_settings: {orchestrator_timeout_seconds: 600}
        sandbox: {stop_grace_seconds: 2}
        """,
    "deep.yaml": """\
        agents:
          - id: c
            backend:
              type: scripted
              steps:
                - shell: |-
                    massgen-run --automation --config @examples/quickstart grandchild 2>&1; echo "rc=$?"
                  save_as: out
                - answer: "{{out}}"
                - vote: auto
        sandbox: {max_depth: 8}
        """,
    # Question: the sibling's run id. Every call on it must fail as if it did not exist.
    "stopper.yaml": """\
        agents:
          - id: c
            backend:
              type: scripted
              steps:
                - shell: |-
                    massgen-run stop {{question}} 2>&1; echo "rc=$?"
                  save_as: stop
                - shell: |-
                    massgen-run status {{question}} --json 2>&1; echo "rc=$?"
                  save_as: status
                - shell: massgen-run ps --json
                  save_as: ps
                - answer: "STOP={{stop}}|STATUS={{status}}|PS={{ps}}"
                - vote: auto
        """,
    # Question: the sibling's run id. Starts a grandchild, then looks around with ps/status.
    "inner.yaml": """\
        agents:
          - id: c
            backend:
              type: scripted
              steps:
                - shell: |-
                    massgen-run --automation --config @examples/quickstart grandchild > g.txt 2>&1
                    sed -n 's/^RUN_ID: //p' g.txt
                  save_as: gid
                - shell: massgen-run ps --json | python3 @CTX@/summarize.py
                  save_as: ps
                - shell: massgen-run status {{gid}} --json | python3 @CTX@/summarize.py
                  save_as: status
                - shell: |-
                    (massgen-run status {{question}} --json 2>&1; echo "rc=$?") | tr '\\n' ' '
                  save_as: sibling
                - shell: |-
                    p=$(python3 -c "import json; print(json.load(open('/run/massgen/outbox/spec.json'))['parent_run_id'])")
                    (massgen-run status $p --json 2>&1; echo "rc=$?") | tr '\\n' ' '
                  save_as: parent
                - answer: "GID={{gid}}|PS={{ps}}|STATUS={{status}}|SIBLING={{sibling}}|PARENT={{parent}}"
                - vote: auto
        orchestrator:
          context_paths: [{path: "@CTX@"}]
        """,
    # The first context path (as the child sees it) must hold note.txt and be read-only.
    "reader.yaml": """\
        agents:
          - id: c
            backend:
              type: scripted
              steps:
                - shell: |-
                    p=$(python3 -c "import json; print(json.load(open('/run/massgen/outbox/spec.json'))['context_paths'][0])")
                    echo "$p|$(cat $p/note.txt)|$(touch $p/x 2>/dev/null && echo WROTE || echo DENIED)"
                  save_as: out
                - answer: "{{out}}"
                - vote: auto
        orchestrator:
          context_paths: [{path: /workspace/agent_a/data}]
        """,
}

# A child whose only distinguishing feature is one context path (the refusal cases).
REFUSED_CHILD = """\
agents:
  - id: c
    backend: {type: scripted, steps: [{answer: "must not run"}, {vote: auto}]}
orchestrator:
  context_paths: [{path: "@PATH@", permission: @PERM@}]
"""

# The parent's agent runs one shell step (SCRIPT) and answers with its output.
PARENT = """\
agents:
  - id: agent_a
    backend:
      type: scripted
      steps:
        - shell: |-
@SCRIPT@
          timeout: 120
          save_as: out
        - answer: "{{out}}"
        - vote: auto
orchestrator:
  context_paths: [{path: "@CTX@"}]
timeout_settings: {orchestrator_timeout_seconds: @TIMEOUT@}
sandbox: {stop_grace_seconds: 2@SANDBOX@}
"""

# Runs one child in the foreground; its automation lines and exit code become the answer.
ONE_CHILD = """\
massgen-run --automation --config @CTX@/child.yaml "q" > child.txt 2>&1; echo "rc=$?" >> child.txt
cat child.txt"""


def _subst(text: str, **subs: Any) -> str:
    for key, value in subs.items():
        text = text.replace(f"@{key}@", str(value))
    return text


def _parent_config(tmp_path: Path, script: str, *, timeout: float = 60, sandbox: str = "") -> Path:
    indented = "\n".join(" " * 12 + line for line in script.splitlines())
    text = _subst(PARENT, SCRIPT=indented, TIMEOUT=timeout, SANDBOX=f", {sandbox}" if sandbox else "")
    path = tmp_path / "parent.yaml"
    path.write_text(_subst(text, CTX=tmp_path / "ctx"))
    return path


@dataclass
class Run:
    """A finished top-level run and what it left on the host."""

    proc: subprocess.CompletedProcess[str]
    elapsed: float

    @property
    def fields(self) -> dict[str, str]:
        return parse_lines(self.proc.stdout)

    @property
    def log_dir(self) -> Path:
        return Path(self.fields["LOG_DIR"])

    @property
    def run_id(self) -> str:
        return self.fields["RUN_ID"]

    @property
    def status(self) -> Any:
        return load(self.log_dir / "status.json")

    @property
    def result(self) -> Any:
        return load(self.log_dir / "result.json")

    @property
    def answer(self) -> str:
        return (self.log_dir / "final" / "agent_a" / "answer.txt").read_text()

    def child(self, run_id: str) -> Path:
        return self.log_dir / "children" / run_id

    def describe(self) -> str:
        return f"exit {self.proc.returncode}\n{self.proc.stdout}\n{self.proc.stderr}"


def _cli_args(image: str | None, config: str | Path, question: str) -> list[str]:
    """Automation-mode arguments; without an image the CLI goes to a daemon when one answers."""
    return ["--automation", *(["--image", image] if image else []), "--config", str(config), question]


def _run(
    tmp_path: Path,
    image: str | None,
    config: str | Path,
    question: str = "q",
    timeout: float = 120,
    env: dict[str, str] | None = None,
) -> Run:
    t0 = time.monotonic()
    proc = massgen_run(_cli_args(image, config, question), tmp_path, timeout=timeout, **(env or {}))
    return Run(proc, time.monotonic() - t0)


def _tree(log_dir: Path) -> Iterator[Path]:
    yield log_dir
    children = log_dir / "children"
    if children.is_dir():
        for child in sorted(children.iterdir()):
            yield from _tree(child)


def _assert_no_containers(runtime: DockerRuntime, log_dir: Path) -> None:
    for d in _tree(log_dir):
        assert runtime.list_owned({LABEL_RUN: d.name}) == [], f"container left for {d.name}"
        assert runtime.list_owned({LABEL_PARENT: d.name}) == [], f"child container left for {d.name}"


def _children_by_id(status: Any) -> dict[str, Any]:
    return {c["run_id"]: c for c in status["children"]}


def _run_id_lines(text: str) -> list[str]:
    return re.findall(r"^RUN_ID: (\S+)$", text, re.M)


@pytest.fixture
def ctx(tmp_path: Path) -> Path:
    """A context dir with the child configs, visible in the parent's sandbox at its host path."""
    d = tmp_path / "ctx"
    d.mkdir()
    (d / "summarize.py").write_text(SUMMARIZE)
    for name, text in CHILD_CONFIGS.items():
        (d / name).write_text(_subst(textwrap.dedent(text), CTX=d))
    return d


@pytest.fixture(autouse=True)
def _reap(runtime: DockerRuntime, tmp_path: Path) -> Iterator[None]:
    """Remove any container of this test's runs, so that a failed test leaves none behind."""
    yield
    for facts in runtime.list_owned({}):
        if facts.labels.get(LABEL_LOG_DIR, "").startswith(str(tmp_path)):
            with contextlib.suppress(ContainerRuntimeError):
                runtime.kill(DockerHandle(facts.id))
            runtime.remove(DockerHandle(facts.id))


def _write_child(ctx: Path, text: str) -> None:
    (ctx / "child.yaml").write_text(text)


# -- a working nested run -------------------------------------------------------------------------


def test_nested_quickstart_child_runs_in_its_own_container(
    runtime: DockerRuntime, agent_image: str, tmp_path: Path
) -> None:
    """@examples/meta/nested_quickstart exits 0, quotes its child's answer; the child has its own dir and container."""
    run = _run(tmp_path, agent_image, "@examples/meta/nested_quickstart", "Analyse a run")
    assert run.proc.returncode == 0, run.describe()
    status = run.status
    [entry] = status["children"]
    child_id = entry["run_id"]
    child = run.child(child_id)
    assert entry == {
        "run_id": child_id,
        "state": "finished",
        "exit_code": 0,
        "reason": "completed",
        "log_dir": f"{CHILDREN_IN_SANDBOX}/{child_id}",
    }
    child_result = load(child / "result.json")
    assert (child_result["exit_code"], child_result["log_dir"]) == (0, str(child))
    child_status = load(child / "status.json")
    assert child_status["run"]["parent_run_id"] == run.run_id and child_status["run"]["depth"] == 1
    child_answer = (child / "final" / child_result["winner"] / "answer.txt").read_text().strip()
    assert status["results"]["winner"] == "agent_a"
    assert f'"{child_answer}"' in run.answer and "2 + 2 = 4" in child_answer
    parent_cid, child_cid = status["container"]["id"], child_status["container"]["id"]
    assert re.fullmatch(r"[0-9a-f]{64}", parent_cid) and re.fullmatch(r"[0-9a-f]{64}", child_cid)
    assert parent_cid != child_cid
    _assert_no_containers(runtime, run.log_dir)


def test_three_children_at_once_complete_in_distinct_dirs(
    runtime: DockerRuntime, agent_image: str, tmp_path: Path, ctx: Path
) -> None:
    """Three children started in the background at once all run concurrently and exit 0 in distinct dirs."""
    script = """\
for i in 1 2 3; do
  (massgen-run --automation --config @CTX@/sleepy.yaml "child $i" > c$i.txt 2>&1; echo "rc=$?" >> c$i.txt) &
done
wait
for i in 1 2 3; do echo "$(sed -n 's/^RUN_ID: //p' c$i.txt) $(tail -n 1 c$i.txt)"; done"""
    run = _run(tmp_path, agent_image, _parent_config(tmp_path, script))
    assert run.proc.returncode == 0, run.describe()
    reported = dict(line.split() for line in run.answer.strip().splitlines())
    assert len(reported) == 3 and set(reported.values()) == {"rc=0"}, run.answer
    entries = _children_by_id(run.status)
    assert set(entries) == set(reported)
    assert {(e["state"], e["exit_code"]) for e in entries.values()} == {("finished", 0)}
    results = [load(run.child(rid) / "result.json") for rid in reported]
    assert {r["exit_code"] for r in results} == {0}
    assert len({r["log_dir"] for r in results}) == 3 and len({r["container_id"] for r in results}) == 3
    # Each child sleeps 2 s: they were live at the same time.
    assert max(r["started_at"] for r in results) < min(r["finished_at"] for r in results)
    _assert_no_containers(runtime, run.log_dir)


def test_allowed_context_path_is_translated_and_read_only(
    runtime: DockerRuntime, agent_image: str, tmp_path: Path, ctx: Path
) -> None:
    """A child's context path in the parent's workspace is a read-only snapshot (in the child's log dir), never the live folder."""
    script = "mkdir -p data && echo hello > data/note.txt\n" + ONE_CHILD
    _write_child(ctx, (ctx / "reader.yaml").read_text())
    run = _run(tmp_path, agent_image, _parent_config(tmp_path, script))
    assert run.proc.returncode == 0, run.describe()
    [child_id] = _children_by_id(run.status)
    child_answer = (run.child(child_id) / "final" / "c" / "answer.txt").read_text().strip()
    seen_as, note, write = child_answer.split("|")
    host_data = tmp_path / ".massgen" / "workspaces" / run.run_id / "agent_a" / "data"
    # A sandbox can write the parent's workspace, so mounting it live would race with a symlink
    # swap; the child gets a snapshot the supervisor copied without following symlinks.
    snapshot = run.child(child_id) / "context" / "0"
    assert Path(seen_as) == snapshot
    assert (snapshot / "note.txt").read_text().strip() == "hello"
    assert (note, write) == ("hello", "DENIED")
    assert not (host_data / "x").exists()
    _assert_no_containers(runtime, run.log_dir)


# -- refusals -------------------------------------------------------------------------------------


def _assert_refused(run: Run, reason: str) -> str:
    """The parent completed; its one child was refused with exit 2 and `reason`, seen in- and outside."""
    assert run.proc.returncode == 0, run.describe()
    assert run.result["reason"] == "completed"
    out = run.answer
    assert re.search(rf"^FAILED: {reason}: ", out, re.M), out
    assert out.rstrip().endswith("rc=2"), out
    [child_id] = _run_id_lines(out)
    entry = _children_by_id(run.status)[child_id]
    assert (entry["state"], entry["exit_code"], entry["reason"]) == ("finished", 2, reason)
    res = load(run.child(child_id) / "result.json")
    assert (res["exit_code"], res["reason"]) == (2, reason)
    assert res["container_id"] is None  # refused before any container existed
    assert not (run.child(child_id) / "final" / "c").exists()
    return str(res["detail"])


@pytest.mark.parametrize(
    ("path", "permission", "setup", "reason"),
    [
        pytest.param("/etc", "read", "", "path_not_allowed", id="outside-the-view"),
        pytest.param("/workspace", "write", "", "write_not_allowed", id="write-permission"),
        pytest.param("/workspace/../../etc", "read", "", "path_not_allowed", id="dotdot-from-workspace"),
        pytest.param(f"{CHILDREN_IN_SANDBOX}/../../../etc", "read", "", "path_not_allowed", id="dotdot-from-children"),
        pytest.param("@CTX@/..", "read", "", "path_not_allowed", id="dotdot-above-a-context-path"),
        pytest.param(
            "/workspace/agent_a/evil",
            "read",
            "ln -s /etc /workspace/agent_a/evil",
            "path_not_allowed",
            id="symlink-out",
        ),
    ],
)
def test_child_path_refusals(
    runtime: DockerRuntime,
    agent_image: str,
    tmp_path: Path,
    ctx: Path,
    path: str,
    permission: str,
    setup: str,
    reason: str,
) -> None:
    """A child asking for a path outside the parent's view (or for write access) is refused with exit 2; the parent completes."""
    _write_child(ctx, _subst(REFUSED_CHILD, PATH=_subst(path, CTX=ctx), PERM=permission))
    script = (setup + "\n" if setup else "") + ONE_CHILD
    run = _run(tmp_path, agent_image, _parent_config(tmp_path, script))
    detail = _assert_refused(run, reason)
    assert _subst(path, CTX=ctx) in detail or reason == "write_not_allowed", detail
    _assert_no_containers(runtime, run.log_dir)


def test_beyond_max_depth_is_refused(runtime: DockerRuntime, agent_image: str, tmp_path: Path, ctx: Path) -> None:
    """With sandbox.max_depth 0 a child is refused with max_depth_exceeded (exit 2); the parent completes."""
    _write_child(ctx, (ctx / "sleepy.yaml").read_text())
    run = _run(tmp_path, agent_image, _parent_config(tmp_path, ONE_CHILD, sandbox="max_depth: 0"))
    assert "max_depth=0" in _assert_refused(run, "max_depth_exceeded")
    _assert_no_containers(runtime, run.log_dir)


def test_a_child_config_cannot_raise_the_roots_max_depth(
    runtime: DockerRuntime, agent_image: str, tmp_path: Path, ctx: Path
) -> None:
    """Root max_depth 1, child config max_depth 8: the grandchild (depth 2) is refused with max_depth_exceeded."""
    _write_child(ctx, (ctx / "deep.yaml").read_text())
    run = _run(tmp_path, agent_image, _parent_config(tmp_path, ONE_CHILD, sandbox="max_depth: 1"))
    assert run.proc.returncode == 0, run.describe()
    [child_id] = _run_id_lines(run.answer)
    child = run.child(child_id)
    assert load(child / "result.json")["exit_code"] == 0  # depth 1 is allowed
    [grandchild_id] = _children_by_id(load(child / "status.json"))
    res = load(child / "children" / grandchild_id / "result.json")
    assert (res["exit_code"], res["reason"]) == (2, "max_depth_exceeded")
    assert "max_depth=1" in res["detail"]
    _assert_no_containers(runtime, run.log_dir)


def test_beyond_max_children_one_of_two_concurrent_children_is_refused(
    runtime: DockerRuntime, agent_image: str, tmp_path: Path, ctx: Path
) -> None:
    """With max_children 1, of two children started at once one completes and the other exits 2 max_children_exceeded."""
    script = """\
for i in 1 2; do
  (massgen-run --automation --config @CTX@/sleepy.yaml "child $i" > c$i.txt 2>&1; echo "rc=$?" >> c$i.txt) &
done
wait
cat c1.txt c2.txt"""
    run = _run(tmp_path, agent_image, _parent_config(tmp_path, script, sandbox="max_children: 1"))
    assert run.proc.returncode == 0, run.describe()
    out = run.answer
    assert sorted(re.findall(r"^rc=(\d)$", out, re.M)) == ["0", "2"], out
    assert len(re.findall(r"^FAILED: max_children_exceeded: ", out, re.M)) == 1, out
    entries = _children_by_id(run.status)
    assert sorted((e["exit_code"], e["reason"]) for e in entries.values()) == [
        (0, "completed"),
        (2, "max_children_exceeded"),
    ]
    for rid, e in entries.items():
        assert load(run.child(rid) / "result.json")["reason"] == e["reason"]
    _assert_no_containers(runtime, run.log_dir)


# -- scoping: a run sees only itself and its descendants ------------------------------------------

PROBE = """\
import json, os, sys
import httpx2

target = sys.argv[1]
sock = os.environ["MASSGEN_SUPERVISOR_SOCKET"]
c = httpx2.Client(base_url="http://massgen-supervisor", transport=httpx2.HTTPTransport(uds=sock), timeout=10)
codes = [
    c.get(f"/v1/runs/{target}").status_code,
    c.get(f"/v1/runs/{target}/status").status_code,
    c.get(f"/v1/runs/{target}/result").status_code,
    c.post(f"/v1/runs/{target}/stop").status_code,
]
print(" ".join(map(str, codes)), len(c.get("/v1/runs").json()))
"""


@pytest.fixture
def daemon(agent_image: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    """A `massgen-supervisor` daemon on a short socket; yields the CLI environment that reaches it."""
    sock_dir = Path(tempfile.mkdtemp(prefix="mgd-", dir="/tmp"))
    sock = sock_dir / "d.sock"
    argv = ["--socket", str(sock), "--logs-root", str(tmp_path / "daemon-runs"), "--image", agent_image]
    proc = subprocess.Popen(
        [sys.executable, "-m", "supervisor.daemon", *argv],
        cwd=tmp_path,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("SOCKET: "), f"daemon did not start: {line!r} (exit {proc.poll()})"
        yield {"MASSGEN_DAEMON_SOCKET": str(sock)}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(sock_dir, ignore_errors=True)


@pytest.mark.parametrize("supervisor", ["embedded", "daemon"])
def test_another_top_level_run_is_invisible_through_the_socket(
    runtime: DockerRuntime, agent_image: str, tmp_path: Path, ctx: Path, request: pytest.FixtureRequest, supervisor: str
) -> None:
    """From run B's sandbox, GET/stop of a running top-level run A over the socket are all 404; A finishes 0.

    "embedded": A and B each have their own CLI process; "daemon": both are runs of one daemon.
    """
    env: dict[str, str] = request.getfixturevalue("daemon") if supervisor == "daemon" else {}
    image = None if env else agent_image
    (ctx / "probe.py").write_text(PROBE)
    a_cfg = tmp_path / "a.yaml"
    a_cfg.write_text(
        "agents:\n"
        "  - id: a\n"
        "    backend: {type: scripted, steps: [{shell: 'sleep 6', timeout: 30}, {answer: A done}, {vote: auto}]}\n"
    )
    a = subprocess.Popen(
        [sys.executable, "-m", "supervisor.cli", *_cli_args(image, a_cfg, "q")],
        cwd=tmp_path,
        env=cli_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert a.stdout is not None
        a_dir = Path(a.stdout.readline().split(": ", 1)[1].strip())
        b = _run(tmp_path, image, _parent_config(tmp_path, f"python3 @CTX@/probe.py {a_dir.name}"), env=env)
        assert b.proc.returncode == 0, b.describe()
        assert b.answer.strip() == "404 404 404 404 0"
        assert load(a_dir / "status.json")["run"]["state"] != "finished"  # B ran while A was live
        out, err = a.communicate(timeout=60)
    finally:
        if a.poll() is None:
            a.kill()
            a.wait()
    assert a.returncode == 0, out + err
    assert load(a_dir / "result.json")["reason"] == "completed"
    a_run, b_run = load(a_dir / "status.json")["run"], b.status["run"]
    if supervisor == "daemon":
        assert a_run["supervisor_id"].startswith("daemon-") and a_run["supervisor_id"] == b_run["supervisor_id"]
        assert a_run["supervisor_pid"] == b_run["supervisor_pid"]
    else:
        assert a_run["supervisor_pid"] != b_run["supervisor_pid"]
    _assert_no_containers(runtime, a_dir)
    _assert_no_containers(runtime, b.log_dir)


def test_a_child_cannot_stop_or_see_its_sibling(
    runtime: DockerRuntime, agent_image: str, tmp_path: Path, ctx: Path
) -> None:
    """A child's `massgen-run stop SIBLING` and `status SIBLING` fail (exit 2, not visible); the sibling finishes 0."""
    script = """\
massgen-run --automation --config @CTX@/sleepy.yaml "sibling" > s.txt 2>&1 &
for i in $(seq 300); do grep -q '^RUN_ID: ' s.txt 2>/dev/null && break; sleep 0.05; done
sid=$(sed -n 's/^RUN_ID: //p' s.txt)
massgen-run --automation --config @CTX@/stopper.yaml "$sid" > stopper.txt 2>&1
wait
echo "SID=$sid"
echo "SIBLING_END=$(tail -n 1 s.txt)"
sed -n 's/^RUN_ID: /STOPPER=/p' stopper.txt"""
    run = _run(tmp_path, agent_image, _parent_config(tmp_path, script))
    assert run.proc.returncode == 0, run.describe()
    facts = dict(line.split("=", 1) for line in run.answer.strip().splitlines())
    sibling = load(run.child(facts["SID"]) / "result.json")
    assert (sibling["exit_code"], sibling["reason"]) == (0, "completed"), sibling
    assert facts["SIBLING_END"].startswith("COMPLETED: ")
    stopper_answer = (run.child(facts["STOPPER"]) / "final" / "c" / "answer.txt").read_text()
    seen = dict(part.split("=", 1) for part in stopper_answer.split("|"))
    for verb in ("STOP", "STATUS"):
        assert f"no run {facts['SID']} visible here" in seen[verb] and seen[verb].rstrip().endswith("rc=2"), seen
    assert json.loads(seen["PS"]) == []
    _assert_no_containers(runtime, run.log_dir)


def test_in_sandbox_ps_and_status_list_only_descendants(
    runtime: DockerRuntime, agent_image: str, tmp_path: Path, ctx: Path
) -> None:
    """In-sandbox `ps --json` lists exactly the caller's descendants and `status RUN --json` works only for them."""
    script = """\
massgen-run --automation --config @examples/quickstart sibling > s.txt 2>&1
sid=$(sed -n 's/^RUN_ID: //p' s.txt)
massgen-run --automation --config @CTX@/inner.yaml "$sid" > i.txt 2>&1
iid=$(sed -n 's/^RUN_ID: //p' i.txt)
echo "SID=$sid"
echo "IID=$iid"
echo "PS=$(massgen-run ps --json | python3 @CTX@/summarize.py)"
echo "STATUS=$(massgen-run status $iid --json | python3 @CTX@/summarize.py)"
echo "PS_TABLE=$(massgen-run ps | wc -l)"
"""
    run = _run(tmp_path, agent_image, _parent_config(tmp_path, script))
    assert run.proc.returncode == 0, run.describe()
    root = dict(line.split("=", 1) for line in run.answer.strip().splitlines())
    sid, iid, root_id = root["SID"], root["IID"], run.run_id
    inner_answer = (run.child(iid) / "final" / "c" / "answer.txt").read_text()
    inner = dict(part.split("=", 1) for part in inner_answer.split("|"))
    gid = inner["GID"]
    assert root["PS"].split() == sorted([f"{sid}:1:{root_id}", f"{iid}:1:{root_id}", f"{gid}:2:{iid}"])
    assert root["STATUS"] == f"{iid} finished 0 1"
    assert root["PS_TABLE"] == "4"  # header + three descendants
    assert inner["PS"] == f"{gid}:2:{iid}"  # not itself, not its parent, not its sibling
    assert inner["STATUS"] == f"{gid} finished 0 2"
    for other in ("SIBLING", "PARENT"):
        assert "visible here" in inner[other] and inner[other].rstrip().endswith("rc=2"), inner
    assert (run.child(iid) / "children" / gid / "result.json").exists()
    _assert_no_containers(runtime, run.log_dir)


# -- the parent's deadline ------------------------------------------------------------------------


def test_parent_timeout_while_a_child_runs_ends_the_subtree(
    runtime: DockerRuntime, agent_image: str, tmp_path: Path, ctx: Path
) -> None:
    """The parent times out (exit 3) while its child sleeps; the child ends too (3 or 4), no containers left."""
    _write_child(ctx, (ctx / "forever.yaml").read_text())
    script = 'massgen-run --automation --config @CTX@/child.yaml "q" > child.txt 2>&1; echo "rc=$?"'
    run = _run(tmp_path, agent_image, _parent_config(tmp_path, script, timeout=5))
    assert run.proc.returncode == 3, run.describe()
    assert run.elapsed < 5 + 2 + 2 + 5  # deadline + grace + 2 s, plus CLI and container start-up
    assert (run.result["exit_code"], run.result["reason"]) == (3, "timeout")
    [child_dir] = (run.log_dir / "children").iterdir()
    res = load(child_dir / "result.json")
    # The child's deadline is capped at the parent's: its own engine may time out (3) just before
    # the ended parent interrupts its subtree (4); either way it is finished and gone.
    assert (res["exit_code"], res["reason"]) in {(3, "timeout"), (4, "interrupted")}, res
    st = load(child_dir / "status.json")
    assert (st["run"]["state"], st["run"]["exit_code"]) == ("finished", res["exit_code"])
    assert st["run"]["deadline"] <= run.status["run"]["deadline"] + 1e-3
    # The parent's status.json, final before its subtree is stopped, still learns how the child ended.
    entry = _children_by_id(run.status)[child_dir.name]
    assert (entry["state"], entry["exit_code"], entry["reason"]) == ("finished", res["exit_code"], res["reason"])
    _assert_no_containers(runtime, run.log_dir)

"""Outbox floods from inside real sandboxes: the shared daemon stays fair, logs stay bounded, the verdict is ours.

Each attack is a scripted agent whose shell step writes into its own outbox
(`/run/massgen/outbox/events.jsonl` inside the sandbox): junk lines, forged valid events, one
huge line, forged long strings, or a million files next to the events file.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from supervisor.lifecycle import MAX_IGNORED_LINES, MAX_OUTBOX_BYTES
from supervisor.materializer import MAX_SANDBOX_LOG_BYTES, MAX_SANDBOX_TEXT
from supervisor.runtime.docker import DockerRuntime
from tests.cli_helpers import load, massgen_run, parse_lines, start_cli, wait_for_event, write_config
from tests.e2e.test_daemon import Daemon

OUTBOX = "/run/massgen/outbox/events.jsonl"

# Forges valid `log` events that continue the engine's own numbering, at a steady rate that
# stays under the outbox cap: every line is accepted, so every line costs the supervisor a
# parse, two appends and a fold. The most work per byte a sandbox can cause.
FORGE_VALID = """\
import json, os, sys, time
def last_seq(path):
    with open(path, "rb") as fh:
        for raw in reversed(fh.read().splitlines()):
            try:
                return json.loads(raw)["seq"]
            except (ValueError, KeyError, TypeError):
                continue
path, seconds, rate, size = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
seq = last_seq(path) + 1
pad = b"p" * size
fd = os.open(path, os.O_WRONLY | os.O_APPEND)
t0 = time.time()
written = 0
while time.time() - t0 < seconds:
    batch = b"".join(b'{"v":1,"seq":%d,"ts":1.0,"type":"log","level":"info","message":"forged %s"}\\n' % (seq + i, pad) for i in range(100))
    seq += 100
    written += os.write(fd, batch)
    ahead = written / rate - (time.time() - t0)
    if ahead > 0:
        time.sleep(ahead)
print(written)
"""

# Appends one line at `seq_offset` past the engine's last event: a forged event that would
# only be accepted if the gap allowance had been widened.
FORGE_AT = """\
import json, os, sys
def last_seq(path):
    with open(path, "rb") as fh:
        for raw in reversed(fh.read().splitlines()):
            try:
                return json.loads(raw)["seq"]
            except (ValueError, KeyError, TypeError):
                continue
path, offset, message = sys.argv[1], int(sys.argv[2]), sys.argv[3]
seq = last_seq(path) + offset
line = json.dumps({"v": 1, "seq": seq, "ts": 1.0, "type": "log", "level": "info", "message": message})
os.write(os.open(path, os.O_WRONLY | os.O_APPEND), line.encode() + b"\\n")
"""

# Forged events carrying 500 KB strings where status.json and massgen.log take sandbox text.
FORGE_LONG = """\
import json, os, sys
def last_seq(path):
    with open(path, "rb") as fh:
        for raw in reversed(fh.read().splitlines()):
            try:
                return json.loads(raw)["seq"]
            except (ValueError, KeyError, TypeError):
                continue
path = sys.argv[1]
seq = last_seq(path) + 1
big = "R" * 500_000
lines = [
    {"v": 1, "seq": seq, "ts": 1.0, "type": "agent_failed", "agent": "a", "reason": big, "message": "m"},
    {"v": 1, "seq": seq + 1, "ts": 1.0, "type": "log", "level": "info", "message": "L" * 8000},
    {"v": 1, "seq": seq + 2, "ts": 1.0, "type": "log", "level": "info", "message": "bad", "x" * 400_000: 1},
    {"v": 1, "seq": seq + 2, "ts": 1.0, "type": "run_finished", "exit_code": 0, "reason": big, "detail": big},
]
fd = os.open(path, os.O_WRONLY | os.O_APPEND)
for obj in lines:
    os.write(fd, json.dumps(obj).encode() + b"\\n")
"""

# Creates N files in the outbox directory, then for S seconds writes to two of them in turn
# (alternating, so the kernel cannot merge the events): every syscall is one file-watch event
# for whoever watches the directory.
CHURN = """\
import os, sys, time
d, n, seconds = os.path.dirname(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
made = 0
try:
    for i in range(n):
        os.close(os.open(os.path.join(d, "c%07d" % i), os.O_CREAT | os.O_WRONLY, 0o644))
        made += 1
except OSError as exc:
    print("stopped:", exc, file=sys.stderr)
fds = [os.open(os.path.join(d, name), os.O_CREAT | os.O_WRONLY, 0o644) for name in ("w0", "w1")]
writes = 0
end = time.time() + seconds
while time.time() < end:
    for _ in range(1000):
        os.pwrite(fds[writes & 1], b"x", 0)
        writes += 1
print(made, writes)
"""


def _script_step(name: str, source: str) -> str:
    return f"        - {{write_file: {name}, content: {json.dumps(source)}}}\n"


def _agent(steps: str, agent: str = "a") -> str:
    return f"agents:\n  - id: {agent}\n    backend:\n      type: scripted\n      steps:\n{steps}"


def _run_cli(tmp_path: Path, image: str, cfg: Path, timeout: float = 180) -> tuple[Any, dict[str, str], float]:
    t0 = time.monotonic()
    p = massgen_run(["--automation", "--image", image, "--config", str(cfg), "q"], tmp_path, timeout=timeout)
    return p, parse_lines(p.stdout), time.monotonic() - t0


def _finish(proc: Any, timeout: float) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out.decode(), err.decode()


def _log_dir(stdout: str) -> Path:
    return Path(stdout.splitlines()[0].split(": ", 1)[1].strip())


# -- fairness ----------------------------------------------------------------------------------


@pytest.fixture
def daemon(runtime: DockerRuntime, agent_image: str, tmp_path: Path) -> Iterator[Daemon]:
    """A `massgen-supervisor` subprocess on a short socket; every container it owns is removed afterwards."""
    d = Daemon(runtime, agent_image, tmp_path)
    d.start()
    try:
        yield d
    finally:
        d.cleanup()
    assert d.containers() == []


class _HealthProbe(threading.Thread):
    """GET /v1/health every 20 ms over the daemon's socket, recording each latency."""

    def __init__(self, d: Daemon) -> None:
        super().__init__(daemon=True)
        self.d = d
        self.stop = threading.Event()
        self.latencies: list[float] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with self.d.http(timeout=60) as client:
                while not self.stop.is_set():
                    t0 = time.perf_counter()
                    resp = client.get("/v1/health")
                    self.latencies.append(time.perf_counter() - t0)
                    assert resp.status_code == 200, resp.text
                    self.stop.wait(0.02)
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            self.error = exc


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def test_health_stays_fast_and_a_neighbours_deadline_fires_while_one_run_floods(daemon: Daemon, tmp_path: Path) -> None:
    """While one run forges accepted events faster than the daemon can apply them, /v1/health answers in < 100 ms p99 and another run's 10 s deadline fires on time."""
    flood_s, rate = 20, 8 << 20  # 160 MiB of ~70-byte lines: under the outbox cap, never stopped
    flood_cfg = write_config(
        tmp_path,
        _agent(
            _script_step("forge.py", FORGE_VALID)
            + f'        - {{shell: "python3 forge.py {OUTBOX} {flood_s} {rate} 1", timeout: 120}}\n'
            + "        - answer: flooded\n        - vote: auto\n"
        )
        + "timeout_settings: {orchestrator_timeout_seconds: 120}\n",
        name="flood.yaml",
    )
    sleeper_cfg = write_config(
        tmp_path,
        _agent('        - {shell: "sleep 300", timeout: 600}\n        - answer: never\n')
        + "timeout_settings: {orchestrator_timeout_seconds: 10}\nsandbox: {stop_grace_seconds: 2}\n",
        name="sleeper.yaml",
    )
    flood = daemon.cli(["--automation", "--config", str(flood_cfg), "q"], tmp_path)
    assert flood.stdout is not None
    flood_dir = Path(flood.stdout.readline().decode().split(": ", 1)[1].strip())
    outbox = flood_dir / "sandbox" / "events.jsonl"

    def outbox_size() -> int:
        return outbox.stat().st_size if outbox.exists() else 0

    deadline = time.monotonic() + 60
    while outbox_size() < 4 << 20:  # the flood is on
        assert time.monotonic() < deadline, "the flood never started"
        time.sleep(0.05)
    applied_before = (flood_dir / "events.jsonl").stat().st_size
    probe = _HealthProbe(daemon)
    probe.start()
    sleeper = daemon.cli(["--automation", "--config", str(sleeper_cfg), "q"], tmp_path)
    try:
        out_b, err_b = sleeper.communicate(timeout=120)
        rc, out, err = sleeper.returncode, out_b.decode(), err_b.decode()
        flooding_still = outbox_size() > (flood_dir / "events.jsonl").stat().st_size
    finally:
        probe.stop.set()
        probe.join(timeout=60)
    applied_during = (flood_dir / "events.jsonl").stat().st_size - applied_before
    assert probe.error is None, probe.error
    assert rc == 3, out + err
    sleeper_dir = Path(parse_lines(out)["LOG_DIR"])
    res, st = load(sleeper_dir / "result.json"), load(sleeper_dir / "status.json")
    assert res["reason"] == "timeout", res
    # grace 2 s, plus generous slack for a loaded machine (the issue saw 75 s late)
    assert res["finished_at"] - st["run"]["deadline"] < 2 + 5, (res, st["run"]["deadline"])
    # the daemon really was busy with the flood the whole time: behind it, applying megabytes
    assert flooding_still, "the flood ended before the neighbour's deadline: nothing was measured"
    assert applied_during > 1 << 20, applied_during  # > 10^4 forged events while probing
    assert len(probe.latencies) > 100
    p99 = _p99(probe.latencies)
    print(
        f"health over {len(probe.latencies)} probes: p50 {sorted(probe.latencies)[len(probe.latencies) // 2] * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, max {max(probe.latencies) * 1000:.0f} ms; applied {applied_during >> 20} MiB"
    )
    assert p99 < 0.100, f"health p99 {p99 * 1000:.0f} ms over {len(probe.latencies)} probes"
    # End the flood through the API (the daemon then gives its disk back) rather than leaving
    # it to the fixture's graceful shutdown, which detaches running sandboxes.
    with daemon.http() as client:
        assert client.post(f"/v1/runs/{flood_dir.name}/stop").status_code == 202
    rc, _, err = _finish(flood, timeout=90)
    assert rc == 4, err  # interrupted; its backlog drain after the stop is bounded (10 s)


# -- floods end as limit_exceeded, quickly -----------------------------------------------------


@pytest.mark.parametrize(
    "attack",
    [
        # bounded by head even if nothing stopped them: a failing test must not fill the disk
        pytest.param(f"yes '{{}}' | head -c 2000000000 >> {OUTBOX}", id="junk-objects"),
        pytest.param(f"yes x | head -c 2000000000 >> {OUTBOX}", id="junk-lines"),
        pytest.param(f"head -c 2000000000 /dev/zero >> {OUTBOX}", id="bytes"),
    ],
)
def test_outbox_flood_ends_as_limit_exceeded_quickly_with_bounded_logs(
    agent_image: str, tmp_path: Path, attack: str
) -> None:
    """A flood of junk lines or bytes into the outbox ends in seconds as exit 2 limit_exceeded, with a small massgen.log and status.json."""
    cfg = write_config(
        tmp_path,
        _agent(f'        - {{shell: "{attack}", timeout: 120}}\n        - answer: survived\n        - vote: auto\n')
        + "timeout_settings: {orchestrator_timeout_seconds: 150}\n",
    )
    p, _f, elapsed = _run_cli(tmp_path, agent_image, cfg)
    log_dir = _log_dir(p.stdout)
    try:
        assert p.returncode == 2, p.stdout + p.stderr
        res = load(log_dir / "result.json")
        assert res["reason"] == "limit_exceeded", res
        # whichever bound the follower saw first: the outbox's size or its count of junk lines
        assert f"{MAX_OUTBOX_BYTES >> 20} MiB" in res["detail"] or str(MAX_IGNORED_LINES) in res["detail"], res
        assert elapsed < 40, f"{elapsed:.0f}s"  # start-up and the flood itself included; was ~100 s of draining
        log_text = (log_dir / "massgen.log").read_text()
        assert (log_dir / "massgen.log").stat().st_size < 256 << 10
        assert (log_dir / "status.json").stat().st_size < 64 << 10
        if "yes" in attack:
            assert "more malformed event lines" in log_text  # aggregated, not one line each
            assert log_text.count("ignored malformed event line") <= 2 + int(elapsed / 5)
        else:
            assert log_text.count("oversized") <= 2
    finally:
        shutil.rmtree(log_dir / "sandbox", ignore_errors=True)


# -- bounded logs and status -------------------------------------------------------------------


def test_one_huge_line_is_one_warning_and_widens_the_gap_allowance_by_one(agent_image: str, tmp_path: Path) -> None:
    """A 50 MB line in the outbox: one warning; a forged event two seqs ahead is still refused; the run completes."""
    huge = f"head -c 50000000 /dev/zero >> {OUTBOX}; echo >> {OUTBOX}"
    cfg = write_config(
        tmp_path,
        _agent(
            _script_step("forge.py", FORGE_AT)
            + f'        - {{shell: "{huge}", timeout: 120}}\n'
            + f'        - {{shell: "python3 forge.py {OUTBOX} 3 FORGED-AHEAD", timeout: 60}}\n'
            + "        - answer: done\n        - vote: auto\n"
        ),
    )
    p, f, _ = _run_cli(tmp_path, agent_image, cfg)
    assert p.returncode == 0, p.stdout + p.stderr
    log_dir = Path(f["LOG_DIR"])
    log_text = (log_dir / "massgen.log").read_text()
    assert log_text.count("oversized") == 1, [ln for ln in log_text.splitlines() if "oversized" in ln]
    events = [json.loads(raw) for raw in (log_dir / "events.jsonl").read_bytes().splitlines()]
    assert [e for e in events if e.get("message") == "FORGED-AHEAD"] == []
    assert "out of sequence" in log_text
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(len(seqs))), seqs  # the engine's own events all applied, in order


def test_forged_long_strings_are_cut_before_status_json_and_massgen_log(agent_image: str, tmp_path: Path) -> None:
    """Forged 500 KB reasons and a 400 KB field name do not bloat status.json, result.json or massgen.log."""
    cfg = write_config(
        tmp_path,
        _agent(
            _script_step("forge.py", FORGE_LONG)
            + f'        - {{shell: "python3 forge.py {OUTBOX}; sleep 2", timeout: 60}}\n'
            + "        - answer: done\n        - vote: auto\n"
        ),
    )
    p, _f, _ = _run_cli(tmp_path, agent_image, cfg)
    log_dir = _log_dir(p.stdout)
    assert (log_dir / "result.json").exists(), p.stdout + p.stderr  # the verdict itself is not this test's subject
    for name in ("status.json", "result.json"):
        size = (log_dir / name).stat().st_size
        assert size < 5 * MAX_SANDBOX_TEXT + (16 << 10), (name, size)
    status = load(log_dir / "status.json")
    assert len(status["agents"]["a"]["error"]["type"]) < MAX_SANDBOX_TEXT + 100
    assert (log_dir / "massgen.log").stat().st_size < 64 << 10
    # the long log line is the sandbox's own text: kept (it is under the cap), not repeated
    assert (log_dir / "massgen.log").read_text().count("L" * 8000) == 1


def test_forged_log_flood_is_capped_in_massgen_log(agent_image: str, tmp_path: Path) -> None:
    """Accepted forged log events stop reaching massgen.log past its cap for sandbox text; the log says so once."""
    cfg = write_config(
        tmp_path,
        _agent(
            _script_step("forge.py", FORGE_VALID)
            + f'        - {{shell: "python3 forge.py {OUTBOX} 600 {64 << 20} 7000", timeout: 120}}\n'
            + "        - answer: done\n        - vote: auto\n"
        )
        + "timeout_settings: {orchestrator_timeout_seconds: 150}\n",
    )
    p, _, _ = _run_cli(tmp_path, agent_image, cfg, timeout=240)
    log_dir = _log_dir(p.stdout)
    try:
        assert load(log_dir / "result.json")["reason"] == "limit_exceeded", p.stdout + p.stderr
        size = (log_dir / "massgen.log").stat().st_size
        # ~7 KB per forged line plus a 30-byte stamp: the cap, a little over, and the supervisor's own lines
        assert MAX_SANDBOX_LOG_BYTES <= size < MAX_SANDBOX_LOG_BYTES + (1 << 20), size
        assert (log_dir / "massgen.log").read_text().count("later sandbox log lines are not written") == 1
    finally:
        shutil.rmtree(log_dir / "sandbox", ignore_errors=True)


# -- file churn ---------------------------------------------------------------------------------


def test_file_churn_in_the_outbox_keeps_supervisor_rss_within_20_mib(agent_image: str, tmp_path: Path) -> None:
    """10^5 new files and ~10^6 writes to other files in the outbox grow the (embedded) supervisor's RSS by under 20 MiB.

    Each of those is a file-watch event for a directory watch; a watch on the events file alone
    sees none of them (10^6 new files took minutes on a busy host, hence the writes).
    """
    n, seconds = 100_000, 15
    cfg = write_config(
        tmp_path,
        _agent(
            _script_step("churn.py", CHURN)
            + '        - {shell: "sleep 2", timeout: 60}\n'
            + f'        - {{shell: "python3 churn.py {OUTBOX} {n} {seconds}", timeout: 600, save_as: made}}\n'
            + "        - answer: 'made {{made}}'\n        - vote: auto\n"
        )
        + "timeout_settings: {orchestrator_timeout_seconds: 900, agent_timeout_seconds: 900}\n",
    )
    proc, log_dir = start_cli(["--automation", "--image", agent_image, "--config", str(cfg), "q"], tmp_path)
    try:
        wait_for_event(log_dir, "tool_called", timeout=60)  # the write_file step ran: the run is up
        ps = psutil.Process(proc.pid)
        baseline = 0
        quiet_until = time.monotonic() + 1.5  # the `sleep 2` step
        while time.monotonic() < quiet_until:
            baseline = max(baseline, ps.memory_info().rss)
            time.sleep(0.1)
        peak = baseline
        # until the churn step is over (the answer follows it)
        while proc.poll() is None and b'"type":"answer"' not in (log_dir / "events.jsonl").read_bytes().replace(
            b" ", b""
        ):
            peak = max(peak, ps.memory_info().rss)
            time.sleep(0.1)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, out + err
        answer = Path(parse_lines(out)["ANSWER_FILE"]).read_text()
        made, writes = (int(x) for x in answer.split()[-2:])
        assert made >= 50_000 and writes >= 100_000, answer  # a disk quota may stop creation early
        assert peak - baseline < 20 << 20, f"RSS grew by {(peak - baseline) >> 20} MiB ({made} files, {writes} writes)"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
        shutil.rmtree(log_dir / "sandbox", ignore_errors=True)

"""Nested-run launch latency: in-sandbox `massgen-run` versus the same launch from the host.

Both figures are the time from just before `massgen-run` starts to the child's engine starting in
its container (`run.started_at` in its status.json, stamped inside the container; runc shares
the host's clock). Host: `time.time()` before Popen of the CLI (`--image` given, no daemon).
Nested: one parent run whose scripted agent launches the same config N times in a row from its
shell, stamping `date +%s.%N` before each. Target (issue: nested runs): median ratio <= 1.3x.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report

REPO = Path(__file__).resolve().parents[1]
CHILD = "@examples/quickstart"
TARGET = 1.3

PARENT = """\
agents:
  - id: agent_a
    backend:
      type: scripted
      steps:
        - shell: |-
            for i in $(seq {count}); do
              t=$(date +%s.%N)
              massgen-run --automation --config {child} "What is 2+2?" > out.txt 2>&1 || {{ cat out.txt; exit 1; }}
              echo "$t $(sed -n 's/^RUN_ID: //p' out.txt)"
            done
          timeout: 1800
          save_as: times
        - answer: "{{{{times}}}}"
        - vote: auto
timeout_settings: {{orchestrator_timeout_seconds: 1900, agent_timeout_seconds: 1850}}
"""


def _cli(image: str, config: str | Path, cwd: Path) -> tuple[float, subprocess.CompletedProcess[str]]:
    env = dict(os.environ, PYTHONPATH=str(REPO), MASSGEN_NO_DAEMON="1")
    cmd = [sys.executable, "-m", "supervisor.cli", "--automation", "--image", image, "--config", str(config), "q"]
    t0 = time.time()
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"launch failed ({p.returncode}): {' '.join(cmd)}\n{p.stdout}\n{p.stderr}")
    return t0, p


def _log_dir(p: subprocess.CompletedProcess[str]) -> Path:
    return Path(p.stdout.splitlines()[0].split(": ", 1)[1])


def _started_at(log_dir: Path) -> float:
    return float(json.loads((log_dir / "status.json").read_text())["run"]["started_at"])


def host_samples(image: str, work: Path, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0, p = _cli(image, CHILD, work)
        out.append(_started_at(_log_dir(p)) - t0)
    return out


def nested_samples(image: str, work: Path, n: int) -> list[float]:
    cfg = work / "parent.yaml"
    cfg.write_text(textwrap.dedent(PARENT.format(count=n, child=CHILD)))
    _, p = _cli(image, cfg, work)
    parent = _log_dir(p)
    out = []
    lines = (parent / "final" / "agent_a" / "answer.txt").read_text().strip().splitlines()
    for line in lines:
        stamp, run_id = line.split()
        out.append(_started_at(parent / "children" / run_id) - float(stamp))
    if len(out) != n:
        raise SystemExit(f"expected {n} nested launches, got {len(out)}: {lines}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=9, help="samples per figure (after one warm-up each)")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from supervisor.images import ensure_images
    from supervisor.runtime.docker import DockerRuntime

    image = ensure_images(DockerRuntime(), progress=lambda m: print(m, file=sys.stderr))
    work = Path(tempfile.mkdtemp(prefix="mgbench-nested-"))
    try:
        host = host_samples(image, work, args.n + 1)[1:]
        nested = nested_samples(image, work, args.n + 1)[1:]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    h, m = statistics.median(host), statistics.median(nested)
    for name, xs in (("host", host), ("nested", nested)):
        print(f"{name:7} launch -> engine running, ms: " + " ".join(f"{x * 1000:.0f}" for x in xs))
    report("nested launch -> child engine running", m, h, f"ratio <= {TARGET}x")
    ok = m / h <= TARGET
    print("PASS" if ok else "MISS", f"(baseline: host `massgen-run --image ... {CHILD}` -> engine running)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

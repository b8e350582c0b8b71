"""The quickstart on the remote engine (linked through the run channel) versus on the local one.

Issue #15's target: remote quickstart end to end at most 1.5x of the local one, in the same run.
The remote engine is the one of tests/remote/engine.py (its own network namespace, TLS only);
bring it up with `scripts/remote-engine.sh up && scripts/remote-engine.sh push` first.
Not measured here yet: status freshness over the channel and the gateway's added latency.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median_of, report, time_cmd

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-n", type=int, default=7, help="samples per figure")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from tests.remote import engine

    if not engine.answers():
        print("the remote engine does not answer: scripts/remote-engine.sh up && scripts/remote-engine.sh push")
        return 2
    py = sys.executable
    local_env = dict(os.environ, PYTHONPATH=str(REPO))
    remote_env = {**local_env, **engine.engine_env(), "MASSGEN_RUNTIME": "remote-docker"}
    work = tempfile.mkdtemp(prefix="mgbench-")
    try:
        quick = [py, "-m", "supervisor.cli", "--automation", "--config", "@examples/quickstart", "What is 2+2?"]
        local, _ = median_of(lambda: time_cmd(quick, cwd=work, env=local_env), args.n)
        remote, _ = median_of(lambda: time_cmd(quick, cwd=work, env=remote_env), args.n)
        report("quickstart, remote engine through the channel (e2e CLI)", remote, local, "ratio <= 1.5x")
        ok = remote / local <= 1.5
        print("PASS" if ok else "MISS", "(baseline: the same quickstart on the local engine, bind mounts)")
        return 0 if ok else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

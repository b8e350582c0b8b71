"""CLI start-up and an in-process (--sandbox none) quickstart, against bare Python in the same run.

Targets (issue: coordination engine): `massgen-run --help` median under 0.3 s; the quickstart with
`--sandbox none` median under 1 s. MassGen 0.1.97 on this machine kind: 7.2 s and 7.4 s.
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
    ap.add_argument("-n", type=int, default=10, help="samples per figure")
    args = ap.parse_args()
    py = sys.executable
    env = dict(os.environ, PYTHONPATH=str(REPO))
    work = tempfile.mkdtemp(prefix="mgbench-")
    try:
        base, _ = median_of(lambda: time_cmd([py, "-c", "pass"], env=env), args.n)
        helpt, _ = median_of(lambda: time_cmd([py, "-m", "supervisor.cli", "--help"], env=env), args.n)
        report("massgen-run --help", helpt, base, "< 300 ms")
        quick = [
            py,
            "-m",
            "supervisor.cli",
            "--automation",
            "--sandbox",
            "none",
            "--config",
            "@examples/quickstart",
            "What is 2+2?",
        ]
        qs, _ = median_of(lambda: time_cmd(quick, cwd=work, env=env), args.n)
        report("quickstart --sandbox none (2 agents)", qs, base, "< 1000 ms")
        ok = helpt < 0.3 and qs < 1.0
        print("PASS" if ok else "MISS", "(baseline: python3 -c pass)")
        return 0 if ok else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

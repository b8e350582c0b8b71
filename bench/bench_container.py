"""The quickstart in its own container versus a bare `docker run --rm <agent image> python3 -c pass`.

Targets (issue: container per run): median ratio at most 4x, and under 3 s median on a 2-core
machine. MassGen 0.1.97, with no container at all, takes 7.4 s here.
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
    from supervisor.images import ensure_images
    from supervisor.runtime.docker import DockerRuntime

    image = ensure_images(DockerRuntime(), progress=lambda m: print(m, file=sys.stderr))
    py = sys.executable
    env = dict(os.environ, PYTHONPATH=str(REPO))
    work = tempfile.mkdtemp(prefix="mgbench-")
    try:
        bare = ["docker", "run", "--rm", "--network", "none", image, "python3", "-c", "pass"]
        base, _ = median_of(lambda: time_cmd(bare), args.n)
        quick = [py, "-m", "supervisor.cli", "--automation", "--config", "@examples/quickstart", "What is 2+2?"]
        qs, _ = median_of(lambda: time_cmd(quick, cwd=work, env=env), args.n)
        report("quickstart in its container (e2e CLI)", qs, base, "ratio <= 4x and < 3000 ms")
        ok = qs / base <= 4 and qs < 3.0
        print("PASS" if ok else "MISS", "(baseline: bare docker run --rm <agent image> python3 -c pass)")
        return 0 if ok else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

"""The containerised quickstart with its disk budget (a loop-mounted ext4 per run) versus without.

Target (issue 9): the disk budget costs under 5% of the quickstart e2e. Samples alternate
between the two settings so that load on the shared machine hits both alike.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report, time_cmd

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-n", type=int, default=9, help="samples per figure")
    ap.add_argument("--mode", default="auto", help="MASSGEN_DISK_QUOTA for the measured runs (auto, mount, poll)")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from supervisor.diskquota import quota_mode
    from supervisor.images import ensure_images
    from supervisor.runtime.docker import DockerRuntime

    image = ensure_images(DockerRuntime(), progress=lambda m: print(m, file=sys.stderr))
    mode, why = quota_mode({**os.environ, "MASSGEN_DISK_QUOTA": args.mode})
    print(f"disk budget enforced by: {mode.value}{f' ({why})' if why else ''}")
    work = tempfile.mkdtemp(prefix="mgbench-disk-")
    quick = [sys.executable, "-m", "supervisor.cli", "--automation", "--image", image]
    quick += ["--config", "@examples/quickstart", "What is 2+2?"]
    base_env = dict(os.environ, PYTHONPATH=str(REPO), MASSGEN_NO_DAEMON="1")
    env_on = dict(base_env, MASSGEN_DISK_QUOTA=args.mode)
    env_off = dict(base_env, MASSGEN_DISK_QUOTA="off")
    try:
        time_cmd(quick, cwd=work, env=env_on)  # warm-up: page cache, image, first mkfs
        time_cmd(quick, cwd=work, env=env_off)
        on, off = [], []
        for _ in range(args.n):
            on.append(time_cmd(quick, cwd=work, env=env_on))
            off.append(time_cmd(quick, cwd=work, env=env_off))
        with_quota, without = statistics.median(on), statistics.median(off)
        report("quickstart with its disk budget (e2e CLI)", with_quota, without, "ratio < 1.05x")
        ok = with_quota / without < 1.05
        print("PASS" if ok else "MISS", "(baseline: the same quickstart with MASSGEN_DISK_QUOTA=off)")
        return 0 if ok else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

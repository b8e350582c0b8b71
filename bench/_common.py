"""Shared timing helpers for the benchmark scripts (figures, not tests)."""

from __future__ import annotations

import statistics
import subprocess
import time
from collections.abc import Callable, Sequence


def time_cmd(
    cmd: Sequence[str], *, cwd: str | None = None, env: dict[str, str] | None = None, check: bool = True
) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(list(cmd), cwd=cwd, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if check and p.returncode != 0:
        raise SystemExit(f"benchmark command failed ({p.returncode}): {' '.join(cmd)}\n{p.stdout}\n{p.stderr}")
    return dt


def median_of(fn: Callable[[], float], n: int, warmup: int = 1) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    samples = [fn() for _ in range(n)]
    return statistics.median(samples), samples


def report(name: str, value: float, baseline: float, target: str) -> None:
    figures = f"median {value * 1000:8.1f} ms   baseline {baseline * 1000:8.1f} ms   ratio {value / baseline:5.2f}x"
    print(f"{name:44} {figures}   target: {target}")

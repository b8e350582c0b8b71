"""Statistics over verdicts: Wilson intervals, pass@k / pass^k, seeded bootstraps, exact McNemar, Holm.

Pure Python on purpose: the exact binomial tail McNemar needs is a sum of `math.comb` terms in
integers (exact, no float underflow), and the bootstraps are a few thousand resamples of at most
a few hundred questions. scipy would add ~100 MB and a slow import to every batch for that.
Every function is deterministic for a given seed (string seeds hash with SHA-512 in `random`,
independent of PYTHONHASHSEED).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from fractions import Fraction

Z95 = 1.959963984540054  # the 0.975 quantile of the standard normal


def wilson(passes: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval for a binomial proportion; None when n == 0."""
    if n <= 0:
        return None
    p = passes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def pass_at_k(n: int, c: int, k: int) -> float | None:
    """Unbiased pass@k (the chance at least one of k draws without replacement passes)."""
    if k > n or n <= 0:
        return None
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pass_hat_k(n: int, c: int, k: int) -> float | None:
    """pass^k (the chance all k draws without replacement pass): consistency, not luck."""
    if k > n or n <= 0:
        return None
    return math.comb(c, k) / math.comb(n, k)


def _percentile_interval(samples: list[float], alpha: float) -> tuple[float, float]:
    s = sorted(samples)
    b = len(s)
    lo = s[max(0, math.floor(alpha / 2 * b))]
    hi = s[min(b - 1, math.ceil((1 - alpha / 2) * b) - 1)]
    return lo, hi


def bootstrap_mean(
    values: Sequence[float], seed: str, samples: int = 2000, alpha: float = 0.05
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean of `values` (resampled with replacement)."""
    n = len(values)
    if n == 0:
        return None
    rng = random.Random(seed)  # noqa: S311 - a seeded bootstrap, reproducible on purpose
    means = [sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(samples)]
    return _percentile_interval(means, alpha)


def paired_bootstrap(
    diffs: Sequence[float], seed: str, samples: int = 2000, alpha: float = 0.05
) -> tuple[tuple[float, float], float] | None:
    """Interval of the mean paired difference, and a two-sided bootstrap p-value for zero.

    The unit resampled is the pair (a question, with all its repeats), so repeats of one
    question are never treated as independent evidence.
    """
    n = len(diffs)
    if n == 0:
        return None
    rng = random.Random(seed)  # noqa: S311 - a seeded bootstrap, reproducible on purpose
    means = [sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(samples)]
    le = sum(1 for m in means if m <= 0) / samples
    ge = sum(1 for m in means if m >= 0) / samples
    p = min(1.0, 2 * min(le, ge))
    return _percentile_interval(means, alpha), p


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: b, c are the discordant pairs (binomial(b + c, 1/2) test)."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = Fraction(sum(math.comb(n, i) for i in range(k + 1)), 2**n)
    return float(min(Fraction(1), 2 * tail))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (step-down, monotone), in the input order."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted

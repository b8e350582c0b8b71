"""Batch statistics against hand-computed values."""

from __future__ import annotations

import math

import pytest

from supervisor.batch import stats


def test_wilson_hand_values() -> None:
    """Wilson 95%: 3/3 -> [0.4385, 1], 15/30 -> [0.3315, 0.6685], 0/10 -> [0, 0.2775]; n=0 has none."""
    z2 = stats.Z95**2
    three = stats.wilson(3, 3)
    assert three is not None
    lo, hi = three
    # p = 1: centre = (1 + z²/6) / (1 + z²/3), half = (z²/6) / (1 + z²/3)
    assert lo == pytest.approx((1 + z2 / 6 - z2 / 6) / (1 + z2 / 3), abs=1e-12)
    assert lo == pytest.approx(0.43850, abs=1e-5)
    assert hi == 1.0
    assert stats.wilson(15, 30) == pytest.approx((0.331541, 0.668459), abs=1e-6)
    none_of_ten = stats.wilson(0, 10)
    assert none_of_ten is not None
    lo, hi = none_of_ten
    assert lo == 0.0 and hi == pytest.approx(0.277533, abs=1e-6)
    assert stats.wilson(0, 0) is None


def test_pass_at_k_and_pass_hat_k() -> None:
    """pass@k = 1 - C(n-c,k)/C(n,k) and pass^k = C(c,k)/C(n,k), by hand for small n."""
    assert stats.pass_at_k(3, 1, 1) == pytest.approx(1 / 3)
    assert stats.pass_at_k(3, 1, 3) == 1.0
    assert stats.pass_at_k(5, 3, 2) == pytest.approx(1 - 1 / 10)
    assert stats.pass_at_k(3, 0, 2) == 0.0
    assert stats.pass_hat_k(5, 3, 2) == pytest.approx(3 / 10)
    assert stats.pass_hat_k(3, 1, 3) == 0.0
    assert stats.pass_hat_k(3, 3, 3) == 1.0
    assert stats.pass_at_k(2, 1, 3) is None and stats.pass_hat_k(2, 1, 3) is None


def test_mcnemar_exact_hand_values() -> None:
    """Exact McNemar: two-sided binomial(b+c, 1/2) tail, capped at 1."""
    assert stats.mcnemar_exact(0, 5) == pytest.approx(2 / 32)
    assert stats.mcnemar_exact(9, 1) == pytest.approx(22 / 1024)
    assert stats.mcnemar_exact(1, 9) == stats.mcnemar_exact(9, 1)
    assert stats.mcnemar_exact(3, 3) == 1.0
    assert stats.mcnemar_exact(0, 0) == 1.0
    # no float underflow for large discordant counts
    assert 0 < stats.mcnemar_exact(0, 2000) < 1e-300 or stats.mcnemar_exact(0, 2000) == 0.0


def test_holm_step_down() -> None:
    """Holm: sorted p times (m - rank), running max, capped, back in input order."""
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert stats.holm([]) == []


def test_bootstrap_is_seeded_and_sane() -> None:
    """The same seed gives the same interval; constant data a point; the mean inside the interval."""
    vals = [((i * 37) % 101) / 100 for i in range(40)]
    a = stats.bootstrap_mean(vals, "7:x", 2000)
    assert a == stats.bootstrap_mean(vals, "7:x", 2000)
    assert a != stats.bootstrap_mean(vals, "8:x", 2000)
    assert a is not None and a[0] <= sum(vals) / len(vals) <= a[1]
    assert 0.0 <= a[0] < a[1] <= 1.0
    assert stats.bootstrap_mean([1.0, 1.0], "s") == (1.0, 1.0)
    assert stats.bootstrap_mean([], "s") is None


def test_paired_bootstrap_p_value_matches_hand_probability() -> None:
    """5 questions at -1 and 5 at 0: a resample has mean >= 0 only when all 10 draws are zeros
    (probability 0.5^10), so the two-sided p is about 2 * 0.5^10 ~ 0.002 and the interval is [-0.8, -0.2]."""
    diffs = [-1.0] * 5 + [0.0] * 5
    res = stats.paired_bootstrap(diffs, "7:compare", 20000)
    assert res is not None
    (lo, hi), p = res
    assert p == pytest.approx(2 * 0.5**10, abs=0.002)
    assert lo == pytest.approx(-0.8, abs=0.1) and hi == pytest.approx(-0.2, abs=0.1)
    flat = stats.paired_bootstrap([0.0, 0.0], "s")
    assert flat is not None
    assert math.isclose(flat[1], 1.0)

"""The pareto benchmark's paired comparison of two plans' top-1 (`paper_tables.paired_gap`):
what decides whether a gap between strategies is larger than the test set can resolve."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from paper_tables import paired_gap  # noqa: E402


def test_paired_gap_by_hand() -> None:
    # a alone right on samples 1 and 2, b alone on 3: n10 = 2, n01 = 1, n = 5
    a = np.array([1, 1, 1, 0, 0], bool)
    b = np.array([1, 0, 0, 1, 0], bool)
    d, lo, hi = paired_gap(a, b)
    half = 1.96 * np.sqrt(2 + 1 - 5 * 0.2 ** 2) / 5
    assert d == pytest.approx(0.2)
    assert (lo, hi) == pytest.approx((0.2 - half, 0.2 + half))
    d2, lo2, hi2 = paired_gap(b, a)
    assert (d2, lo2, hi2) == pytest.approx((-0.2, -0.2 - half, -0.2 + half))


def test_identical_plans_have_no_gap_and_disjoint_ones_resolve() -> None:
    rng = np.random.default_rng(0)
    a = rng.random(1000) < 0.9
    assert paired_gap(a, a) == (0.0, 0.0, 0.0)
    # 30 more samples right and nothing lost: the interval stays above 0
    b = a.copy()
    b[np.flatnonzero(~a)[:30]] = True
    d, lo, _ = paired_gap(b, a)
    assert d == pytest.approx(0.03) and lo > 0

"""pass@k against brute-force enumeration of every k-subset of the samples."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest

from nanochat.eval.passk import mean_pass_at_k, pass_at_k, per_problem_pass_at_k


def brute_force(n: int, c: int, k: int) -> Fraction:
    """Fraction of all k-subsets of n samples (the first c correct) that contain a correct sample."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    hits = sum(any(samples[i] for i in s) for s in subsets)
    return Fraction(hits, len(subsets))


@pytest.mark.parametrize("n", range(1, 11))
def test_matches_brute_force(n: int) -> None:
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(float(brute_force(n, c, k)), abs=1e-12), (n, c, k)


def test_closed_form_and_edges() -> None:
    assert pass_at_k(200, 0, 100) == 0.0
    assert pass_at_k(200, 200, 1) == 1.0
    assert pass_at_k(5, 4, 2) == 1.0  # n - c < k: every pair holds a correct one
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the plain fraction correct
    # Large n where the binomials would overflow a float: still finite and equal to the exact value.
    n, c, k = 2000, 17, 100
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-9)


def test_k_greater_than_n_raises() -> None:
    with pytest.raises(ValueError, match="at least 5 samples"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 0)
    with pytest.raises(ValueError):
        mean_pass_at_k([(10, 2), (3, 1)], 5)


def test_mean_and_per_problem() -> None:
    counts = [(5, 0), (5, 1), (5, 5), (4, 2)]
    per = per_problem_pass_at_k(counts, 2)
    assert per == pytest.approx([float(brute_force(n, c, 2)) for n, c in counts])
    assert mean_pass_at_k(counts, 2) == pytest.approx(sum(per) / 4)
    with pytest.raises(ValueError):
        mean_pass_at_k([], 1)

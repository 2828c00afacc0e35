"""Unbiased pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on Code", §2.1).

With n samples of which c pass, the probability that at least one of k samples drawn without replacement
passes is ``1 - C(n-c, k) / C(n, k)``. The binomials overflow floats for large n, so we use the product form
``1 - prod_{i=n-c+1}^{n} (1 - k/i)`` (the same as the paper's numpy snippet): n-c terms cancel, each factor
is in [0, 1], and no large numbers appear.
"""

from __future__ import annotations

from collections.abc import Iterable


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with `n` samples, `c` of them correct.

    Raises ValueError when k > n (the estimator is undefined: fewer samples than draws), k < 1, or c outside
    [0, n].
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"number correct c={c} must be within [0, n={n}]")
    if n - c < k:
        return 1.0  # every k-subset contains a correct sample
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def per_problem_pass_at_k(counts: Iterable[tuple[int, int]], k: int) -> list[float]:
    """pass@k for each (n, c) pair."""
    return [pass_at_k(n, c, k) for n, c in counts]


def mean_pass_at_k(counts: Iterable[tuple[int, int]], k: int) -> float:
    """Mean pass@k over problems given as (n, c) pairs; raises ValueError on an empty list or any k > n."""
    values = per_problem_pass_at_k(counts, k)
    if not values:
        raise ValueError("no problems to average over")
    return sum(values) / len(values)

"""The numpy sampler (``nanochat.engine.sampling``) against plain-Python references.

- Draws: empirical frequencies over many seeded draws against the exact renormalised top-k / top-p distribution,
  computed in plain Python floats, with a chi-square bound; no token outside that distribution's support is drawn.
- Greedy: temperature 0 is the first maximum (ties included), checked by a Python loop.
- Nucleus: the kept set is the smallest prefix of the sorted distribution reaching ``top_p`` (brute force over every
  prefix length), so dropping its last token falls short of ``top_p``.
- Penalties and logprobs: OpenAI's formula and log-softmax written out per token.
- Seeds, dtypes and bad input.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from nanochat.engine.sampling import filter_logits, make_generator, penalize, sample
from nanochat.serve.backend import LOGPROB_FLOOR, token_logprob


def reference(logits: list[float], temperature: float, top_k: int | None, top_p: float | None) -> list[float]:
    """The sampling distribution in plain Python: softmax(l / T), the top-k logits (ties at the k-th kept), then the
    smallest prefix of the sorted distribution reaching top_p, renormalised (logits distinct, finite)."""
    n = len(logits)
    m = max(logits)
    w = [math.exp((x - m) / temperature) for x in logits]
    keep = list(range(n))
    if top_k and top_k < n:
        kth = sorted(logits, reverse=True)[top_k - 1]
        keep = [i for i in range(n) if logits[i] >= kth]
    keep.sort(key=lambda i: -w[i])
    if top_p is not None and top_p < 1.0:
        total = sum(w[i] for i in keep)
        for size in range(1, len(keep) + 1):  # brute force: the first prefix length whose mass reaches top_p
            if sum(w[i] for i in keep[:size]) / total >= top_p:
                keep = keep[:size]
                break
    z = sum(w[i] for i in keep)
    return [w[i] / z if i in keep else 0.0 for i in range(n)]


def random_logits(rng: random.Random, n: int, spread: float = 2.0) -> list[float]:
    """``n`` distinct logits, exactly representable in float32 (so float32 and Python agree on their order)."""
    xs = rng.sample(range(-1024, 1024), n)
    return [x * spread / 1024 for x in xs]  # spread a power of two: 11 significant bits at most


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [(1.0, None, None), (0.7, 5, None), (1.3, None, 0.8), (0.9, 6, 0.7), (2.0, 3, 0.95)],
)
def test_draw_frequencies_match_the_exact_distribution(temperature: float, top_k: int | None, top_p: float) -> None:
    rng = random.Random(0)
    logits = random_logits(rng, 12)
    want = reference(logits, temperature, top_k, top_p)
    g = make_generator(123)
    draws = 20000
    counts = [0] * len(logits)
    x = np.array(logits, dtype=np.float32)
    for _ in range(draws):
        counts[sample(x, temperature, top_k, top_p, g)] += 1
    support = [i for i, p in enumerate(want) if p > 0]
    assert all(counts[i] == 0 for i in range(len(logits)) if want[i] == 0), (counts, want)
    df = len(support) - 1
    chi2 = sum((counts[i] - draws * want[i]) ** 2 / (draws * want[i]) for i in support)
    # mean df, standard deviation sqrt(2 df): 6 standard deviations out is ~1e-6 likely for a correct sampler, while a
    # sampler off by 3% of a 0.1 probability already gives chi2 ~ 20000 * 0.003**2 / 0.1 ~ 18 per token
    assert chi2 <= df + 6 * math.sqrt(2 * max(df, 1)) + 5, (chi2, df, counts, want)


def test_temperature_zero_is_the_first_maximum() -> None:
    rng = random.Random(1)
    for _ in range(200):
        xs = [float(rng.randint(-3, 3)) for _ in range(rng.randint(1, 10))]  # many ties
        first = next(i for i, x in enumerate(xs) if x == max(xs))
        assert sample(np.array(xs, dtype=np.float32), 0.0) == first
        assert sample(np.array(xs, dtype=np.float64), 0.0, 2, 0.1, make_generator(0)) == first


def test_top_p_keeps_the_minimal_prefix() -> None:
    rng = random.Random(2)
    for _ in range(300):
        n = rng.randint(2, 15)
        logits = random_logits(rng, n, spread=rng.choice([0.5, 2.0, 8.0]))
        top_p = rng.uniform(0.01, 0.999)
        temperature = rng.choice([0.5, 1.0, 1.7])
        scaled = filter_logits(np.array(logits, dtype=np.float32), temperature, None, top_p)
        kept = {i for i in range(n) if scaled[i] > -np.inf}
        want = {i for i, p in enumerate(reference(logits, temperature, None, top_p)) if p > 0}
        # the nucleus boundary may differ only where the kept mass equals top_p to rounding
        w = [math.exp((x - max(logits)) / temperature) for x in logits]
        order = sorted(range(n), key=lambda i: -w[i])
        mass = [sum(w[j] for j in order[: k + 1]) / sum(w) for k in range(n)]
        if kept != want:
            assert len(kept ^ want) == 1 and min(abs(c - top_p) for c in mass) < 1e-9
            continue
        # minimal: the kept tokens are the most likely ones, and without the last of them the mass is short of top_p
        assert kept == set(order[: len(kept)])
        assert len(kept) == 1 or mass[len(kept) - 2] < top_p <= mass[len(kept) - 1] + 1e-12


@pytest.mark.parametrize("spread", [0.05, 1.0, 6.0, 40.0])
def test_top_p_on_a_large_vocabulary_equals_the_full_sort(spread: float) -> None:
    """The nucleus search looks at the likeliest few hundred tokens first: on 5000 tokens with many ties (logits on a
    coarse grid), from a peaked to an almost flat distribution (nuclei of one to thousands of tokens), its kept set is
    the prefix of the full sort (probability, then token id) in plain Python."""
    rng = random.Random(int(spread * 100))
    n = 5000
    for _ in range(6):
        logits = [rng.randint(-40, 40) * spread / 32 for _ in range(n)]  # 81 distinct values: ties everywhere
        top_p = rng.choice([1e-9, 0.1, 0.5, 0.9, 0.99, 0.999999])
        scaled = filter_logits(np.array(logits, dtype=np.float32), 1.0, None, top_p)
        kept = [i for i in range(n) if scaled[i] > -np.inf]
        m = max(logits)
        w = [math.exp(x - m) for x in logits]
        order = sorted(range(n), key=lambda i: (-logits[i], i))
        total, cum, want = sum(w), 0.0, []
        for i in order:
            if want and cum >= top_p * total:
                break
            want.append(i)
            cum += w[i]
        if set(kept) != set(want):  # only where the boundary mass equals top_p to rounding
            assert abs(len(kept) - len(want)) == 1 and abs(cum / total - top_p) < 1e-9, (len(kept), len(want))
        assert set(kept) == set(order[: len(kept)])  # always a prefix of the full order


def test_top_p_ending_in_a_tie_group_beyond_the_first_candidates_keeps_the_lowest_ids() -> None:
    """200 tokens at 0 after 5000 tied at -1: the nucleus ends 20 tokens into the tied group, which the first few
    hundred candidates cut through; the kept ones must be that group's 20 lowest ids, as in the full sort."""
    x = np.array([-1.0] * 5000 + [0.0] * 200)
    w_tie = math.exp(-1.0)
    total = 200 + 5000 * w_tie
    top_p = (200 + 19.5 * w_tie) / total  # reached by the 20th tied token
    scaled = filter_logits(x, 1.0, None, top_p)
    assert np.flatnonzero(scaled > -np.inf).tolist() == list(range(20)) + list(range(5000, 5200))


def test_top_k_and_a_tiny_top_p_keep_the_best_token() -> None:
    rng = np.random.default_rng(3)
    g = make_generator(4)
    for _ in range(50):
        x = rng.standard_normal(1000).astype(np.float32) * 4
        best = int(np.argmax(x))
        assert sample(x, 1.0, 1, None, g) == best
        assert sample(x, 1.0, None, 5e-324, g) == best
        assert sample(x, 1e-30, None, None, g) == best


def test_nan_and_inf_logits() -> None:
    g = make_generator(5)
    x = np.array([np.nan, 1.0, np.inf, -np.inf, np.inf], dtype=np.float32)
    assert {sample(x, 1.0, None, None, g) for _ in range(200)} == {2, 4}  # +inf tokens share all the mass
    assert sample(x, 0.0) == 2
    y = np.array([np.nan, -1.0, 3.0, np.nan], dtype=np.float32)
    assert sample(y, 0.0) == 2  # NaN is not a maximum
    assert {sample(y, 1.0, None, None, g) for _ in range(200)} <= {1, 2}
    assert {sample(y, math.inf, None, None, g) for _ in range(400)} == {1, 2}  # uniform over the finite ones
    for row in ([np.nan] * 3, [-np.inf] * 3):
        for t in (0.0, 1.0):
            with pytest.raises(ValueError, match="no finite value"):
                sample(np.array(row), t)


def test_seeds_dtypes_and_input_untouched() -> None:
    x64 = np.array(random_logits(random.Random(6), 50), dtype=np.float64)
    x32 = x64.astype(np.float32)
    assert np.array_equal(x32.astype(np.float64), x64)  # exactly representable
    before = x32.copy()
    a = [sample(x32, 0.8, 10, 0.9, g) for g in [make_generator(9)] for _ in range(30)]
    b = [sample(x64, 0.8, 10, 0.9, g) for g in [make_generator(9)] for _ in range(30)]
    assert a == b and len(set(a)) > 1
    assert np.array_equal(x32, before)
    # seeds are taken modulo 2**64: the server's wrapped signed seeds are the unsigned ones they equal
    assert make_generator(-1).random() == make_generator(2**64 - 1).random()
    assert make_generator(1).random() != make_generator(2).random()


def test_bad_input_is_a_clear_error() -> None:
    with pytest.raises(TypeError, match="numeric"):
        sample(np.array(["a", "b"]), 1.0)
    with pytest.raises(ValueError, match="empty"):
        sample(np.array([], dtype=np.float32), 0.0)
    with pytest.raises(ValueError, match="bias has shape"):
        penalize(np.zeros(4, dtype=np.float32), bias=np.zeros(3, dtype=np.float32))


def test_penalize_is_openais_formula() -> None:
    rng = np.random.default_rng(7)
    x = rng.standard_normal(20).astype(np.float32)
    counts = rng.integers(0, 4, 20).astype(np.float32)
    bias = rng.standard_normal(20).astype(np.float32)
    got = penalize(x, counts, presence=0.5, frequency=0.25, bias=bias)
    for j in range(20):
        want = float(x[j]) + float(bias[j]) - 0.25 * float(counts[j]) - 0.5 * (counts[j] > 0)
        assert got[j] == pytest.approx(want, abs=1e-5)
    assert got.dtype == np.float32 and got is not x
    assert np.array_equal(penalize(x), x)


def test_token_logprob_is_log_softmax() -> None:
    x = np.array([2.0, -1.0, 0.5, -np.inf, 2.0], dtype=np.float32)
    lse = math.log(sum(math.exp(v) for v in x.tolist() if v > -math.inf))
    lp = token_logprob(x, 2, 3)
    assert lp.logprob == pytest.approx(0.5 - lse, abs=1e-6)
    assert [i for i, _ in lp.top] == [0, 4, 2]  # most likely first, ties by token id
    assert lp.top[0][1] == pytest.approx(2.0 - lse, abs=1e-6)
    assert token_logprob(x, 3, 0).logprob == LOGPROB_FLOOR  # probability 0: JSON has no -inf

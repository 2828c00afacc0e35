"""Next-token sampling: greedy, temperature, top-k, top-p (nucleus), seeded; numerically safe for every value.

numpy only, no torch: the Rust engine hands back numpy logits, and importing torch would cost a command-line run
most of its start-up (``nanochat-sample --max-tokens 1`` on a GGUF imports no torch). The torch backend converts its
logits at the boundary (``.float().cpu().numpy()``).

Order of operations (the engine and the tests' KV-cache-free reference loop, ``tests/serve_fakes.py``, both call
:func:`sample`, so both draw the same token from the same logits and generator state): temperature 0 is ``argmax``
(the first maximum); otherwise shift the logits so their maximum is 0, divide by the temperature, keep the ``top_k``
largest (ties at the k-th value are kept), then the smallest prefix of the sorted distribution whose probability
reaches ``top_p`` (the most likely token always stays; ties in that order broken by token id), and draw once by
inverting the cumulative distribution with one uniform number from a ``numpy.random.Generator`` (PCG64).

Numerical safety (one bad request must not be able to raise inside a batched decode step):
- the shift before the division means a tiny temperature gives ``0`` for the best token and ``-inf`` for the others
  (greedy in effect), never ``inf - inf``; a temperature below float32's smallest normal number is greedy outright;
- the most likely token always survives top-k (k >= 1) and top-p, however small ``top_p`` is;
- NaN logits count as ``-inf`` and ``+inf`` logits share all the probability, so the distribution drawn from always
  has mass; a token of probability 0 is never drawn. Only a row with no finite logit at all raises
  (:class:`ValueError`).

Sampling runs on CPU in float64 (float32 or float64 logits in) with one generator per sequence, so a seed gives the
same tokens whichever backend (Rust or torch, CPU or CUDA) produced the logits, and a sequence samples the same
whether it is generated alone or in a batch. Seeded draws differ from the torch sampler this replaced (another
generator): a seed reproduces runs of this version, not of earlier ones.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

# below this, a temperature is treated as 0, i.e. greedy (dividing float32 logits by it would underflow x / 0)
MIN_TEMPERATURE = float(np.finfo(np.float32).tiny)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy (argmax); below MIN_TEMPERATURE also greedy
    top_k: int | None = None  # keep the k most likely tokens (None or 0 = off)
    top_p: float | None = None  # nucleus: smallest set of tokens reaching this probability (None or 1.0 = off)
    seed: int | None = None  # None = a fresh random seed

    def __post_init__(self) -> None:
        if not (self.temperature >= 0.0):
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.top_p is not None and not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return is_greedy(self.temperature)


def is_greedy(temperature: float) -> bool:
    """True when ``temperature`` means argmax: 0, anything below :data:`MIN_TEMPERATURE`, or NaN."""
    return not temperature >= MIN_TEMPERATURE


def new_seed() -> int:
    """A random 62-bit seed (for generations that did not ask for one)."""
    return int.from_bytes(os.urandom(8), "little") >> 2


def make_generator(seed: int | None) -> np.random.Generator:
    """A PCG64 generator seeded with ``seed`` (a fresh random seed if None). Any integer works: it is taken modulo
    2**64, so the signed 64-bit seeds the server derives (``seed + i``, wrapped) are the unsigned ones they equal."""
    s = new_seed() if seed is None else int(seed) % (1 << 64)
    return np.random.Generator(np.random.PCG64(s))


def as_logits(logits: Any) -> np.ndarray:
    """``logits`` as a flat numpy float array (V,): float32 and float64 as they are, other numbers as float32.
    Raises ``TypeError`` for non-numeric data and ``ValueError`` for an empty row."""
    a = np.asarray(logits)
    if a.dtype.kind not in "fiub":
        raise TypeError(f"logits must be a numeric array, got dtype {a.dtype}")
    if a.dtype not in (np.float32, np.float64):
        a = a.astype(np.float32)
    a = a.reshape(-1)
    if a.size == 0:
        raise ValueError("cannot sample: the logits are empty")
    return a


def _clean(logits: np.ndarray) -> np.ndarray:
    """NaN -> ``-inf``; if any logit is ``+inf``, those share the mass (``0``) and all others are ``-inf``."""
    logits = np.where(np.isnan(logits), -np.inf, logits)
    pos = np.isposinf(logits)
    if pos.any():
        logits = np.where(pos, 0.0, -np.inf)
    if not np.isfinite(logits).any():
        raise ValueError("cannot sample: the logits have no finite value (the model produced NaN or -inf only)")
    return logits


def filter_logits(logits: Any, temperature: float, top_k: int | None, top_p: float | None) -> np.ndarray:
    """Temperature-scaled float64 logits (V,), shifted so the best is ``0``, with everything outside top-k / top-p
    set to ``-inf``. The result always has at least one finite entry (the best token); ``temperature`` must be > 0.
    ``softmax`` of it is the distribution :func:`sample` draws from."""
    x = as_logits(logits).astype(np.float64)  # a copy: the caller's row is never modified
    m = float(x.max())
    if not math.isfinite(m):  # NaN or +inf somewhere (max propagates NaN), or every logit -inf
        x = _clean(x)
        m = float(x.max())
    with np.errstate(invalid="ignore", over="ignore"):
        scaled = (x - m) / float(temperature)  # <= 0 everywhere, exactly 0 for the best token(s)
    if math.isinf(temperature):
        scaled[np.isnan(scaled)] = -np.inf  # -inf / inf
    n = scaled.size
    if top_k is not None and 0 < top_k < n:
        kth = np.partition(scaled, n - top_k)[n - top_k]  # the k-th largest
        scaled[scaled < kth] = -np.inf
    if top_p is not None and top_p < 1.0:
        idx = np.flatnonzero(scaled > -np.inf)  # only these can be in the nucleus (few after a top-k)
        keep = idx[_nucleus(scaled[idx], top_p)]
        out = np.full_like(scaled, -np.inf)
        out[keep] = scaled[keep]
        scaled = out
    return scaled


def _nucleus(vals: np.ndarray, top_p: float) -> np.ndarray:
    """Positions in ``vals`` (finite scaled logits, max 0) of the smallest set of most likely tokens (ties by
    position) whose probability reaches ``top_p``; at least the first maximum.

    A full sort of the vocabulary is most of the cost (~3 ms for 32k), and the nucleus is usually a few hundred
    tokens, so the ``m`` most likely are taken with ``argpartition`` (O(V)) and sorted, ``m`` growing until the
    nucleus ends inside them, strictly above the smallest of them (then no token left out, not even one tied with
    the smallest, can precede any kept token: the result is that of the full sort)."""
    w_all = np.exp(vals)
    target = top_p * float(w_all.sum())  # >= top_p: the best token contributes exp(0) = 1
    m = 256
    while True:
        cand = np.arange(vals.size) if m >= vals.size else np.sort(np.argpartition(-vals, m - 1)[:m])
        cand = cand[np.argsort(-vals[cand], kind="stable")]  # most likely first, ties by position
        w = w_all[cand]
        before = np.concatenate(([0.0], np.cumsum(w)[:-1]))  # mass of the tokens before each one, unnormalised
        # a token stays while the tokens before it fall short of top_p; the first always stays (top_p may be tiny)
        n = max(1, int(np.count_nonzero(before < target)))
        if cand.size == vals.size or (n < cand.size and vals[cand[n - 1]] > vals[cand[-1]]):
            return cand[:n]
        m *= 8


def penalize(
    logits: Any,
    counts: np.ndarray | None = None,
    presence: float = 0.0,
    frequency: float = 0.0,
    bias: np.ndarray | None = None,
) -> np.ndarray:
    """OpenAI's logit processors, applied before :func:`sample`: ``l[j] + bias[j] - frequency * c[j] - presence *
    (c[j] > 0)``, with ``c[j]`` how many times token ``j`` was generated so far (``counts``, (V,)). Returns a new
    array of the logits' float dtype (``logits`` is not modified)."""
    out = as_logits(logits).copy()
    for name, arr in (("bias", bias), ("counts", counts)):
        if arr is not None and np.shape(arr) != out.shape:
            raise ValueError(f"penalize: {name} has shape {np.shape(arr)}, the logits {out.shape}")
    if bias is not None:
        out += bias
    if counts is not None and (presence or frequency):
        c = np.asarray(counts)
        out -= frequency * c + presence * (c > 0)
    return out


def sample(
    logits: Any,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: np.random.Generator | None = None,
) -> int:
    """One token id from ``logits`` (V,) (a numpy float array; float32 or float64). ``generator`` None draws from a
    fresh, unseeded one. Raises ``ValueError`` only for a row with no finite logit."""
    x = as_logits(logits)
    if is_greedy(temperature):
        best = int(np.argmax(x))  # the first maximum; argmax treats NaN as the maximum
        v = float(x[best])
        if math.isnan(v):
            best = int(np.argmax(_clean(x)))
        elif v == -math.inf:
            _clean(x)  # raises: nothing finite
        return best
    w = np.exp(filter_logits(x, temperature, top_k, top_p))  # unnormalised probabilities: 1 for the best token
    cdf = np.cumsum(w)
    g = generator if generator is not None else np.random.default_rng()
    u = g.random() * float(cdf[-1])  # in [0, total)
    # the first index whose cumulative mass exceeds u: a token of probability 0 adds nothing, so it is never chosen
    tok = int(np.searchsorted(cdf, u, side="right"))
    if tok >= cdf.size:  # u rounded up to the total
        tok = int(np.flatnonzero(w)[-1])
    return tok

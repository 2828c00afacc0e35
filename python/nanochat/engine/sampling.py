"""Next-token sampling: greedy, temperature, top-k, top-p (nucleus), seeded; numerically safe for every value.

Order of operations (the engine and the tests' KV-cache-free reference loop, ``tests/serve_fakes.py``, both call
:func:`sample`, so both draw the same token from the same logits and generator state): temperature 0 is ``argmax``
(the first maximum); otherwise shift the logits so their maximum is 0, divide by the temperature, keep the ``top_k``
largest (ties at the k-th value are kept), then the smallest prefix of the sorted distribution whose probability
reaches ``top_p`` (the most likely token always stays), and draw once with ``torch.multinomial`` from a CPU
``torch.Generator``.

Numerical safety (one bad request must not be able to raise inside a batched decode step):
- the shift before the division means a tiny temperature gives ``0`` for the best token and ``-inf`` for the others
  (greedy in effect), never ``inf - inf``; a temperature below float32's smallest normal number is greedy outright;
- the most likely token always survives top-k (k >= 1) and top-p, however small ``top_p`` is (``1e-46`` rounds to
  ``0`` in float32, which used to drop every token);
- NaN logits count as ``-inf`` and ``+inf`` logits share all the probability, so the distribution handed to
  ``multinomial`` always sums to at least 1. Only a row with no finite logit at all raises (:class:`ValueError`).

Sampling always runs on CPU in float32 with one generator per sequence, so a seed gives the same tokens whichever
backend (Rust or torch, CPU or CUDA) produced the logits, and a sequence samples the same whether it is generated
alone or in a batch.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from torch import Tensor

# below this, dividing by the temperature underflows float32 (x / 0): treated as 0, i.e. greedy
MIN_TEMPERATURE = float(torch.finfo(torch.float32).tiny)


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


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with ``seed`` (a fresh random seed if None)."""
    g = torch.Generator(device="cpu")
    g.manual_seed(new_seed() if seed is None else int(seed))
    return g


def _clean(logits: Tensor) -> Tensor:
    """NaN -> ``-inf``; if any logit is ``+inf``, those share the mass (``0``) and all others are ``-inf``."""
    logits = torch.nan_to_num(logits, nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    pos = torch.isposinf(logits)
    if bool(pos.any()):
        logits = torch.where(pos, 0.0, float("-inf"))
    if not bool(torch.isfinite(logits).any()):
        raise ValueError("cannot sample: the logits have no finite value (the model produced NaN or -inf only)")
    return logits


def filter_logits(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None) -> Tensor:
    """Temperature-scaled logits (V,), shifted so the best is ``0``, with everything outside top-k / top-p set to
    ``-inf``. The result always has at least one finite entry (the best token); ``temperature`` must be > 0."""
    logits = logits.float()
    m = float(logits.max())
    if not math.isfinite(m):  # NaN or +inf somewhere (max propagates NaN), or every logit -inf
        logits = _clean(logits)
        m = float(logits.max())
    scaled = (logits - m) / float(temperature)  # <= 0 everywhere, exactly 0 for the best token(s)
    if math.isinf(temperature):
        scaled = torch.nan_to_num(scaled, nan=float("-inf"))  # -inf / inf
    if top_k is not None and 0 < top_k < scaled.numel():
        kth = torch.topk(scaled, top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens before it already reach top_p; the first token always stays, even when
        # top_p rounds to 0 in float32
        drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        drop[0] = False
        scaled = scaled.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    return scaled


def penalize(
    logits: Tensor,
    counts: Tensor | None = None,
    presence: float = 0.0,
    frequency: float = 0.0,
    bias: Tensor | None = None,
) -> Tensor:
    """OpenAI's logit processors, applied before :func:`sample`: ``l[j] + bias[j] - frequency * c[j] - presence *
    (c[j] > 0)``, with ``c[j]`` how many times token ``j`` was generated so far (``counts``, (V,)). Returns a new
    float32 tensor on CPU (``logits`` is not modified)."""
    out = logits.detach().reshape(-1).float().cpu().clone()
    if bias is not None:
        out += bias
    if counts is not None and (presence or frequency):
        out -= frequency * counts + presence * (counts > 0).float()
    return out


def sample(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> int:
    """One token id from ``logits`` (V,) (any device; sampled on CPU). Raises ``ValueError`` only for a row with no
    finite logit."""
    logits = logits.detach().reshape(-1).float().cpu()
    if is_greedy(temperature):
        best = int(torch.argmax(logits))
        if math.isnan(float(logits[best])):  # argmax treats NaN as the maximum
            best = int(torch.argmax(_clean(logits)))
        elif math.isinf(float(logits[best])) and float(logits[best]) < 0:
            _clean(logits)  # raises: nothing finite
        return best
    probs = torch.softmax(filter_logits(logits, temperature, top_k, top_p), dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))

"""Next-token sampling: greedy, temperature, top-k, top-p (nucleus), seeded.

Order of operations (the same as the server's reference loop, ``nanochat.serve.backend.sample_token``, so both
draw the same token from the same logits and generator state): temperature 0 is ``argmax`` (the first maximum);
otherwise divide by the temperature, keep the ``top_k`` largest logits (ties at the k-th value are kept), then the
smallest prefix of the sorted distribution whose probability reaches ``top_p`` (the most likely token always
stays), and draw once with ``torch.multinomial`` from a CPU ``torch.Generator``.

Sampling always runs on CPU in float32 with one generator per sequence, so a seed gives the same tokens whichever
backend (Rust or torch, CPU or CUDA) produced the logits, and a sequence samples the same whether it is generated
alone or in a batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy (argmax)
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
        return self.temperature == 0.0


def new_seed() -> int:
    """A random 62-bit seed (for generations that did not ask for one)."""
    return int.from_bytes(os.urandom(8), "little") >> 2


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with ``seed`` (a fresh random seed if None)."""
    g = torch.Generator(device="cpu")
    g.manual_seed(new_seed() if seed is None else int(seed))
    return g


def filter_logits(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None) -> Tensor:
    """Temperature-scaled logits (V,) with everything outside top-k / top-p set to ``-inf``."""
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens before it already reach top_p (the first token always stays)
        drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def sample(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> int:
    """One token id from ``logits`` (V,) (any device; sampled on CPU)."""
    logits = logits.detach().reshape(-1).float().cpu()
    if temperature <= 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(filter_logits(logits, temperature, top_k, top_p), dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))

"""mHC residual-stream ops: Sinkhorn-Knopp projection, permutation basis, BvN decomposition.

Placeholder torch implementations; the Rust-backed CPU custom ops replace them (see issue 3).
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor


def sinkhorn_reference(logits: Tensor, iters: int = 20) -> Tensor:
    """Log-domain Sinkhorn-Knopp: ``exp(logits)`` projected towards doubly stochastic, batched over
    leading dims; alternately normalises rows then columns ``iters`` times. Differentiable."""
    log_p = logits
    for _ in range(iters):
        log_p = log_p - torch.logsumexp(log_p, dim=-1, keepdim=True)
        log_p = log_p - torch.logsumexp(log_p, dim=-2, keepdim=True)
    return log_p.exp()


def sinkhorn(logits: Tensor, iters: int = 20) -> Tensor:
    """Doubly-stochastic projection of ``exp(logits)`` (``(..., n, n)``)."""
    return sinkhorn_reference(logits, iters)


def permutation_basis(n: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    """All ``n!`` permutation matrices ``(n!, n, n)`` in lexicographic order; index 0 is the identity."""
    perms = list(itertools.permutations(range(n)))
    idx = torch.tensor(perms, dtype=torch.long)
    eye = torch.eye(n, dtype=dtype)
    return eye[idx].to(device)  # P_k[i, j] = 1 iff j == perm_k[i]

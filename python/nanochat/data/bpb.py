"""Bits per byte: a tokenizer-independent loss, so models with different vocabularies compare.

``bpb = sum of target losses in nats / (ln 2 · UTF-8 bytes of those targets)``. A target's byte count comes
from :meth:`nanochat.data.tokenizer.Tokenizer.token_bytes` (exact for byte-level BPE). Special tokens
decode to no bytes: following nanochat, their positions are left out of both sums (:func:`bpb_sums`), since
predicting ``<|bos|>`` is not predicting text.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def bits_per_byte(sum_nats: float, num_bytes: int) -> float:
    """Bits per byte of ``num_bytes`` bytes whose tokens cost ``sum_nats`` nats of cross-entropy in total."""
    if num_bytes <= 0:
        raise ValueError(f"num_bytes must be positive, got {num_bytes}")
    return float(sum_nats) / (math.log(2.0) * num_bytes)


def target_bytes(targets: torch.Tensor, token_bytes: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Bytes per target position: ``token_bytes[targets]``, same shape as ``targets``."""
    table = torch.as_tensor(token_bytes, device=targets.device)
    return table[targets]


def bpb_sums(losses: torch.Tensor, targets: torch.Tensor, token_bytes: torch.Tensor | np.ndarray) -> tuple[float, int]:
    """``(sum of nats, sum of bytes)`` over the positions whose target decodes to at least one byte.

    ``losses`` are per-position cross-entropies in nats (``reduction="none"``), shaped like ``targets``.
    Accumulate the pairs over batches (and ranks), then call :func:`bits_per_byte`.
    """
    nbytes = target_bytes(targets, token_bytes)
    mask = nbytes > 0
    return float(losses.double()[mask].sum().item()), int(nbytes[mask].sum().item())

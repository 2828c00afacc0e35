"""KV-cache generation with the torch model: the CUDA path, the ``quant="fp"`` path, and the reference the Rust
engine is tested against.

There is no second forward here: a :class:`TorchSession` is the model's own :class:`~nanochat.model.gpt.KVCache`
(one sequence), and :meth:`TorchEngine.forward` calls ``GPT.hidden(idx, kv_cache=session)`` then the LM head, on
the last position only unless every position's logits are asked for (a prompt's other positions would be a wasted
``T × V`` matmul). Masking of several new tokens after a non-empty cache lives with the model
(``nanochat.model.gpt.cached_attn_mask``).

Batches (``decode_batch``) run the sessions one after another: sequences differ in length, and this path serves
correctness and the GPU rather than CPU throughput (the Rust engine batches for real).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from nanochat.model import GPT
from nanochat.model.gpt import KVCache


class TorchSession(KVCache):
    """One sequence's KV cache (batch 1) for :class:`TorchEngine`; ``position`` is the number of tokens fed."""

    def __init__(self, model: GPT, max_seq: int) -> None:
        super().__init__(model.config.n_layer, max_seq)

    @property
    def position(self) -> int:
        return self.pos


class TorchEngine:
    """Cached step-by-step forward of a torch ``GPT`` (any device, any ``quant``), through the model's own forward."""

    def __init__(self, model: GPT) -> None:
        self.model = model.eval()
        self.config = model.config

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def new_session(self, max_seq: int = 0) -> TorchSession:
        return TorchSession(self.model, max_seq or self.config.seq_len)

    @torch.inference_mode()
    def forward(self, session: TorchSession, ids: Sequence[int], all_logits: bool = False) -> Tensor:
        """Feed ``ids``; float32 logits ``(V,)`` of the last position, or ``(T, V)`` of all new positions."""
        ids = [int(t) for t in ids]
        if not ids:
            raise ValueError("no tokens given")
        V = self.config.vocab_size
        bad = [t for t in ids if not 0 <= t < V]
        if bad:
            raise ValueError(f"token id {bad[0]} is out of range for vocab_size {V}")
        idx = torch.tensor([ids], dtype=torch.long, device=self.device)  # (1, T)
        h = self.model.hidden(idx, kv_cache=session)  # (1, T, C); the session advances by T
        logits = self.model.head(h if all_logits else h[:, -1:])[0]  # (T or 1, V) float32
        return logits if all_logits else logits[-1]

    def prefill(self, session: TorchSession, ids: Sequence[int]) -> Tensor:
        return self.forward(session, ids)

    def decode(self, session: TorchSession, token: int) -> Tensor:
        return self.forward(session, [token])

    def decode_batch(self, sessions: Sequence[TorchSession], tokens: Sequence[int]) -> Tensor:
        """One token per session; ``(B, V)`` float32 (sessions run one after another)."""
        if len(sessions) != len(tokens):
            raise ValueError(f"decode_batch: {len(sessions)} sessions but {len(tokens)} tokens")
        return torch.stack([self.forward(s, [t]) for s, t in zip(sessions, tokens, strict=True)])

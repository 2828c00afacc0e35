"""KV-cache generation with the torch model: the CUDA path, the ``quant="fp"`` path, and the reference the Rust
engine is tested against.

The model (``nanochat.model.gpt``) has no cache hook, but ``Attention.qkv`` returns exactly what a cache stores
(projected, QK-normed and rotated q/k/v for positions ``offset .. offset+T``) and ``GPT.rope`` takes an offset, so
:meth:`TorchEngine.forward` replays ``GPT.hidden`` block by block with an attention closure that appends to the
cache and attends over it, and hands the same closure to the mHC residuals (``StreamResidual.forward(x, f)``).
Everything else is the model's own modules, so the math is the model's by construction; the tests hold the
cached forward equal to the full forward.

Masking: a new token at absolute position ``p`` sees cache positions ``0..p``. One new token needs no mask; a
prompt into an empty cache is SDPA's ``is_causal``; several tokens after a non-empty cache get an explicit
(bottom-right aligned) boolean mask, since SDPA's ``is_causal`` aligns the mask top-left when the query is shorter
than the keys.

Batches (``decode_batch``) run the sessions one after another: sequences differ in length, and this path serves
correctness and the GPU rather than CPU throughput (the Rust engine batches for real).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from nanochat.model import GPT

CACHE_CHUNK = 256  # positions added when a session's cache grows


class TorchSession:
    """One sequence's KV cache: per layer ``(1, n_kv_head, capacity, head_dim)`` keys and values."""

    def __init__(self, model: GPT, max_seq: int) -> None:
        cfg = model.config
        p = next(model.parameters())
        self.max_seq = max_seq
        self.position = 0
        self._shape = (1, cfg.n_kv_head, 0, cfg.head_dim)
        self._device, self._dtype = p.device, p.dtype
        self.k: list[Tensor] = [self._empty(0) for _ in range(cfg.n_layer)]
        self.v: list[Tensor] = [self._empty(0) for _ in range(cfg.n_layer)]

    def _empty(self, cap: int) -> Tensor:
        b, h, _, d = self._shape
        return torch.zeros(b, h, cap, d, device=self._device, dtype=self._dtype)

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    def reserve(self, n: int) -> None:
        need = self.position + n
        if need > self.max_seq:
            raise ValueError(
                f"context overflow: the session holds {self.position} tokens and {n} more would exceed "
                f"max_seq = {self.max_seq}"
            )
        if need > self.capacity:
            cap = min(-(-need // CACHE_CHUNK) * CACHE_CHUNK, self.max_seq)
            for buf in (self.k, self.v):
                for i, t in enumerate(buf):
                    nb = self._empty(cap)
                    nb[:, :, : self.position] = t[:, :, : self.position]
                    buf[i] = nb

    def reset(self) -> None:
        self.position = 0

    def truncate(self, position: int) -> None:
        if position > self.position:
            raise ValueError(f"cannot truncate a session at position {self.position} to {position}")
        self.position = position


class TorchEngine:
    """Cached step-by-step forward of a torch ``GPT`` (any device, any ``quant``)."""

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
        session.reserve(len(ids))
        m, cfg = self.model, self.config
        T, pos = len(ids), session.position
        idx = torch.tensor([ids], dtype=torch.long, device=self.device)  # (1, T)
        cos, sin = m.rope(T, idx.device, offset=pos)  # (T, hd/2)
        x = m.wte(idx)  # (1, T, C)
        if cfg.residual != "standard":
            x = x.unsqueeze(-2).expand(1, T, cfg.streams, x.shape[-1])  # (1, T, n, C)
        mask = None
        if T > 1 and pos > 0:  # bottom-right causal: query t sees keys 0 .. pos + t
            q_pos = torch.arange(pos, pos + T, device=idx.device)[:, None]
            mask = torch.arange(pos + T, device=idx.device)[None, :] <= q_pos  # (T, pos+T)
        for li, block in enumerate(m.blocks):
            attn = block.attn

            def attn_fn(u: Tensor, li: int = li, block=block, attn=attn) -> Tensor:  # (1, T, C) -> (1, T, C)
                q, k, v = attn.qkv(block.attn_norm(u), cos, sin)  # (1, H, T, hd), (1, Hkv, T, hd) x2
                session.k[li][:, :, pos : pos + T] = k
                session.v[li][:, :, pos : pos + T] = v
                K = session.k[li][:, :, : pos + T]
                Vv = session.v[li][:, :, : pos + T]
                y = F.scaled_dot_product_attention(
                    q, K, Vv, attn_mask=mask, is_causal=(T > 1 and pos == 0), enable_gqa=attn.n_kv_head != attn.n_head
                )  # (1, H, T, hd)
                y = y.transpose(1, 2).reshape(1, T, attn.n_head * attn.head_dim)  # (1, T, C)
                return attn.o_proj(attn.sub_norm(y))

            def mlp_fn(u: Tensor, block=block) -> Tensor:
                return block.mlp(block.mlp_norm(u))

            if block.mhc_attn is None or block.mhc_mlp is None:
                x = x + attn_fn(x)
                x = x + mlp_fn(x)
            else:
                x = block.mhc_attn(x, attn_fn)
                x = block.mhc_mlp(x, mlp_fn)
        if cfg.residual != "standard":
            x = x.mean(dim=-2)  # (1, T, C)
        if not all_logits:
            x = x[:, -1:]
        logits = m.head(m.norm(x))[0]  # (T or 1, V) float32
        session.position = pos + T
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

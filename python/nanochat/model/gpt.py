"""The GPT decoder: a small ternary (BitNet b1.58) transformer with optional mHC residual streams.

Read top to bottom: norms and RoPE, the KV cache, attention, MLP, the block, the model, its init and diagnostics.

Notable choices:
- Token embedding and LM head in full precision, the head tied to the embedding by default (llama.cpp's `bitnet`
  graph has no separate output tensor). Every other matrix is a :class:`BitLinear` (ternary weights, int8
  activations, straight-through estimator); ``quant="fp"`` builds the same model in full precision.
- Pre-norm blocks with RMSNorm (learned weight, no bias), plus BitNet's sub-norms: ``attn.sub_norm`` before the
  attention output projection and ``mlp.sub_norm`` before the MLP down projection (BitNet b1.58 2B4T; llama.cpp
  `attn_sub_norm`, `ffn_sub_norm`). They keep the int8 activation quantizer's input well scaled.
- RoPE rotates the pairs ``(i, i + hd/2)`` (GPT-NeoX convention, what llama.cpp runs for `bitnet`); cos/sin for
  positions ``offset .. offset+T`` (the offset being the :class:`KVCache`'s position) are slices of a table kept as
  a plain attribute, not a buffer (a buffer would be left uninitialised by ``to_empty`` + ``load_state_dict``): it
  is rebuilt in eager mode whenever the device differs or more positions are needed (:meth:`GPT.rope`).
- One forward, with an optional KV cache (karpathy/nanochat's ``forward(idx, targets=None, kv_cache=None)``):
  without a cache it is the training forward, unchanged; with one, each attention layer appends its new keys and
  values to the cache and attends over all cached positions, so a decode step costs O(T) instead of a full O(T²)
  forward. Generation (``nanochat.engine.TorchEngine``) runs this same forward; the Rust engine is its fast twin.
- Causality. Every operation other than attention is per position (norms, per-token int8 activation quantization,
  mHC mappings), and attention is causal, so the logits at position t depend on tokens 0..t only: exactly so in
  float64 (tested). In float32 a row's result also depends on how many rows one call holds, at rounding level (MKL's
  sgemm gave other sums for calls of fewer than 16 rows here, and SDPA's blocking follows the sequence length:
  ~1e-6 relative), and the int8 quantizer turns such an ulp into a whole code step when a value sits at a rounding
  boundary (a "flip": 0.5-1e-2 relative on the logits, what issue 15 saw between 8 and 36 tokens). Not a leak: the
  logits of a prefix with or without later tokens differ only through such flips (tested), and not at all in
  float64. The Rust kernels' own rows do not depend on the row count (exact integer sums).
- Optional QK-norm (RMSNorm over each head of q and k, before RoPE; Dehghani et al. 2023) and grouped KV heads
  (GQA; Ainslie et al. 2023); causal ``F.scaled_dot_product_attention``.
- MLP: SwiGLU ``down(sub_norm(silu(gate(x)) * up(x)))`` by default, or ReLU² ``down(sub_norm(relu(up(x))²))``
  (So et al. 2021; BitNet b1.58 2B4T).
- Residual: ``standard`` (``x + F(norm(x))``) or mHC streams (``mhc_lite``/``mhc``, see :mod:`.mhc`): the embedding
  is copied into ``n`` streams and their mean goes to the final norm.
- Init (all in :meth:`GPT.init_weights`): embedding (and an untied head) N(0, init_std); q/k/v/gate/up
  N(0, 1/fan_in) (their inputs are RMS-normalised, so outputs start at unit scale; absmean quantization is
  scale-invariant anyway); the projections back into the residual (``o_proj``, ``down_proj``) start at zero so every
  block starts as the identity (as in modded-nanogpt / nanochat); the STE still gives them gradients. Norm weights
  start at 1; the mHC connections at their static biases (see :mod:`.mhc`, ``StreamResidual.reset_parameters``).
- Builds on the meta device (``with torch.device("meta"): GPT(cfg)``) for parameter counts without memory; after
  ``model.to_empty(device=...)`` call :meth:`GPT.init_weights` (or load a state dict).
"""

from __future__ import annotations

import copy
import math
from typing import Any, Literal, cast, overload

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nanochat import ops
from nanochat.model.bitlinear import BitLinear
from nanochat.model.config import GPTConfig
from nanochat.model.mhc import StreamResidual

# ----------------------------------------------------------------------------- norms and RoPE


class RMSNorm(nn.Module):
    """``x / rms(x) · weight`` over the last dim; learned weight, no bias."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


def rope_cos_sin(
    seq_len: int, head_dim: int, theta: float, device: torch.device, offset: int = 0
) -> tuple[Tensor, Tensor]:
    """cos/sin ``(T, hd/2)`` (float32) for positions ``offset .. offset+T``; frequency ``theta^(-2i/hd)``."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)  # (hd/2,)
    pos = torch.arange(offset, offset + seq_len, dtype=torch.float32, device=device)  # (T,)
    angles = torch.outer(pos, inv_freq)  # (T, hd/2)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs ``(i, i + hd/2)`` (NEOX) of ``x`` (B, T, H, hd) by the angles in ``cos``/``sin`` (T, hd/2)."""
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]  # (B, T, H, hd/2) each
    c = cos[:, None, :].to(x.dtype)  # (T, 1, hd/2)
    s = sin[:, None, :].to(x.dtype)
    return torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)  # (B, T, H, hd)


# ----------------------------------------------------------------------------- KV cache

KV_CACHE_CHUNK = 256  # positions added when a cache grows


class KVCache:
    """Keys and values of every layer for the positions seen so far (karpathy/nanochat's ``KVCache``).

    Per layer ``(B, n_kv_head, capacity, head_dim)`` buffers, allocated at the first insert in the keys' dtype and
    device and grown by :data:`KV_CACHE_CHUNK` positions up to ``max_seq`` (a short chat never pays for a long context).
    ``pos`` counts the positions written; :meth:`GPT.forward` checks the room first (an overflow changes nothing) and
    advances ``pos`` after the last layer. ``truncate`` rewinds (positions past ``pos`` are simply overwritten).
    """

    def __init__(self, n_layer: int, max_seq: int) -> None:
        if n_layer < 1 or max_seq < 1:
            raise ValueError(f"KVCache needs n_layer >= 1 and max_seq >= 1, got {n_layer} and {max_seq}")
        self.max_seq = max_seq
        self.pos = 0
        self.k: list[Tensor | None] = [None] * n_layer  # (B, Hkv, capacity, hd) each
        self.v: list[Tensor | None] = [None] * n_layer

    @property
    def capacity(self) -> int:
        k0 = self.k[0]
        return 0 if k0 is None else k0.shape[2]

    def check_room(self, n: int) -> None:
        """Raise before any work if ``n`` more positions do not fit in ``max_seq``."""
        if self.pos + n > self.max_seq:
            raise ValueError(
                f"context overflow: the session holds {self.pos} tokens and {n} more would exceed "
                f"max_seq = {self.max_seq}"
            )

    def insert(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write ``k, v`` (B, Hkv, T, hd) at positions ``pos .. pos+T`` of ``layer``; return that layer's keys and
        values for positions ``0 .. pos+T``."""
        B, H, T, D = k.shape
        end = self.pos + T
        self.check_room(T)
        buf_k, buf_v = self.k[layer], self.v[layer]
        if buf_k is not None and (buf_k.shape[0], buf_k.shape[1], buf_k.shape[3]) != (B, H, D):
            held = (buf_k.shape[0], buf_k.shape[1], buf_k.shape[3])
            raise ValueError(f"the KVCache holds (B, Hkv, hd) = {held}, got keys of shape {tuple(k.shape)}")
        if buf_k is None or buf_v is None or buf_k.shape[2] < end:
            cap = min(-(-end // KV_CACHE_CHUNK) * KV_CACHE_CHUNK, self.max_seq)
            new_k, new_v = k.new_zeros(B, H, cap, D), v.new_zeros(B, H, cap, D)
            if buf_k is not None and buf_v is not None:
                new_k[:, :, : self.pos] = buf_k[:, :, : self.pos]
                new_v[:, :, : self.pos] = buf_v[:, :, : self.pos]
            self.k[layer], self.v[layer] = buf_k, buf_v = new_k, new_v
        buf_k[:, :, self.pos : end] = k
        buf_v[:, :, self.pos : end] = v
        return buf_k[:, :, :end], buf_v[:, :, :end]

    def advance(self, n: int) -> None:
        self.pos += n

    def reset(self) -> None:
        self.pos = 0

    def fork(self) -> KVCache:
        """An independent cache with a copy of the positions written so far (a prompt prefilled once, then sampled
        several ways)."""
        twin = copy.copy(self)  # same class and settings (a TorchSession stays one)
        twin.k = [None if t is None else t.clone() for t in self.k]
        twin.v = [None if t is None else t.clone() for t in self.v]
        return twin

    def truncate(self, position: int) -> None:
        """Forget positions from ``position`` on (e.g. to reuse a shared prompt)."""
        if not 0 <= position <= self.pos:
            raise ValueError(f"cannot truncate a cache at position {self.pos} to {position}")
        self.pos = position


def cached_attn_mask(pos: int, T: int, device: torch.device) -> Tensor | None:
    """Mask for ``T`` queries at positions ``pos .. pos+T`` over keys ``0 .. pos+T``, or None where SDPA needs none.

    One query (decode) sees every cached key; a prompt into an empty cache is SDPA's ``is_causal``; several queries
    after a non-empty cache need this explicit bottom-right-aligned mask, because SDPA's ``is_causal`` aligns the
    triangle top-left when the query is shorter than the keys."""
    if T == 1 or pos == 0:
        return None
    q_pos = torch.arange(pos, pos + T, device=device)[:, None]  # (T, 1)
    return torch.arange(pos + T, device=device)[None, :] <= q_pos  # (T, pos+T) bool, True = attend


# ----------------------------------------------------------------------------- attention


class Attention(nn.Module):
    """Causal self-attention with GQA, optional QK-norm, NEOX RoPE and BitNet's sub-norm before ``o_proj``."""

    def __init__(self, cfg: GPTConfig, layer: int = 0) -> None:
        super().__init__()
        self.layer = layer  # which KVCache slot this layer writes
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        C, kv = cfg.n_embd, cfg.n_kv_head * cfg.head_dim
        self.q_proj = BitLinear(C, C, cfg.quant)
        self.k_proj = BitLinear(C, kv, cfg.quant)
        self.v_proj = BitLinear(C, kv, cfg.quant)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.sub_norm = RMSNorm(C, cfg.norm_eps)
        self.o_proj = BitLinear(C, C, cfg.quant)

    def qkv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Projected, normed and rotated ``q (B,H,T,hd)``, ``k, v (B,Hkv,T,hd)``: what a KV cache stores/extends."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)  # (B, T, H, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)  # (B, T, Hkv, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim)  # (B, T, Hkv, hd)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, is_causal: bool = True, attn_mask: Tensor | None = None
    ) -> Tensor:
        """SDPA over heads then sub-norm and output projection: ``q (B,H,T,hd)``, ``k, v (B,Hkv,S,hd) -> (B,T,C)``."""
        B, _, T, _ = q.shape
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=self.n_kv_head != self.n_head
        )  # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, C)
        return self.o_proj(self.sub_norm(y))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv_cache: KVCache | None = None) -> Tensor:
        # (B, T, C) -> (B, T, C); cos/sin are for positions kv_cache.pos .. +T when a cache is given
        q, k, v = self.qkv(x, cos, sin)
        if kv_cache is None:
            return self.attend(q, k, v)
        T, pos = q.shape[2], kv_cache.pos
        k, v = kv_cache.insert(self.layer, k, v)  # (B, Hkv, pos+T, hd): the cached positions and these
        mask = cached_attn_mask(pos, T, q.device)
        return self.attend(q, k, v, is_causal=T > 1 and pos == 0, attn_mask=mask)


# ----------------------------------------------------------------------------- MLP


class MLP(nn.Module):
    """SwiGLU (gate/up/down) or ReLU² (up/down), with BitNet's sub-norm before ``down_proj``."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.kind = cfg.mlp
        C, H = cfg.n_embd, cfg.mlp_hidden
        self.gate_proj = BitLinear(C, H, cfg.quant) if cfg.mlp == "swiglu" else None
        self.up_proj = BitLinear(C, H, cfg.quant)
        self.sub_norm = RMSNorm(H, cfg.norm_eps)
        self.down_proj = BitLinear(H, C, cfg.quant)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, C) -> (B, T, C)
        if self.gate_proj is not None:
            h = F.silu(self.gate_proj(x)) * self.up_proj(x)  # (B, T, H)
        else:
            h = F.relu(self.up_proj(x)).square()  # (B, T, H)
        return self.down_proj(self.sub_norm(h))


# ----------------------------------------------------------------------------- block


class Block(nn.Module):
    """Pre-norm attention and MLP sublayers, each wrapped by a standard or an mHC residual connection."""

    def __init__(self, cfg: GPTConfig, layer: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.mhc_attn: StreamResidual | None = None
        self.mhc_mlp: StreamResidual | None = None
        if cfg.residual != "standard":
            n, it, eps = cfg.n_streams, cfg.sinkhorn_iters, cfg.norm_eps
            # sublayer index 2·layer (+1): its "home" stream for symmetry breaking, as HC's `layer_id % n`
            self.mhc_attn = StreamResidual(cfg.n_embd, n, cfg.residual, (2 * layer) % n, it, eps)
            self.mhc_mlp = StreamResidual(cfg.n_embd, n, cfg.residual, (2 * layer + 1) % n, it, eps)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        record: list[Tensor] | None = None,
        kv_cache: KVCache | None = None,
    ) -> Tensor:
        # x: (B, T, C) for "standard", (B, T, n, C) streams otherwise
        if self.mhc_attn is None or self.mhc_mlp is None:
            x = x + self.attn(self.attn_norm(x), cos, sin, kv_cache)
            return x + self.mlp(self.mlp_norm(x))
        x = self.mhc_attn(x, lambda u: self.attn(self.attn_norm(u), cos, sin, kv_cache), record)
        return self.mhc_mlp(x, lambda u: self.mlp(self.mlp_norm(u)), record)

    def residuals(self) -> list[tuple[str, StreamResidual]]:
        return [(k, m) for k, m in (("mhc_attn", self.mhc_attn), ("mhc_mlp", self.mhc_mlp)) if m is not None]


# ----------------------------------------------------------------------------- loss


class _CrossEntropy(torch.autograd.Function):
    """Mean cross-entropy, computed in float32 from logits of any float dtype; targets ``-1`` are ignored.

    The value is ``F.cross_entropy(logits.float(), targets, ignore_index=-1)``. The backward is one elementwise pass,
    ``softmax·g/n`` less ``g/n`` scattered at the targets, from the saved logits (in their own dtype) and the row
    log-sum-exp: autograd's log-softmax saves a float32 (N, V) copy and its NLL backward scatters into a zeroed
    (N, V) tensor, two extra full passes over the largest tensor of a small-model step (a 16k vocabulary: 128 MiB at
    2,048 tokens)."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, targets: Tensor) -> Tensor:
        lf = logits.float()
        lse = torch.logsumexp(lf, dim=-1)  # (N,)
        valid = targets >= 0
        t = targets.clamp(min=0)
        picked = lf.gather(-1, t.unsqueeze(-1)).squeeze(-1)  # (N,)
        n = valid.sum()
        ctx.save_for_backward(logits, lse, t, valid, n)
        return ((lse - picked) * valid).sum() / n  # 0/0 = nan when every target is ignored, as F.cross_entropy

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:
        logits, lse, t, valid, n = ctx.saved_tensors
        scale = (valid.to(torch.float32) * (g / n)).unsqueeze(-1)  # (N, 1)
        grad = torch.exp(logits.float() - lse.unsqueeze(-1)) * scale  # softmax·g/n (N, V)
        # the one-hot term as a scatter of N values, not a compare against an (N, V) iota: a d20 step 3% faster
        grad = grad.scatter_add(-1, t.unsqueeze(-1), -scale)
        return grad.to(logits.dtype), None


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy of ``logits (N, V)`` against ``targets (N,)`` (``-1`` ignored), in float32.

    Under torch.compile it is :class:`_CrossEntropy`, whose backward inductor turns into one kernel; in eager mode
    torch's own fused log-softmax kernels are faster than that Function's separate elementwise ops."""
    if torch.compiler.is_compiling():
        return cast(Tensor, _CrossEntropy.apply(logits, targets))
    return F.cross_entropy(logits.float(), targets, ignore_index=-1)


# ----------------------------------------------------------------------------- model


class GPT(nn.Module):
    """Decoder-only LM: ``forward(idx (B,T)) -> logits (B,T,V)``, or the mean cross-entropy given targets; with a
    :class:`KVCache` (:meth:`new_kv_cache`), ``idx`` continues the cached sequence."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self._rope_table: tuple[Tensor, Tensor] | None = None  # (cos, sin) of positions 0..n, see `rope`
        self.rope(config.seq_len, self.wte.weight.device)
        self.init_weights()

    # ------------------------------------------------------------------ init

    @torch.no_grad()
    def init_weights(self) -> None:
        """All weight initialisation (see the module docstring); also what to call after ``to_empty``."""
        cfg = self.config
        nn.init.normal_(self.wte.weight, mean=0.0, std=cfg.init_std)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, mean=0.0, std=cfg.init_std)
        for name, m in self.named_modules():
            if isinstance(m, BitLinear):
                if name.endswith(("o_proj", "down_proj")):
                    nn.init.zeros_(m.weight)  # block starts as the identity
                else:
                    nn.init.normal_(m.weight, mean=0.0, std=1.0 / math.sqrt(m.in_features))
            elif isinstance(m, (RMSNorm, StreamResidual)):
                m.reset_parameters()

    # ------------------------------------------------------------------ forward

    def rope(self, seq_len: int, device: torch.device, offset: int = 0) -> tuple[Tensor, Tensor]:
        """cos/sin ``(T, hd/2)`` for positions ``offset .. offset+T``: slices of a table of the first positions
        (at least ``seq_len``), built per device in eager mode (and at construction) and never under torch.compile.
        Computed inside a compiled graph, inductor folds the trig into the fused RoPE kernels and recomputes it for
        every element of q and k, forward and backward: ~5% of a compiled d20 step on the CPU. The values are the
        same either way (each entry is ``cos(pos·freq)`` of its own position). While compiling without a table for
        ``device`` they are computed in the graph, as before."""
        end = offset + seq_len
        table = self._rope_table
        if table is None or table[0].device != device or table[0].shape[0] < end:
            cfg = self.config
            if torch.compiler.is_compiling() or device.type == "meta":
                return rope_cos_sin(seq_len, cfg.head_dim, cfg.rope_theta, device, offset)
            n = max(cfg.seq_len, -(-end // KV_CACHE_CHUNK) * KV_CACHE_CHUNK)
            table = self._rope_table = rope_cos_sin(n, cfg.head_dim, cfg.rope_theta, device)
        return table[0][offset:end], table[1][offset:end]

    def new_kv_cache(self, max_seq: int | None = None) -> KVCache:
        """An empty cache for up to ``max_seq`` positions (default: the config's ``seq_len``)."""
        return KVCache(self.config.n_layer, max_seq or self.config.seq_len)

    def hidden(self, idx: Tensor, record: list[Tensor] | None = None, kv_cache: KVCache | None = None) -> Tensor:
        """Final-normed hidden states ``(B, T, C)`` for tokens ``idx`` (B, T), at positions ``kv_cache.pos ..`` given
        a cache (which then holds them too)."""
        B, T = idx.shape
        pos = 0
        if kv_cache is not None:
            kv_cache.check_room(T)  # before any layer writes
            pos = kv_cache.pos
        cos, sin = self.rope(T, idx.device, offset=pos)  # (T, hd/2) each
        x = self.wte(idx)  # (B, T, C)
        n = self.config.streams
        if self.config.residual != "standard":
            x = x.unsqueeze(-2).expand(B, T, n, x.shape[-1])  # (B, T, n, C): n copies of the embedding
        for block in self.blocks:
            x = block(x, cos, sin, record, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(T)
        if self.config.residual != "standard":
            x = x.mean(dim=-2)  # (B, T, C)
        return self.norm(x)

    def head(self, h: Tensor, float32: bool = True) -> Tensor:
        """Logits ``(B, T, V)`` of hidden states ``(B, T, C)``: float32, or the matmul's own dtype (bf16 under
        autocast) for the loss, which upcasts inside its fused kernels."""
        w = self.wte.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(h, w.to(h.dtype))
        return logits.float() if float32 else logits

    @overload
    def forward(
        self, idx: Tensor, targets: None = None, kv_cache: KVCache | None = None, *, return_logits: bool = False
    ) -> Tensor: ...
    @overload
    def forward(
        self, idx: Tensor, targets: Tensor, kv_cache: KVCache | None = None, *, return_logits: Literal[False] = False
    ) -> Tensor: ...
    @overload
    def forward(
        self, idx: Tensor, targets: Tensor, kv_cache: KVCache | None = None, *, return_logits: Literal[True]
    ) -> tuple[Tensor, Tensor]: ...

    def forward(
        self,
        idx: Tensor,
        targets: Tensor | None = None,
        kv_cache: KVCache | None = None,
        *,
        return_logits: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Logits ``(B, T, V)`` (float32); with ``targets`` (B, T) the mean cross-entropy (``-1`` ignored), or
        ``(logits, loss)`` when ``return_logits`` is set. With ``kv_cache``, ``idx`` continues the cached sequence
        (positions ``kv_cache.pos ..``) and the cache advances by T."""
        h = self.hidden(idx, kv_cache=kv_cache)
        if targets is None:
            return self.head(h)  # (B, T, V)
        logits = self.head(h, float32=False)  # (B, T, V) in the matmul dtype (bf16 under autocast)
        loss = cross_entropy(logits.flatten(0, 1), targets.flatten())
        return (logits.float(), loss) if return_logits else loss

    # ------------------------------------------------------------------ accounting

    def param_counts(self) -> dict[str, int]:
        """``total`` (tied head counted once), ``embedding`` (wte), ``non_embedding`` (the rest, an untied head
        included), and the ``bitlinear`` (ternary matrices) and ``mhc`` subsets. Works on the meta device."""
        total = sum(p.numel() for p in self.parameters())
        emb = self.wte.weight.numel()
        bit = sum(m.weight.numel() for m in self.modules() if isinstance(m, BitLinear))
        mhc = sum(p.numel() for n, p in self.named_parameters() if "mhc" in n)
        return {"total": total, "embedding": emb, "non_embedding": total - emb, "bitlinear": bit, "mhc": mhc}

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token: 6 per matmul weight (forward + backward) plus ``12·L·C·T`` for attention scores
        (the usual estimate, Kaplan et al. 2020 / PaLM appendix B), for MFU and tokens/s budgets."""
        cfg = self.config
        T = seq_len or cfg.seq_len
        matmul = self.param_counts()["non_embedding"] + (cfg.vocab_size * cfg.n_embd if cfg.tie_embeddings else 0)
        return 6 * matmul + 12 * cfg.n_layer * cfg.n_embd * T

    # ------------------------------------------------------------------ mHC diagnostics

    def residuals(self) -> list[tuple[str, StreamResidual]]:
        """``(name, module)`` of every mHC connection in forward order (empty for ``standard``)."""
        blocks = cast(list[Block], list(self.blocks))
        return [(f"blocks.{i}.{k}", m) for i, b in enumerate(blocks) for k, m in b.residuals()]

    @torch.no_grad()
    def hres_matrices(self, idx: Tensor | None = None) -> dict[str, Tensor]:
        """Current ``H_res`` (n, n) of every sublayer, in forward order: from the static logits alone, or, given
        tokens ``idx``, averaged over the batch's tokens (what the model actually applied)."""
        if idx is None:
            return {name: m.static_h_res() for name, m in self.residuals()}
        record: list[Tensor] = []
        self.hidden(idx, record)
        return {name: h.float() for (name, _), h in zip(self.residuals(), record, strict=True)}

    @torch.no_grad()
    def mhc_diagnostics(self, idx: Tensor | None = None, per_sublayer: bool = False) -> dict[str, float]:
        """Flat dict of floats for logging (empty for ``standard``), from ``ops.hres_diagnostics`` over
        :meth:`hres_matrices` (static, or batch-averaged given ``idx``): ``max_row_sum_err``/``max_col_sum_err``
        (doubly-stochastic error of the worst sublayer), ``composite_gain``/``composite_col_gain`` (mHC §3.1's Amax
        gain of ``∏ H_res``: largest absolute row / column sum, 1 when every factor is doubly stochastic),
        ``composite_identity`` and ``min_identity`` (mean diagonal of the composite; smallest mean diagonal of one
        sublayer: how far the streams mix). ``per_sublayer`` adds ``<name>.row_sum_err``, ``.col_sum_err`` and
        ``.identity`` for each connection."""
        mats = self.hres_matrices(idx)
        if not mats:
            return {}
        d = ops.hres_diagnostics(list(mats.values()))
        ident = [h.double().diagonal().mean().item() for h in mats.values()]
        out: dict[str, float] = {
            "max_row_sum_err": float(d["max_row_sum_err"]),
            "max_col_sum_err": float(d["max_col_sum_err"]),
            "composite_gain": float(d["composite_gain"]),
            "composite_col_gain": float(d["composite_col_gain"]),
            "composite_identity": torch.as_tensor(d["composite"]).diagonal().mean().item(),
            "min_identity": min(ident),
        }
        if per_sublayer:
            rows, cols = torch.as_tensor(d["row_sum_err"]), torch.as_tensor(d["col_sum_err"])
            for i, name in enumerate(mats):
                out[f"{name}.row_sum_err"] = rows[i].item()
                out[f"{name}.col_sum_err"] = cols[i].item()
                out[f"{name}.identity"] = ident[i]
        return out

"""The GPT decoder: a small ternary (BitNet b1.58) transformer with optional mHC residual streams.

Read top to bottom: norms and RoPE, attention, MLP, the block, the model, its init and diagnostics.

Notable choices:
- Token embedding and LM head in full precision, the head tied to the embedding by default (llama.cpp's `bitnet`
  graph has no separate output tensor). Every other matrix is a :class:`BitLinear` (ternary weights, int8
  activations, straight-through estimator); ``quant="fp"`` builds the same model in full precision.
- Pre-norm blocks with RMSNorm (learned weight, no bias), plus BitNet's sub-norms: ``attn.sub_norm`` before the
  attention output projection and ``mlp.sub_norm`` before the MLP down projection (BitNet b1.58 2B4T; llama.cpp
  `attn_sub_norm`, `ffn_sub_norm`). They keep the int8 activation quantizer's input well scaled.
- RoPE rotates the pairs ``(i, i + hd/2)`` (GPT-NeoX convention, what llama.cpp runs for `bitnet`); cos/sin are
  computed per forward for positions ``offset .. offset+T`` (a few KB of work; simpler than keeping buffers valid
  across ``to_empty``/``load_state_dict``, and ready for a KV cache that starts at an offset).
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

import math
from typing import Literal, overload

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


# ----------------------------------------------------------------------------- attention


class Attention(nn.Module):
    """Causal self-attention with GQA, optional QK-norm, NEOX RoPE and BitNet's sub-norm before ``o_proj``."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
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

    def attend(self, q: Tensor, k: Tensor, v: Tensor, is_causal: bool = True) -> Tensor:
        """SDPA over heads then sub-norm and output projection: ``(B,H,T,hd) -> (B,T,C)``."""
        B, _, T, _ = q.shape
        y = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=self.n_kv_head != self.n_head)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, C)
        return self.o_proj(self.sub_norm(y))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:  # (B, T, C) -> (B, T, C)
        q, k, v = self.qkv(x, cos, sin)
        return self.attend(q, k, v)


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
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.mhc_attn: StreamResidual | None = None
        self.mhc_mlp: StreamResidual | None = None
        if cfg.residual != "standard":
            n, it, eps = cfg.n_streams, cfg.sinkhorn_iters, cfg.norm_eps
            # sublayer index 2·layer (+1): its "home" stream for symmetry breaking, as HC's `layer_id % n`
            self.mhc_attn = StreamResidual(cfg.n_embd, n, cfg.residual, (2 * layer) % n, it, eps)
            self.mhc_mlp = StreamResidual(cfg.n_embd, n, cfg.residual, (2 * layer + 1) % n, it, eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, record: list[Tensor] | None = None) -> Tensor:
        # x: (B, T, C) for "standard", (B, T, n, C) streams otherwise
        if self.mhc_attn is None or self.mhc_mlp is None:
            x = x + self.attn(self.attn_norm(x), cos, sin)
            return x + self.mlp(self.mlp_norm(x))
        x = self.mhc_attn(x, lambda u: self.attn(self.attn_norm(u), cos, sin), record)
        return self.mhc_mlp(x, lambda u: self.mlp(self.mlp_norm(u)), record)

    def residuals(self) -> list[tuple[str, StreamResidual]]:
        return [(k, m) for k, m in (("mhc_attn", self.mhc_attn), ("mhc_mlp", self.mhc_mlp)) if m is not None]


# ----------------------------------------------------------------------------- model


class GPT(nn.Module):
    """Decoder-only LM: ``forward(idx (B,T)) -> logits (B,T,V)``, or the mean cross-entropy given targets."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.n_embd, config.vocab_size, bias=False)
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
        return rope_cos_sin(seq_len, self.config.head_dim, self.config.rope_theta, device, offset)

    def hidden(self, idx: Tensor, record: list[Tensor] | None = None) -> Tensor:
        """Final-normed hidden states ``(B, T, C)`` for tokens ``idx`` (B, T)."""
        B, T = idx.shape
        cos, sin = self.rope(T, idx.device)  # (T, hd/2) each
        x = self.wte(idx)  # (B, T, C)
        n = self.config.streams
        if self.config.residual != "standard":
            x = x.unsqueeze(-2).expand(B, T, n, x.shape[-1])  # (B, T, n, C): n copies of the embedding
        for block in self.blocks:
            x = block(x, cos, sin, record)
        if self.config.residual != "standard":
            x = x.mean(dim=-2)  # (B, T, C)
        return self.norm(x)

    def head(self, h: Tensor) -> Tensor:  # (B, T, C) -> (B, T, V) float32
        w = self.wte.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(h, w.to(h.dtype)).float()

    @overload
    def forward(self, idx: Tensor, targets: None = None, *, return_logits: bool = False) -> Tensor: ...
    @overload
    def forward(self, idx: Tensor, targets: Tensor, *, return_logits: Literal[False] = False) -> Tensor: ...
    @overload
    def forward(self, idx: Tensor, targets: Tensor, *, return_logits: Literal[True]) -> tuple[Tensor, Tensor]: ...

    def forward(
        self, idx: Tensor, targets: Tensor | None = None, *, return_logits: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Logits ``(B, T, V)`` (float32); with ``targets`` (B, T) the mean cross-entropy (``-1`` ignored), or
        ``(logits, loss)`` when ``return_logits`` is set."""
        logits = self.head(self.hidden(idx))  # (B, T, V)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
        return (logits, loss) if return_logits else loss

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
        return [(f"blocks.{i}.{k}", m) for i, b in enumerate(self.blocks) for k, m in b.residuals()]

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

"""Residual connections for the GPT blocks: standard ``x + F(x)`` and mHC residual streams.

mHC (Xie et al. 2025, "Manifold-Constrained Hyper-Connections", after Hyper-Connections, Zhu et al. 2024) keeps
``n`` residual streams ``x`` of shape ``(B, T, n, C)`` and wraps each sublayer ``F`` (attention or MLP, including
its pre-norm) as

    x_next = H_res · x + H_postᵀ · F(H_pre · x)

with, per token, ``H_pre = sigmoid(b_pre + α_pre·d_pre)`` (1×n), ``H_post = 2·sigmoid(b_post + α_post·d_post)`` (1×n)
and ``H_res`` (n×n) doubly stochastic (rows and columns sum to 1, entries >= 0), so the composite map through all
layers stays norm-bounded. ``d_*`` are linear maps of the RMS-normalised flattened streams (n·C -> n, n, and n! or
n·n), the mHC "dynamic" part; ``b_*`` are the "static" biases and ``α_*`` learnable scalar gates.

Notable choices:
- ``mhc_lite`` ("mHC-lite", 2026): ``H_res = Σ_k softmax(a)_k P_k`` over all n! permutation matrices
  (``ops.permutation_basis``): doubly stochastic exactly, by Birkhoff–von Neumann, with no iteration.
  ``mhc``: ``H_res = ops.sinkhorn(logits, iters)``: doubly stochastic up to the Sinkhorn tolerance.
- Initialisation (why the model starts as a standard residual). The streams start as ``n`` copies of the embedding
  and every dynamic projection starts at zero, so at init each sublayer sees identical streams ``x_i = x`` and:
  ``H_res · x = x`` for *any* row-stochastic ``H_res``; ``H_pre`` sums to 1, so ``H_pre · x = x``; and
  ``H_post = 2·sigmoid(0) = 1`` on every stream. Hence ``x_next_i = x + F(x)`` on every stream: each stream runs
  the standard residual exactly, and the mean read-out equals the standard model. ``H_res`` starts close to the
  identity (weight 0.95 on it) as in HC/mHC, so that once streams differ they are not averaged away.
- Symmetry breaking. If ``H_pre`` were uniform (1/n each) the n streams would get identical gradients forever and
  stay copies of one stream. As Hyper-Connections reads layer ``k`` from stream ``k mod n``, sublayer ``k`` gives its
  "home" stream half of ``H_pre`` and splits the other half over the rest: still summing to 1 (so the init argument
  above holds) while the gradients differ per stream, so the ``H_post``/``H_pre`` gates drift apart and the streams
  diverge within the first steps. (``H_res`` itself gets no gradient while the streams are identical: it only
  reorders equal rows. It starts learning once they differ.)
- The dynamic projections ``φ`` start at zero and the gates ``α`` at 0.01 (mHC's small gating factors), so the
  model starts exactly at the static biases and the per-token part grows in gradually.
- The RMS normalisation of the flattened streams is applied after the projection
  (``(x·φᵀ)·rsqrt(mean x²)``, as mHC's fused kernel does): the same value without materialising the normed copy.
- Streams are reduced by the mean before the final norm: at init (identical streams) the mean is exactly the
  standard model's residual, and it keeps the residual's scale comparable to a standard model's (RMSNorm makes
  mean and sum the same function up to eps; the mean keeps eps and any logged activation norms comparable).
- A block holds its connections as ``mhc_attn`` and ``mhc_mlp``, so every parameter name here contains "mhc"
  (``blocks.3.mhc_attn.res_logits``): the optimizer's rule sends those to Lion.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nanochat import ops

HRES_INIT_IDENTITY = 0.95  # weight of the identity in H_res at init
ALPHA_INIT = 0.01  # mHC gate on the dynamic part (its projection starts at zero)


@functools.cache
def _cpu_basis(n: int) -> Tensor:
    """The ``(n!, n·n)`` float32 permutation basis on the CPU, shared by every connection with ``n`` streams."""
    return ops.permutation_basis(n, device="cpu").reshape(-1, n * n)


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def pre_init_weights(n: int, home: int) -> list[float]:
    """H_pre at init: sums to 1, ``home`` stream gets 1/2 (n > 1); for n == 1 as close to 1 as sigmoid allows."""
    if n == 1:
        return [0.99]
    return [0.5 if i == home else 0.5 / (n - 1) for i in range(n)]


class StreamResidual(nn.Module):
    """One mHC connection around a sublayer: ``(B, T, n, C) -> (B, T, n, C)``."""

    def __init__(
        self, n_embd: int, n_streams: int, kind: str, home: int, sinkhorn_iters: int = 20, eps: float = 1e-5
    ) -> None:
        super().__init__()
        if kind not in ("mhc_lite", "mhc"):
            raise ValueError(f"StreamResidual: kind must be 'mhc_lite' or 'mhc', got {kind!r}")
        n = n_streams
        self.n, self.kind, self.home, self.iters, self.eps = n, kind, home, sinkhorn_iters, eps
        self.n_res = math.factorial(n) if kind == "mhc_lite" else n * n  # mixture weights or n×n logits
        self.pre_bias = nn.Parameter(torch.empty(n))  # static H_pre logits
        self.post_bias = nn.Parameter(torch.empty(n))  # static H_post logits
        self.res_logits = nn.Parameter(torch.empty(self.n_res))  # static H_res: perm logits (lite) or n×n (mhc)
        self.alpha = nn.Parameter(torch.empty(3))  # gates of the dynamic parts (pre, post, res)
        self.proj = nn.Parameter(torch.empty(2 * n + self.n_res, n * n_embd))  # φ: (2n + n_res, n·C)
        # (n!, n·n) permutation basis, built here on the CPU (explicitly: also under `with torch.device("meta")`) so
        # that no forward calls into the Rust core: under torch.compile that call broke the graph at every connection
        self._basis_cpu = _cpu_basis(n) if kind == "mhc_lite" else None
        self._basis: Tensor | None = None  # the basis on the input's device and dtype

    def reset_parameters(self) -> None:
        n = self.n
        with torch.no_grad():
            self.pre_bias.copy_(torch.tensor([_logit(p) for p in pre_init_weights(n, self.home)]))
            self.post_bias.zero_()  # 2·sigmoid(0) = 1
            self.res_logits.zero_()
            if self.kind == "mhc_lite":
                # identity permutation (index 0) with softmax weight HRES_INIT_IDENTITY, the others equal
                m = self.n_res
                if m > 1:
                    self.res_logits[0] = math.log(HRES_INIT_IDENTITY * (m - 1) / (1 - HRES_INIT_IDENTITY))
            elif n > 1:
                # exp(logits) with c on the diagonal is already doubly stochastic: diag e^c / (e^c + n - 1)
                c = math.log(HRES_INIT_IDENTITY * (n - 1) / (1 - HRES_INIT_IDENTITY))
                self.res_logits.view(n, n).diagonal().fill_(c)
            self.alpha.fill_(ALPHA_INIT)
            self.proj.zero_()

    def basis(self, like: Tensor) -> Tensor:
        b = self._basis
        if b is None or b.device != like.device or b.dtype != like.dtype:
            assert self._basis_cpu is not None  # only mhc_lite asks for it
            b = self._basis_cpu.to(device=like.device, dtype=like.dtype)
            self._basis = b
        return b

    def h_res_from_logits(self, logits: Tensor) -> Tensor:  # (..., n_res) -> (..., n, n)
        n = self.n
        if self.kind == "mhc_lite":
            w = torch.softmax(logits, dim=-1)  # (..., n!)
            return (w @ self.basis(w)).unflatten(-1, (n, n))
        return ops.sinkhorn(logits.unflatten(-1, (n, n)), self.iters)

    def static_h_res(self) -> Tensor:
        """H_res from the static logits alone (what the model applies to a zero dynamic part), ``(n, n)``."""
        return self.h_res_from_logits(self.res_logits.detach().float())

    def mappings(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(H_pre (B,T,n), H_post (B,T,n), H_res (B,T,n,n))`` for streams ``x`` (B,T,n,C)."""
        n = self.n
        flat = x.flatten(-2)  # (B, T, n·C)
        # 1/rms(flat) from one fused reduction (vector_norm: one pass forward and backward)
        inv_rms = torch.rsqrt(
            torch.linalg.vector_norm(flat.float(), dim=-1, keepdim=True).square() / flat.shape[-1] + self.eps
        )  # (B, T, 1)
        d = F.linear(flat, self.proj.to(flat.dtype)).float() * inv_rms  # (B, T, 2n + n_res)
        a = self.alpha.float()
        h_pre = torch.sigmoid(self.pre_bias + a[0] * d[..., :n])  # (B, T, n)
        h_post = 2.0 * torch.sigmoid(self.post_bias + a[1] * d[..., n : 2 * n])  # (B, T, n)
        h_res = self.h_res_from_logits(self.res_logits + a[2] * d[..., 2 * n :])  # (B, T, n, n)
        return h_pre, h_post, h_res

    def forward(self, x: Tensor, f: Callable[[Tensor], Tensor], record: list[Tensor] | None = None) -> Tensor:
        h_pre, h_post, h_res = self.mappings(x)
        if record is not None:
            record.append(h_res.detach().flatten(0, -3).mean(0))  # (n, n) batch mean
        if torch.compiler.is_compiling():  # elementwise: fused into the kernels around it (see `update`)
            u = (h_pre.to(x.dtype).unsqueeze(-1) * x).sum(-2)  # (B, T, C)
        else:
            u = (h_pre.to(x.dtype).unsqueeze(-2) @ x).squeeze(-2)  # (B, T, C)
        y = f(u)  # (B, T, C)
        dev = x.device.type
        if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
            # keep the residual streams in their own dtype (fp32) under bf16 autocast, as `x + y` would
            with torch.autocast(dev, enabled=False):
                return self.update(x, y, h_res, h_post)
        return self.update(x, y, h_res, h_post)

    @staticmethod
    def update(x: Tensor, y: Tensor, h_res: Tensor, h_post: Tensor) -> Tensor:
        """``H_res·x + H_postᵀ·y``. Eager: one batched matmul ``[H_res | H_post] (B,T,n,n+1) @ [x; y] (B,T,n+1,C)``.
        Under torch.compile: the same sums written elementwise, which inductor fuses with the ops around them, forward
        and backward (B·T tiny (n, n+1) matmuls and their concatenations were ~10% of a compiled d20 step on the CPU;
        the elementwise form, materialised by eager torch, would be slower there)."""
        if torch.compiler.is_compiling():
            mixed = (h_res.to(x.dtype).unsqueeze(-1) * x.unsqueeze(-3)).sum(-2)  # (B, T, n, C)
            return mixed + h_post.to(x.dtype).unsqueeze(-1) * y.to(x.dtype).unsqueeze(-2)
        mix = torch.cat((h_res, h_post.unsqueeze(-1)), dim=-1).to(x.dtype)  # (B, T, n, n+1)
        return mix @ torch.cat((x, y.to(x.dtype).unsqueeze(-2)), dim=-2)  # (B, T, n, C)

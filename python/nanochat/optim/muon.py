"""Muon: momentum SGD whose update is orthogonalised by a Newton–Schulz iteration (Keller Jordan, 2024).

For a 2-D weight with gradient ``g``: ``m = β·m + g``; Nesterov ``u = g + β·m``; ``O ≈ U Vᵀ`` of ``u = U S Vᵀ``
from 5 steps of the quintic Newton–Schulz map ``X ← aX + (bA + cA²)X`` with ``A = XXᵀ``,
``(a, b, c) = (3.4445, −4.7750, 2.0315)``, started at ``X = u/‖u‖_F``; then
``θ ← θ·(1 − lr·λ) − lr·sqrt(max(1, rows/cols))·O``.

Notable choices:
- The coefficients maximise the slope at 0 rather than converge exactly: each singular value σ (relative to
  ‖u‖_F) is mapped by the scalar quintic p applied 5 times, which sends every σ ≥ 0.01 into about
  [0.68, 1.13] (and σ ≥ 0.003 into [0.68, 1.21]) — "roughly orthogonal" is all the method needs, and the
  tests check that band against the scalar map.
- ``A`` is always the smaller Gram matrix: ``XᵀX`` with ``X ← aX + X·B`` when rows > cols (the same map as on the
  transpose, since ``B`` is a polynomial in the symmetric ``A``), so no transposed copy is made. It runs in
  bfloat16 on CUDA and on CPUs with AMX-BF16 (the iteration is stable in bf16 and the matrix units make it cheap)
  and float32 elsewhere; ``ns_dtype`` overrides. The updates of one shape are stacked straight into one tensor of
  that dtype (one pass) and iterated as one batched GEMM per product.
- Weight decay is decoupled and scaled by lr (AdamW style).
- A plain ``torch.optim.Optimizer``: under DDP the gradients are already all-reduced when ``step`` runs, so
  every rank computes the same update; there is no sharded variant.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

NS_COEFFS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5


def default_ns_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16
    from nanochat.hardware import has_amx_bf16

    return torch.bfloat16 if device.type == "cpu" and has_amx_bf16() else torch.float32


def newton_schulz(g: Tensor, steps: int = NS_STEPS, dtype: torch.dtype | None = None, eps: float = 1e-7) -> Tensor:
    """Approximate the orthogonal polar factor ``U Vᵀ`` of ``g`` (``(..., rows, cols)``); same shape, ``dtype``."""
    if g.ndim < 2:
        raise ValueError(f"newton_schulz needs a matrix, got shape {tuple(g.shape)}")
    a, b, c = NS_COEFFS
    x = g.to(dtype or default_ns_dtype(g.device))
    tall = g.size(-2) > g.size(-1)  # then A = XᵀX and X ← aX + X·B: the smaller Gram matrix, with no transposed copy
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)  # all singular values now <= 1
    lead = x.shape[:-2]
    x = x.reshape(-1, *x.shape[-2:])  # (k, r, c): one batched GEMM per product
    for _ in range(steps):
        A = x.mT @ x if tall else x @ x.mT  # (k, m, m), m = min(r, c)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b·A + c·A²: the sum rides in the GEMM's epilogue
        # a·X + X·B (tall) or a·X + B·X, likewise (B is symmetric, so both are the same map as on the transpose)
        x = torch.baddbmm(x, x, B, beta=a, alpha=1.0) if tall else torch.baddbmm(x, B, x, beta=a, alpha=1.0)
    return x.reshape(*lead, *x.shape[-2:])


class Muon(Optimizer):
    """Muon for 2-D parameters. ``lr`` is per step in units of an orthogonal update (typ. 0.01–0.05)."""

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        ns_steps: int = NS_STEPS,
        ns_dtype: torch.dtype | None = None,
    ) -> None:
        if lr < 0 or not 0 <= momentum < 1 or weight_decay < 0 or ns_steps < 1:
            raise ValueError(f"invalid Muon hyperparameters lr={lr} momentum={momentum} wd={weight_decay}")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, ns_steps=ns_steps)
        super().__init__(params, defaults)
        self.ns_dtype = ns_dtype
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon only takes 2-D parameters, got shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, beta, wd = group["lr"], group["momentum"], group["weight_decay"]
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p.grad)
            bufs = [self.state[p]["momentum_buffer"] for p in params]
            torch._foreach_mul_(bufs, beta)  # m = β·m + g, one multi-tensor pass per op
            torch._foreach_add_(bufs, grads)
            us = torch._foreach_add(grads, bufs, alpha=beta) if group["nesterov"] else bufs  # g + β·m
            # one batched iteration per shape, stacked straight in the iteration's dtype (one pass: no separate
            # stack and cast copies); the update is added to the float32 weight from that dtype
            by_shape: dict[tuple[int, ...], list[tuple[Tensor, Tensor]]] = {}
            for p, u in zip(params, us, strict=True):
                by_shape.setdefault(tuple(p.shape), []).append((p, u))
            ns_dtype = self.ns_dtype or default_ns_dtype(params[0].device)
            for (rows, cols), items in by_shape.items():
                stacked = torch.empty((len(items), rows, cols), dtype=ns_dtype, device=items[0][1].device)
                for slot, (_, u) in zip(stacked, items, strict=True):
                    slot.copy_(u)
                os_ = newton_schulz(stacked, steps=group["ns_steps"], dtype=ns_dtype)
                scale = max(1.0, rows / cols) ** 0.5
                for (p, _), o in zip(items, os_, strict=True):
                    if wd:
                        p.mul_(1.0 - lr * wd)
                    p.add_(o, alpha=-lr * scale)
        return loss

"""Lion (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms"): sign of an interpolated momentum.

``c = β1·m + (1−β1)·g;  θ ← θ − lr·(sign(c) + λ·θ);  m ← β2·m + (1−β2)·g``, β = (0.9, 0.99) by default.

Notable choices: every coordinate moves by exactly ±lr (plus decay), so Lion's lr is typically 3–10× smaller
than AdamW's and its weight decay correspondingly larger; one state tensor (``exp_avg``) per parameter,
in the parameter's dtype. ``sign(0) = 0``: a coordinate with zero gradient and zero momentum stays put.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer


class Lion(Optimizer):
    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
    ) -> None:
        if lr < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1) or weight_decay < 0:
            raise ValueError(f"invalid Lion hyperparameters lr={lr} betas={betas} wd={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (b1, b2), wd = group["lr"], group["betas"], group["weight_decay"]
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            for p in params:
                if "exp_avg" not in self.state[p]:
                    self.state[p]["exp_avg"] = torch.zeros_like(p)
            ms = [self.state[p]["exp_avg"] for p in params]
            # one multi-tensor pass per op over the whole group (lerp(g, m, β1) = β1·m + (1−β1)·g)
            cs = torch._foreach_lerp(grads, ms, b1)
            torch._foreach_sign_(cs)
            if wd:
                torch._foreach_mul_(params, 1.0 - lr * wd)
            torch._foreach_add_(params, cs, alpha=-lr)
            torch._foreach_lerp_(ms, grads, 1.0 - b2)  # m = β2·m + (1−β2)·g
        return loss

"""mHC residual-stream ops: Sinkhorn-Knopp projection, permutation basis, BvN decomposition, diagnostics.

``sinkhorn`` is the ``nanochat::sinkhorn`` custom op: ``iters`` log-domain row-then-column normalisations of
``exp(logits)`` over the last two dims of ``(..., n, n)``. Its CPU kernel and backward run in Rust
(``_core.sinkhorn_forward`` / ``_core.sinkhorn_backward``); other devices run the same recurrence in torch.

Notable choices:
- The backward is a second custom op, ``nanochat::sinkhorn_backward``, registered with ``register_autograd``. It
  is the exact gradient of the *unrolled* iterations (what autograd through ``sinkhorn_reference`` computes), not
  the implicit gradient of the fixed point, so it passes ``gradcheck`` at any ``iters``. On CPU, Rust recomputes
  each matrix's iterates in cache instead of saving ``2·iters`` copies of the batch between forward and backward;
  elsewhere ``sinkhorn_backward_reference`` runs the same sweep in torch (tested equal to autograd through the
  reference). Double backward is not supported.
- Rust computes in float64 whatever the input (float32 in, float32 out), so the CPU op is at least as accurate as
  the float32 reference. Other floating dtypes (bf16/fp16 under autocast) are computed in float32 on every device
  and cast back: 20 iterations of logsumexp in bf16 would not stay doubly stochastic.
- ``permutation_basis`` orders the n! matrices as ``itertools.permutations(range(n))`` (identity first), the order
  mhc_lite's logits and checkpoints rely on; ``bvn_decompose`` / ``bvn_basis_weights`` invert it (Birkhoff's
  algorithm in Rust), e.g. to turn an ``mhc`` ``H_res`` into ``mhc_lite`` logits.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from nanochat import _core

DEFAULT_ITERS = 20
_RUST_DTYPES = (torch.float32, torch.float64)


def _check_logits(logits: Tensor, iters: int, op: str) -> None:
    if logits.dim() < 2 or logits.shape[-1] != logits.shape[-2]:
        raise ValueError(f"{op}: expected logits of shape (..., n, n), got {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"{op}: expected floating-point logits, got {logits.dtype}")
    if iters < 0:
        raise ValueError(f"{op}: iters must be >= 0, got {iters}")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in _RUST_DTYPES else torch.float32


# ----------------------------------------------------------------------------- torch references


def sinkhorn_reference(logits: Tensor, iters: int = DEFAULT_ITERS) -> Tensor:
    """Log-domain Sinkhorn-Knopp: ``exp(logits)`` projected towards doubly stochastic, batched over
    leading dims; alternately normalises rows then columns ``iters`` times. Differentiable."""
    log_p = logits
    for _ in range(iters):
        log_p = log_p - torch.logsumexp(log_p, dim=-1, keepdim=True)
        log_p = log_p - torch.logsumexp(log_p, dim=-2, keepdim=True)
    return log_p.exp()


def sinkhorn_backward_reference(logits: Tensor, grad_out: Tensor, iters: int = DEFAULT_ITERS) -> Tensor:
    """Gradient of ``sinkhorn_reference(logits, iters)`` for the upstream gradient ``grad_out``, by an explicit
    backward sweep over the half-step iterates (``∂ lse_row(x)/∂x = exp(x − lse_row(x))``)::

        g = grad_out ⊙ P
        for t = iters..1:  g -= C_t ⊙ colsum(g);  g -= R_t ⊙ rowsum(g)

    where ``R_t`` / ``C_t`` are the matrices after the t-th row / column normalisation."""
    log_p = logits
    steps: list[tuple[Tensor, Tensor]] = []
    for _ in range(iters):
        log_p = log_p - torch.logsumexp(log_p, dim=-1, keepdim=True)
        r = log_p.exp()
        log_p = log_p - torch.logsumexp(log_p, dim=-2, keepdim=True)
        steps.append((r, log_p.exp()))
    g = grad_out * log_p.exp()
    for r, c in reversed(steps):
        g = g - c * g.sum(dim=-2, keepdim=True)
        g = g - r * g.sum(dim=-1, keepdim=True)
    return g


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("nanochat::sinkhorn", mutates_args=())
def sinkhorn(logits: Tensor, iters: int = DEFAULT_ITERS) -> Tensor:
    """Doubly-stochastic projection of ``exp(logits)`` (``(..., n, n)``): ``iters`` log-domain Sinkhorn-Knopp
    iterations (rows, then columns); ``iters = 0`` gives ``exp(logits)``. Same shape and dtype as ``logits``.
    Differentiable; CPU runs in Rust."""
    _check_logits(logits, iters, "sinkhorn")
    return sinkhorn_reference(logits.to(_compute_dtype(logits.dtype)), iters).to(logits.dtype)


@sinkhorn.register_kernel("cpu")
def _sinkhorn_cpu(logits: Tensor, iters: int = DEFAULT_ITERS) -> Tensor:
    _check_logits(logits, iters, "sinkhorn")
    x = logits.detach().to(_compute_dtype(logits.dtype)).contiguous()
    p = _core.sinkhorn_forward(x.numpy(), iters)
    return torch.from_numpy(p).to(logits.dtype)


@sinkhorn.register_fake
def _sinkhorn_fake(logits: Tensor, iters: int = DEFAULT_ITERS) -> Tensor:
    _check_logits(logits, iters, "sinkhorn")
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.custom_op("nanochat::sinkhorn_backward", mutates_args=())
def sinkhorn_backward(logits: Tensor, grad_out: Tensor, iters: int = DEFAULT_ITERS) -> Tensor:
    """Exact gradient of ``sinkhorn(logits, iters)`` w.r.t. ``logits`` for the upstream gradient ``grad_out``
    (same shape as ``logits``); result in ``logits``' dtype. CPU runs in Rust."""
    _check_backward(logits, grad_out, iters)
    dt = _compute_dtype(logits.dtype)
    return sinkhorn_backward_reference(logits.to(dt), grad_out.to(dt), iters).to(logits.dtype)


def _check_backward(logits: Tensor, grad_out: Tensor, iters: int) -> None:
    _check_logits(logits, iters, "sinkhorn_backward")
    if grad_out.shape != logits.shape:
        raise ValueError(f"sinkhorn_backward: grad_out has shape {tuple(grad_out.shape)}, logits {tuple(logits.shape)}")


@sinkhorn_backward.register_kernel("cpu")
def _sinkhorn_backward_cpu(logits: Tensor, grad_out: Tensor, iters: int = DEFAULT_ITERS) -> Tensor:
    _check_backward(logits, grad_out, iters)
    dt = _compute_dtype(logits.dtype)
    x = logits.detach().to(dt).contiguous()
    g = grad_out.detach().to(dt).contiguous()
    return torch.from_numpy(_core.sinkhorn_backward(x.numpy(), g.numpy(), iters)).to(logits.dtype)


@sinkhorn_backward.register_fake
def _sinkhorn_backward_fake(logits: Tensor, grad_out: Tensor, iters: int = DEFAULT_ITERS) -> Tensor:
    _check_backward(logits, grad_out, iters)
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _sinkhorn_setup_context(ctx, inputs, output) -> None:
    logits, iters = inputs
    ctx.save_for_backward(logits)
    ctx.iters = iters


def _sinkhorn_autograd(ctx, grad: Tensor) -> tuple[Tensor, None]:
    (logits,) = ctx.saved_tensors
    return sinkhorn_backward(logits, grad, ctx.iters), None


sinkhorn.register_autograd(_sinkhorn_autograd, setup_context=_sinkhorn_setup_context)


# ----------------------------------------------------------------------------- permutations and BvN


@functools.cache
def _permutations(n: int) -> Tensor:
    return torch.from_numpy(_core.permutations(n))


def permutations(n: int, device: torch.device | str | None = None) -> Tensor:
    """All ``n!`` permutations of ``range(n)`` as int64 index vectors ``(n!, n)``, in the order of
    ``itertools.permutations(range(n))`` (identity first). ``1 <= n <= 8``."""
    return _permutations(int(n)).to(device=device, copy=True)


def permutation_basis(n: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    """All ``n!`` permutation matrices ``(n!, n, n)`` in lexicographic order; index 0 is the identity.
    ``P_k[i, j] = 1`` iff ``j == permutations(n)[k, i]``, so ``(P_k x)_i = x_{perm_k[i]}``. ``1 <= n <= 8``."""
    idx = permutations(n, device=device)
    return torch.eye(n, dtype=dtype, device=device)[idx]


def _as_f64_matrix(m: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(m, Tensor):
        m = m.detach().to("cpu", torch.float64).numpy()
    return np.ascontiguousarray(m, dtype=np.float64)


def bvn_decompose(m: Tensor | np.ndarray, tol: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Birkhoff–von Neumann decomposition of a doubly stochastic ``(n, n)`` matrix (sums within ``tol`` of 1,
    entries >= -tol): ``(weights float64 (k,), perms int64 (k, n))`` with ``k <= (n-1)²+1`` positive weights
    summing to 1, largest first, and ``m ≈ Σ_k weights[k] · P(perms[k])`` where ``P(p)[i, p[i]] = 1``.
    Raises ``NotDoublyStochasticError`` (a ValueError) naming the offending row/column/entry otherwise."""
    w, p = _core.bvn_decompose(_as_f64_matrix(m), float(tol))
    device = m.device if isinstance(m, Tensor) else None
    return torch.from_numpy(w).to(device), torch.from_numpy(p).to(device)


def bvn_basis_weights(m: Tensor | np.ndarray, tol: float = 1e-6) -> Tensor:
    """``bvn_decompose(m)`` spread over ``permutation_basis(n)``: float64 ``(n!,)`` weights with
    ``m ≈ Σ_k w[k] · permutation_basis(n)[k]`` (``n <= 8``) — the mhc_lite form of an mhc ``H_res``
    (mhc_lite logits ``log(w)`` reproduce it exactly through the softmax)."""
    w = _core.bvn_basis_weights(_as_f64_matrix(m), float(tol))
    return torch.from_numpy(w).to(m.device if isinstance(m, Tensor) else None)


def hres_diagnostics(mats: Sequence[Tensor] | Tensor) -> dict[str, float | Tensor]:
    """Diagnostics of the residual mixing matrices ``H_res`` of all sublayers, in forward order (a sequence of
    ``(n, n)`` tensors or one ``(L, n, n)`` tensor), computed in float64:

    - ``row_sum_err`` / ``col_sum_err``: float64 ``(L,)``, per matrix the largest ``|sum − 1|`` over rows / columns;
      ``max_row_sum_err`` / ``max_col_sum_err``: their maxima (floats);
    - ``composite``: ``(n, n)`` product ``H[L-1] ⋯ H[1] H[0]`` (the map from the first stream state to the last);
    - ``composite_gain``: its largest absolute row sum (forward amplification; 1 when all are doubly stochastic);
      ``composite_col_gain``: its largest absolute column sum (the same for gradients).
    """
    if isinstance(mats, Tensor):
        stacked = mats.detach()
    else:
        if len(mats) == 0:
            raise ValueError("hres_diagnostics: need at least one matrix")
        stacked = torch.stack([m.detach().to("cpu", torch.float64) for m in mats])
    if stacked.dim() != 3 or stacked.shape[-1] != stacked.shape[-2]:
        raise ValueError(f"hres_diagnostics: expected (L, n, n) matrices, got {tuple(stacked.shape)}")
    out = _core.hres_diagnostics(stacked.to("cpu", torch.float64).contiguous().numpy())
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else float(v) for k, v in out.items()}

"""Ternary weight ops: absmean quantization, packing to the kernel layout, and ternary linear.

The packed weight is a uint8 tensor of shape ``(rows, cols // 4)``: TQ2_0's ``qs`` codes (code =
trit + 1, element ``e`` of each 256-block in byte ``32*(e//128) + e%32`` at shift
``2*((e%128)//32)``) with the per-block fp16 scale stripped; the per-tensor scale travels as a
0-dim float32 tensor. ``cols`` must be a multiple of 256.

Rounding is half-to-even everywhere (``torch.round``), in Rust too, so the CPU path (Rust) and the
torch path produce the same integers; the tests hold them equal before scaling.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from nanochat import _core
from nanochat.ops.native import (  # noqa: F401 - numpy-only, re-exported here for existing callers
    available_kernels,
    default_kernel,
    get_num_threads,
    pack_gguf,
    set_num_threads,
    tq1_0_to_kernel_layout,
    tq2_0_to_kernel_layout,
)

QK_K = 256
MIN_WEIGHT_SCALE = 1e-5
MIN_ACT_ABSMAX = 1e-5

_kernel: str | None = None  # None: the core's default (NANOCHAT_KERNEL or best detected)


def set_kernel(name: str | None) -> None:
    """Force a kernel (``"scalar"``, ``"avx2"``, ...) for the CPU ops; ``None`` restores the default."""
    global _kernel
    if name is not None and name not in _core.available_kernels():
        raise ValueError(f"kernel {name!r} is not available here (available: {_core.available_kernels()})")
    _kernel = name


# ----------------------------------------------------------------------------- quantizers (torch)


def absmean_quantize(w: Tensor) -> tuple[Tensor, Tensor]:
    """BitNet b1.58 weights: ``scale = max(mean|w|, 1e-5)``, ``trits = clamp(round(w/scale), -1, 1)``.

    Returns ``(trits, scale)`` in ``w``'s dtype; the scale is a 0-dim tensor.
    """
    scale = w.abs().mean().clamp(min=MIN_WEIGHT_SCALE)
    return (w / scale).round().clamp(-1, 1), scale


def quantize_acts_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row absmax int8: ``q = clamp(round(x * 127/absmax), -128, 127)``; returns ``(q, absmax/127)``.

    ``q`` stays in ``x``'s floating dtype (integer-valued) so autograd and matmuls can use it.
    """
    amax = x.abs().amax(dim=-1, keepdim=True).clamp(min=MIN_ACT_ABSMAX)
    q = (x * (127.0 / amax)).round().clamp(-128, 127)
    return q, amax / 127.0


# ----------------------------------------------------------------------------- packing


_SHIFTS = (0, 2, 4, 6)


def _pack_codes_torch(trits: Tensor) -> Tensor:
    rows, cols = trits.shape
    codes = (trits.to(torch.int16) + 1).to(torch.uint8).view(rows, cols // QK_K, 2, 4, 32)
    out = codes[..., 0, :] | (codes[..., 1, :] << 2) | (codes[..., 2, :] << 4) | (codes[..., 3, :] << 6)
    return out.reshape(rows, cols // 4).contiguous()


def unpack_ternary(packed: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Trits (``rows × cols``, in ``dtype``) from a packed uint8 ``rows × cols/4`` tensor (any device)."""
    rows, rb = packed.shape
    p = packed.view(rows, rb // 64, 2, 1, 32)
    shifts = torch.tensor(_SHIFTS, dtype=torch.uint8, device=packed.device).view(1, 1, 1, 4, 1)
    codes = (p >> shifts) & 3  # (rows, blocks, 2 halves, 4 planes, 32)
    return codes.reshape(rows, rb * 4).to(dtype) - 1


def _check_weight(w: Tensor) -> None:
    if w.dim() != 2:
        raise ValueError(f"pack_ternary: expected a 2-D weight, got shape {tuple(w.shape)}")
    if w.shape[1] % QK_K != 0:
        raise ValueError(
            f"pack_ternary: in_features {w.shape[1]} is not a multiple of {QK_K} (the TQ2_0 block); "
            "choose model dims that are multiples of 256"
        )
    if not w.is_floating_point():
        raise TypeError(f"pack_ternary: expected a floating-point weight, got {w.dtype}")


@torch.library.custom_op("nanochat::pack_ternary", mutates_args=())
def pack_ternary(w: Tensor) -> tuple[Tensor, Tensor]:
    """Absmean-quantize a ``rows × cols`` weight and pack it: ``(packed uint8 rows × cols/4, scale f32)``."""
    _check_weight(w)
    trits, scale = absmean_quantize(w.detach().float())
    return _pack_codes_torch(trits), scale.float()


@pack_ternary.register_kernel("cpu")
def _pack_ternary_cpu(w: Tensor) -> tuple[Tensor, Tensor]:
    _check_weight(w)
    trits, scale = absmean_quantize(w.detach().float())
    packed = _core.pack_trits(np.ascontiguousarray(trits.to(torch.int8).numpy()))
    return torch.from_numpy(packed), scale.float()


@pack_ternary.register_fake
def _pack_ternary_fake(w: Tensor) -> tuple[Tensor, Tensor]:
    _check_weight(w)
    rows, cols = w.shape
    return w.new_empty((rows, cols // 4), dtype=torch.uint8), w.new_empty((), dtype=torch.float32)


# ----------------------------------------------------------------------------- ternary linear


def _check_linear(x: Tensor, packed: Tensor, scale: Tensor) -> None:
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise TypeError(f"ternary_linear: packed must be a 2-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"ternary_linear: x must be floating point, got {x.dtype}")
    if x.shape[-1] != packed.shape[1] * 4:
        raise ValueError(
            f"ternary_linear: x has {x.shape[-1]} features but the packed weight expects {packed.shape[1] * 4}"
        )
    if scale.numel() != 1:
        raise ValueError(f"ternary_linear: scale must hold one value, got shape {tuple(scale.shape)}")


def ternary_linear_reference(x: Tensor, packed: Tensor, scale: Tensor) -> Tensor:
    """Plain-torch ``y = quant8(x) · (trits·scale)ᵀ`` on any device: the CUDA path and the oracle."""
    _check_linear(x, packed, scale)
    q, xs = quantize_acts_int8(x.float())
    trits = unpack_ternary(packed, torch.float32)
    # Integer-valued float32 products are exact while |acc| < 2^24 (127 · cols).
    return ((q @ trits.t()) * (xs * scale.float())).to(x.dtype)


@torch.library.custom_op("nanochat::ternary_linear", mutates_args=())
def ternary_linear(x: Tensor, packed: Tensor, scale: Tensor) -> Tensor:
    """``y = x · Wᵀ`` for packed ternary ``W`` (``rows × cols/4`` uint8) with int8 activations inside.

    ``x`` is ``(..., cols)``; the result is ``(..., rows)`` in ``x``'s dtype. No autograd: this is
    the inference path (training uses fake quantization in torch).
    """
    return ternary_linear_reference(x, packed, scale)


@ternary_linear.register_kernel("cpu")
def _ternary_linear_cpu(x: Tensor, packed: Tensor, scale: Tensor) -> Tensor:
    _check_linear(x, packed, scale)
    lead = x.shape[:-1]
    x2 = x.detach().reshape(-1, x.shape[-1]).float().contiguous()
    if x2.shape[0] == 0:
        return x.new_empty((*lead, packed.shape[0]))
    y = _core.ternary_linear(x2.numpy(), packed.contiguous().numpy(), float(scale), kernel=_kernel)
    return torch.from_numpy(y).reshape(*lead, packed.shape[0]).to(x.dtype)


@ternary_linear.register_fake
def _ternary_linear_fake(x: Tensor, packed: Tensor, scale: Tensor) -> Tensor:
    _check_linear(x, packed, scale)
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


# ----------------------------------------------------------------------------- GGUF blocks (numpy in/out)

"""BitLinear: the BitNet b1.58 linear layer (ternary weights, int8 activations), and its fp twin.

Notable choices:
- Latent full-precision weight ``(out, in)``, no bias. The forward sees ``W_q = clamp(round(W/s), -1, 1)·s`` with
  per-tensor ``s = max(mean|W|, 1e-5)`` and per-token int8 activations ``x_q = clamp(round(x·127/max|x|))·max|x|/127``
  (``ops.absmean_quantize``, ``ops.quantize_acts_int8``), then ``F.linear``. Both use the straight-through estimator
  (Bengio et al. 2013; BitNet, Wang et al. 2023): the backward treats quantization as the identity. We write it as
  a tiny autograd Function rather than ``w + (q(w) - w).detach()``: the same gradients, two fewer full-size passes
  and no saved tensors for the quantizer.
- Inference on CPU (module in eval mode, no gradient wanted, input on CPU) packs the weight once to the kernel layout
  (``ops.pack_ternary``), caches it keyed on the weight's ``_version`` and storage (so an optimizer step or a
  ``load_state_dict`` invalidates it) and runs the Rust kernel (``ops.ternary_linear``). Other devices, and
  training, use the torch fake-quant math. :func:`torch_path_only` forces the torch path (tests compare both).
- ``quant="fp"`` is a plain ``F.linear``: the full-precision baseline of the same architecture.
- Training in bfloat16 (:func:`set_matmul_dtype`, chosen once by the trainer from what the CPU has). The QAT
  operands are integers: activation codes in [-127, 127] and trits, both exact in bf16, so
  ``(q_bf16 @ t_bf16ᵀ)·(step·s)`` on AMX (fp32 accumulation) is the fp32 result up to summation order and the
  final bf16 rounding of the product. :class:`_BitLinearBF16` does that in one autograd Function that saves the
  bf16 codes (half the bytes of the fp32 fake-quant tensors) and computes the backward as
  ``dX = (dY @ t)·s`` (exact trits) and ``dW = (dY·step)ᵀ @ q`` (exact integers), with dY in bf16 as in any
  mixed-precision training; the gradients stay straight-through. The fp32 master weight is quantized once per
  call (no separate bf16 weight copy is kept).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nanochat import ops
from nanochat.ops.ternary import MIN_ACT_ABSMAX, MIN_WEIGHT_SCALE

QK_K = 256

_state = threading.local()
_matmul_dtype: torch.dtype = torch.float32  # the QAT training matmul dtype (set_matmul_dtype)


def set_matmul_dtype(dtype: torch.dtype) -> None:
    """QAT training matmuls in ``dtype``: float32 (the fake-quant reference) or bfloat16 (exact operands)."""
    global _matmul_dtype
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"BitLinear matmul dtype must be float32 or bfloat16, got {dtype}")
    _matmul_dtype = dtype


def get_matmul_dtype() -> torch.dtype:
    return _matmul_dtype


def _torch_forced() -> bool:
    return getattr(_state, "torch_only", False)


@contextlib.contextmanager
def torch_path_only(enabled: bool = True) -> Iterator[None]:
    """Within this block (this thread), BitLinear never uses the Rust kernel: the test hook for the slow twin."""
    prev = _torch_forced()
    _state.torch_only = enabled
    try:
        yield
    finally:
        _state.torch_only = prev


class _STEWeight(torch.autograd.Function):
    """Ternary fake-quant of a weight; backward passes the gradient straight through."""

    @staticmethod
    def forward(ctx: Any, w: Tensor) -> Tensor:
        trits, scale = ops.absmean_quantize(w)
        return trits * scale

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad


class _STEActs(torch.autograd.Function):
    """Per-token int8 fake-quant of activations; backward passes the gradient straight through."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        q, step = ops.quantize_acts_int8(x)
        return q * step

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad


class _BitLinearBF16(torch.autograd.Function):
    """``y = (q @ tᵀ)·(step·s)`` with bf16 integer operands (see the module docstring); straight-through grads."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, out_dtype: torch.dtype) -> Tensor:
        with torch.no_grad():
            s = w.abs().mean().clamp(min=MIN_WEIGHT_SCALE)  # () fp32
            t = (w / s).round_().clamp_(-1, 1).to(torch.bfloat16)  # (out, in) trits
            x2 = x.reshape(-1, x.shape[-1])  # (N, in)
            lo, hi = torch.aminmax(x2, dim=-1, keepdim=True)  # one pass, no |x| temporary
            amax = torch.maximum(hi, -lo).float().clamp_(min=MIN_ACT_ABSMAX)  # (N, 1)
            # the same arithmetic as ops.quantize_acts_int8 (|x·127/amax| <= 127, so no clamp is needed)
            q = (x2.float() * (127.0 / amax)).round_().to(torch.bfloat16)  # (N, in) integer codes
            step = amax / 127.0  # (N, 1)
            y = (q @ t.mT).float().mul_(step * s)  # (N, out)
        ctx.save_for_backward(q, t, step, s)
        ctx.x_dtype = x.dtype
        return y.to(out_dtype).view(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        q, t, step, s = ctx.saved_tensors
        g2 = gy.reshape(-1, gy.shape[-1])  # (N, out)
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = (g2.to(torch.bfloat16) @ t).float().mul_(s).to(ctx.x_dtype).view(*gy.shape[:-1], t.shape[1])
        if ctx.needs_input_grad[1]:
            gw = ((g2.float() * step).to(torch.bfloat16).mT @ q).float()  # (out, in)
        return gx, gw, None


def fake_quant_weight(w: Tensor) -> Tensor:
    """``clamp(round(w/s), -1, 1)·s`` with ``s = mean|w|``; identity gradient."""
    return _STEWeight.apply(w)


def fake_quant_acts(x: Tensor) -> Tensor:
    """Per-row int8 ``round(x·127/max|x|)·max|x|/127``; identity gradient."""
    return _STEActs.apply(x)


class BitLinear(nn.Module):
    """``y = x · W_qᵀ`` with ternary ``W_q`` and int8 activations (``quant="ternary"``) or plain fp (``"fp"``)."""

    def __init__(self, in_features: int, out_features: int, quant: str = "ternary") -> None:
        super().__init__()
        if quant not in ("ternary", "fp"):
            raise ValueError(f"BitLinear: quant must be 'ternary' or 'fp', got {quant!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.quant = quant
        self.weight = nn.Parameter(torch.empty(out_features, in_features))  # (out, in)
        # (key, packed uint8 (out, in/4), scale f32 0-dim): not a buffer, never saved, rebuilt on demand
        self._packed: tuple[tuple[int, int, torch.dtype], Tensor, Tensor] | None = None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, quant={self.quant!r}"

    def _use_kernel(self, x: Tensor) -> bool:
        return (
            not self.training
            and x.device.type == "cpu"
            and self.weight.device.type == "cpu"
            and self.in_features % QK_K == 0
            and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
            and not _torch_forced()
        )

    def packed_weight(self) -> tuple[Tensor, Tensor]:
        """``(packed uint8 (out, in/4), scale f32)`` of the current weight, cached until the weight changes."""
        w = self.weight
        key = (w._version, w.data_ptr(), w.dtype)
        if self._packed is None or self._packed[0] != key:
            with torch.no_grad():
                packed, scale = ops.pack_ternary(w.detach())
            self._packed = (key, packed, scale)
        return self._packed[1], self._packed[2]

    def forward(self, x: Tensor) -> Tensor:  # (..., in) -> (..., out)
        if self.quant == "fp":
            return F.linear(x, self.weight)
        if self._use_kernel(x):
            packed, scale = self.packed_weight()
            return ops.ternary_linear(x, packed, scale)
        if _matmul_dtype == torch.bfloat16 and self.weight.dtype == torch.float32:
            dev = x.device.type
            autocast = dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev)
            out = torch.get_autocast_dtype(dev) if autocast else x.dtype
            return _BitLinearBF16.apply(x, self.weight, out)
        return F.linear(fake_quant_acts(x), fake_quant_weight(self.weight).to(x.dtype))

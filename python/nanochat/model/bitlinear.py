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

QK_K = 256

_state = threading.local()


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
        return F.linear(fake_quant_acts(x), fake_quant_weight(self.weight).to(x.dtype))

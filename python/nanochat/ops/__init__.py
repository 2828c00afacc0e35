"""Torch custom ops over the Rust core — the only package that imports ``nanochat._core``.

Each op is a ``torch.library.custom_op`` in the ``nanochat::`` namespace: its CPU implementation
calls Rust, other devices (CUDA) run the same math in plain torch, and a fake implementation lets
``torch.compile`` trace it. Model, engine and training code call these functions, never ``_core``.
"""

from nanochat.ops.mhc import permutation_basis, sinkhorn, sinkhorn_reference
from nanochat.ops.ternary import (
    absmean_quantize,
    available_kernels,
    default_kernel,
    get_num_threads,
    pack_gguf,
    pack_ternary,
    quantize_acts_int8,
    set_kernel,
    set_num_threads,
    ternary_linear,
    ternary_linear_reference,
    tq1_0_to_kernel_layout,
    tq2_0_to_kernel_layout,
    unpack_ternary,
)

__all__ = [
    "absmean_quantize",
    "available_kernels",
    "default_kernel",
    "get_num_threads",
    "pack_gguf",
    "pack_ternary",
    "permutation_basis",
    "sinkhorn",
    "sinkhorn_reference",
    "quantize_acts_int8",
    "set_kernel",
    "set_num_threads",
    "ternary_linear",
    "ternary_linear_reference",
    "tq1_0_to_kernel_layout",
    "tq2_0_to_kernel_layout",
    "unpack_ternary",
]

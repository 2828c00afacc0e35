"""Torch custom ops over the Rust core — the only package that imports ``nanochat._core``.

Each op is a ``torch.library.custom_op`` in the ``nanochat::`` namespace: its CPU implementation
calls Rust, other devices (CUDA) run the same math in plain torch, and a fake implementation lets
``torch.compile`` trace it. Model, engine and training code call these functions, never ``_core``.
"""

from nanochat.ops.engine import EngineSession, RustEngine, build_rust_engine, engine_weights, rust_engine_from_weights
from nanochat.ops.mhc import (
    bvn_basis_weights,
    bvn_decompose,
    hres_diagnostics,
    permutation_basis,
    permutations,
    sinkhorn,
    sinkhorn_backward,
    sinkhorn_backward_reference,
    sinkhorn_reference,
)
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
    "EngineSession",
    "RustEngine",
    "build_rust_engine",
    "engine_weights",
    "rust_engine_from_weights",
    "absmean_quantize",
    "available_kernels",
    "default_kernel",
    "get_num_threads",
    "pack_gguf",
    "pack_ternary",
    "bvn_basis_weights",
    "bvn_decompose",
    "hres_diagnostics",
    "permutation_basis",
    "permutations",
    "sinkhorn",
    "sinkhorn_backward",
    "sinkhorn_backward_reference",
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

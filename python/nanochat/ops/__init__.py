"""Torch custom ops over the Rust core — the only package that imports ``nanochat._core``.

Each op is a ``torch.library.custom_op`` in the ``nanochat::`` namespace: its CPU implementation
calls Rust, other devices (CUDA) run the same math in plain torch, and a fake implementation lets
``torch.compile`` trace it. Model, engine and training code call these functions, never ``_core``.

Names are re-exported lazily (:func:`nanochat.lazy_exports`): the GGUF block helpers and the engine's extension types
(:mod:`.native`) need numpy alone, and the custom ops (:mod:`.ternary`, :mod:`.mhc`) are registered with torch when
first used. The Rust engine's Python wrapper walks a model's modules, so it lives above ``model``, in
:mod:`nanochat.engine.rust_engine`.
"""

from __future__ import annotations

from nanochat import lazy_exports

_EXPORTS = {
    **dict.fromkeys(
        [
            "EngineSession",
            "available_kernels",
            "default_kernel",
            "engine_model",
            "get_num_threads",
            "max_threads",
            "pack_gguf",
            "set_num_threads",
            "tq1_0_to_kernel_layout",
            "tq2_0_to_kernel_layout",
            "xxh3_128_hex",
        ],
        "native",
    ),
    **dict.fromkeys(
        [
            "bvn_basis_weights",
            "bvn_decompose",
            "hres_diagnostics",
            "permutation_basis",
            "permutations",
            "sinkhorn",
            "sinkhorn_backward",
            "sinkhorn_backward_reference",
            "sinkhorn_reference",
        ],
        "mhc",
    ),
    **dict.fromkeys(
        [
            "absmean_quantize",
            "pack_ternary",
            "quantize_acts_int8",
            "set_kernel",
            "ternary_linear",
            "ternary_linear_reference",
            "unpack_ternary",
        ],
        "ternary",
    ),
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)

"""The numpy-only face of the Rust core: GGUF ternary block packing and repacking, thread and kernel information, and
the engine's extension types (wrapped by :mod:`nanochat.engine.rust_engine`).

No torch here: loading a GGUF into the Rust engine and serving it needs only numpy, and
importing torch costs about a second of a command's start-up. The torch custom ops are in :mod:`nanochat.ops.ternary`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from nanochat import _core

EngineSession = _core.EngineSession  # one sequence's KV cache in the Rust engine


def engine_model(
    config: dict[str, Any],
    weights: dict[str, Any],
    threads: int,
    kernel: str | None,
    head: str,
    kv: str,
    profile: bool,
) -> Any:
    """``_core.EngineModel``: the Rust engine built from ``weights`` (see :func:`nanochat.engine.rust_engine_from_weights`
    for the arguments); here so that ``ops`` stays the only package importing ``_core``."""
    return _core.EngineModel(config, weights, threads, kernel, head, kv, profile)


def available_kernels() -> list[str]:
    return list(_core.available_kernels())


def default_kernel() -> tuple[str, str]:
    """The kernel used when none is forced, and the reason it was chosen."""
    return _core.default_kernel()


def set_num_threads(n: int) -> None:
    """Threads for the Rust kernels (0 = automatic)."""
    _core.set_num_threads(int(n))


def get_num_threads() -> int:
    return int(_core.get_num_threads())


def max_threads() -> int:
    """The most threads the Rust core accepts anywhere (4 × the cores, at least 8); more raise ValueError."""
    return int(_core.max_threads())


def pack_gguf(trits: np.ndarray, scale: float, quant: str = "tq2_0") -> np.ndarray:
    """Pack int8 trits (``rows × cols``) into GGUF TQ2_0/TQ1_0 blocks, every block's ``d = fp16(scale)``."""
    if quant == "tq2_0":
        return _core.pack_tq2_0(np.ascontiguousarray(trits, dtype=np.int8), float(scale))
    if quant == "tq1_0":
        return _core.pack_tq1_0(np.ascontiguousarray(trits, dtype=np.int8), float(scale))
    raise ValueError(f"unknown ternary GGUF type {quant!r} (tq2_0 or tq1_0)")


def _gguf_bytes(data: np.ndarray, fn: str) -> np.ndarray:
    """``data`` as a C-contiguous uint8 array; any other dtype is refused (a cast would turn floats into garbage)."""
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        got = data.dtype if isinstance(data, np.ndarray) else type(data).__name__
        raise TypeError(f"{fn}: expected GGUF block bytes as a numpy uint8 array, got {got}")
    return np.ascontiguousarray(data)


def tq2_0_to_kernel_layout(data: np.ndarray) -> tuple[np.ndarray, float]:
    """TQ2_0 bytes (``rows × bytes`` uint8) -> (kernel-layout packed ``rows × cols/4``, per-tensor scale)."""
    packed, scale = _core.tq2_0_to_kernel_layout(_gguf_bytes(data, "tq2_0_to_kernel_layout"))
    return packed, float(scale)


def tq1_0_to_kernel_layout(data: np.ndarray) -> tuple[np.ndarray, float]:
    """TQ1_0 bytes (uint8) -> (kernel-layout packed, per-tensor scale); refuses per-block scales that differ."""
    trits, d = _core.unpack_tq1_0(_gguf_bytes(data, "tq1_0_to_kernel_layout"))
    nz = d[d != 0]
    scale = float(np.abs(nz).max()) if nz.size else 0.0
    if nz.size and not np.all(nz == scale):
        raise ValueError("TQ1_0 blocks carry different scales; the ternary kernels need one per-tensor scale")
    return _core.pack_trits(trits), scale


def xxh3_128_hex(parts: Sequence[bytes | np.ndarray]) -> str:
    """XXH3-128 of the concatenation of ``parts`` (bytes or C-contiguous uint8 arrays), 32 hex digits: the content
    checksum of our exports (``nanochat.export.names.CHECKSUM_KEY``), hashed in Rust (GIL held: the parts are borrowed)."""
    return _core.xxh3_128_hex(list(parts))

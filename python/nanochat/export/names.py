"""Tensor and key names of the two GGUF architectures we write, mapped to the model's state-dict names.

``bitnet`` is llama.cpp's architecture for BitNet b1.58 models (standard residual, SwiGLU, sub-norms, NEOX RoPE,
head tied to ``token_embd``). ``nanochat`` is the same layout plus what llama.cpp cannot express: mHC residual
streams (``blk.N.mhc_attn.*``, ``blk.N.mhc_mlp.*``), QK-norm (``blk.N.attn_q_norm``/``attn_k_norm``, llama.cpp's
names), ReLU² MLPs (no ``ffn_gate``) and an untied head (``output``).
"""

from __future__ import annotations

import re

from nanochat.model.schema import BLOCK_ROWS, GLOBAL_ROWS, MHC_PARAMS

__all__ = [
    "ARCH_BITNET",
    "ARCH_NANOCHAT",
    "BLOCK_TENSORS",
    "CHECKSUM_ALGOS",
    "CHECKSUM_HEX_LEN",
    "CHECKSUM_KEY",
    "CHECKSUM_KEY_SHA256",
    "GLOBAL_TENSORS",
    "MHC_PARAMS",
    "TERNARY_BLOCK_TENSORS",
    "TOKENIZER_JSON_KEY",
    "from_gguf_name",
    "is_ternary",
    "to_gguf_name",
]

ARCH_BITNET = "bitnet"
ARCH_NANOCHAT = "nanochat"
# the content checksum our exports carry: in a GGUF's metadata (over metadata and tensors, see
# ``GGUFFile.content_digest``) and in a safetensors file's ``__metadata__`` (over the other metadata and the tensors).
# It guards against corruption, not against an attacker (anyone can recompute an unkeyed hash), so exports write a fast
# XXH3-128 (Rust: a few ms for a 50 MB model) under CHECKSUM_KEY; files written before carry SHA-256
# (~45 ms) under CHECKSUM_KEY_SHA256 and are still verified with it.
CHECKSUM_KEY = "nanochat.checksum.xxh3_128"
CHECKSUM_KEY_SHA256 = "nanochat.checksum.sha256"
CHECKSUM_ALGOS = {CHECKSUM_KEY: "xxh3_128", CHECKSUM_KEY_SHA256: "sha256"}  # key -> algorithm (hex digest)
CHECKSUM_HEX_LEN = {"xxh3_128": 32, "sha256": 64}
# the tokenizer as HF tokenizer.json in our GGUF exports, beside the tokenizer.ggml.* arrays other runtimes read: a
# loader builds it with one parse instead of validating and assembling the arrays (used only when the checksum holds)
TOKENIZER_JSON_KEY = "nanochat.tokenizer.json"

# model state-dict suffix within blocks.N -> GGUF name within blk.N, and the same for the global tensors: from the
# model schema (nanochat.model.schema), like the shapes and which tensors are BitLinear weights
BLOCK_TENSORS: dict[str, str] = {r.name: r.gguf for r in BLOCK_ROWS}  # mHC parameters keep their names
GLOBAL_TENSORS: dict[str, str] = {r.name: r.gguf for r in GLOBAL_ROWS}
TERNARY_BLOCK_TENSORS = frozenset(r.name for r in BLOCK_ROWS if r.ternary)  # BitLinear weights, within blocks.N

_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")
_BLK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


def to_gguf_name(name: str) -> str:
    """Model state-dict name -> GGUF tensor name (KeyError for names with no GGUF counterpart)."""
    if name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[name]
    m = _BLOCK_RE.match(name)
    if m:
        i, rest = m.groups()
        if rest in BLOCK_TENSORS:
            return f"blk.{i}.{BLOCK_TENSORS[rest]}"
    raise KeyError(f"no GGUF name for model tensor {name!r}")


_INV_BLOCK = {v: k for k, v in BLOCK_TENSORS.items()}
_INV_GLOBAL = {v: k for k, v in GLOBAL_TENSORS.items()}


def from_gguf_name(name: str) -> str:
    """GGUF tensor name -> model state-dict name (KeyError when unknown)."""
    if name in _INV_GLOBAL:
        return _INV_GLOBAL[name]
    m = _BLK_RE.match(name)
    if m:
        i, rest = m.groups()
        if rest in _INV_BLOCK:
            return f"blocks.{i}.{_INV_BLOCK[rest]}"
    raise KeyError(f"unknown GGUF tensor {name!r}")


def is_ternary(name: str) -> bool:
    """Whether a model state-dict tensor is a BitLinear weight (packed as TQ2_0/TQ1_0)."""
    m = _BLOCK_RE.match(name)
    return m is not None and m.group(2) in TERNARY_BLOCK_TENSORS

"""Tensor and key names of the two GGUF architectures we write, mapped to the model's state-dict names.

``bitnet`` is llama.cpp's architecture for BitNet b1.58 models (standard residual, SwiGLU, sub-norms, NEOX RoPE,
head tied to ``token_embd``). ``nanochat`` is the same layout plus what llama.cpp cannot express: mHC residual
streams (``blk.N.mhc_attn.*``, ``blk.N.mhc_mlp.*``), QK-norm (``blk.N.attn_q_norm``/``attn_k_norm``, llama.cpp's
names), ReLU² MLPs (no ``ffn_gate``) and an untied head (``output``).
"""

from __future__ import annotations

import re

ARCH_BITNET = "bitnet"
ARCH_NANOCHAT = "nanochat"
# the content checksum our exports carry (hex SHA-256): in a GGUF's metadata (over metadata and tensors, see
# ``GGUFFile.content_digest``) and in a safetensors file's ``__metadata__`` (over the other metadata and the tensors)
CHECKSUM_KEY = "nanochat.checksum.sha256"

# model state-dict suffix within blocks.N -> GGUF name within blk.N
BLOCK_TENSORS: dict[str, str] = {
    "attn_norm.weight": "attn_norm.weight",
    "attn.q_proj.weight": "attn_q.weight",
    "attn.k_proj.weight": "attn_k.weight",
    "attn.v_proj.weight": "attn_v.weight",
    "attn.o_proj.weight": "attn_output.weight",
    "attn.sub_norm.weight": "attn_sub_norm.weight",
    "attn.q_norm.weight": "attn_q_norm.weight",
    "attn.k_norm.weight": "attn_k_norm.weight",
    "mlp_norm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.sub_norm.weight": "ffn_sub_norm.weight",
}
MHC_PARAMS = ("pre_bias", "post_bias", "res_logits", "alpha", "proj")
GLOBAL_TENSORS: dict[str, str] = {
    "wte.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
TERNARY_SUFFIXES = (
    "q_proj.weight",
    "k_proj.weight",
    "v_proj.weight",
    "o_proj.weight",
    "gate_proj.weight",
    "up_proj.weight",
    "down_proj.weight",
)

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
        if rest.startswith(("mhc_attn.", "mhc_mlp.")):
            return f"blk.{i}.{rest}"
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
        if rest.startswith(("mhc_attn.", "mhc_mlp.")):
            return f"blocks.{i}.{rest}"
    raise KeyError(f"unknown GGUF tensor {name!r}")


def is_ternary(name: str) -> bool:
    """Whether a model state-dict tensor is a BitLinear weight (packed as TQ2_0/TQ1_0)."""
    return name.startswith("blocks.") and name.endswith(TERNARY_SUFFIXES)

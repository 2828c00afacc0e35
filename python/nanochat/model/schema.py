"""The model schema: every tensor a :class:`GPTConfig` implies, and every hyperparameter a GGUF file stores.

One table, from which the rest derive (issue 11 §2): the state-dict names and shapes a loader expects
(:func:`expected_shapes`), which tensors are BitLinear weights (packed TQ2_0/TQ1_0 when ``quant = "ternary"``), what
each is called in a GGUF file (``nanochat.export.names``) and in what float type the exporter writes the others, and
the ``<arch>.*`` keys that carry the config (``write_hparams``/``_config_from_gguf`` in ``nanochat.export.gguf_io``).
The config's keys are :class:`GPTConfig`'s fields (:data:`CONFIG_KEYS`).

The Rust engine's config keys and tensor names are generated from this table (``scripts/gen_rust_schema.py`` writes
``rust/core/src/engine/schema_gen.rs``; ``tests/test_schema.py`` fails when the file is stale); its shapes and
``Config::validate`` are checked against it there too: the engine is built from weights made from this table alone,
for every model variant, and the accepted keys and validation are held equal, so drift fails CI.

Plain Python (no torch): loaders use it before deciding to build a model.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields

from nanochat.model.config import GPTConfig

CONFIG_KEYS: tuple[str, ...] = tuple(f.name for f in fields(GPTConfig))
MHC_SUBLAYERS = ("mhc_attn", "mhc_mlp")  # one StreamResidual around each sublayer of a block
MHC_PARAMS = ("pre_bias", "post_bias", "res_logits", "alpha", "proj")


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a model: its state-dict name, shape, whether it is a BitLinear weight, and its GGUF form."""

    name: str  # state-dict name: "wte.weight", "blocks.3.attn.q_proj.weight", "blocks.3.mhc_attn.proj"
    shape: tuple[int, ...]  # torch order (rows, cols); GGUF lists the dims reversed
    ternary: bool  # a BitLinear weight: packed TQ2_0/TQ1_0 when quant = "ternary", else a float like the rest
    gguf_name: str  # "token_embd.weight", "blk.3.attn_q.weight", "blk.3.mhc_attn.proj"
    f16: bool  # written as F16 by the exporter when not packed (embedding, head, BitLinear under quant = "fp")


# ----------------------------------------------------------------------------- the table

# Dimensions a shape is written in. "R" is the H_res parameter count: n! mixture weights (mhc_lite) or n*n logits.
Dims = Mapping[str, int]


def dims(cfg: GPTConfig) -> dict[str, int]:
    """The named dimensions of ``cfg`` the shapes below are written in."""
    n = cfg.n_streams
    r = math.factorial(n) if cfg.residual == "mhc_lite" else n * n
    return {
        "V": cfg.vocab_size,
        "C": cfg.n_embd,
        "H": cfg.mlp_hidden,
        "KV": cfg.n_kv_head * cfg.head_dim,
        "HD": cfg.head_dim,
        "N": n,
        "R": r,
        "3": 3,  # alpha: gates on the pre, post and res dynamic parts
        "2N+R": 2 * n + r,  # rows of the mHC projection: H_pre, H_post and H_res parameters
        "NC": n * cfg.n_embd,  # the flattened streams
    }


# When a tensor exists: a predicate on the config.
_ALWAYS: Callable[[GPTConfig], bool] = lambda c: True  # noqa: E731
_WHEN: dict[str, Callable[[GPTConfig], bool]] = {
    "always": _ALWAYS,
    "untied": lambda c: not c.tie_embeddings,
    "qk_norm": lambda c: c.qk_norm,
    "swiglu": lambda c: c.mlp == "swiglu",
    "mhc": lambda c: c.residual != "standard",
}


@dataclass(frozen=True)
class _Row:
    name: str  # state-dict name (within blocks.N for block tensors)
    gguf: str  # GGUF name (within blk.N for block tensors)
    shape: tuple[str, ...]  # in the names of dims()
    ternary: bool = False
    f16: bool = False
    when: str = "always"
    last: bool = False  # a global tensor that comes after the blocks (the final norm, the head)


GLOBAL_ROWS: tuple[_Row, ...] = (
    _Row("wte.weight", "token_embd.weight", ("V", "C"), f16=True),
    _Row("norm.weight", "output_norm.weight", ("C",), last=True),
    _Row("lm_head.weight", "output.weight", ("V", "C"), f16=True, when="untied", last=True),
)
BLOCK_ROWS: tuple[_Row, ...] = (
    _Row("attn_norm.weight", "attn_norm.weight", ("C",)),
    _Row("attn.q_proj.weight", "attn_q.weight", ("C", "C"), ternary=True),
    _Row("attn.k_proj.weight", "attn_k.weight", ("KV", "C"), ternary=True),
    _Row("attn.v_proj.weight", "attn_v.weight", ("KV", "C"), ternary=True),
    _Row("attn.q_norm.weight", "attn_q_norm.weight", ("HD",), when="qk_norm"),
    _Row("attn.k_norm.weight", "attn_k_norm.weight", ("HD",), when="qk_norm"),
    _Row("attn.sub_norm.weight", "attn_sub_norm.weight", ("C",)),
    _Row("attn.o_proj.weight", "attn_output.weight", ("C", "C"), ternary=True),
    _Row("mlp_norm.weight", "ffn_norm.weight", ("C",)),
    _Row("mlp.gate_proj.weight", "ffn_gate.weight", ("H", "C"), ternary=True, when="swiglu"),
    _Row("mlp.up_proj.weight", "ffn_up.weight", ("H", "C"), ternary=True),
    _Row("mlp.sub_norm.weight", "ffn_sub_norm.weight", ("H",)),
    _Row("mlp.down_proj.weight", "ffn_down.weight", ("C", "H"), ternary=True),
    *(
        _Row(f"{sub}.{p}", f"{sub}.{p}", shape, when="mhc")
        for sub in MHC_SUBLAYERS
        for p, shape in zip(MHC_PARAMS, (("N",), ("N",), ("R",), ("3",), ("2N+R", "NC")), strict=True)
    ),
)


def tensor_specs(cfg: GPTConfig) -> list[TensorSpec]:
    """Every tensor of a model with ``cfg``, in the torch model's state-dict order (the embedding, block by block,
    the final norm and head)."""
    d = dims(cfg)

    def spec(row: _Row, prefix: str, gprefix: str) -> TensorSpec:
        shape = tuple(d[k] for k in row.shape)
        return TensorSpec(prefix + row.name, shape, row.ternary, gprefix + row.gguf, row.f16 or row.ternary)

    glob = [r for r in GLOBAL_ROWS if _WHEN[r.when](cfg)]
    out = [spec(r, "", "") for r in glob if not r.last]
    rows = [r for r in BLOCK_ROWS if _WHEN[r.when](cfg)]
    for i in range(cfg.n_layer):
        out.extend(spec(r, f"blocks.{i}.", f"blk.{i}.") for r in rows)
    out.extend(spec(r, "", "") for r in glob if r.last)
    return out


def expected_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """State-dict name -> shape of every tensor a model with ``cfg`` has, from the config alone (building even a
    meta-device model costs seconds of first-use torch imports, which a loader should not pay; a test holds this
    equal to ``GPT(cfg).state_dict()``)."""
    return {s.name: s.shape for s in tensor_specs(cfg)}


# ----------------------------------------------------------------------------- GGUF hyperparameters


@dataclass(frozen=True)
class HParam:
    """A config field stored as ``<arch>.<key>`` in GGUF (``bitnet``: llama.cpp's standard keys)."""

    field: str  # GPTConfig field
    key: str  # after "<arch>."
    kind: str  # GGUF value type the exporter writes: "u32", "f32", "str", "bool"
    required: bool = True  # a file without it is refused (else a default applies, see _config_from_gguf)


# The keys both architectures carry, in the order the exporter writes them (llama.cpp's names; the converter's
# add_* methods write the same types).
HPARAMS: tuple[HParam, ...] = (
    HParam("seq_len", "context_length", "u32"),
    HParam("n_embd", "embedding_length", "u32"),
    HParam("n_layer", "block_count", "u32"),
    HParam("mlp_hidden", "feed_forward_length", "u32"),
    HParam("n_head", "attention.head_count", "u32"),
    HParam("n_kv_head", "attention.head_count_kv", "u32", required=False),  # default: n_head (no GQA)
    HParam("norm_eps", "attention.layer_norm_rms_epsilon", "f32"),
    HParam("rope_theta", "rope.freq_base", "f32", required=False),  # default: GPTConfig's
    HParam("vocab_size", "vocab_size", "u32", required=False),  # default: the tokenizer's length
)
# What only architecture ``nanochat`` stores (``bitnet`` fixes them: standard, swiglu, no QK-norm, tied, ternary).
NANOCHAT_HPARAMS: tuple[HParam, ...] = (
    HParam("residual", "residual", "str"),
    HParam("n_streams", "n_streams", "u32"),
    HParam("sinkhorn_iters", "sinkhorn_iters", "u32"),
    HParam("mlp", "mlp", "str"),
    HParam("qk_norm", "qk_norm", "bool"),
    HParam("tie_embeddings", "tie_embeddings", "bool"),
    HParam("quant", "quant", "str", required=False),  # files from before it: "ternary"
)
BITNET_FIXED: dict[str, object] = {
    "residual": "standard",
    "mlp": "swiglu",
    "qk_norm": False,
    "tie_embeddings": True,
    "quant": "ternary",
}
# Fields no file stores: training-only (init_std) or meaningless for the architecture (bitnet's n_streams and
# sinkhorn_iters); a loaded config takes GPTConfig's defaults for them.
NOT_STORED = ("init_std",)


# ----------------------------------------------------------------------------- checks against tensor directories

_BLOCK_INDEX = re.compile(r"^(?:blocks|blk)\.(\d+)\.")


def layer_count_problem(n_layer: int, names: Iterable[str]) -> str | None:
    """Why ``n_layer`` disagrees with the blocks present among tensor ``names`` (``blocks.N.*`` or ``blk.N.*``), or
    None. Cheap and done first: anything per layer (``expected_shapes``, building a model) costs O(n_layer), and a
    header's ``n_layer`` is just a number anyone can patch to 2**32-1."""
    idx = {int(m.group(1)) for n in names if (m := _BLOCK_INDEX.match(n))}
    if len(idx) == n_layer and (not idx or max(idx) == n_layer - 1):
        return None
    have = f"{len(idx)} blocks" + (f" (numbered {min(idx)}..{max(idx)})" if idx else "")
    return f"n_layer (block_count) is {n_layer}, but the file has tensors for {have}"


def state_dict_problem(cfg: GPTConfig, shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """Why a tensor directory ``{state-dict name: shape}`` does not fit ``cfg``, or None (layers checked first)."""
    problem = layer_count_problem(cfg.n_layer, shapes)
    if problem:
        return problem
    want = expected_shapes(cfg)
    missing = sorted(set(want) - set(shapes))
    unexpected = sorted(set(shapes) - set(want))
    wrong = [
        f"{k} is {tuple(shapes[k])}, expected {want[k]}" for k in want if k in shapes and tuple(shapes[k]) != want[k]
    ]
    parts = []
    if missing:
        parts.append(f"missing {missing[:5]}" + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    if unexpected:
        parts.append(
            f"unexpected {unexpected[:5]}" + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else "")
        )
    if wrong:
        parts.append("; ".join(wrong[:5]) + (f" and {len(wrong) - 5} more" if len(wrong) > 5 else ""))
    return "; ".join(parts) or None


def raw_layer_count_problem(raw: object, names: Iterable[str]) -> str | None:
    """:func:`layer_count_problem` for a not yet validated config dict (JSON metadata, ``state.json``): run before
    :class:`GPTConfig` sees it, so a patched ``n_layer`` is named against the tensors the file holds rather than
    against a limit. None when ``raw`` has no integer ``n_layer`` (the config's own validation says why)."""
    n = raw.get("n_layer") if isinstance(raw, dict) else None
    if isinstance(n, bool) or not isinstance(n, int):
        return None
    return layer_count_problem(n, names)

"""One model schema (issue 11 §2): ``nanochat.model.schema`` against the torch model, the GGUF files, and the Rust
engine (its accepted config keys, the tensor names it takes, ``Config::validate``), so drift fails here. The Rust
names are generated from the schema (``scripts/gen_rust_schema.py``); the committed file must equal a fresh run.

The Rust side is read through the binding: the keys from its "unknown key" error, the tensor names and shapes by
building the engine from weights made from the schema alone (the engine refuses a missing, unexpected or misshapen
tensor), and its validation by what ``EngineModel`` refuses before it looks at any weight.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import math
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from nanochat import _core, ops
from nanochat.data.tokenizer import Tokenizer
from nanochat.engine.rust_engine import rust_engine_from_weights
from nanochat.export import export_gguf, read_gguf
from nanochat.model import GPT, GPTConfig
from nanochat.model.bitlinear import BitLinear
from nanochat.model.config import HARD_LIMITS, MAX_HEAD_DIM, MAX_MHC_STREAMS, ConfigError
from nanochat.model.schema import (
    BITNET_FIXED,
    CONFIG_KEYS,
    HPARAMS,
    NANOCHAT_HPARAMS,
    NOT_STORED,
    expected_shapes,
    tensor_specs,
)

# every combination of what changes the tensor set
VARIANTS = [
    dict(residual=r, mlp=m, qk_norm=q, tie_embeddings=t)
    for r, m, q, t in itertools.product(
        ("standard", "mhc_lite", "mhc"), ("swiglu", "relu2"), (False, True), (True, False)
    )
]
SMALL = dict(vocab_size=96, seq_len=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=256, mlp_hidden=512, n_streams=3)


def small(**kw: Any) -> GPTConfig:
    return GPTConfig(**{**SMALL, **kw})


def vid(kw: dict[str, Any]) -> str:
    return "-".join(str(v) for v in kw.values())


# ----------------------------------------------------------------------------- the schema vs the torch model


@pytest.mark.parametrize("kw", VARIANTS, ids=vid)
def test_specs_are_the_torch_models_tensors(kw):
    """Names, order and shapes equal ``GPT(cfg).state_dict()``; ``ternary`` marks exactly the BitLinear weights."""
    cfg = small(**kw)
    with torch.device("meta"):
        m = GPT(cfg)
    specs = tensor_specs(cfg)
    assert [(s.name, s.shape) for s in specs] == [(k, tuple(v.shape)) for k, v in m.state_dict().items()]
    bitlinear = {f"{n}.weight" for n, mod in m.named_modules() if isinstance(mod, BitLinear)}
    assert {s.name for s in specs if s.ternary} == bitlinear
    assert expected_shapes(cfg) == {s.name: s.shape for s in specs}


def test_gguf_names_are_llama_cpps_bitnet_names():
    """Spelled out here from llama.cpp's ``bitnet`` tensor list (DESIGN §4), independently of the schema."""
    cfg = small(residual="standard", qk_norm=False)
    per_block = [
        "attn_norm",
        "attn_q",
        "attn_k",
        "attn_v",
        "attn_output",
        "attn_sub_norm",
        "ffn_norm",
        "ffn_gate",
        "ffn_up",
        "ffn_down",
        "ffn_sub_norm",
    ]
    want = {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(cfg.n_layer) for n in per_block
    }
    assert {s.gguf_name for s in tensor_specs(cfg)} == want
    # what the exporter writes as F16 when not packed: the embedding, the head and (quant = fp) BitLinear weights
    f16 = {s.name for s in tensor_specs(small(tie_embeddings=False)) if s.f16}
    assert f16 == {"wte.weight", "lm_head.weight"} | {s.name for s in tensor_specs(small()) if s.ternary}


# ----------------------------------------------------------------------------- the schema vs GGUF hyperparameters


def test_every_config_field_is_stored_or_declared_not_stored():
    """A new GPTConfig field must get a GGUF key (or be declared training-only), or this fails."""
    stored = [hp.field for hp in (*HPARAMS, *NANOCHAT_HPARAMS)]
    assert len(stored) == len(set(stored))
    assert set(stored) | set(NOT_STORED) == {f.name for f in dataclasses.fields(GPTConfig)} == set(CONFIG_KEYS)
    assert set(BITNET_FIXED) <= {hp.field for hp in NANOCHAT_HPARAMS}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(["def f(x):\n    return x + 1\n", "print('hi')\n"] * 20, 300)


@pytest.mark.parametrize(
    "kw",
    [
        dict(residual="mhc", mlp="relu2", qk_norm=True, tie_embeddings=False, n_streams=5, sinkhorn_iters=7),
        dict(residual="mhc_lite", quant="fp", n_streams=2, rope_theta=500000.0, norm_eps=1e-6),
        dict(
            residual="standard", qk_norm=False, n_kv_head=1, rope_theta=1234.5, norm_eps=3e-5, seq_len=77, n_streams=4
        ),
    ],
    ids=["mhc", "fp", "bitnet"],
)
def test_gguf_round_trips_every_stored_field(tmp_path, tok, kw):
    """Every field the tables store comes back from the file as written (non-default values, so a key the reader
    ignores shows); only NOT_STORED fields fall back to the defaults."""
    cfg = small(vocab_size=320, init_std=0.03, **kw)
    with torch.device("meta"):
        m = GPT(cfg)
    m.to_empty(device="cpu")
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.02)
    back = read_gguf(export_gguf(m, tok, tmp_path / "m.gguf")).config
    assert back == dataclasses.replace(cfg, **{k: getattr(GPTConfig(), k) for k in NOT_STORED})


# ----------------------------------------------------------------------------- the schema vs the Rust engine


def rust_config_keys() -> set[str]:
    with pytest.raises(ValueError, match="unknown key") as e:
        _core.EngineModel({"no_such_key": 1}, {})
    m = re.search(r"\(known: ([^)]*)\)", str(e.value))
    assert m, str(e.value)
    return {k.strip() for k in m.group(1).split(",")}


def test_rust_engine_accepts_exactly_the_python_config_keys():
    assert rust_config_keys() == set(CONFIG_KEYS)


def _generator() -> Any:
    """``scripts/gen_rust_schema.py``, imported from its path (scripts/ is not a package)."""
    path = Path(__file__).resolve().parents[1] / "scripts" / "gen_rust_schema.py"
    spec = importlib.util.spec_from_file_location("gen_rust_schema", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_rust_schema_file_is_the_generators_output_byte_for_byte():
    """The Rust engine's config keys and tensor names (``rust/core/src/engine/schema_gen.rs``) are generated from
    this schema: a schema change without ``python scripts/gen_rust_schema.py`` (or a hand edit) fails here."""
    gen = _generator()
    assert gen.OUT.read_text() == gen.render(), "stale: run python scripts/gen_rust_schema.py"
    assert gen.main(["--check"]) == 0


def test_rust_schema_file_names_every_tensor_of_every_variant():
    """Read independently of the generator: the string constants of the generated file, with the block template,
    spell every tensor name the schema lists for every variant, and the config keys are GPTConfig's fields."""
    text = (Path(__file__).resolve().parents[1] / "rust" / "core" / "src" / "engine" / "schema_gen.rs").read_text()
    consts = dict(re.findall(r'pub const (\w+): &str = "([^"]*)";', text))
    keys = re.search(r"pub const CONFIG_KEYS: \[&str; (\d+)\] = \[(.*?)\];", text, re.S)
    assert keys, "CONFIG_KEYS missing"
    listed = re.findall(r'"([^"]+)"', keys.group(2))
    assert listed == [f.name for f in dataclasses.fields(GPTConfig)] and int(keys.group(1)) == len(listed)
    template = re.search(r'format!\("([^"]*)\{i\}([^"]*)\{name\}"\)', text)
    assert template, "block_tensor missing"
    values = set(consts.values())
    subs = {consts[k] for k in ("MHC_ATTN", "MHC_MLP")}
    for kw in VARIANTS:
        cfg = small(**kw)
        for s in tensor_specs(cfg):
            m = re.fullmatch(re.escape(template.group(1)) + r"(\d+)" + re.escape(template.group(2)) + "(.*)", s.name)
            rel = m.group(2) if m else s.name
            if rel.split(".")[0] in subs:
                sub, param = rel.split(".", 1)
                assert param in values, (s.name, param)
            else:
                assert rel in values, s.name


def schema_weights(cfg: GPTConfig, seed: int = 0) -> tuple[dict[str, tuple[np.ndarray, float]], dict[str, np.ndarray]]:
    """Random weights for every tensor the schema lists (and only those): BitLinear ones packed."""
    g = torch.Generator().manual_seed(seed)
    ternary, dense = {}, {}
    for s in tensor_specs(cfg):
        w = torch.randn(s.shape, generator=g) * 0.05
        if s.ternary:
            packed, scale = ops.pack_ternary(w)
            ternary[s.name] = (packed.numpy(), float(scale))
        else:
            dense[s.name] = (w + (1.0 if s.name.endswith("norm.weight") else 0.0)).numpy()
    return ternary, dense


@pytest.mark.parametrize("kw", VARIANTS, ids=vid)
def test_rust_engine_takes_exactly_the_schemas_tensors(kw):
    """The engine refuses missing, unexpected and misshapen weights, so building it from the schema's tensors alone
    shows both lists agree, for every variant; and it runs them."""
    cfg = small(**kw)
    ternary, dense = schema_weights(cfg)
    eng = rust_engine_from_weights(cfg, ternary, dense, threads=1)
    logits = eng.new_session().prefill([1, 2, 3])
    assert logits.shape == (cfg.vocab_size,) and np.isfinite(logits).all()


def test_a_schema_without_a_tensor_or_with_an_extra_one_is_refused_by_rust():
    """The check above can fail: one row fewer or one more than Rust expects is an error naming the tensor."""
    cfg = small(residual="mhc", qk_norm=True, tie_embeddings=False)
    ternary, dense = schema_weights(cfg)
    for name in [*ternary, *dense]:
        if not name.startswith(("blocks.1.", "wte", "norm", "lm_head")):
            continue
        t = {k: v for k, v in ternary.items() if k != name}
        d = {k: v for k, v in dense.items() if k != name}
        with pytest.raises(ValueError, match=re.escape(name)):
            rust_engine_from_weights(cfg, t, d, threads=1)
    with pytest.raises(ValueError, match="unexpected weights"):
        rust_engine_from_weights(cfg, ternary, {**dense, "blocks.0.attn.extra.weight": np.ones(4, np.float32)})


# ----------------------------------------------------------------------------- one validation


def python_accepts(d: dict[str, Any]) -> bool:
    try:
        GPTConfig.from_dict(d)
    except ConfigError:
        return False
    return True


def rust_accepts(d: dict[str, Any]) -> bool:
    """Whether the engine's ``Config::validate`` passes ``d``: with no weights given, a valid config gets as far as
    counting them ("needs at least N weights"); an invalid one is refused before (a value or a type error)."""
    try:
        _core.EngineModel(d, {}, 1)
    except (ValueError, TypeError, OverflowError) as e:
        return "needs at least" in str(e)
    raise AssertionError("an engine with no weights was built")


BASE = dict(GPTConfig().to_dict(), quant="ternary")  # the engine runs ternary models only (fp: the torch engine)
POOLS: dict[str, list[Any]] = {
    "vocab_size": [1, 2, 4096, HARD_LIMITS["vocab_size"], HARD_LIMITS["vocab_size"] + 1, 0, -1],
    "seq_len": [1, 256, HARD_LIMITS["seq_len"], HARD_LIMITS["seq_len"] + 1, 0],
    "n_layer": [1, 3, HARD_LIMITS["n_layer"], HARD_LIMITS["n_layer"] + 1, 0],
    "n_head": [1, 2, 3, 4, 8, 16, 2048, 1 << 16, (1 << 16) + 1, 0],
    "n_kv_head": [1, 2, 3, 4, 8, 2048, 1 << 16, (1 << 16) + 1, 0],
    "n_embd": [256, 512, 768, 1024, 100, 258, 1 << 20, (1 << 20) + 256, 0],
    "mlp_hidden": [256, 512, 300, HARD_LIMITS["mlp_hidden"], HARD_LIMITS["mlp_hidden"] + 256, 0],
    "mlp": ["swiglu", "relu2", "gelu"],
    "residual": ["standard", "mhc_lite", "mhc", "both"],
    "qk_norm": [True, False],
    "tie_embeddings": [True, False],
    "n_streams": [1, 2, 4, MAX_MHC_STREAMS, MAX_MHC_STREAMS + 1, 0],
    "sinkhorn_iters": [1, 20, HARD_LIMITS["sinkhorn_iters"], HARD_LIMITS["sinkhorn_iters"] + 1, 0],
    "rope_theta": [10000.0, 1e-300, 1e300, 0.0, -1.0, math.inf, math.nan],
    "norm_eps": [1e-5, 1e-45, 1e-50, 1e39, 3e38, 0.0, -1e-5, math.nan],
}


def test_python_and_rust_validation_agree_on_sampled_configs():
    """Python's validation is the engine's: on ternary configs sampled around every limit (a valid base with one to
    four keys changed), each accepts exactly what the other does; and what ``check_limits`` (the tighter, sane limits
    a training run applies) accepts the engine accepts."""
    rng = random.Random(11)
    seen = {True: 0, False: 0}
    for _ in range(600):
        d = dict(BASE)
        for key in rng.sample(sorted(POOLS), rng.randint(1, 4)):
            d[key] = rng.choice(POOLS[key])
        py, rust = python_accepts(d), rust_accepts(d)
        assert py == rust, (d, py, rust)
        seen[py] += 1
        if py:
            try:
                GPTConfig.from_dict(d).check_limits()
            except ConfigError:
                continue
            assert rust
    assert seen[True] > 60 and seen[False] > 60, seen  # both sides of every rule were exercised


def at_limit(key: str, value: int) -> dict[str, Any]:
    """A config valid in every other respect with ``key = value``."""
    d = dict(BASE, n_layer=2)
    if key in ("n_head", "n_kv_head"):
        d.update(n_head=value, n_kv_head=value, n_embd=2 * value if value % 128 == 0 else 256 * value)
    elif key == "n_embd":
        d.update(n_embd=value, n_head=max(1, value // MAX_HEAD_DIM), n_kv_head=max(1, value // MAX_HEAD_DIM))
    elif key == "sinkhorn_iters":
        d.update(residual="mhc", sinkhorn_iters=value)
    else:
        d[key] = value
    return d


@pytest.mark.parametrize("key", sorted(HARD_LIMITS))
def test_both_validations_put_each_hard_limit_in_the_same_place(key):
    limit = HARD_LIMITS[key]
    step = 256 if key in ("n_embd", "mlp_hidden") else 1
    ok, over = at_limit(key, limit), at_limit(key, limit + step)
    assert python_accepts(ok) and rust_accepts(ok), ok
    assert not python_accepts(over) and not rust_accepts(over), over


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (dict(n_embd=1024, n_head=1, n_kv_head=1), "head_dim"),  # 1024 > 512: only Rust refused it before
        (dict(norm_eps=1e-50), "norm_eps"),  # rounds to 0 in float32: only Rust refused it before
        (dict(norm_eps=1e39), "norm_eps"),  # inf in float32
        (dict(n_layer=HARD_LIMITS["n_layer"] + 1), "n_layer"),  # a loader's config: no check_limits
    ],
)
def test_what_only_rust_refused_python_now_refuses_naming_the_key(change, needle):
    d = dict(BASE, **change)
    assert not rust_accepts(d)
    with pytest.raises(ConfigError, match=needle):
        GPTConfig.from_dict(d)


def test_head_dim_limit_is_inclusive():
    assert python_accepts(dict(BASE, n_embd=MAX_HEAD_DIM, n_head=1, n_kv_head=1))
    assert rust_accepts(dict(BASE, n_embd=MAX_HEAD_DIM, n_head=1, n_kv_head=1))

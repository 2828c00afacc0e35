"""Model configuration: the ``GPTConfig`` dataclass and the TOML config loader.

A config file has two tables: ``[model]`` (the fields of :class:`GPTConfig`; unknown keys are errors) and
``[train]`` (training defaults handed to the trainer as a plain dict). Named configs (``tiny_cpu``, ``d20``,
``nano_125m``, ``nano_1b``) ship inside the package (``nanochat/configs/NAME.toml``) so an installed wheel
finds them; the repository's top-level ``configs/`` holds identical copies for people browsing the repo.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import math
import struct
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

QK_K = 256  # TQ2_0 block: every packed (input) dimension must be a multiple of it
MLP_KINDS = ("swiglu", "relu2")
RESIDUAL_KINDS = ("mhc_lite", "mhc", "standard")
QUANT_KINDS = ("ternary", "fp")
CONFIG_NAMES = ("tiny_cpu", "d20", "nano_125m", "nano_1b")

# Keys of the [train] table the shipped configs set (the trainer owns their meaning; others pass through).
TRAIN_KEYS = (
    "batch_size",
    "seq_len",
    "grad_accum",
    "steps",
    "lr_muon",
    "lr_lion",
    "weight_decay",
    "warmup_steps",
    "decay_frac",
    "grad_clip",
    "eval_every",
    "eval_batches",
    "save_every",
    "keep_last",
    "vocab_size",
    "synthetic_ratio",
    "dtype",
    "seed",
)


# Upper bounds for a model about to be built from a config (GPTConfig.check_limits): far above any model this project
# (or llama.cpp's largest bitnet files) would build, low enough that a typo (n_layer = 100000000, n_embd = 1048576)
# is refused at once instead of allocating for minutes. Loaders do not need them: they check a file's numbers against
# the tensors it really holds, which says more ("n_layer is 100000, but the file has tensors for 2 blocks").
MAX_VALUES = {
    "vocab_size": 1 << 22,  # 4M tokens (the largest public vocabularies are ~256k)
    "seq_len": 1 << 24,  # 16M positions (RoPE tables are built per forward, never for the whole context)
    "n_layer": 1024,
    "n_head": 1024,
    "n_kv_head": 1024,
    "n_embd": 65536,
    "mlp_hidden": 1 << 18,
    "n_streams": 64,  # mHC variants are held to <= 6 below; "standard" ignores it
    "sinkhorn_iters": 10_000,
}
MAX_PARAMS = 1 << 40  # ~1.1T parameters: anything larger is a typo, not a model

# Hard limits every config must keep (``_validate``, so loaders too): what the Rust engine's ``Config::validate``
# (rust/core/src/engine/mod.rs) refuses, so that a model Python accepts is one the engine runs, and a refusal comes
# up front, naming the key, instead of from the engine later. ``tests/test_schema.py`` holds the two equal at every
# boundary. The sane limits above are tighter; these are what the code can represent.
HARD_LIMITS = {
    "vocab_size": (1 << 32) - 1,  # token ids are u32
    "seq_len": 1 << 24,
    "n_layer": 1 << 12,
    "n_head": 1 << 16,
    "n_kv_head": 1 << 16,
    "n_embd": 1 << 20,
    "mlp_hidden": 1 << 22,
    "sinkhorn_iters": 10_000,  # the core's sinkhorn::MAX_ITERS
}
MAX_HEAD_DIM = 512  # the engine's attention keeps one head's scores and values in fixed-size scratch
MAX_MHC_STREAMS = 6  # mhc_lite materialises all n! permutations; more than 6 streams has no use at these sizes


class ConfigError(ValueError):
    """A config value or key is invalid; the message names the key."""


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 4096  # tokenizer vocabulary (embedding rows, logits width)
    seq_len: int = 256  # context length the model is trained for (RoPE works beyond it, untrained)
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # query heads
    n_kv_head: int = 4  # key/value heads (GQA when < n_head); must divide n_head
    n_embd: int = 256  # model width C
    mlp: str = "swiglu"  # "swiglu" (gate/up/down, llama.cpp `bitnet`) or "relu2" (up/down, ReLU squared)
    mlp_hidden: int = 512  # MLP hidden width; a multiple of 256 when ternary (TQ2_0 rows of down_proj)
    qk_norm: bool = True  # RMSNorm on q and k per head (not in llama.cpp's `bitnet` graph: off to export there)
    tie_embeddings: bool = True  # LM head shares the token embedding (required by llama.cpp's `bitnet`)
    residual: str = "mhc_lite"  # "mhc_lite" (Birkhoff mixture), "mhc" (Sinkhorn) or "standard" (x + F(x))
    n_streams: int = 4  # residual streams for the mHC variants (ignored by "standard")
    sinkhorn_iters: int = 20  # Sinkhorn-Knopp iterations for residual = "mhc"
    rope_theta: float = 10000.0  # RoPE base
    norm_eps: float = 1e-5  # RMSNorm epsilon (exported as attention.layer_norm_rms_epsilon)
    quant: str = "ternary"  # "ternary" (BitNet b1.58 QAT) or "fp" (same model in full precision: the baseline)
    init_std: float = 0.02  # std of the token embedding (and of an untied LM head)

    def __post_init__(self) -> None:
        _validate(self)

    def check_limits(self) -> GPTConfig:
        """Refuse (:class:`ConfigError` naming the key) a model beyond :data:`MAX_VALUES` or :data:`MAX_PARAMS`,
        before anyone builds it; returns ``self``."""
        for key, limit in MAX_VALUES.items():
            if getattr(self, key) > limit:
                raise ConfigError(f"model.{key} = {getattr(self, key)} is beyond the sane limit {limit}")
        if approx_params(self) > MAX_PARAMS:
            raise ConfigError(
                f"model of ~{approx_params(self):.3g} parameters (n_layer {self.n_layer}, n_embd {self.n_embd}, "
                f"mlp_hidden {self.mlp_hidden}, vocab_size {self.vocab_size}) is beyond the sane limit of "
                f"{MAX_PARAMS:.3g}"
            )
        return self

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def streams(self) -> int:
        """Residual streams actually used: 1 for ``standard``."""
        return 1 if self.residual == "standard" else self.n_streams

    def replace(self, **changes: Any) -> GPTConfig:
        """A copy with ``changes`` applied (validated; unknown keys raise :class:`ConfigError`)."""
        _check_keys(changes, "model")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTConfig:
        """Build from a ``[model]`` table; unknown keys and wrong types raise :class:`ConfigError`."""
        _check_keys(d, "model")
        return cls(**d)


def _check_keys(d: dict[str, Any], table: str) -> None:
    known = {f.name for f in fields(GPTConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"[{table}] unknown key(s) {unknown}; known keys: {sorted(known)}")


def _expect(cfg: GPTConfig, key: str, types: type | tuple[type, ...]) -> None:
    v = getattr(cfg, key)
    # bool is an int subclass: refuse it where a number is meant, and a number where a bool is meant
    if isinstance(v, bool) and types is not bool:
        raise ConfigError(f"model.{key} must be {_type_name(types)}, got bool {v!r}")
    if not isinstance(v, types):
        raise ConfigError(f"model.{key} must be {_type_name(types)}, got {type(v).__name__} {v!r}")


def _type_name(types: type | tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))


def _validate(cfg: GPTConfig) -> None:
    ints = ("vocab_size", "seq_len", "n_layer", "n_head", "n_kv_head", "n_embd", "mlp_hidden", "n_streams")
    for key in (*ints, "sinkhorn_iters"):
        _expect(cfg, key, int)
    for key in ("rope_theta", "norm_eps", "init_std"):
        _expect(cfg, key, (int, float))
    for key in ("qk_norm", "tie_embeddings"):
        _expect(cfg, key, bool)
    for key in ("mlp", "residual", "quant"):
        _expect(cfg, key, str)
    for key in (*ints, "sinkhorn_iters"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"model.{key} must be >= 1, got {getattr(cfg, key)}")
    for key in ("rope_theta", "norm_eps", "init_std"):
        v = getattr(cfg, key)
        if not (math.isfinite(v) and v > 0):
            raise ConfigError(f"model.{key} must be a positive finite number, got {v}")
    if not _positive_f32(cfg.norm_eps):  # RMSNorm adds it in float32 (torch, the engine) and GGUF stores an f32
        raise ConfigError(
            f"model.norm_eps = {cfg.norm_eps} is not a positive finite float32 (it would round to 0 or inf)"
        )
    for key, limit in HARD_LIMITS.items():
        if getattr(cfg, key) > limit:
            raise ConfigError(f"model.{key} = {getattr(cfg, key)} is above the limit {limit}")
    if cfg.mlp not in MLP_KINDS:
        raise ConfigError(f"model.mlp must be one of {MLP_KINDS}, got {cfg.mlp!r}")
    if cfg.residual not in RESIDUAL_KINDS:
        raise ConfigError(f"model.residual must be one of {RESIDUAL_KINDS}, got {cfg.residual!r}")
    if cfg.quant not in QUANT_KINDS:
        raise ConfigError(f"model.quant must be one of {QUANT_KINDS}, got {cfg.quant!r}")
    if cfg.n_embd % cfg.n_head != 0:
        raise ConfigError(f"model.n_embd ({cfg.n_embd}) must be divisible by model.n_head ({cfg.n_head})")
    if cfg.n_head % cfg.n_kv_head != 0:
        raise ConfigError(f"model.n_head ({cfg.n_head}) must be divisible by model.n_kv_head ({cfg.n_kv_head})")
    if cfg.head_dim % 2 != 0:
        raise ConfigError(f"head_dim = model.n_embd / model.n_head = {cfg.head_dim} must be even (RoPE rotates pairs)")
    if cfg.head_dim > MAX_HEAD_DIM:
        raise ConfigError(
            f"head_dim = model.n_embd / model.n_head = {cfg.n_embd} / {cfg.n_head} = {cfg.head_dim} is above the "
            f"limit {MAX_HEAD_DIM} "
            "(the Rust engine's attention); use more heads"
        )
    if cfg.residual != "standard" and cfg.n_streams > MAX_MHC_STREAMS:
        raise ConfigError(
            f"model.n_streams must be <= {MAX_MHC_STREAMS} for residual {cfg.residual!r}, got {cfg.n_streams}"
        )
    if cfg.quant == "ternary":
        for key in ("n_embd", "mlp_hidden"):
            if getattr(cfg, key) % QK_K != 0:
                raise ConfigError(
                    f"model.{key} ({getattr(cfg, key)}) must be a multiple of {QK_K} when model.quant = 'ternary' "
                    "(packed ternary rows are whole TQ2_0 blocks)"
                )


def _positive_f32(v: float) -> bool:
    """Whether ``v`` stays a positive finite number once rounded to float32."""
    try:
        (f,) = struct.unpack("<f", struct.pack("<f", v))
    except OverflowError:
        return False
    return bool(math.isfinite(f) and f > 0)


def approx_params(cfg: GPTConfig) -> int:
    """Parameter count from the config alone (embedding, head, attention and MLP matrices; norms and mHC left out):
    enough to refuse an absurd model before building one."""
    kv = cfg.n_kv_head * cfg.head_dim
    attn = cfg.n_embd * (2 * cfg.n_embd + 2 * kv)  # q, o, k, v
    mlp = (3 if cfg.mlp == "swiglu" else 2) * cfg.n_embd * cfg.mlp_hidden
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.n_embd
    return cfg.vocab_size * cfg.n_embd + head + cfg.n_layer * (attn + mlp)


# ----------------------------------------------------------------------------- TOML loading


def config_path(name_or_path: str | Path) -> Path:
    """Resolve a config name (``"d20"``) to the packaged TOML file, or return an existing path as is."""
    p = Path(name_or_path)
    res = importlib.resources.files("nanochat") / "configs" / f"{name_or_path}.toml"
    shipped = p.suffix != ".toml" and "/" not in str(name_or_path) and res.is_file()
    if p.is_dir() and not shipped:  # a directory that happens to share a shipped config's name is not a config
        raise ConfigError(f"config {str(p)!r} is a directory; expected a .toml file or a shipped config name")
    if p.suffix == ".toml" or p.is_file():
        if not p.exists():
            raise FileNotFoundError(f"config file {str(p)!r} does not exist")
        if not p.is_file():
            raise ConfigError(f"config {str(p)!r} is not a regular file")
        return p
    if not res.is_file():
        names = sorted(
            e.name.removesuffix(".toml")
            for e in (importlib.resources.files("nanochat") / "configs").iterdir()
            if e.name.endswith(".toml")
        )
        raise FileNotFoundError(f"no config named {str(name_or_path)!r}; shipped configs: {names}")
    return Path(str(res))


def load_config(name_or_path: str | Path) -> tuple[GPTConfig, dict[str, Any]]:
    """Load ``[model]`` into a validated :class:`GPTConfig` and return ``[train]`` as a dict of defaults.

    ``name_or_path`` is a shipped config name (``tiny_cpu``, ``d20``, ``nano_125m``, ``nano_1b``) or a path to a
    TOML file. Unknown ``[model]`` keys and unknown top-level tables raise :class:`ConfigError`.
    """
    path = config_path(name_or_path)
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    except UnicodeDecodeError as e:  # a binary file: tomllib decodes before it parses
        raise ConfigError(f"{path}: not a TOML file (not UTF-8 text: {e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config ({e.strerror or e})") from None
    extra = sorted(set(doc) - {"model", "train"})
    if extra:
        raise ConfigError(f"{path}: unknown table(s) {extra}; expected [model] and [train]")
    if "model" not in doc:
        raise ConfigError(f"{path}: missing [model] table")
    for table in ("model", "train"):
        if not isinstance(doc.get(table, {}), dict):
            raise ConfigError(f"{path}: {table} must be a table ([{table}]), got {type(doc[table]).__name__}")
    try:
        cfg = GPTConfig.from_dict(dict(doc["model"])).check_limits()
    except TypeError as e:  # pragma: no cover - from_dict checks keys first
        raise ConfigError(f"{path}: {e}") from e
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e
    train = dict(doc.get("train", {}))
    # (types are the trainer's to check, with the key's name: compare only what is already a number)
    if _is_int(train.get("seq_len")) and train["seq_len"] > cfg.seq_len:
        raise ConfigError(f"{path}: train.seq_len ({train['seq_len']}) exceeds model.seq_len ({cfg.seq_len})")
    if _is_int(train.get("vocab_size")) and train["vocab_size"] > cfg.vocab_size:
        raise ConfigError(
            f"{path}: train.vocab_size ({train['vocab_size']}) exceeds model.vocab_size ({cfg.vocab_size})"
        )
    return cfg, train


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)

"""The Rust inference engine (KV-cache forward step on the ternary kernels), wrapped for Python.

It lives in ``engine/``, not ``ops/``: :func:`engine_weights` walks a torch model's BitLinear modules, and ``ops`` sits
below ``model`` (issue 11 §4). The one call into the extension, ``_core.EngineModel``, goes through
:func:`nanochat.ops.native.engine_model`, so ``ops`` stays the only package that imports ``_core``.

Two ways to build one, both ending in :class:`RustEngine`:

- :func:`build_rust_engine` from a torch ``GPT`` (packs every BitLinear with ``ops.pack_ternary``, the same
  quantization the model's eval path uses, and copies norms, embeddings and mHC parameters from ``state_dict()``);
- :func:`rust_engine_from_weights` from a config and the weights keyed by state-dict name, ternary ones as
  ``(packed uint8 (rows, cols/4), scale)`` in the kernel layout. This is what a GGUF file maps to without any float
  copy: ``nanochat.export.load`` reads TQ2_0 tensors memory-mapped and converts them with
  ``ops.tq2_0_to_kernel_layout`` (``LoadedModel.packed_weights()``), then calls this.

Weight names are the torch model's (``wte.weight``, ``blocks.0.attn.q_proj.weight``, ``blocks.0.mhc_attn.proj``,
...); the full list is in ``rust/python/src/engine.rs``. The engine refuses ``quant="fp"`` models (serve those with
the torch engine, :class:`nanochat.engine.TorchEngine`).

Sessions (``RustEngine.new_session()``) are :data:`EngineSession` objects: ``prefill(ids)`` and ``decode(id)``
return float32 numpy logits ``(vocab,)`` of the last position; ``position``, ``reset()``, ``truncate(n)``, and
``fork()``: a new session holding a copy of the KV cache and position (prefill a prompt once, fork it per sample).
``RustEngine.decode_batch(sessions, ids)`` advances several sessions by one token each in one batched step.
All compute releases the GIL.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from nanochat.ops import native

if TYPE_CHECKING:
    from nanochat.model import GPT, GPTConfig

EngineSession = native.EngineSession

HEAD_PRECISIONS = ("f32", "f16", "int8")
KV_PRECISIONS = ("f32", "f16")


class RustEngine:
    """A ternary model loaded into the Rust engine. Thread-safe: concurrent calls serialise on the engine's lock."""

    def __init__(self, core: Any) -> None:
        self._m = core

    # ------------------------------------------------------------------ sessions and steps
    def new_session(self, max_seq: int = 0) -> Any:
        """An empty KV cache of at most ``max_seq`` positions (0: the config's ``seq_len``)."""
        return self._m.new_session(int(max_seq))

    def decode_batch(self, sessions: Sequence[Any], tokens: Sequence[int]) -> np.ndarray:
        """One token per session in one batched forward; float32 ``(len(sessions), vocab)``."""
        return self._m.decode_batch(list(sessions), [int(t) for t in tokens])

    def forward(self, sessions: Sequence[Any], tokens: Sequence[Sequence[int]], all_logits: bool = False) -> np.ndarray:
        """Advance ``sessions[i]`` by ``tokens[i]``; last-position logits per session, or every new position."""
        return self._m.forward(list(sessions), [list(map(int, t)) for t in tokens], all_logits)

    # ------------------------------------------------------------------ info and settings
    @property
    def config(self) -> dict[str, Any]:
        return dict(self._m.config)

    @property
    def vocab_size(self) -> int:
        return int(self._m.vocab_size)

    @property
    def threads(self) -> int:
        return int(self._m.threads)

    def set_threads(self, n: int) -> None:
        """Resize the engine's thread team (0 = ``NANOCHAT_THREADS`` or all cores)."""
        self._m.set_threads(int(n))

    @property
    def kernel(self) -> str:
        return str(self._m.kernel)

    @property
    def head(self) -> str:
        return str(self._m.head)

    @property
    def kv(self) -> str:
        return str(self._m.kv)

    @property
    def weight_bytes(self) -> int:
        return int(self._m.weight_bytes)

    def profile(self, reset: bool = False) -> dict[str, float]:
        """Seconds per forward section since the last reset (needs ``profile=True`` at build time)."""
        return dict(self._m.profile(reset))

    def __repr__(self) -> str:
        return f"RustEngine({self._m!r})"


def _config_dict(config: GPTConfig | Mapping[str, Any]) -> dict[str, Any]:
    d = dict(config.to_dict() if hasattr(config, "to_dict") else config)
    d.pop("init_std", None)
    return d


def rust_engine_from_weights(
    config: GPTConfig | Mapping[str, Any],
    ternary: Mapping[str, tuple[np.ndarray, float]],
    dense: Mapping[str, np.ndarray],
    *,
    threads: int = 0,
    kernel: str | None = None,
    head: str = "f16",
    kv: str = "f32",
    profile: bool = False,
) -> RustEngine:
    """Build the engine from weights keyed by state-dict name.

    ``ternary``: BitLinear weights as ``(packed uint8 (rows, cols/4), scale)`` in the kernel layout (TQ2_0's ``qs``
    bytes, ``ops.pack_ternary`` or ``ops.tq2_0_to_kernel_layout``); ``dense``: every other tensor (any float dtype,
    converted to float32). ``head`` is the LM head copy: ``"f16"`` (the default: half the bytes an f32 head reads
    per token, ~1e-4 relative logit error, greedy tokens kept: 100% top-1 agreement with f32 on a trained d20),
    ``"f32"`` (exact) or ``"int8"`` (a quarter, ~1e-2; 98.7% top-1 agreement). ``kv`` is the KV cache element type:
    ``"f32"`` (exact) or ``"f16"`` (half the memory and attention reads).
    """
    if head not in HEAD_PRECISIONS:
        raise ValueError(f"head must be one of {HEAD_PRECISIONS}, got {head!r}")
    if kv not in KV_PRECISIONS:
        raise ValueError(f"kv must be one of {KV_PRECISIONS}, got {kv!r}")
    weights: dict[str, Any] = {}
    for name, (packed, scale) in ternary.items():
        weights[name] = (np.ascontiguousarray(packed, dtype=np.uint8), float(scale))
    for name, arr in dense.items():
        if name in weights:
            raise ValueError(f"weight {name!r} given both as ternary and as dense")
        arr = np.asarray(arr)
        # float16 stays float16 (a GGUF's token_embd, memory-mapped): the engine widens it exactly, or keeps it as
        # the one copy a tied f16 head and the embedding lookups share (no f32 copy of the embedding)
        weights[name] = np.ascontiguousarray(arr, dtype=np.float16 if arr.dtype == np.float16 else np.float32)
    core = native.engine_model(_config_dict(config), weights, int(threads), kernel, head, kv, bool(profile))
    return RustEngine(core)


def engine_weights(model: GPT) -> tuple[dict[str, tuple[np.ndarray, float]], dict[str, np.ndarray]]:
    """``(ternary, dense)`` weights of a torch ``GPT`` keyed by state-dict name (BitLinears packed)."""
    import torch  # here, not at the top: serving a GGUF needs no torch

    from nanochat.model.bitlinear import BitLinear

    bitlinear = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, BitLinear)}
    ternary: dict[str, tuple[np.ndarray, float]] = {}
    dense: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for name, t in model.state_dict().items():
            m = bitlinear.get(name)
            if m is not None and m.quant == "ternary":
                if m.weight.device.type == "cpu":
                    packed, scale = m.packed_weight()  # cached by the module, the exact eval-path packing
                else:
                    from nanochat.ops.ternary import pack_ternary

                    packed, scale = pack_ternary(m.weight.detach().float().cpu())
                ternary[name] = (packed.cpu().numpy(), float(scale))
            else:
                dense[name] = t.detach().float().cpu().numpy()
    return ternary, dense


def build_rust_engine(
    model: GPT,
    *,
    threads: int = 0,
    kernel: str | None = None,
    head: str = "f16",
    kv: str = "f32",
    profile: bool = False,
) -> RustEngine:
    """The Rust engine for a torch ``GPT`` (ternary only; raises ValueError for ``quant="fp"``)."""
    if model.config.quant != "ternary":
        raise ValueError(
            f"the Rust engine runs ternary models only (this model has quant={model.config.quant!r}); "
            "use the torch engine"
        )
    ternary, dense = engine_weights(model)
    return rust_engine_from_weights(
        model.config, ternary, dense, threads=threads, kernel=kernel, head=head, kv=kv, profile=profile
    )

"""Inference: KV-cache generation on the Rust engine (CPU, ternary) or the torch model (CUDA, fp), sampling, and
streaming text.

```python
from nanochat.engine import Engine

engine = Engine(model, tokenizer)            # or Engine(nanochat.export.load.load(path))
print(engine.generate("def fib(n):", max_new_tokens=64, temperature=0).text)
```

- :mod:`.generate`: :class:`Engine` (backend choice, ``generate`` / ``stream`` / ``generate_batch``),
  :class:`TextStream` (UTF-8-safe deltas, stop strings).
- :mod:`.rust_engine`: :class:`RustEngine` (the Rust KV-cache engine on the ternary kernels), built from a torch
  ``GPT`` (:func:`build_rust_engine`) or from packed weights (:func:`rust_engine_from_weights`, what a GGUF maps to).
- :mod:`.torch_engine`: :class:`TorchEngine`, cached step-by-step forward of the torch model.
- :mod:`.sampling`: greedy / temperature / top-k / top-p with seeded CPU generators.
- :mod:`.cli`: ``nanochat-sample``.

Names are re-exported lazily (:func:`nanochat.lazy_exports`), so ``nanochat-sample --help`` imports no torch.
"""

from __future__ import annotations

from nanochat import lazy_exports

_EXPORTS = {
    **dict.fromkeys(
        ["Engine", "Generation", "GenerationResult", "LiveSequence", "TextStream", "decode_fn"], "generate"
    ),
    **dict.fromkeys(["SamplingParams", "filter_logits", "make_generator", "sample"], "sampling"),
    **dict.fromkeys(
        ["EngineSession", "RustEngine", "build_rust_engine", "engine_weights", "rust_engine_from_weights"],
        "rust_engine",
    ),
    **dict.fromkeys(["TorchEngine", "TorchSession"], "torch_engine"),
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)

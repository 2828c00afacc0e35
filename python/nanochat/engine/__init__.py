"""Inference: KV-cache generation on the Rust engine (CPU, ternary) or the torch model (CUDA, fp), sampling, and
streaming text.

```python
from nanochat.engine import Engine

engine = Engine(model, tokenizer)            # or Engine(nanochat.export.load.load(path))
print(engine.generate("def fib(n):", max_new_tokens=64, temperature=0).text)
```

- :mod:`.generate`: :class:`Engine` (backend choice, ``generate`` / ``stream`` / ``generate_batch`` /
  ``generate_tokens``), :class:`TextStream` (UTF-8-safe deltas, stop strings).
- :mod:`.torch_engine`: :class:`TorchEngine`, cached step-by-step forward of the torch model.
- :mod:`.sampling`: greedy / temperature / top-k / top-p with seeded CPU generators.
- :mod:`.cli`: ``nanochat-sample``.
"""

from nanochat.engine.generate import Engine, Generation, GenerationResult, LiveSequence, TextStream, decode_fn
from nanochat.engine.sampling import SamplingParams, filter_logits, make_generator, sample
from nanochat.engine.torch_engine import TorchEngine, TorchSession

__all__ = [
    "Engine",
    "Generation",
    "GenerationResult",
    "LiveSequence",
    "SamplingParams",
    "TextStream",
    "TorchEngine",
    "TorchSession",
    "decode_fn",
    "filter_logits",
    "make_generator",
    "sample",
]

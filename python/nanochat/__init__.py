"""nanochat: train, evaluate, export and serve small ternary (BitNet b1.58) language models for code.

The compiled Rust core lives in ``nanochat._core``; only :mod:`nanochat.ops` imports it.
``nanochat.load(path)`` opens any model file we write (GGUF, run directory, safetensors).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:  # lazy: `import nanochat` stays light for CLIs
    if name == "load":
        from nanochat.export.load import load

        return load
    raise AttributeError(f"module 'nanochat' has no attribute {name!r}")

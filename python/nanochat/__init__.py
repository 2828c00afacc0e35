"""nanochat: train, evaluate, export and serve small ternary (BitNet b1.58) language models for code.

The compiled Rust core lives in ``nanochat._core``; only :mod:`nanochat.ops` imports it.
"""

__version__ = "0.1.0"

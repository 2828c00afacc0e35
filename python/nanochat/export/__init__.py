"""Export (GGUF with TQ2_0/TQ1_0 tensors, safetensors) and loading of nanochat models.

Names are re-exported lazily (:func:`nanochat.lazy_exports`): the exporters need torch, loading a GGUF for the Rust
engine should not, and ``nanochat-export --help`` needs neither.
"""

from __future__ import annotations

from nanochat import lazy_exports

_EXPORTS = {
    "LoadError": "gguf_file",
    **dict.fromkeys(["GGUFError", "export_gguf", "read_gguf"], "gguf_io"),
    **dict.fromkeys(["LoadedModel", "load", "load_model"], "load"),
    **dict.fromkeys(["export_safetensors", "read_safetensors"], "safetensors_io"),
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)

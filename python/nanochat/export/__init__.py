"""Export (GGUF with TQ2_0/TQ1_0 tensors, safetensors) and loading of nanochat models."""

from nanochat.export.gguf_file import LoadError
from nanochat.export.gguf_io import GGUFError, export_gguf, read_gguf
from nanochat.export.load import LoadedModel, load, load_model
from nanochat.export.safetensors_io import export_safetensors, read_safetensors

__all__ = [
    "GGUFError",
    "LoadError",
    "LoadedModel",
    "export_gguf",
    "export_safetensors",
    "load",
    "load_model",
    "read_gguf",
    "read_safetensors",
]

"""``nanochat.load(path)``: one entry point for every model file we write.

``path`` may be a GGUF file (memory-mapped; ternary tensors go to the kernel layout without a float copy), a run
directory or checkpoint directory from ``nanochat-train`` (its latest checkpoint), or a safetensors export. The
result, :class:`LoadedModel`, gives the config and tokenizer, the packed weights the Rust engine runs on, and (on
demand) a torch ``GPT`` for CUDA or as the reference.

Every problem with a file raises :class:`~nanochat.export.gguf_file.LoadError` (a ``ValueError``) naming the file;
a path that does not exist raises ``FileNotFoundError``. Only regular files are opened (a FIFO would block), and a
checkpoint is loaded from ``state.json`` and ``model.safetensors`` alone (:mod:`nanochat.checkpoint_format`; this
module never imports the trainer): the optimizer state is never read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from nanochat import ops
from nanochat.data.tokenizer import Tokenizer
from nanochat.export.gguf_file import LoadError, check_regular_file, open_regular
from nanochat.export.gguf_io import GGUFModel, gguf_to_torch, read_gguf
from nanochat.export.names import is_ternary
from nanochat.model.config import GPTConfig

if TYPE_CHECKING:
    import torch

    from nanochat.model import GPT


@dataclass
class LoadedModel:
    config: GPTConfig
    tokenizer: Tokenizer
    path: Path
    format: str  # "gguf" | "checkpoint" | "safetensors"
    gguf: GGUFModel | None = None
    _torch: GPT | None = field(default=None, repr=False)

    def torch_model(self, device: str | torch.device = "cpu") -> GPT:
        """The model as a torch ``GPT`` in eval mode (materialised from the GGUF on first use)."""
        if self._torch is None:
            assert self.gguf is not None
            self._torch = gguf_to_torch(self.gguf)
        return self._torch.to(device).eval()

    def packed_weights(self) -> tuple[dict[str, tuple[np.ndarray, float]], dict[str, np.ndarray]]:
        """``(ternary, dense)``: BitLinear weights as (kernel-layout packed uint8, scale) and every other tensor as a
        float array, keyed by state-dict names — what the Rust engine is built from."""
        if self.gguf is not None:
            return self.gguf.ternary, self.gguf.dense
        model = self.torch_model()
        ternary: dict[str, tuple[np.ndarray, float]] = {}
        dense: dict[str, np.ndarray] = {}
        for name, t in model.state_dict().items():
            if is_ternary(name) and self.config.quant == "ternary":
                packed, scale = ops.pack_ternary(t.detach().float().cpu())
                ternary[name] = (packed.numpy(), float(scale))
            else:
                dense[name] = t.detach().float().cpu().numpy()
        return ternary, dense

    def release_pages(self) -> None:
        """Drop what the Rust engine, once built from :meth:`packed_weights`, holds its own copy of: the packed
        ternary arrays and the GGUF file's resident pages. Nothing is lost: both come back from the file on demand
        (:meth:`packed_weights`, :meth:`torch_model`). Without it a served GGUF is resident about three times."""
        if self.gguf is not None:
            self.gguf.release()

    def file_sha256(self) -> str:
        import hashlib

        h = hashlib.sha256()
        files = [self.path] if self.path.is_file() else sorted(p for p in self.path.rglob("*.safetensors"))
        for f in files:
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
        return h.hexdigest()


def _load_checkpoint_dir(path: Path) -> LoadedModel:
    from nanochat.checkpoint_format import CheckpointError, checkpoint_model_config, find_checkpoint, load_model_weights

    ckpt = find_checkpoint(path)
    cfg = checkpoint_model_config(ckpt)  # validated against model.safetensors before building anything
    run_dir = ckpt.parent.parent
    tok_path = run_dir / "tokenizer.json"
    if not tok_path.exists():
        raise CheckpointError(f"{run_dir}: tokenizer.json is missing (needed to use the checkpoint)")
    try:
        check_regular_file(tok_path)
        tok = Tokenizer.load(tok_path)
    except LoadError:
        raise
    except Exception as e:  # the tokenizers library raises a bare Exception for a malformed file
        raise CheckpointError(f"{tok_path}: not a valid tokenizer ({e})") from None
    import torch

    from nanochat.model import GPT

    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device="cpu")
    load_model_weights(ckpt, model)
    return LoadedModel(cfg, tok, ckpt, "checkpoint", _torch=model.eval())


def load(path: str | os.PathLike[str]) -> LoadedModel:
    """Load a GGUF file, a run/checkpoint directory or a safetensors export (see the module docstring)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_dir():
        if path.suffix in (".gguf", ".safetensors"):
            raise LoadError(f"{path}: is a directory, expected a {path.suffix[1:]} file")
        return _load_checkpoint_dir(path)
    with os.fdopen(open_regular(path), "rb") as f:  # refuses FIFOs and devices before reading
        magic = f.read(4)
    if magic == b"GGUF" or path.suffix == ".gguf":
        g = read_gguf(path)
        return LoadedModel(g.config, g.tokenizer, path, "gguf", gguf=g)
    if path.suffix == ".safetensors":
        from nanochat.export.safetensors_io import read_safetensors

        model, tok = read_safetensors(path)
        return LoadedModel(model.config, tok, path, "safetensors", _torch=model)
    raise LoadError(f"{path}: unknown model format (expected .gguf, .safetensors or a run directory)")


def load_model(path: str | os.PathLike[str]) -> tuple[GPT, Tokenizer]:
    """Convenience: ``(torch GPT in eval mode, tokenizer)`` from any supported path."""
    m = load(path)
    return m.torch_model(), m.tokenizer

"""Plain safetensors export: the model's float (latent) weights, its config and tokenizer, in one file.

The file's metadata holds ``nanochat.config`` (GPTConfig as JSON) and ``nanochat.tokenizer`` (tokenizer.json), so
the one file is enough to load the model back; a ``.json`` sidecar with the config is written beside it for people
and other tools. Tied heads are stored once (``wte.weight``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from nanochat.data.tokenizer import Tokenizer
from nanochat.model import GPT, GPTConfig

FORMAT = "nanochat"


def export_safetensors(model: GPT, tokenizer: Tokenizer, out: str | os.PathLike[str]) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {
        "format": FORMAT,
        "nanochat.config": json.dumps(model.config.to_dict()),
        "nanochat.tokenizer": tokenizer.to_json(),
    }
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    side = out.with_suffix(".json")
    side_tmp = side.with_name(f".{side.name}.tmp")
    side_tmp.write_text(json.dumps({"format": FORMAT, "config": model.config.to_dict()}, indent=2))
    os.replace(side_tmp, side)
    return out


def read_safetensors(path: str | os.PathLike[str]) -> tuple[GPT, Tokenizer]:
    """Load a file written by :func:`export_safetensors`; clear errors for foreign or damaged files."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT or "nanochat.config" not in meta:
                raise ValueError(f"{path}: not a nanochat safetensors export (no nanochat.config metadata)")
            cfg = GPTConfig.from_dict(json.loads(meta["nanochat.config"]))
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, RuntimeError, SafetensorError) as e:  # truncated or corrupt files
        raise ValueError(f"{path}: corrupt or unreadable safetensors file ({e})") from None
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device="cpu")
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: tensors do not fit the stored config: {e}") from None
    tok = _tok_from_json(meta)
    return model.eval(), tok


def _tok_from_json(meta: dict[str, str]) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    return Tokenizer(HFTokenizer.from_str(meta["nanochat.tokenizer"]))

"""Plain safetensors export: the model's float (latent) weights, its config and tokenizer, in one file.

The file's metadata holds ``nanochat.config`` (GPTConfig as JSON) and ``nanochat.tokenizer`` (tokenizer.json), so
the one file is enough to load the model back; a ``.json`` sidecar with the config is written beside it for people
and other tools. Tied heads are stored once (``wte.weight``).

Loading reads the header with :func:`safetensors_header` first (our own parser: sizes, offsets and dtypes checked
against the file's real size) and compares the tensor directory with the stored config *before* building a model,
so a patched ``n_layer`` or shape fails at once with :class:`~nanochat.export.gguf_file.LoadError` naming the file.

Exports carry ``nanochat.checksum.xxh3_128`` in ``__metadata__``: the XXH3-128 of the other metadata and of every
tensor's name, dtype, shape and bytes (:func:`content_digest`; the same scheme as our GGUF files), checked on load,
so a flipped byte in the tensor data or in the stored config or tokenizer is an error. Exports that carry the older
``nanochat.checksum.sha256`` are verified with SHA-256; exports written before any checksum load unverified.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from nanochat.data.tokenizer import Tokenizer
from nanochat.export.gguf_file import LoadError, hex_digest, open_regular
from nanochat.export.names import CHECKSUM_ALGOS, CHECKSUM_KEY
from nanochat.model import GPT, GPTConfig
from nanochat.model.config import ConfigError
from nanochat.model.schema import raw_layer_count_problem, state_dict_problem

FORMAT = "nanochat"
# bytes per element of the safetensors dtypes (https://github.com/huggingface/safetensors, format spec)
DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "U64": 8, "U32": 4, "U16": 2, "C64": 8, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1,
}  # fmt: skip
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit


def safetensors_header(path: str | os.PathLike[str]) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, str]]:
    """``({name: (dtype, shape)}, metadata)`` of a safetensors file, every number checked against the file's size.

    Raises :class:`LoadError` naming the file for anything but a complete, well-formed file: not a regular file, a
    header length beyond the file, invalid JSON, an unknown dtype, a tensor whose byte range disagrees with its
    shape, or data that does not end exactly at the end of the file (truncation). Reads only the header.
    """
    fd = open_regular(path)
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise LoadError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise LoadError(f"{path}: corrupt safetensors file (header of {n} bytes in a {size}-byte file)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoadError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise LoadError(f"{path}: corrupt safetensors header (not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise LoadError(f"{path}: corrupt safetensors header (__metadata__ must map strings to strings)")
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    end = 0
    for name, info in header.items():
        try:
            dtype, shape, (a, b) = info["dtype"], info["shape"], info["data_offsets"]
            ok = isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)
            ok = ok and type(a) is int and type(b) is int and 0 <= a <= b
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise LoadError(f"{path}: corrupt safetensors header entry for tensor {name!r}: {info!r}"[:400])
        if dtype not in DTYPE_SIZES:
            raise LoadError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
        if b - a != math.prod(shape) * DTYPE_SIZES[dtype]:
            raise LoadError(f"{path}: tensor {name!r} of shape {shape} {dtype} has a {b - a}-byte range")
        out[name] = (dtype, tuple(shape))
        end = max(end, b)
    if 8 + n + end != size:
        what = "truncated" if 8 + n + end > size else "trailing bytes after the data"
        raise LoadError(f"{path}: {what}: the header describes {8 + n + end} bytes, the file has {size}")
    return out, meta


def content_digest(
    meta: dict[str, str], tensors: dict[str, tuple[str, tuple[int, ...], memoryview]], algo: str = "xxh3_128"
) -> str:
    """Checksum (hex; ``algo`` as :func:`~nanochat.export.gguf_file.hex_digest`) of the metadata other than the
    checksum keys and of ``{name: (dtype, shape, little-endian bytes)}``, both in sorted order: what the file means,
    independent of how the safetensors library orders its data."""
    parts: list[bytes | np.ndarray] = []
    for k in sorted(meta):
        if k not in CHECKSUM_ALGOS:
            for part in (k, meta[k]):
                b = part.encode()
                parts.append(len(b).to_bytes(8, "little") + b)
    for name in sorted(tensors):
        dtype, shape, data = tensors[name]
        b = f"{name}\0{dtype}\0{','.join(map(str, shape))}".encode()
        parts.append(len(b).to_bytes(8, "little") + b + len(data).to_bytes(8, "little"))
        parts.append(np.frombuffer(data, dtype=np.uint8))
    return hex_digest(algo, parts)


def _tensor_entry(t: torch.Tensor) -> tuple[str, tuple[int, ...], memoryview]:
    """``(dtype, shape, bytes)`` of a float32 CPU tensor as :func:`content_digest` takes it."""
    a = t.detach().cpu().contiguous().numpy()
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return "F32", tuple(a.shape), a.data.cast("B")


def export_safetensors(model: GPT, tokenizer: Tokenizer, out: str | os.PathLike[str]) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {
        "format": FORMAT,
        "nanochat.config": json.dumps(model.config.to_dict()),
        "nanochat.tokenizer": tokenizer.to_json(),
    }
    meta[CHECKSUM_KEY] = content_digest(meta, {k: _tensor_entry(v) for k, v in tensors.items()})
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
    """Load a file written by :func:`export_safetensors`; :class:`LoadError` naming the file for foreign or damaged
    files (the header and tensor directory are validated before any model is built)."""
    path = Path(path)
    tensors, meta = safetensors_header(path)
    if meta.get("format") != FORMAT or "nanochat.config" not in meta:
        raise LoadError(f"{path}: not a nanochat safetensors export (no nanochat.config metadata)")
    try:
        raw = json.loads(meta["nanochat.config"])
        problem = raw_layer_count_problem(raw, tensors)  # a patched n_layer, named against the tensors first
        if problem:
            raise LoadError(f"{path}: tensors do not fit the stored config: {problem}")
        cfg = GPTConfig.from_dict(raw)
    except (json.JSONDecodeError, ConfigError, TypeError, AttributeError) as e:
        raise LoadError(f"{path}: invalid nanochat.config metadata: {e}") from None
    problem = state_dict_problem(cfg, {k: shape for k, (_, shape) in tensors.items()})
    if problem:
        raise LoadError(f"{path}: tensors do not fit the stored config: {problem}")
    not_f32 = sorted(k for k, (dtype, _) in tensors.items() if dtype != "F32")
    if not_f32:
        raise LoadError(f"{path}: tensor(s) {not_f32[:5]} are not F32 (an export holds float32 latent weights)")
    tok = _tok_from_json(path, meta)
    try:
        with safe_open(str(path), framework="pt") as f:
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, RuntimeError, SafetensorError) as e:  # what the header check cannot see
        raise LoadError(f"{path}: corrupt or unreadable safetensors file ({e})") from None
    key = next((k for k in CHECKSUM_ALGOS if k in meta), None)
    if key is not None:
        stored = meta[key]
        digest = content_digest(meta, {k: _tensor_entry(v) for k, v in sd.items()}, CHECKSUM_ALGOS[key])
        if stored != digest:
            raise LoadError(
                f"{path}: checksum mismatch ({key} is {stored[:64]!r}, the content hashes to {digest!r}): "
                "the file is corrupt or was modified after export"
            )
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device="cpu")
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise LoadError(f"{path}: tensors do not fit the stored config: {e}") from None
    return model.eval(), tok


def _tok_from_json(path: Path, meta: dict[str, str]) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    if "nanochat.tokenizer" not in meta:
        raise LoadError(f"{path}: the nanochat.tokenizer metadata is missing")
    try:
        return Tokenizer(HFTokenizer.from_str(meta["nanochat.tokenizer"]))
    except Exception as e:  # the tokenizers library raises a bare Exception for a malformed spec
        raise LoadError(f"{path}: invalid nanochat.tokenizer metadata ({e})") from None

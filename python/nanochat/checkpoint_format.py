"""The checkpoint format: what a checkpoint directory holds, and reading it (issue 11 §4: one low-level home).

Below both ``train/`` (which writes checkpoints: :class:`nanochat.train.checkpoint.CheckpointManager` adds retention
and the disk guard) and ``export/`` (``nanochat.load`` reads a run directory for inference); neither imports the
other. No torch at import: serving a GGUF must not pay for it.

Layout of a run directory::

    RUN/checkpoints/step_000200/{model.safetensors, optim.safetensors, state.json, complete.json}
    RUN/checkpoints/latest.json      -> {"step": 200, "dir": "step_000200"}
    RUN/checkpoints/best.json        -> {"step": 150, "dir": "step_000150", "val_loss": 3.21}

- ``model.safetensors``: the model's ``state_dict()`` (names and shapes: :mod:`nanochat.model.schema`).
  ``optim.safetensors``: optimizer state flattened into named tensors (``opt{i}.{param}.{key}``) and ``extra.*``
  tensors (RNG states). ``state.json``: everything else (step, ``model_config``, the run's settings, the optimizers'
  non-tensor parts), strict JSON.
- ``complete.json`` (the manifest: every file with its size and the tensor files' SHA-256) is written last; a
  checkpoint counts only when it is *complete*: its manifest is there and every file has the recorded size.
  Directories written before the manifest existed count when all three files are there, ``state.json`` parses and
  each safetensors file is exactly as long as its header says, so old runs still resume while a half-deleted one
  does not. Loading verifies the files it reads against the manifest's checksums (a flipped byte in tensor data is a
  :class:`CheckpointError`, never a model with silently different weights).
- The newest complete checkpoint is the latest; ``latest.json`` is a pointer for people and tools, not trusted.
  Falling back past a newer checkpoint that is broken is never silent: a warning names the skipped step, what is
  wrong with it, and the step used instead.
- Every load problem raises :class:`CheckpointError` (a :class:`~nanochat.export.gguf_file.LoadError`) naming the
  file; ``state.json``'s ``model_config`` is checked against ``model.safetensors``' tensor directory before a model
  is built (:func:`checkpoint_model_config`). Loading for inference reads ``model.safetensors`` and ``state.json``
  alone, never the optimizer state.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nanochat.export.gguf_file import LoadError, check_regular_file
from nanochat.model.config import ConfigError, GPTConfig
from nanochat.model.schema import raw_layer_count_problem, state_dict_problem

if TYPE_CHECKING:
    import torch

CKPT_DIRNAME = "checkpoints"
MANIFEST = "complete.json"  # written last: {"format": 2, "step": N, "files": {name: size}, "sha256": {name: hex}}
CHECKSUMMED = ("model.safetensors", "optim.safetensors")  # the tensor files, whose content the manifest vouches for
CKPT_FILES = ("model.safetensors", "optim.safetensors", "state.json")
INFERENCE_FILES = ("model.safetensors", "state.json")  # what loading a model needs: never the optimizer state
STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(LoadError):
    """A checkpoint that cannot be loaded; the message names the file and what is wrong."""


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes (streamed: a multi-GB checkpoint is never held in memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:  # (hashlib.file_digest is Python 3.11+; the package supports 3.10)
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_checksum(ckpt: Path, name: str) -> None:
    """Check ``ckpt/name`` against the size and SHA-256 its manifest recorded; :class:`CheckpointError` naming the
    file when they differ. Checkpoints without a manifest, or whose manifest predates checksums, pass unverified."""
    path = Path(ckpt) / name
    mpath = Path(ckpt) / MANIFEST
    if not mpath.exists():
        return
    try:
        manifest = json.loads(mpath.read_text())
        size, digest = manifest["files"][name], manifest.get("sha256", {}).get(name)
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{mpath}: unreadable or does not describe {name} ({e!r})") from None
    got = check_regular_file(path).st_size
    if got != size:
        raise CheckpointError(f"{path}: corrupt or truncated ({got} bytes, {MANIFEST} recorded {size})")
    if digest is not None and file_sha256(path) != digest:
        raise CheckpointError(
            f"{path}: corrupt: its content no longer matches the SHA-256 {MANIFEST} recorded when it was written "
            "(a changed byte in the tensor data)"
        )


def incomplete_reason(ckpt: Path, files: tuple[str, ...] = CKPT_FILES) -> str | None:
    """Why ``ckpt`` does not hold ``files`` whole (by default all of it; :data:`INFERENCE_FILES` for loading a model),
    or None when it does: its manifest is there and lists them with the sizes they have, or (a checkpoint written
    before manifests, which has none) each exists, ``state.json`` parses and each safetensors file is exactly as long
    as its header says."""
    from nanochat.export.safetensors_io import safetensors_header

    ckpt = Path(ckpt)
    try:
        if (ckpt / MANIFEST).exists():
            sizes = json.loads((ckpt / MANIFEST).read_text())["files"]
            for name in files:
                size = check_regular_file(ckpt / name).st_size
                if size != sizes[name]:
                    return f"{name} has {size} bytes, {MANIFEST} recorded {sizes[name]}"
            return None
        for name in files:
            if name.endswith(".safetensors"):
                safetensors_header(ckpt / name)
            elif name.endswith(".json"):
                check_regular_file(ckpt / name)
                json.loads((ckpt / name).read_text())
            else:
                check_regular_file(ckpt / name)
    except KeyError as e:
        return f"{MANIFEST} does not list {e}"
    except (OSError, ValueError, TypeError, AttributeError) as e:
        return str(e)
    return None


def is_complete(ckpt: Path, files: tuple[str, ...] = CKPT_FILES) -> bool:
    """Whether ``ckpt`` holds ``files`` whole (see :func:`incomplete_reason`)."""
    return incomplete_reason(ckpt, files) is None


def step_dirs(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """``(step, directory)`` of every ``step_*`` directory under ``ckpt_dir``, complete or not, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    out = []
    for p in ckpt_dir.iterdir():
        m = STEP_DIR.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def complete_checkpoints(ckpt_dir: Path, files: tuple[str, ...] = CKPT_FILES) -> list[tuple[int, Path]]:
    """Complete checkpoints (as far as ``files`` go) under ``ckpt_dir``, oldest first."""
    return [(s, p) for s, p in step_dirs(ckpt_dir) if is_complete(p, files)]


def read_pointer(ckpt_dir: Path, name: str) -> dict[str, Any] | None:
    """``latest.json``/``best.json`` as a dict with a ``dir``, or None when absent or unreadable (it is a hint)."""
    p = Path(ckpt_dir) / f"{name}.json"
    if not p.exists():
        return None
    try:
        ptr = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return ptr if isinstance(ptr, dict) and isinstance(ptr.get("dir"), str) else None


def latest_checkpoint(ckpt_dir: Path, files: tuple[str, ...] = CKPT_FILES, stacklevel: int = 2) -> Path | None:
    """The newest complete checkpoint directory under ``ckpt_dir`` (``files=INFERENCE_FILES``: whole enough to load the model).

    A fallback is never silent: when newer ``step_*`` directories are broken (``state.json`` gone, a file short),
    or ``latest.json`` names a checkpoint that is not there, a warning names each skipped step, why, and the step
    used instead. (With no complete checkpoint at all, the caller's error says why.)"""
    ckpt_dir = Path(ckpt_dir)
    found = complete_checkpoints(ckpt_dir, files)
    if not found:
        return None
    step, newest = found[-1]
    complete = {p.name for _, p in found}
    broken = [(p.name, incomplete_reason(p, files)) for s, p in step_dirs(ckpt_dir) if s > step]
    broken = [(name, why) for name, why in broken if name not in complete]
    ptr = read_pointer(ckpt_dir, "latest")
    named = ptr["dir"] if ptr and ptr["dir"] != newest.name else None
    m = STEP_DIR.match(named or "")
    if m and int(m.group(1)) < step:
        named = None  # a stale pointer to an older checkpoint: the newer one is used, nothing is skipped
    if named and named not in {name for name, _ in broken}:
        target = ckpt_dir / named
        if not (target.is_dir() and is_complete(target, files)):
            broken.insert(
                0, (named, "its directory is gone" if not target.exists() else incomplete_reason(target, files))
            )
    for name, why in broken:
        said = f"{ckpt_dir / 'latest.json'} names {name}, which" if name == named else f"{name}"
        warnings.warn(
            f"{said} is missing or incomplete ({why}); falling back to the older {newest.name}",
            RuntimeWarning,
            stacklevel=stacklevel,
        )
    return newest


def read_state(ckpt: Path) -> dict[str, Any]:
    """``state.json`` of a checkpoint as a dict; :class:`CheckpointError` naming the file when it is not."""
    path = Path(ckpt) / "state.json"
    try:
        check_regular_file(path)
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt} is not a checkpoint: state.json is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable or invalid JSON ({e})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return state


def model_tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` from a checkpoint's ``model.safetensors`` header (validated against the file's size)."""
    from nanochat.export.safetensors_io import safetensors_header

    try:
        tensors, _ = safetensors_header(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path.parent} is not a checkpoint: {path.name} is missing") from None
    except LoadError as e:
        raise CheckpointError(str(e)) from None
    return {k: shape for k, (_, shape) in tensors.items()}


def checkpoint_model_config(ckpt: Path) -> GPTConfig:
    """The model config of a checkpoint, checked against ``model.safetensors``' tensor directory before anyone
    builds a model from it (a patched ``n_layer`` of 100000 would otherwise take minutes to fail)."""
    state = read_state(ckpt)
    path = Path(ckpt) / "state.json"
    if not isinstance(state.get("model_config"), dict):
        raise CheckpointError(f"{path}: model_config is missing (needed to build the model)")
    shapes = model_tensor_shapes(Path(ckpt) / "model.safetensors")
    problem = raw_layer_count_problem(state["model_config"], shapes)  # a patched n_layer, named against the file
    if problem:
        raise CheckpointError(f"{Path(ckpt) / 'model.safetensors'} does not fit {path}'s model_config: {problem}")
    try:
        cfg = GPTConfig.from_dict(state["model_config"])
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{path}: invalid model_config: {e}") from None
    problem = state_dict_problem(cfg, shapes)
    if problem:
        raise CheckpointError(f"{Path(ckpt) / 'model.safetensors'} does not fit {path}'s model_config: {problem}")
    return cfg


def load_model_weights(ckpt: Path, model: torch.nn.Module) -> dict[str, Any]:
    """Restore ``model``'s weights from checkpoint directory ``ckpt`` (its tensor directory checked against the
    model's, the file against the manifest's checksum); returns ``state.json``. Reads ``model.safetensors`` and
    ``state.json`` only. A missing ``lm_head.weight`` is allowed (checkpoints of tied models)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    ckpt = Path(ckpt)
    state = read_state(ckpt)
    model_path = ckpt / "model.safetensors"
    shapes = model_tensor_shapes(model_path)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(k for k in set(want) - set(shapes) if not k.endswith("lm_head.weight"))
    unexpected = sorted(set(shapes) - set(want))
    wrong = sorted(f"{k}: file {shapes[k]}, model {want[k]}" for k in set(want) & set(shapes) if shapes[k] != want[k])
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{model_path} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"shape mismatches {wrong[:5]}"
        )
    verify_checksum(ckpt, "model.safetensors")
    try:
        load_model(model, str(model_path), strict=False)
    except (OSError, RuntimeError, SafetensorError) as e:
        raise CheckpointError(f"{model_path}: unreadable ({e})") from None
    return state


def find_checkpoint(path: Path) -> Path:
    """A checkpoint directory to load a model from: ``path`` itself when it is one, else the newest checkpoint whose
    model and state are whole under a run directory or its ``checkpoints/`` directory."""
    path = Path(path)
    if (path / "state.json").exists() and (path / "model.safetensors").exists():
        return path
    for root in (path, path.parent):
        latest = latest_checkpoint(root / CKPT_DIRNAME, INFERENCE_FILES, stacklevel=3)
        if latest is not None:
            return latest
    broken = [p for root in (path, path.parent) for _, p in step_dirs(root / CKPT_DIRNAME)]
    if broken:
        why = "; ".join(f"{p.name}: {incomplete_reason(p, INFERENCE_FILES)}" for p in broken[-3:])
        raise CheckpointError(
            f"no complete checkpoint under {path} ({why}); pass a checkpoint directory itself to load it anyway"
        )
    raise FileNotFoundError(f"no checkpoint found under {path} (expected RUN_DIR/{CKPT_DIRNAME}/step_*/)")

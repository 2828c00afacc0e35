"""Checkpoints: safetensors for tensors, JSON for everything else, written atomically.

Layout of a run directory::

    RUN/checkpoints/step_000200/{model.safetensors, optim.safetensors, state.json}
    RUN/checkpoints/latest.json      -> {"step": 200, "dir": "step_000200"}
    RUN/checkpoints/best.json        -> {"step": 150, "dir": "step_000150", "val_loss": 3.21}

Notable choices:
- A checkpoint is written into ``.tmp-step_...`` and renamed into place, so a crash or a full disk
  never leaves a half-written checkpoint where a loader would find it; ``latest.json`` and
  ``best.json`` are replaced with ``os.replace`` too.
- Retention keeps the last ``keep_last`` checkpoints plus the best one by validation loss.
- Disk guard: before writing, free space is compared with the expected size plus a margin; old
  checkpoints are pruned per retention and, if space is still short, the save is skipped with a
  warning (``save`` returns None) instead of crashing the run or touching an older checkpoint.
- Optimizer state is flattened into named tensors (``opt{i}.{param}.{key}``); its non-tensor parts
  (param groups, hyperparameters) go to JSON.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

CKPT_DIRNAME = "checkpoints"
DISK_MARGIN_BYTES = 64 * 1024 * 1024


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem holding ``path`` (tests monkeypatch this to fake a full disk)."""
    fake = os.environ.get("NANOCHAT_FAKE_FREE_BYTES")
    if fake is not None:
        return int(fake)
    return shutil.disk_usage(path).free


def finite_json(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, ±inf) replaced by None: strict JSON has no NaN."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def write_json_atomic(path: Path, obj: Any) -> None:
    """Strict JSON (non-finite floats become null) via a temp file, fsync and rename; the temp never outlives us."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            json.dump(finite_json(obj), f, indent=2, allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _flatten_optim(optimizers: list[torch.optim.Optimizer]) -> tuple[dict[str, torch.Tensor], list[dict]]:
    tensors: dict[str, torch.Tensor] = {}
    meta: list[dict] = []
    for i, opt in enumerate(optimizers):
        sd = opt.state_dict()
        state_meta: dict[str, dict[str, Any]] = {}
        for pid, st in sd["state"].items():
            for key, val in st.items():
                if isinstance(val, torch.Tensor):
                    tensors[f"opt{i}.{pid}.{key}"] = val.detach().contiguous().cpu()
                else:
                    state_meta.setdefault(str(pid), {})[key] = val
        meta.append({"param_groups": sd["param_groups"], "state_scalars": state_meta})
    return tensors, meta


def _unflatten_optim(
    optimizers: list[torch.optim.Optimizer], tensors: dict[str, torch.Tensor], meta: list[dict]
) -> None:
    if len(meta) != len(optimizers):
        raise ValueError(f"checkpoint has {len(meta)} optimizer states, the run has {len(optimizers)}")
    for i, (opt, m) in enumerate(zip(optimizers, meta)):
        state: dict[int, dict[str, Any]] = {}
        for name, t in tensors.items():
            oi, pid, key = name.split(".", 2)
            if oi == f"opt{i}":
                state.setdefault(int(pid), {})[key] = t
        for pid, scalars in m["state_scalars"].items():
            state.setdefault(int(pid), {}).update(scalars)
        opt.load_state_dict({"state": state, "param_groups": m["param_groups"]})


@dataclass
class CheckpointManager:
    """Saves, prunes and finds checkpoints of one run."""

    run_dir: Path
    keep_last: int = 3

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / CKPT_DIRNAME

    def _list(self) -> list[tuple[int, Path]]:
        if not self.ckpt_dir.exists():
            return []
        out = []
        for p in self.ckpt_dir.iterdir():
            if p.is_dir() and p.name.startswith("step_") and (p / "state.json").exists():
                out.append((int(p.name[5:]), p))
        return sorted(out)

    def _pointer(self, name: str) -> dict | None:
        p = self.ckpt_dir / f"{name}.json"
        if not p.exists():
            return None
        try:
            return json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def latest(self) -> Path | None:
        """The newest complete checkpoint directory (by the pointer, else by scanning)."""
        ptr = self._pointer("latest")
        if ptr and (self.ckpt_dir / ptr["dir"] / "state.json").exists():
            return self.ckpt_dir / ptr["dir"]
        found = self._list()
        return found[-1][1] if found else None

    def best(self) -> dict | None:
        return self._pointer("best")

    def prune(self, protect: set[str] | None = None) -> list[Path]:
        """Delete all but the last ``keep_last`` checkpoints and the best one; returns what was removed."""
        protect = set(protect or ())
        best = self.best()
        if best:
            protect.add(best["dir"])
        found = self._list()
        keep = {p.name for _, p in found[-self.keep_last :]} if self.keep_last > 0 else set()
        removed = []
        for _, p in found:
            if p.name not in keep and p.name not in protect:
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
        for tmp in self.ckpt_dir.glob(".tmp-*"):  # leftovers of a crash mid-save
            shutil.rmtree(tmp, ignore_errors=True)
        return removed

    def _prune_for_space(self, need: int) -> None:
        """Prune per retention, then oldest non-best checkpoints, until ``need`` bytes are free."""
        self.prune()
        best = (self.best() or {}).get("dir")
        for _, p in self._list()[:-1]:  # never the newest
            if free_bytes(self.ckpt_dir) >= need:
                return
            if p.name != best:
                shutil.rmtree(p, ignore_errors=True)

    def save(
        self,
        step: int,
        model: torch.nn.Module,
        optimizers: list[torch.optim.Optimizer],
        state: dict[str, Any],
        extra_tensors: dict[str, torch.Tensor] | None = None,
        val_loss: float | None = None,
    ) -> Path | None:
        """Write checkpoint ``step``; returns its directory, or None when skipped for disk space."""
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        opt_tensors, opt_meta = _flatten_optim(optimizers)
        extra = {k: v.detach().contiguous().cpu() for k, v in (extra_tensors or {}).items()}
        size = sum(p.numel() * p.element_size() for p in model.state_dict().values())
        size += sum(t.numel() * t.element_size() for t in [*opt_tensors.values(), *extra.values()])
        need = int(size * 1.05) + DISK_MARGIN_BYTES
        if free_bytes(self.ckpt_dir) < need:
            self._prune_for_space(need)
            if free_bytes(self.ckpt_dir) < need:
                warnings.warn(
                    f"checkpoint at step {step} skipped: {free_bytes(self.ckpt_dir) / 2**20:.0f} MiB free, "
                    f"{need / 2**20:.0f} MiB needed; older checkpoints are untouched",
                    RuntimeWarning,
                    stacklevel=2,
                )
                return None
        name = f"step_{step:06d}"
        final = self.ckpt_dir / name
        tmp = self.ckpt_dir / f".tmp-{name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            save_model(model, str(tmp / "model.safetensors"))
            save_file({**opt_tensors, **{f"extra.{k}": v for k, v in extra.items()}}, str(tmp / "optim.safetensors"))
            write_json_atomic(tmp / "state.json", {**state, "step": step, "optimizers": opt_meta, "val_loss": val_loss})
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        write_json_atomic(self.ckpt_dir / "latest.json", {"step": step, "dir": name})
        best = self.best()
        if val_loss is not None and (best is None or val_loss < best["val_loss"]):
            write_json_atomic(self.ckpt_dir / "best.json", {"step": step, "dir": name, "val_loss": val_loss})
        self.prune()
        return final


def load_checkpoint(
    ckpt: Path,
    model: torch.nn.Module,
    optimizers: list[torch.optim.Optimizer] | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Restore model (and optimizers) from a checkpoint directory; returns (state, extra tensors)."""
    ckpt = Path(ckpt)
    for f in ("model.safetensors", "state.json"):
        if not (ckpt / f).exists():
            raise FileNotFoundError(f"{ckpt} is not a checkpoint: {f} is missing")
    state = json.loads((ckpt / "state.json").read_text())
    missing, unexpected = load_model(model, str(ckpt / "model.safetensors"), strict=False)
    if unexpected or [m for m in missing if not m.endswith("lm_head.weight")]:
        raise ValueError(f"checkpoint {ckpt} does not fit the model: missing {missing}, unexpected {unexpected}")
    extra: dict[str, torch.Tensor] = {}
    opt_path = ckpt / "optim.safetensors"
    if opt_path.exists():
        tensors = load_file(str(opt_path))
        extra = {k[len("extra.") :]: v for k, v in tensors.items() if k.startswith("extra.")}
        if optimizers is not None:
            _unflatten_optim(optimizers, {k: v for k, v in tensors.items() if k.startswith("opt")}, state["optimizers"])
    return state, extra


def find_checkpoint(path: Path) -> Path:
    """A checkpoint directory from a run directory (its latest), a checkpoint dir, or a checkpoints/ dir."""
    path = Path(path)
    if (path / "state.json").exists() and (path / "model.safetensors").exists():
        return path
    for mgr_root in (path, path.parent):
        latest = CheckpointManager(mgr_root).latest()
        if latest is not None:
            return latest
    raise FileNotFoundError(f"no checkpoint found under {path} (expected RUN_DIR/{CKPT_DIRNAME}/step_*/)")

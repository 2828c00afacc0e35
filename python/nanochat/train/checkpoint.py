"""Checkpoints of a training run: saving, retention and the disk guard, and resuming with optimizer state.

The format itself (layout, manifest, checksums, finding the latest complete checkpoint, loading model weights) lives
in :mod:`nanochat.checkpoint_format`, below both this module and ``nanochat.export`` (which loads run directories for
inference without importing the trainer). Its names are re-exported here.

Notable choices:
- A checkpoint is written into ``.tmp-step_...-PID``; its data files are fsynced, then ``complete.json`` (the
  manifest: every file with its size and SHA-256) is written last, and the directory is renamed into place.
- Deleting (retention, the disk guard) renames a checkpoint to ``.trash-step_...-PID`` first and then removes it,
  so a kill mid-delete never leaves a ``step_*`` directory missing files. :meth:`CheckpointManager.clean_leftovers`
  removes ``.tmp-*``/``.trash-*`` directories and ``.*.json.tmp-PID`` files of dead processes (the trainer calls it
  at start; every save calls it too).
- Retention keeps the last ``keep_last`` checkpoints plus the best one by validation loss.
- Disk guard: before writing, free space is compared with the expected size plus a margin; old
  checkpoints are pruned per retention and, if space is still short, the save is skipped with a
  warning (``save`` returns None) instead of crashing the run or touching an older checkpoint.
  A disk that fills *during* the write (ENOSPC/EDQUOT, from the OS or from safetensors) is the same: the partial
  directory is removed, a warning says so, ``save`` returns None and the next save tries again.
  :attr:`CheckpointManager.skipped` records every skipped save, so a run can say plainly that nothing was saved.
- Optimizer state is flattened into named tensors (``opt{i}.{param}.{key}``); its non-tensor parts
  (param groups, hyperparameters) go to JSON. Loading for inference never reads it.
"""

from __future__ import annotations

import errno
import math
import os
import re
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file, save_model

from nanochat.checkpoint_format import (
    CHECKSUMMED,
    CKPT_DIRNAME,
    CKPT_FILES,
    INFERENCE_FILES,
    MANIFEST,
    CheckpointError,
    checkpoint_model_config,
    complete_checkpoints,
    file_sha256,
    find_checkpoint,
    incomplete_reason,
    is_complete,
    latest_checkpoint,
    load_model_weights,
    model_tensor_shapes,
    read_pointer,
    read_state,
    step_dir_name,
    step_dirs,
    verify_checksum,
)
from nanochat.export.gguf_file import check_regular_file
from nanochat.runlog import finite_json, write_json_atomic

__all__ = [  # the format's names too, so callers of this module keep working
    "CHECKSUMMED",
    "CKPT_DIRNAME",
    "CKPT_FILES",
    "INFERENCE_FILES",
    "MANIFEST",
    "CheckpointError",
    "CheckpointManager",
    "checkpoint_model_config",
    "clean_leftovers",
    "disk_can_hold_one_checkpoint",
    "file_sha256",
    "find_checkpoint",
    "finite_json",
    "incomplete_reason",
    "is_complete",
    "is_disk_full",
    "load_checkpoint",
    "model_tensor_shapes",
    "read_state",
    "safe_write",
    "state_bytes",
    "verify_checksum",
    "write_json_atomic",
]

DISK_MARGIN_BYTES = 64 * 1024 * 1024
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# what a killed writer leaves: .tmp-step_N-PID, .trash-step_N-PID (checkpoints), .NAME.json.tmp-PID (write_json_atomic)
_LEFTOVER = re.compile(r"^\.(?:(?:tmp|trash)-step_\d+-|[^/]+\.json\.tmp-)(\d+)$")


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem holding ``path`` (or its nearest existing parent; tests monkeypatch this)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def is_disk_full(e: BaseException) -> bool:
    """Whether ``e`` says the disk (or quota) is full: ENOSPC/EDQUOT from the OS, or safetensors' wrapped I/O error
    (``SafetensorError: Error while serializing: I/O error: No space left on device (os error 28)``)."""
    if isinstance(e, OSError):
        return e.errno in DISK_FULL_ERRNOS
    if isinstance(e, SafetensorError):
        msg = str(e)
        return any(s in msg for s in ("No space left", "Disk quota exceeded", "os error 28", "os error 122"))
    return False


def safe_write(fn: Callable[[], object], what: str) -> bool:
    """Run ``fn`` (a best-effort write of ``what``: the summary, the metrics log, the loss plot); on a full disk warn
    and return False instead of raising, so the run keeps its exit status and last checkpoint. Other errors raise."""
    try:
        fn()
    except (OSError, SafetensorError) as e:
        if not is_disk_full(e):
            raise
        warnings.warn(f"{what} not written: the disk is full ({e})", RuntimeWarning, stacklevel=2)
        return False
    return True


def state_bytes(model: torch.nn.Module, optimizers: list[torch.optim.Optimizer] | None = None) -> int:
    """Bytes a checkpoint of ``model`` takes. Without ``optimizers`` (at the start of a run their state does not
    exist yet) it counts one state tensor per parameter, as Muon (momentum) and Lion (``exp_avg``) keep."""
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if optimizers is None:
        return model_bytes + sum(p.numel() * p.element_size() for p in model.parameters())
    opt_tensors, _ = _flatten_optim(optimizers)
    return model_bytes + sum(t.numel() * t.element_size() for t in opt_tensors.values())


def bytes_needed(size: int) -> int:
    """What the disk guard wants free before writing a ``size``-byte checkpoint (5% plus a fixed margin)."""
    return int(size * 1.05) + DISK_MARGIN_BYTES


def disk_can_hold_one_checkpoint(run_dir: Path, nbytes: int) -> bool:
    """Warn (and return False) at the start of a run when the free space cannot hold even one ``nbytes``
    checkpoint: the run would train, skip every save and keep nothing."""
    free, need = free_bytes(Path(run_dir)), bytes_needed(nbytes)
    if free >= need:
        return True
    warnings.warn(
        f"{run_dir}: {free / 2**20:.0f} MiB free cannot hold one checkpoint ({need / 2**20:.0f} MiB needed); "
        "training will run but no checkpoint can be saved until space is freed",
        RuntimeWarning,
        stacklevel=2,
    )
    return False


def _pid_alive(pid: int) -> bool:
    if pid <= 0 or pid == os.getpid():  # our own leftovers: nothing of ours is in flight when we clean
        return False
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except PermissionError:
        return True  # another user's live process
    except (OSError, OverflowError, ValueError):
        return False  # gone, or a number no pid can be
    return True


def clean_leftovers(directory: Path) -> list[Path]:
    """Remove ``.tmp-*``/``.trash-*`` directories and ``.NAME.tmp-PID`` files in ``directory`` left by processes that
    are gone (a kill mid-save or mid-prune); returns what was removed."""
    removed: list[Path] = []
    if not Path(directory).is_dir():
        return removed
    for p in Path(directory).iterdir():
        m = _LEFTOVER.match(p.name)
        if not m or _pid_alive(int(m.group(1))):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


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


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # also where a filesystem with delayed allocation reports ENOSPC
    finally:
        os.close(fd)


@dataclass
class CheckpointManager:
    """Saves, prunes and finds checkpoints of one run."""

    run_dir: Path
    keep_last: int = 3
    saved: list[int] = field(default_factory=list, repr=False)  # steps saved by this manager
    skipped: list[tuple[int, str]] = field(default_factory=list, repr=False)  # (step, why) of skipped saves

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / CKPT_DIRNAME

    def _step_dirs(self) -> list[tuple[int, Path]]:
        return step_dirs(self.ckpt_dir)

    def _list(self, files: tuple[str, ...] = CKPT_FILES) -> list[tuple[int, Path]]:
        """Complete checkpoints (as far as ``files`` go), oldest first."""
        return complete_checkpoints(self.ckpt_dir, files)

    def _pointer(self, name: str) -> dict | None:
        return read_pointer(self.ckpt_dir, name)

    def latest(self, files: tuple[str, ...] = CKPT_FILES) -> Path | None:
        """The newest complete checkpoint directory (``files=INFERENCE_FILES``: whole enough to load the model);
        a fallback past broken newer ones warns (:func:`nanochat.checkpoint_format.latest_checkpoint`)."""
        return latest_checkpoint(self.ckpt_dir, files, stacklevel=3)

    def best(self) -> dict | None:
        return self._pointer("best")

    def clean_leftovers(self) -> list[Path]:
        """Remove temp and trash leftovers of dead processes from the run and checkpoint directories."""
        return clean_leftovers(self.run_dir) + clean_leftovers(self.ckpt_dir)

    def _discard(self, p: Path) -> None:
        """Delete a checkpoint directory: rename it to ``.trash-`` first, so a kill mid-delete leaves no ``step_*``
        directory missing files (only trash, which :meth:`clean_leftovers` removes)."""
        trash = self.ckpt_dir / f".trash-{p.name}-{os.getpid()}"
        try:
            os.replace(p, trash)
        except OSError:
            (p / MANIFEST).unlink(missing_ok=True)  # cannot rename: at least stop it from counting
            trash = p
        shutil.rmtree(trash, ignore_errors=True)

    def prune(self, protect: set[str] | None = None) -> list[Path]:
        """Delete all but the last ``keep_last`` complete checkpoints and the best one, plus incomplete ones older than
        the newest complete checkpoint; returns what was removed."""
        protect = set(protect or ())
        best = self.best()
        if best:
            protect.add(best["dir"])
        found = self._list()
        keep = {p.name for _, p in found[-self.keep_last :]} if self.keep_last > 0 else set()
        complete = {p.name for _, p in found}
        newest = found[-1][0] if found else -1
        removed = []
        for step, p in self._step_dirs():
            if p.name in keep or p.name in protect or (p.name not in complete and step >= newest):
                continue
            self._discard(p)
            removed.append(p)
        self.clean_leftovers()
        return removed

    def _prune_for_space(self, need: int) -> None:
        """Prune per retention, then oldest non-best checkpoints, until ``need`` bytes are free."""
        self.prune()
        best = (self.best() or {}).get("dir")
        for _, p in self._list()[:-1]:  # never the newest
            if free_bytes(self.ckpt_dir) >= need:
                return
            if p.name != best:
                self._discard(p)

    def _skip(self, step: int, why: str) -> None:
        self.skipped.append((step, why))
        warnings.warn(f"checkpoint at step {step} {why}", RuntimeWarning, stacklevel=3)

    def save(
        self,
        step: int,
        model: torch.nn.Module,
        optimizers: list[torch.optim.Optimizer],
        state: dict[str, Any],
        extra_tensors: dict[str, torch.Tensor] | None = None,
        val_loss: float | None = None,
    ) -> Path | None:
        """Write checkpoint ``step``; returns its directory, or None when skipped for disk space (before or during
        the write: the next save tries again)."""
        opt_tensors, opt_meta = _flatten_optim(optimizers)
        extra = {k: v.detach().contiguous().cpu() for k, v in (extra_tensors or {}).items()}
        size = sum(p.numel() * p.element_size() for p in model.state_dict().values())
        size += sum(t.numel() * t.element_size() for t in [*opt_tensors.values(), *extra.values()])
        need = bytes_needed(size)
        name = step_dir_name(step)
        final = self.ckpt_dir / name
        tmp = self.ckpt_dir / f".tmp-{name}-{os.getpid()}"
        old: Path | None = None
        try:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            if free_bytes(self.ckpt_dir) < need:
                self._prune_for_space(need)
                if free_bytes(self.ckpt_dir) < need:
                    self._skip(
                        step,
                        f"skipped: {free_bytes(self.ckpt_dir) / 2**20:.0f} MiB free, {need / 2**20:.0f} MiB needed; "
                        "older checkpoints are untouched",
                    )
                    return None
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            save_model(model, str(tmp / "model.safetensors"))
            save_file({**opt_tensors, **{f"extra.{k}": v for k, v in extra.items()}}, str(tmp / "optim.safetensors"))
            write_json_atomic(tmp / "state.json", {**state, "step": step, "optimizers": opt_meta, "val_loss": val_loss})
            for f in ("model.safetensors", "optim.safetensors"):
                _fsync_file(tmp / f)
            files = {f: (tmp / f).stat().st_size for f in CKPT_FILES}
            sums = {f: file_sha256(tmp / f) for f in CHECKSUMMED}  # of the bytes on disk, read back after the fsync
            manifest = {"format": 2, "step": step, "files": files, "sha256": sums}
            write_json_atomic(tmp / MANIFEST, manifest)  # last: now it counts
            if final.exists():  # the same step saved again (a resumed run): keep it until the new one is in place
                old = self.ckpt_dir / f".trash-{name}-{os.getpid()}"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            os.replace(tmp, final)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if old is not None and old.exists() and not final.exists():
                os.replace(old, final)  # the earlier save of this step stays
            if not is_disk_full(e):
                raise
            self._skip(
                step,
                f"not saved: the disk filled during the write ({e}); the partial checkpoint was removed, older "
                "checkpoints are untouched, and the next save will try again",
            )
            return None
        self.saved.append(step)
        try:  # pointers: a full disk here loses nothing (latest() scans for complete checkpoints)
            write_json_atomic(self.ckpt_dir / "latest.json", {"step": step, "dir": name})
            best = self.best()
            if val_loss is not None and (best is None or val_loss < best.get("val_loss", math.inf)):
                write_json_atomic(self.ckpt_dir / "best.json", {"step": step, "dir": name, "val_loss": val_loss})
        except OSError as e:
            if not is_disk_full(e):
                raise
            warnings.warn(f"{self.ckpt_dir}: pointer files not updated, the disk is full ({e})", RuntimeWarning, 2)
        self.prune()
        return final

    def outcome(self) -> str:
        """One line for the end of a run: where the latest checkpoint is, or plainly that none could be saved."""
        latest = self.latest()
        if latest is None:
            why = f": {len(self.skipped)} save(s) skipped, the last one {self.skipped[-1][1]}" if self.skipped else ""
            return f"NO checkpoint was saved{why}"
        skipped = f" ({len(self.skipped)} save(s) skipped for disk space)" if self.skipped else ""
        return f"latest checkpoint: {latest}{skipped}"


def load_checkpoint(
    ckpt: Path,
    model: torch.nn.Module,
    optimizers: list[torch.optim.Optimizer] | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Restore model (and optimizers) from a checkpoint directory; returns (state, extra tensors).

    ``optim.safetensors`` (optimizer state and the extra tensors, e.g. RNG states) is read only when ``optimizers``
    are given: loading for inference needs just ``model.safetensors`` and ``state.json``. Problems raise
    :class:`CheckpointError` naming the file.
    """
    ckpt = Path(ckpt)
    state = load_model_weights(ckpt, model)
    extra: dict[str, torch.Tensor] = {}
    if optimizers is not None:
        opt_path = ckpt / "optim.safetensors"
        try:
            check_regular_file(opt_path)
            verify_checksum(ckpt, "optim.safetensors")
            tensors = load_file(str(opt_path))
        except FileNotFoundError:
            raise CheckpointError(f"{ckpt}: optim.safetensors is missing (needed to resume training)") from None
        except CheckpointError:
            raise
        except (OSError, ValueError, RuntimeError, SafetensorError) as e:
            raise CheckpointError(f"{opt_path}: corrupt or truncated ({e})") from None
        extra = {k[len("extra.") :]: v for k, v in tensors.items() if k.startswith("extra.")}
        if "optimizers" not in state:
            raise CheckpointError(f"{ckpt / 'state.json'}: optimizers is missing (needed to resume training)")
        try:
            _unflatten_optim(optimizers, {k: v for k, v in tensors.items() if k.startswith("opt")}, state["optimizers"])
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{opt_path}: does not fit the run's optimizers ({e})") from None
    return state, extra

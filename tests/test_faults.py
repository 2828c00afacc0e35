"""Faults and hostile files (issue 14): a disk that fills during checkpoint, summary or shard writes; checkpoints that
count only when complete, trash-first pruning and leftover cleanup; loaders that check every header number against
the file before allocating, refuse non-regular files, and raise one error type (``LoadError``) naming the file.

Disk-full cases run on a real 1-4 MiB tmpfs when the tests may mount one (root), and with the writer patched to raise
ENOSPC everywhere. Hostile headers are loaded in a subprocess with a wall-clock limit and an address-space cap, so a
regression shows up as a failed test instead of a hung or swapping machine.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import resource
import shutil
import struct
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nanochat.data import shards as shards_mod
from nanochat.data.shards import build_shards
from nanochat.data.tokenizer import Tokenizer
from nanochat.export import GGUFError, LoadError, export_gguf, export_safetensors, load, read_gguf
from nanochat.model import GPT, GPTConfig, torch_path_only
from nanochat.optim import build_optimizers
from nanochat.train import checkpoint as ckpt_mod
from nanochat.train.checkpoint import (
    CKPT_FILES,
    MANIFEST,
    CheckpointError,
    CheckpointManager,
    disk_can_hold_one_checkpoint,
    find_checkpoint,
    is_complete,
    load_checkpoint,
    safe_write,
    state_bytes,
    write_json_atomic,
)

TEXTS = ["def add(a, b):\n    return a + b\n", "print('héllo wörld 🙂')\n", "class Foo:\n    pass\n"] * 40
SAMPLES = ["def add(a, b):\n    return a + b\n", "print('héllo')", "x = [1, 2]\n", "<|bos|>class A: pass"]
ENOSPC_SAFETENSORS = "Error while serializing: I/O error: No space left on device (os error 28)"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(TEXTS, 400)


def tiny_gpt(seed: int = 0) -> GPT:
    cfg = GPTConfig(vocab_size=512, seq_len=32, n_layer=2, n_embd=256, n_head=4, n_kv_head=2, mlp_hidden=256)
    cfg = cfg.replace(residual="standard", qk_norm=False)
    torch.manual_seed(seed)
    m = GPT(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


def logits(m: GPT, ids: list[int]) -> torch.Tensor:
    with torch.no_grad(), torch_path_only():
        return m(torch.tensor([ids]))[0]


def trained_linear() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A 256x256 linear layer after one AdamW step: ~0.26 MB of weights, ~0.5 MB of optimizer state."""
    torch.manual_seed(0)
    model = torch.nn.Linear(256, 256)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 256)).sum().backward()
    opt.step()
    return model, opt


def run_with_checkpoint(tmp_path: Path, tok: Tokenizer, optimizers: bool = False) -> tuple[Path, GPT, list]:
    """A run directory as nanochat-train leaves it: tokenizer.json and one checkpoint of a tiny GPT."""
    run = tmp_path / "run"
    run.mkdir()
    tok.save(run / "tokenizer.json")
    model = tiny_gpt()
    opts: list = []
    if optimizers:
        opts = list(build_optimizers(model))
        model.train()
        model(torch.tensor([[1, 2, 3, 4]]), targets=torch.tensor([[2, 3, 4, 5]])).backward()
        for o in opts:
            o.step()
        model.eval()
    CheckpointManager(run).save(1, model, opts, {"model_config": model.config.to_dict()})
    return run, model, opts


@contextlib.contextmanager
def small_disk(tmp_path: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of ``size`` (e.g. ``"2m"``) mounted under ``tmp_path``; skips when mounting is not allowed."""
    d = tmp_path / f"disk_{size}"
    d.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield d
    finally:
        if subprocess.run(["umount", str(d)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(d)], capture_output=True)


def fill_disk(d: Path, leave: int) -> Path:
    """Write a filler file leaving about ``leave`` bytes free on ``d``'s filesystem."""
    filler = d / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(shutil.disk_usage(d).free - leave, 0))
    return filler


def leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.startswith(".")) if d.exists() else []


# ----------------------------------------------------------------------------- item 3: ENOSPC during a checkpoint


def test_disk_filling_during_a_checkpoint_write_skips_it_on_a_real_tmpfs(tmp_path, monkeypatch):
    model, opt = trained_linear()
    # the guard sees plenty of room (as when another writer fills the disk during our write)
    monkeypatch.setattr(ckpt_mod, "free_bytes", lambda p: 10**12)
    with small_disk(tmp_path, "4m") as disk:
        mgr = CheckpointManager(disk / "run")
        assert mgr.save(1, model, [opt], {"x": 1}) is not None
        first = (mgr.ckpt_dir / "step_000001" / "model.safetensors").read_bytes()
        filler = fill_disk(disk, leave=300_000)  # room for model.safetensors, not for optim.safetensors
        with pytest.warns(RuntimeWarning, match="step 2 not saved: the disk filled during the write"):
            assert mgr.save(2, model, [opt], {"x": 2}) is None
        assert mgr.skipped and mgr.skipped[-1][0] == 2
        assert leftovers(mgr.ckpt_dir) == [] and not (mgr.ckpt_dir / "step_000002").exists()
        assert mgr.latest().name == "step_000001"
        assert (mgr.ckpt_dir / "step_000001" / "model.safetensors").read_bytes() == first
        filler.unlink()  # space comes back: the next save goes through
        with torch.no_grad():
            model.weight.add_(1.0)
        assert mgr.save(3, model, [opt], {"x": 3}) is not None
        assert mgr.latest().name == "step_000003"
        fresh = torch.nn.Linear(256, 256)
        state, _ = load_checkpoint(mgr.latest(), fresh)
        assert state["x"] == 3 and torch.equal(fresh.weight, model.weight)


@pytest.mark.parametrize(
    "target,exc",
    [
        ("save_model", OSError(errno.ENOSPC, "No space left on device")),
        ("save_file", SafetensorError(ENOSPC_SAFETENSORS)),
        ("state.json", OSError(errno.EDQUOT, "Disk quota exceeded")),
        ("_fsync_file", OSError(errno.ENOSPC, "No space left on device")),
        ("manifest", OSError(errno.ENOSPC, "No space left on device")),
    ],
)
def test_disk_full_from_any_writer_skips_the_save_and_the_next_one_retries(tmp_path, monkeypatch, target, exc):
    model, opt = trained_linear()
    mgr = CheckpointManager(tmp_path)
    assert mgr.save(1, model, [opt], {}) is not None
    with monkeypatch.context() as mp:
        if target in ("state.json", "manifest"):
            real = ckpt_mod.write_json_atomic
            name = "state.json" if target == "state.json" else MANIFEST

            def failing(path: Path, obj: Any) -> None:
                if Path(path).name == name:
                    raise exc
                real(path, obj)

            mp.setattr(ckpt_mod, "write_json_atomic", failing)
        else:

            def boom(*a: Any, **k: Any) -> None:
                raise exc

            mp.setattr(ckpt_mod, target, boom)
        with pytest.warns(RuntimeWarning, match="step 2 not saved: the disk filled"):
            assert mgr.save(2, model, [opt], {}) is None
    assert not list(mgr.ckpt_dir.glob(".tmp-*")) and not (mgr.ckpt_dir / "step_000002").exists()
    assert mgr.latest().name == "step_000001" and mgr.skipped == [(2, mgr.skipped[0][1])]
    assert mgr.save(3, model, [opt], {}) is not None and mgr.latest().name == "step_000003"


def test_other_write_errors_still_raise_and_leave_no_partial_directory(tmp_path, monkeypatch):
    model, opt = trained_linear()
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, model, [opt], {})

    def boom(*a: Any, **k: Any) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(ckpt_mod, "save_file", boom)
    with pytest.raises(OSError, match="Input/output error"):
        mgr.save(2, model, [opt], {})
    assert not list(mgr.ckpt_dir.glob(".tmp-*")) and mgr.latest().name == "step_000001"


def test_safe_write_turns_a_full_disk_into_a_warning(tmp_path):
    calls = []
    assert safe_write(lambda: calls.append(1), "summary.json") is True and calls == [1]

    def raiser(e: BaseException):
        def fn() -> None:
            raise e

        return fn

    with pytest.warns(RuntimeWarning, match="loss.png not written: the disk is full"):
        assert safe_write(raiser(OSError(errno.ENOSPC, "No space left on device")), "loss.png") is False
    with pytest.warns(RuntimeWarning, match="metrics.jsonl not written"):
        assert safe_write(raiser(OSError(errno.EDQUOT, "Disk quota exceeded")), "metrics.jsonl") is False
    with pytest.warns(RuntimeWarning, match="not written"):
        assert safe_write(raiser(SafetensorError(ENOSPC_SAFETENSORS)), "x") is False
    with pytest.raises(PermissionError):
        safe_write(raiser(PermissionError(errno.EACCES, "Permission denied")), "summary.json")
    with pytest.raises(ValueError):
        safe_write(raiser(ValueError("not about disks")), "summary.json")


def test_safe_write_on_a_real_full_disk_leaves_no_temp_file(tmp_path):
    with small_disk(tmp_path, "1m") as disk:
        fill_disk(disk, leave=0)
        big = {"losses": list(range(50_000))}
        with pytest.warns(RuntimeWarning, match="summary.json not written: the disk is full"):
            assert safe_write(lambda: write_json_atomic(disk / "summary.json", big), "summary.json") is False
        assert not (disk / "summary.json").exists() and leftovers(disk) == []


# ----------------------------------------------------------------------------- item 4: nothing could be saved


def test_state_bytes_matches_what_a_checkpoint_holds(tmp_path):
    model = tiny_gpt()
    estimate = state_bytes(model)  # before any step: no optimizer state exists yet
    opts = list(build_optimizers(model))
    model.train()
    model(torch.tensor([[1, 2, 3, 4]]), targets=torch.tensor([[2, 3, 4, 5]])).backward()
    for o in opts:
        o.step()
    ckpt = CheckpointManager(tmp_path).save(1, model, opts, {})
    # independent count: the tensors safetensors actually wrote
    on_disk = sum(
        t.numel() * t.element_size() for f in ("model", "optim") for t in load_file(ckpt / f"{f}.safetensors").values()
    )
    assert state_bytes(model, opts) == on_disk
    assert abs(estimate - on_disk) <= 0.02 * on_disk


def test_start_warns_when_no_checkpoint_can_fit(tmp_path, monkeypatch):
    model = tiny_gpt()
    monkeypatch.setattr(ckpt_mod, "free_bytes", lambda p: 30 * 2**20)
    with pytest.warns(RuntimeWarning, match="30 MiB free cannot hold one checkpoint"):
        assert disk_can_hold_one_checkpoint(tmp_path / "not_yet_created", state_bytes(model)) is False
    monkeypatch.setattr(ckpt_mod, "free_bytes", lambda p: 10 * 2**30)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert disk_can_hold_one_checkpoint(tmp_path, state_bytes(model)) is True


def test_free_bytes_of_a_directory_not_created_yet(tmp_path):
    # a run directory that does not exist yet is measured on its nearest existing parent
    assert ckpt_mod.free_bytes(tmp_path / "a" / "b") == pytest.approx(shutil.disk_usage(tmp_path).free, rel=0.01)


def test_outcome_says_plainly_that_nothing_was_saved(tmp_path, monkeypatch):
    model, opt = trained_linear()
    mgr = CheckpointManager(tmp_path / "run")
    monkeypatch.setattr(ckpt_mod, "free_bytes", lambda p: 30 * 2**20)
    for step in (2, 4, 6):
        with pytest.warns(RuntimeWarning, match="skipped"):
            assert mgr.save(step, model, [opt], {}) is None
    line = mgr.outcome()
    assert line.startswith("NO checkpoint was saved") and "3 save(s) skipped" in line and "30 MiB free" in line
    monkeypatch.setattr(ckpt_mod, "free_bytes", lambda p: 10**12)
    mgr.save(8, model, [opt], {})
    assert mgr.outcome() == f"latest checkpoint: {mgr.ckpt_dir / 'step_000008'} (3 save(s) skipped for disk space)"


# ----------------------------------------------------------------------------- items 5-6: complete checkpoints


def test_a_kill_during_pruning_leaves_no_half_deleted_checkpoint(tmp_path, monkeypatch):
    model, opt = trained_linear()
    mgr = CheckpointManager(tmp_path, keep_last=1)
    mgr.save(1, model, [opt], {})
    real_rmtree = shutil.rmtree

    def killed_midway(path: Any, *a: Any, **k: Any) -> None:
        p = Path(path)
        if "step_000001" in p.name and p.is_dir():
            (p / "optim.safetensors").unlink()  # the first file is gone ...
            raise KeyboardInterrupt  # ... when the process dies
        real_rmtree(path, *a, **k)

    monkeypatch.setattr(ckpt_mod.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        mgr.save(2, model, [opt], {})
    monkeypatch.undo()
    step_dirs = sorted(p.name for p in mgr.ckpt_dir.iterdir() if p.name.startswith("step_"))
    assert step_dirs == ["step_000002"]  # the half-deleted one is trash, not a checkpoint
    assert all((mgr.ckpt_dir / d / f).is_file() for d in step_dirs for f in CKPT_FILES)
    restarted = CheckpointManager(tmp_path, keep_last=1)
    assert restarted.latest().name == "step_000002"
    assert [p.name for p in restarted.clean_leftovers()] == [f".trash-step_000001-{os.getpid()}"]
    assert leftovers(mgr.ckpt_dir) == []


def test_only_complete_checkpoints_count(tmp_path):
    model, opt = trained_linear()
    mgr = CheckpointManager(tmp_path, keep_last=10)
    for s in (1, 2, 3, 4):
        mgr.save(s, model, [opt], {"s": s})
    d = {s: mgr.ckpt_dir / f"step_{s:06d}" for s in (1, 2, 3, 4)}
    assert all(json.loads((p / MANIFEST).read_text())["files"].keys() == set(CKPT_FILES) for p in d.values())
    # step 4 lost its optimizer state (a manifest names it): no use for resuming, fine for inference
    (d[4] / "optim.safetensors").unlink()
    # step 3 predates manifests and is whole: it counts (old runs still resume)
    (d[3] / MANIFEST).unlink()
    with pytest.warns(RuntimeWarning, match="latest.json names step_000004, which is missing or incomplete"):
        assert mgr.latest().name == "step_000003"
    assert find_checkpoint(tmp_path).name == "step_000004"
    state, _ = load_checkpoint(d[3], torch.nn.Linear(256, 256), [torch.optim.AdamW(model.parameters())])
    assert state["s"] == 3
    # ... unless a file is missing or shorter than its header says
    data = (d[3] / "model.safetensors").read_bytes()
    (d[3] / "model.safetensors").write_bytes(data[:-1])
    with pytest.warns(RuntimeWarning):
        assert mgr.latest().name == "step_000002"
    (d[2] / "optim.safetensors").write_bytes(b"")  # a manifest with a wrong size
    with pytest.warns(RuntimeWarning):
        assert mgr.latest().name == "step_000001"
    assert not is_complete(d[2]) and is_complete(d[2], ("model.safetensors", "state.json")) and is_complete(d[1])
    # incomplete checkpoints are left alone until a newer complete one exists, then pruned with the rest
    mgr.keep_last = 1
    mgr.prune()
    assert sorted(p.name for p in mgr.ckpt_dir.iterdir() if p.name.startswith("step_")) == [
        f"step_{s:06d}" for s in (1, 2, 3, 4)
    ]
    mgr.save(5, model, [opt], {"s": 5})
    assert sorted(p.name for p in mgr.ckpt_dir.iterdir() if p.name.startswith("step_")) == ["step_000005"]


def test_saving_the_same_step_again_replaces_it_whole(tmp_path, monkeypatch):
    model, opt = trained_linear()
    mgr = CheckpointManager(tmp_path)
    mgr.save(3, model, [opt], {"v": 1})
    with torch.no_grad():
        model.weight.add_(1.0)
    real_replace = os.replace

    def full_on_rename(src: Any, dst: Any) -> None:
        if Path(src).name.startswith(".tmp-step_"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(ckpt_mod.os, "replace", full_on_rename)
    with pytest.warns(RuntimeWarning, match="not saved"):
        assert mgr.save(3, model, [opt], {"v": 2}) is None
    monkeypatch.undo()
    assert read_state_v(mgr) == 1 and leftovers(mgr.ckpt_dir) == []  # the earlier save of step 3 is back in place
    mgr.save(3, model, [opt], {"v": 3})
    assert read_state_v(mgr) == 3 and leftovers(mgr.ckpt_dir) == []


def read_state_v(mgr: CheckpointManager) -> int:
    return json.loads((mgr.latest() / "state.json").read_text())["v"]


def test_stale_temp_and_trash_files_are_cleaned(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = os.getppid()  # alive, and not us
    model, opt = trained_linear()
    mgr = CheckpointManager(tmp_path, keep_last=2)
    mgr.save(1, model, [opt], {})

    def plant() -> None:
        (mgr.ckpt_dir / f".latest.json.tmp-{dead.pid}").write_text("{")
        (mgr.ckpt_dir / f".best.json.tmp-{os.getpid()}").write_text("{")
        (mgr.ckpt_dir / f".tmp-step_000005-{dead.pid}").mkdir()
        (mgr.ckpt_dir / f".tmp-step_000005-{dead.pid}" / "model.safetensors").write_bytes(b"x")
        (mgr.ckpt_dir / f".trash-step_000000-{dead.pid}").mkdir()
        (tmp_path / f".summary.json.tmp-{dead.pid}").write_text("{")
        (mgr.ckpt_dir / f".latest.json.tmp-{live}").write_text("{")

    plant()
    removed = {p.name for p in CheckpointManager(tmp_path).clean_leftovers()}
    assert removed == {
        f".latest.json.tmp-{dead.pid}",
        f".best.json.tmp-{os.getpid()}",
        f".tmp-step_000005-{dead.pid}",
        f".trash-step_000000-{dead.pid}",
        f".summary.json.tmp-{dead.pid}",
    }
    assert leftovers(mgr.ckpt_dir) == [f".latest.json.tmp-{live}"] and leftovers(tmp_path) == []
    (mgr.ckpt_dir / f".latest.json.tmp-{live}").unlink()
    plant()
    mgr.save(2, model, [opt], {})  # every save cleans up too
    assert leftovers(mgr.ckpt_dir) == [f".latest.json.tmp-{live}"] and leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- item 8: a full data cache


def test_full_data_cache_names_the_path_on_a_real_tmpfs(tmp_path, tok):
    rng = random.Random(0)
    docs = ["".join(rng.choice("abcdefghij (),:=\n") for _ in range(2000)) for _ in range(400)]  # ~0.8M chars
    with small_disk(tmp_path, "1m") as disk:
        with pytest.raises(OSError) as info:
            build_shards({"train": docs}, tok, disk / "cache", shard_tokens=60_000, progress=False)
        e = info.value
        assert e.errno == errno.ENOSPC and "the disk is full" in str(e) and str(disk / "cache" / "train_") in str(e)
        assert not [p for p in (disk / "cache").iterdir() if p.name.startswith(".")]


def test_a_short_write_is_reported_as_a_full_disk(tmp_path, tok, monkeypatch):
    def short(*a: Any, **k: Any) -> None:
        raise OSError("4526110 requested and 993216 written")

    monkeypatch.setattr(shards_mod.np, "save", short)
    with pytest.raises(OSError, match=r"the disk is full: cannot write .*train_00000\.npy") as info:
        build_shards({"train": TEXTS, "val": TEXTS[:3]}, tok, tmp_path / "cache", progress=False)
    assert info.value.errno == errno.ENOSPC
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]

    def denied(*a: Any, **k: Any) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(shards_mod.np, "save", denied)
    with pytest.raises(PermissionError):  # other errors pass through as they are
        build_shards({"train": TEXTS}, tok, tmp_path / "cache2", progress=False)


# ----------------------------------------------------------------------------- item 10: hostile header numbers


def rewrite_state(ckpt: Path, state: dict[str, Any]) -> None:
    """Replace a checkpoint's state.json and record its new size in the manifest, as a consistent writer would."""
    (ckpt / "state.json").write_text(json.dumps(state))
    manifest = json.loads((ckpt / MANIFEST).read_text())
    manifest["files"]["state.json"] = (ckpt / "state.json").stat().st_size
    (ckpt / MANIFEST).write_text(json.dumps(manifest))


def rewrite_gguf(src: Path, dst: Path, fields: dict[str, Any] | None = None, alignment: int | None = None) -> Path:
    """Copy a GGUF file through gguf's writer, replacing some metadata values."""
    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), r.fields["general.architecture"].contents())
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture":
            continue
        val = (fields or {}).get(k, f.contents())
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            w.add_array(k, val)
        else:
            w.add_key_value(k, val, f.types[0])
    if alignment is not None:
        w.add_custom_alignment(alignment)
    for t in r.tensors:
        w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def value_offset(data: bytes, key: str) -> int:
    """Offset of the value type (u32) of metadata ``key`` in a GGUF file."""
    k = key.encode()
    return data.index(struct.pack("<Q", len(k)) + k) + 8 + len(k)


def patched(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


def st_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file, read by hand (8-byte length, then the JSON header)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))["__metadata__"]


LOADER = r"""
import json, sys
from nanochat.export import LoadError, load
for p in sys.argv[1:]:
    try:
        load(p)
        out = {"path": p, "type": None}
    except Exception as e:
        out = {"path": p, "type": type(e).__name__, "load_error": isinstance(e, LoadError), "msg": str(e)}
    print(json.dumps(out), flush=True)
"""


def load_each_in_a_subprocess(paths: list[Path]) -> dict[str, dict[str, Any]]:
    """``nanochat.load`` on each path in one child process with a generous wall-clock limit and a 6 GiB address
    space: a loader that iterates a patched count or blocks on a FIFO fails this test instead of hanging it."""

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))

    try:
        r = subprocess.run(
            [sys.executable, "-c", LOADER, *map(str, paths)],
            capture_output=True,
            text=True,
            timeout=240,
            preexec_fn=cap,
        )
    except subprocess.TimeoutExpired as e:
        done = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        pytest.fail(f"loading hung; finished before the hang: {done}")
    assert r.returncode == 0, r.stderr[-2000:]
    return {d["path"]: d for d in map(json.loads, r.stdout.splitlines())}


def test_hostile_counts_and_non_regular_files_fail_fast_with_a_load_error(tmp_path, tok):
    good = export_gguf(tiny_gpt(), tok, tmp_path / "good.gguf")
    data = good.read_bytes()
    cases: dict[Path, str] = {}  # path -> what the message must say
    for n in (1048576, 4294967295):
        p = rewrite_gguf(good, tmp_path / f"blocks_{n}.gguf", {"bitnet.block_count": n})
        cases[p] = f"n_layer \\(block_count\\) is {n}, but the file has tensors for 2 blocks"
    (tmp_path / "ntensors.gguf").write_bytes(patched(data, 8, "<Q", 2**40))
    cases[tmp_path / "ntensors.gguf"] = "implausible counts"
    (tmp_path / "nkv.gguf").write_bytes(patched(data, 16, "<Q", 1 << 19))
    cases[tmp_path / "nkv.gguf"] = "implausible counts"
    (tmp_path / "ntokens.gguf").write_bytes(patched(data, value_offset(data, "tokenizer.ggml.tokens") + 8, "<Q", 2**60))
    cases[tmp_path / "ntokens.gguf"] = "array of 1152921504606846976 elements .* does not fit"
    (tmp_path / "nmerges.gguf").write_bytes(patched(data, value_offset(data, "tokenizer.ggml.merges") + 8, "<Q", 2**33))
    cases[tmp_path / "nmerges.gguf"] = "does not fit"

    model = tiny_gpt()
    st = export_safetensors(model, tok, tmp_path / "good.safetensors")
    tensors = load_file(st)
    meta = st_metadata(st)
    cfg = json.loads(meta["nanochat.config"])
    save_file(
        tensors, tmp_path / "layers.safetensors", {**meta, "nanochat.config": json.dumps({**cfg, "n_layer": 100000})}
    )
    cases[tmp_path / "layers.safetensors"] = (
        "n_layer \\(block_count\\) is 100000, but the file has tensors for 2 blocks"
    )

    run, _, _ = run_with_checkpoint(tmp_path, tok)
    ckpt = run / "checkpoints" / "step_000001"
    state = json.loads((ckpt / "state.json").read_text())
    state["model_config"]["n_layer"] = 100000
    rewrite_state(ckpt, state)
    cases[run] = "n_layer \\(block_count\\) is 100000"

    for name in ("fifo.gguf", "fifo.safetensors", "fifo"):
        os.mkfifo(tmp_path / name)
        cases[tmp_path / name] = "expected a regular file, found a FIFO"
    fifo_ckpt = tmp_path / "fifo_ckpt"
    shutil.copytree(ckpt, fifo_ckpt)
    (fifo_ckpt / "model.safetensors").unlink()
    os.mkfifo(fifo_ckpt / "model.safetensors")
    cases[fifo_ckpt] = "model.safetensors: expected a regular file, found a FIFO"

    results = load_each_in_a_subprocess(list(cases))
    for path, pattern in cases.items():
        got = results[str(path)]
        assert got["type"] is not None and got["load_error"], got
        assert str(path) in got["msg"] and re.search(pattern, got["msg"]), (pattern, got)


def test_gguf_reader_refuses_non_regular_files_in_process(tmp_path):
    os.mkfifo(tmp_path / "x.gguf")
    with pytest.raises(GGUFError, match="found a FIFO"):
        read_gguf(tmp_path / "x.gguf")
    (tmp_path / "d.gguf").mkdir()
    with pytest.raises(GGUFError, match="found a directory"):
        read_gguf(tmp_path / "d.gguf")
    with pytest.raises(LoadError, match="d.gguf: is a directory, expected a gguf file"):
        load(tmp_path / "d.gguf")


# ----------------------------------------------------------------------------- item 11: errors with context


def test_gguf_alignment_must_be_a_positive_power_of_two(tmp_path, tok):
    src = rewrite_gguf(export_gguf(tiny_gpt(), tok, tmp_path / "g.gguf"), tmp_path / "a32.gguf", alignment=32)
    assert read_gguf(src).config == tiny_gpt().config
    data = src.read_bytes()
    off = value_offset(data, "general.alignment")
    assert struct.unpack_from("<II", data, off) == (gguf.GGUFValueType.UINT32, 32)
    for bad in (0, 3, 48):
        p = tmp_path / f"a{bad}.gguf"
        p.write_bytes(patched(data, off + 4, "<I", bad))
        with pytest.raises(GGUFError, match=f"{p}.*general.alignment must be a positive power of two, got {bad}"):
            read_gguf(p)


def test_gguf_tokenizer_arrays_are_checked_against_each_other(tmp_path, tok):
    good = export_gguf(tiny_gpt(), tok, tmp_path / "g.gguf")
    r = gguf.GGUFReader(str(good))
    types = list(r.fields["tokenizer.ggml.token_type"].contents())
    tokens = list(r.fields["tokenizer.ggml.tokens"].contents())
    merges = list(r.fields["tokenizer.ggml.merges"].contents())
    p = rewrite_gguf(good, tmp_path / "short.gguf", {"tokenizer.ggml.token_type": types[:-5]})
    with pytest.raises(GGUFError, match=f"{p}: tokenizer.ggml.token_type has {len(types) - 5} entries"):
        read_gguf(p)
    i = next(i for i, t in enumerate(tokens) if types[i] == 1 and len(t) > 2)
    p = rewrite_gguf(
        good, tmp_path / "dup.gguf", {"tokenizer.ggml.tokens": [*tokens[:i], tokens[i - 1], *tokens[i + 1 :]]}
    )
    with pytest.raises(GGUFError, match=rf"tokenizer.ggml.tokens\[{i}\] = .* repeats token {i - 1}"):
        read_gguf(p)
    p = rewrite_gguf(good, tmp_path / "merge.gguf", {"tokenizer.ggml.merges": [*merges[:-1], "zzq qzz"]})
    with pytest.raises(GGUFError, match=rf"tokenizer.ggml.merges\[{len(merges) - 1}\] = 'zzq qzz'"):
        read_gguf(p)
    p = rewrite_gguf(good, tmp_path / "nomerges.gguf", {"tokenizer.ggml.merges": []})
    with pytest.raises(GGUFError, match="tokenizer.ggml.merges is missing"):
        read_gguf(p)


def string_array_contents(data: bytes, key: str) -> list[int]:
    """Offsets of every byte inside the strings (not the length prefixes) of GGUF string-array ``key``."""
    off = value_offset(data, key)
    vtype, etype, count = struct.unpack_from("<IIQ", data, off)
    assert (vtype, etype) == (gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING)
    off += 16
    out = []
    for _ in range(count):
        (n,) = struct.unpack_from("<Q", data, off)
        out.extend(range(off + 8, off + 8 + n))
        off += 8 + n
    return out


def test_byte_flips_in_tokens_and_merges_name_the_entry_or_change_nothing(tmp_path, tok):
    good = export_gguf(tiny_gpt(), tok, tmp_path / "g.gguf")
    data = good.read_bytes()
    where = string_array_contents(data, "tokenizer.ggml.tokens") + string_array_contents(data, "tokenizer.ggml.merges")
    want = [tok.encode(s) for s in SAMPLES]
    rng = random.Random(14)
    errors = 0
    for k in range(60):
        b = bytearray(data)
        i = rng.choice(where)
        b[i] ^= 1 << rng.randrange(8)
        p = tmp_path / f"flip{k}.gguf"
        p.write_bytes(bytes(b))
        try:
            g = read_gguf(p)
        except GGUFError as e:  # not the tokenizers library's bare "Exception: Error while initializing BPE"
            # (a special token's name: the tokenizer's checks; a flip they let through: our export's checksum)
            assert str(e).startswith((f"{p}: tokenizer", f"{p}: special token", f"{p}: checksum mismatch")), str(e)
            errors += bool(re.match(rf"{p}: tokenizer\.ggml\.(tokens|merges)\[\d+\] = ", str(e)))
            continue
        assert [g.tokenizer.encode(s) for s in SAMPLES] == want, f"byte {i} flipped: a different tokenizer loaded"
    assert errors >= 15  # flips in the vocabulary, named by entry; the rest hit unused padding or special tokens


def test_checkpoint_errors_name_the_file(tmp_path, tok):
    run, model, opts = run_with_checkpoint(tmp_path, tok, optimizers=True)
    ckpt = run / "checkpoints" / "step_000001"
    ids = tok.encode("def f(x):")
    want = logits(model, ids)
    state = json.loads((ckpt / "state.json").read_text())

    # a truncated optim.safetensors: inference loads (from the run and from the checkpoint), resuming names the file
    opt_bytes = (ckpt / "optim.safetensors").read_bytes()
    (ckpt / "optim.safetensors").write_bytes(opt_bytes[: len(opt_bytes) // 2])
    for where in (run, ckpt):
        torch.testing.assert_close(logits(load(where).torch_model(), ids), want, rtol=0, atol=0)
    fresh = tiny_gpt(seed=1)
    with pytest.raises(CheckpointError, match=f"{ckpt / 'optim.safetensors'}: corrupt or truncated"):
        load_checkpoint(ckpt, fresh, list(build_optimizers(fresh)))
    (ckpt / "optim.safetensors").write_bytes(opt_bytes)
    load_checkpoint(ckpt, fresh, list(build_optimizers(fresh)))  # whole again: resumes

    # a shape mismatch is a CheckpointError naming the file, not torch's RuntimeError
    other = GPT(model.config.replace(n_embd=512, mlp_hidden=512))
    with pytest.raises(CheckpointError, match=f"{ckpt / 'model.safetensors'} does not fit the model.*shape mismatches"):
        load_checkpoint(ckpt, other)
    (ckpt / "state.json").write_text(json.dumps({**state, "model_config": {**state["model_config"], "n_embd": 512}}))
    with pytest.raises(CheckpointError, match=r"no complete checkpoint .*step_000001: state.json has \d+ bytes, comp"):
        load(run)  # edited after it was written: the manifest's sizes no longer match
    rewrite_state(ckpt, {**state, "model_config": {**state["model_config"], "n_embd": 512}})
    with pytest.raises(
        CheckpointError, match=r"model.safetensors does not fit .*state.json's model_config.*wte.weight"
    ):
        load(run)

    # no model_config; state.json not JSON; not an object
    rewrite_state(ckpt, {k: v for k, v in state.items() if k != "model_config"})
    with pytest.raises(CheckpointError, match=f"{ckpt / 'state.json'}: model_config is missing"):
        load(run)
    for text, what in (("{not json", "invalid JSON"), ("[1, 2]", "expected a JSON object")):
        (ckpt / "state.json").write_text(text)
        with pytest.raises(CheckpointError, match=f"{ckpt / 'state.json'}: .*{what}"):
            load(ckpt)
    rewrite_state(ckpt, state)
    assert load(run).config == model.config

    # a directory where a file belongs
    (ckpt / "model.safetensors").rename(tmp_path / "model.safetensors")
    (ckpt / "model.safetensors").mkdir()
    with pytest.raises(CheckpointError, match=f"{ckpt / 'model.safetensors'}: expected a regular file, found a dir"):
        load(ckpt)
    with pytest.raises(CheckpointError, match="no complete checkpoint under .*step_000001: .*found a directory"):
        load(run)
    (ckpt / "model.safetensors").rmdir()
    (tmp_path / "model.safetensors").rename(ckpt / "model.safetensors")
    (ckpt / "optim.safetensors").unlink()
    (ckpt / "optim.safetensors").mkdir()
    with pytest.raises(CheckpointError, match=f"{ckpt / 'optim.safetensors'}: .*found a directory"):
        load_checkpoint(ckpt, fresh, list(build_optimizers(fresh)))
    (ckpt / "optim.safetensors").rmdir()
    with pytest.raises(CheckpointError, match="optim.safetensors is missing \\(needed to resume training\\)"):
        load_checkpoint(ckpt, fresh, list(build_optimizers(fresh)))
    (run / "tokenizer.json").write_text("{}")
    with pytest.raises(CheckpointError, match=f"{run / 'tokenizer.json'}: not a valid tokenizer"):
        load(ckpt)


def test_safetensors_export_errors_name_the_file(tmp_path, tok):
    model = tiny_gpt()
    good = export_safetensors(model, tok, tmp_path / "m.safetensors")
    tensors = load_file(good)
    meta = st_metadata(good)
    cfg = json.loads(meta["nanochat.config"])

    def variant(name: str, t: dict[str, torch.Tensor] = tensors, **m: str) -> Path:
        p = tmp_path / name
        save_file(t, p, {**meta, **m})
        return p

    p = variant("shape.safetensors", **{"nanochat.config": json.dumps({**cfg, "n_embd": 512, "mlp_hidden": 512})})
    with pytest.raises(LoadError, match=f"{p}: tensors do not fit the stored config: .*expected"):
        load(p)
    p = variant("cfg.safetensors", **{"nanochat.config": "{oops"})
    with pytest.raises(LoadError, match=f"{p}: invalid nanochat.config metadata"):
        load(p)
    p = tmp_path / "notok.safetensors"
    save_file(tensors, p, {k: v for k, v in meta.items() if k != "nanochat.tokenizer"})
    with pytest.raises(LoadError, match=f"{p}: the nanochat.tokenizer metadata is missing"):
        load(p)
    p = variant("f16.safetensors", t={k: v.half() if k == "norm.weight" else v for k, v in tensors.items()})
    with pytest.raises(LoadError, match=rf"{p}: tensor\(s\) \['norm.weight'\] are not F32"):
        load(p)
    data = good.read_bytes()
    for name, blob, what in (
        ("trunc.safetensors", data[:-3], "truncated: the header describes"),
        ("trail.safetensors", data + b"xx", "trailing bytes"),
        ("hdr.safetensors", struct.pack("<Q", 2**40) + data[8:], "header of 1099511627776 bytes"),
        ("empty.safetensors", b"", "truncated safetensors file"),
    ):
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(LoadError, match=f"{tmp_path / name}: .*{what}"):
            load(tmp_path / name)
    assert torch.equal(load(good).torch_model().wte.weight, model.wte.weight)


# ----------------------------------------------------------------------------- item 12: checksums, silent fallbacks


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def tensor_data_offset(path: Path) -> int:
    """First byte of a safetensors file's tensor data (after the 8-byte length and the JSON header)."""
    return 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]


def test_a_flipped_byte_in_checkpoint_tensor_data_is_an_error(tmp_path, tok):
    import hashlib

    run, model, _ = run_with_checkpoint(tmp_path, tok, optimizers=True)
    ckpt = run / "checkpoints" / "step_000001"
    manifest = json.loads((ckpt / MANIFEST).read_text())
    for name in ("model.safetensors", "optim.safetensors"):  # the recorded sums are the files' real SHA-256
        assert manifest["sha256"][name] == hashlib.sha256((ckpt / name).read_bytes()).hexdigest()
    ids = tok.encode("def f(x):")
    want = logits(model, ids)
    fresh = tiny_gpt(seed=1)
    opts = list(build_optimizers(fresh))
    good = {n: (ckpt / n).read_bytes() for n in ("model.safetensors", "optim.safetensors")}
    rng = random.Random(0)
    for name in ("model.safetensors", "optim.safetensors"):
        start, size = tensor_data_offset(ckpt / name), len(good[name])
        for offset in [start, size - 1, rng.randrange(start, size), 9]:  # tensor data, and one header byte
            flip_byte(ckpt / name, offset)
            with pytest.raises(CheckpointError, match=f"{ckpt / name}: corrupt"):
                load_checkpoint(ckpt, tiny_gpt(seed=1), list(build_optimizers(fresh)))
            if name == "model.safetensors":
                with pytest.raises(CheckpointError, match=f"{ckpt / name}: corrupt"):
                    load(run)  # inference loading verifies what it reads
            else:  # inference never reads the optimizer state, so its damage does not block it
                torch.testing.assert_close(logits(load(run).torch_model(), ids), want, rtol=0, atol=0)
            (ckpt / name).write_bytes(good[name])
    state, _ = load_checkpoint(ckpt, fresh, opts)  # whole again: loads, and gives the saved model
    torch.testing.assert_close(logits(fresh.eval(), ids), want, rtol=0, atol=0)
    # a checkpoint from before checksums (manifest without sha256) still loads, unverified
    (ckpt / MANIFEST).write_text(json.dumps({k: v for k, v in manifest.items() if k != "sha256"}))
    flip_byte(ckpt / "optim.safetensors", len(good["optim.safetensors"]) - 1)
    load_checkpoint(ckpt, tiny_gpt(seed=1), list(build_optimizers(fresh)))


def test_a_latest_checkpoint_without_state_json_is_a_warned_fallback_naming_it(tmp_path, tok):
    run = tmp_path / "run"
    run.mkdir()
    tok.save(run / "tokenizer.json")
    mgr = CheckpointManager(run, keep_last=5)
    models = {}
    for s in (1, 2, 3):
        models[s] = tiny_gpt(seed=s)
        mgr.save(s, models[s], [], {"model_config": models[s].config.to_dict(), "s": s})
    (mgr.ckpt_dir / "step_000003" / "state.json").unlink()
    ids = tok.encode("x = 1")
    for pointer in (True, False):  # with latest.json naming step 3, and without any pointer (was silent)
        if not pointer:
            (mgr.ckpt_dir / "latest.json").unlink()
        with pytest.warns(RuntimeWarning, match=r"step_000003.* missing or incomplete \(.*state\.json.*falling back"):
            assert mgr.latest().name == "step_000002"
        with pytest.warns(RuntimeWarning, match=r"step_000003.*state\.json.*falling back to the older step_000002"):
            assert find_checkpoint(run).name == "step_000002"
        with pytest.warns(RuntimeWarning, match="step_000003"):
            got = load(run).torch_model()
        torch.testing.assert_close(logits(got, ids), logits(models[2], ids), rtol=0, atol=0)
    # nothing newer is broken: no warning at all
    shutil.rmtree(mgr.ckpt_dir / "step_000003")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert mgr.latest().name == "step_000002"
    # a pointer to a directory that is gone entirely is named too
    write_json_atomic(mgr.ckpt_dir / "latest.json", {"step": 7, "dir": "step_000007"})
    with pytest.warns(RuntimeWarning, match=r"latest\.json names step_000007.*gone.*falling back to the older step_0"):
        assert mgr.latest().name == "step_000002"


# ----------------------------------------------------------------------------- item 12: silent garbage in exports
# Each check is tested on a file whose checksum was recomputed after the edit (seal_gguf), so that the check itself
# refuses it, and where it applies to third-party files, on a copy without the checksum key.


def copy_gguf(
    src: Path,
    dst: Path,
    fields: dict[str, Any] | None = None,
    drop: tuple[str, ...] = (),
    tensors: dict[str, tuple[np.ndarray, Any]] | None = None,
) -> Path:
    """Copy a GGUF file through gguf's writer: some metadata replaced or dropped, some tensors replaced by
    ``(array, raw_dtype)``."""
    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), r.fields["general.architecture"].contents())
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture" or k in drop:
            continue
        val = (fields or {}).get(k, f.contents())
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            w.add_array(k, val)
        else:
            w.add_key_value(k, val, f.types[0])
    for t in r.tensors:
        arr, dtype = (tensors or {}).get(t.name, (np.asarray(t.data), t.tensor_type))
        w.add_tensor(t.name, arr, raw_dtype=dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def written(path: Path, data: bytes | bytearray, seal: bool = True) -> Path:
    """``data`` written to ``path``, with our checksum recomputed over it when ``seal`` (and the file has one)."""
    from nanochat.export.gguf_io import seal_gguf

    path.write_bytes(bytes(data))
    if seal:
        seal_gguf(path)
    return path


def test_our_gguf_tensor_types_are_checked_third_party_float_weights_still_load(tmp_path, tok):
    from test_fuzz_exports import gguf_layout

    from nanochat.export.names import CHECKSUM_KEY

    model = tiny_gpt()
    good = export_gguf(model, tok, tmp_path / "good.gguf")
    data = bytearray(good.read_bytes())
    emb = next(t for t in gguf_layout(bytes(data))["tensors"] if t["name"] == "token_embd.weight")
    struct.pack_into("<I", data, emb["type_off"], gguf.GGMLQuantizationType.BF16)  # same size: the layout holds
    p = written(tmp_path / "bf16.gguf", data)
    with pytest.raises(
        GGUFError, match=f"{p}: tensor 'token_embd.weight' has type BF16, but nanochat writes it as F16"
    ):
        load(p)  # was: loaded, and generated "LockLockLock..."

    # a ternary tensor stored as F32 trits * scale: refused at load() in our file, not only later by the engine
    from nanochat import ops

    sd = model.state_dict()
    trits, scale = ops.absmean_quantize(sd["blocks.0.attn.q_proj.weight"].float())
    q = (trits * scale).numpy().astype(np.float32)
    f32 = {"blk.0.attn_q.weight": (q, gguf.GGMLQuantizationType.F32)}
    p = copy_gguf(good, tmp_path / "f32.gguf", tensors=f32)
    written(p, p.read_bytes())
    with pytest.raises(
        GGUFError, match=r"'blk.0.attn_q.weight' has type F32, but nanochat writes it as TQ2_0 or TQ1_0"
    ):
        load(p)
    # the same tensor in a file without our checksum is a third-party bitnet file: packed exactly, as before
    third = load(copy_gguf(good, tmp_path / "third.gguf", drop=(CHECKSUM_KEY,), tensors=f32))
    ours = load(good)
    for name, (packed, s) in ours.gguf.ternary.items():
        assert np.array_equal(third.gguf.ternary[name][0], packed)
        assert third.gguf.ternary[name][1] == pytest.approx(s, rel=1e-3), name  # f16 block d vs f32 scale


@pytest.mark.parametrize("who", ["ours_resealed", "third_party"])
def test_tq2_0_code_3_and_bad_block_scales_are_refused(tmp_path, tok, who):
    from test_fuzz_exports import gguf_layout

    from nanochat.export.names import CHECKSUM_KEY

    good = export_gguf(tiny_gpt(), tok, tmp_path / "good.gguf")
    if who == "third_party":
        good = copy_gguf(good, tmp_path / "third.gguf", drop=(CHECKSUM_KEY,))
    base = good.read_bytes()
    lay = gguf_layout(base)
    rec = next(t for t in lay["tensors"] if t["name"] == "blk.0.attn_q.weight")
    start, n_blocks = lay["data_start"] + rec["offset"], 256 * 256 // 256  # 256 rows of one block each
    assert struct.unpack_from("<I", base, rec["type_off"])[0] == gguf.GGMLQuantizationType.TQ2_0

    def mutant(name: str, edit: Any) -> Path:
        b = bytearray(base)
        for k in range(n_blocks):
            edit(b, start + 66 * k, k)
        return written(tmp_path / f"{name}.gguf", b, seal=who != "third_party")

    def put_d(b: bytearray, off: int, k: int, block: int | None, value: float) -> None:
        if block is None or k == block:
            b[off + 64 : off + 66] = np.float16(value).tobytes()

    cases = {
        "all_code3": (lambda b, off, k: b.__setitem__(slice(off, off + 64), b"\xff" * 64), "block 0 holds code 3"),
        "one_code3": (lambda b, off, k: b.__setitem__(off + 7, 0x57) if k == 5 else None, "block 5 holds code 3"),
        "all_d_zero": (lambda b, off, k: put_d(b, off, k, None, 0.0), "block 0 has non-zero trits but scale 0"),
        "one_d_zero": (lambda b, off, k: put_d(b, off, k, 9, 0.0), "block 9 has non-zero trits but scale 0"),
        "d_nan": (lambda b, off, k: put_d(b, off, k, 2, float("nan")), "block 2 has scale nan"),
        "d_inf": (lambda b, off, k: put_d(b, off, k, 3, float("inf")), "block 3 has scale inf"),
        "d_negative": (lambda b, off, k: put_d(b, off, k, 0, -0.5), "block 0 has scale -0.5"),
    }
    for name, (edit, msg) in cases.items():
        p = mutant(name, edit)
        with pytest.raises(GGUFError, match=f"{p}: tensor 'blk.0.attn_q.weight' {msg}"):
            load(p)
    # what the converter writes for an all-zero block (codes 1, d = 0) is fine: that row loads as zeros
    zero_row = mutant(
        "zero_block", lambda b, off, k: b.__setitem__(slice(off, off + 66), b"\x55" * 64 + b"\0\0") if k == 4 else None
    )
    w = load(zero_row).torch_model().state_dict()["blocks.0.attn.q_proj.weight"]
    assert (w[4] == 0).all() and (w[5] != 0).any()


def test_tensor_offsets_must_follow_each_other_and_names_be_unique(tmp_path, tok):
    from test_fuzz_exports import gguf_layout

    good = export_gguf(tiny_gpt(), tok, tmp_path / "good.gguf")
    base = good.read_bytes()
    tensors = gguf_layout(base)["tensors"]
    k = next(i for i, t in enumerate(tensors) if t["name"] == "blk.1.attn_q.weight")
    for name, value in (("first", tensors[0]["offset"]), ("previous", tensors[k - 1]["offset"])):
        b = bytearray(base)
        struct.pack_into("<Q", b, tensors[k]["offset_off"], value)  # the data of another tensor, read twice
        p = written(tmp_path / f"{name}.gguf", b, seal=False)  # the checksum does not cover offsets: the check's own
        with pytest.raises(GGUFError, match=rf"{p}: .*tensor 'blk.1.attn_q.weight' has data offset {value}, expected"):
            load(p)
    b = bytearray(base)
    name_at = tensors[k]["len_off"] + 8
    assert b[name_at : name_at + 19] == b"blk.1.attn_q.weight"
    b[name_at + 4] = ord("0")
    with pytest.raises(GGUFError, match="tensor 'blk.0.attn_q.weight' appears twice"):
        load(written(tmp_path / "dup.gguf", b, seal=False))
    b = bytearray(base)
    at = base.index(b"tokenizer.ggml.bos_token_id")
    b[at + len("tokenizer.ggml.")] = ord("e")  # a second eos_token_id: which one is meant? (was: the last, silently)
    with pytest.raises(GGUFError, match="duplicate key 'tokenizer.ggml.eos_token_id'"):
        load(written(tmp_path / "dupkey.gguf", b, seal=False))


def test_merges_and_quant_fp_are_checked(tmp_path, tok):
    from nanochat.export.names import CHECKSUM_KEY

    good = export_gguf(tiny_gpt(), tok, tmp_path / "good.gguf")
    merges = list(gguf.GGUFReader(str(good)).fields["tokenizer.ggml.merges"].contents())
    p = copy_gguf(good, tmp_path / "nomerges.gguf", drop=("tokenizer.ggml.merges", CHECKSUM_KEY))
    with pytest.raises(GGUFError, match=f"{p}: tokenizer.ggml.merges is missing"):
        load(p)
    # fewer merges still form a tokenizer, a different one: in our file the checksum says so
    p = copy_gguf(good, tmp_path / "fewer.gguf", fields={"tokenizer.ggml.merges": merges[:-3]})
    with pytest.raises(GGUFError, match=f"{p}: checksum mismatch"):
        load(p)

    cfg = tiny_gpt().config.replace(residual="mhc_lite", qk_norm=True)
    torch.manual_seed(0)
    mhc = export_gguf(GPT(cfg).eval(), tok, tmp_path / "mhc.gguf")
    assert load(mhc).config.quant == "ternary"
    for seal in (True, False):  # nanochat-architecture files are ours with or without a checksum
        p = copy_gguf(
            mhc, tmp_path / f"fp{seal}.gguf", fields={"nanochat.quant": "fp"}, drop=() if seal else (CHECKSUM_KEY,)
        )
        if seal:
            written(p, p.read_bytes())
        with pytest.raises(GGUFError, match=rf"{p}: .*declares quant = 'fp' .* holds ternary TQ2_0 data"):
            load(p)


def test_a_flipped_byte_in_our_exports_is_a_checksum_error(tmp_path, tok):
    from test_fuzz_exports import gguf_layout

    from nanochat.export.gguf_file import GGUFFile
    from nanochat.export.gguf_io import CHECKSUM_EXCLUDED
    from nanochat.export.names import CHECKSUM_KEY

    model = tiny_gpt()
    good = export_gguf(model, tok, tmp_path / "good.gguf")
    r = GGUFFile(good)
    assert r.fields[CHECKSUM_KEY] == r.content_digest(CHECKSUM_EXCLUDED) != "0" * 32
    base = good.read_bytes()
    lay = gguf_layout(base)
    norm = next(t for t in lay["tensors"] if t["name"] == "blk.1.ffn_norm.weight")
    key = next(k for k in lay["kvs"] if k["key"] == "bitnet.rope.freq_base")
    for name, off in (
        ("tensor", lay["data_start"] + norm["offset"] + 17),  # a float nothing else checks
        ("metadata", key["type_off"] + 4 + 1),  # rope theta's float32
        ("checksum", base.index(r.fields[CHECKSUM_KEY].encode()) + 5),
    ):
        b = bytearray(base)
        b[off] ^= 0x10
        p = written(tmp_path / f"{name}.gguf", b, seal=False)
        with pytest.raises(GGUFError, match=f"{p}: checksum mismatch .* corrupt or was modified after export"):
            load(p)
    # the checksum is over content, not layout: a copy with another alignment still verifies
    assert load(copy_gguf(good, tmp_path / "copy.gguf")).config == model.config
    assert load(rewrite_gguf(good, tmp_path / "a64.gguf", alignment=64)).config == model.config

    st = export_safetensors(model, tok, tmp_path / "m.safetensors")
    assert len(st_metadata(st)[CHECKSUM_KEY]) == 32  # XXH3-128, hex
    data = st.read_bytes()
    start = tensor_data_offset(st)
    flipped = bytearray(data)
    flipped[start + 101] ^= 1  # in the first tensor's bytes
    at = data.index(b'norm_eps\\": ', 0, start) + len(b'norm_eps\\": ')  # inside the stored config (a JSON string)
    assert data[at : at + 1] == b"1"
    eps = bytearray(data)
    eps[at] = ord("2")
    for name, b in (("data", flipped), ("config", eps)):
        p = tmp_path / f"st_{name}.safetensors"
        p.write_bytes(bytes(b))
        with pytest.raises(LoadError, match=f"{p}: checksum mismatch"):
            load(p)
    # an export written before the checksum (no key) loads unverified, as pre-checksum checkpoints do
    assert load(rewrite_st_metadata(st, tmp_path / "old.safetensors", drop=CHECKSUM_KEY)).config == model.config


def rewrite_st_metadata(src: Path, dst: Path, drop: str) -> Path:
    """A copy of a safetensors file without metadata key ``drop`` (header re-serialised, data unchanged)."""
    data = src.read_bytes()
    (n,) = struct.unpack_from("<Q", data)
    header = json.loads(data[8 : 8 + n])
    del header["__metadata__"][drop]
    raw = json.dumps(header).encode()
    dst.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
    return dst

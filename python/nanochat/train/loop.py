"""The training loop: data → model → Muon + Lion under a WSD schedule → logs and checkpoints.

Notable choices:
- One code path for 1 process and ``torchrun`` (DDP: gloo on CPU, nccl on CUDA). Only rank 0 logs,
  evaluates and saves; the loader shards windows by rank; gradients are averaged by DDP, so every
  rank takes the same optimizer step and the replicas stay bit-identical (checked at the end).
- Exact resume: a checkpoint holds model, optimizer state, step, loader position and RNG states, and
  the schedule is a pure function of the step, so N steps straight and N/2 + resume + N/2 give the
  same losses on CPU. ``stop_after`` interrupts a run while keeping the schedule of ``steps``.
- Ctrl-C / SIGTERM set a flag; the loop finishes the current step, saves, and returns cleanly.
- The loss is computed here from the logits (cross-entropy, plus an optional KL term against a frozen
  teacher), so distillation and plain training share one path.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from nanochat import ops
from nanochat.data import TokenLoader, bits_per_byte, bpb_sums, prepare_data
from nanochat.data.fim import chunk_chars_for
from nanochat.hardware import choose_dtype
from nanochat.model import GPT, GPTConfig, load_config
from nanochat.model.bitlinear import get_matmul_dtype, set_matmul_dtype
from nanochat.optim import build_optimizers, wsd
from nanochat.train.checkpoint import (
    CheckpointManager,
    checkpoint_model_config,
    disk_can_hold_one_checkpoint,
    find_checkpoint,
    load_checkpoint,
    safe_write,
    state_bytes,
    write_json_atomic,
)
from nanochat.train.config import TrainConfig
from nanochat.train.metrics import MetricsLog, Throughput, console, make_progress, plot_losses

# ----------------------------------------------------------------------------- runtime setup


@dataclass
class Runtime:
    device: torch.device
    autocast_dtype: torch.dtype | None
    dtype_reason: str
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def ddp(self) -> bool:
        return self.world_size > 1


def setup_runtime(cfg: TrainConfig) -> Runtime:
    rank, world, local = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    if cfg.device == "auto":
        device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda requested but no CUDA device is available")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {cfg.device}: only {torch.cuda.device_count()} CUDA device(s) here")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError("--device mps requested but MPS is not available")
        if device.type == "cuda" and world > 1:
            device = torch.device(f"cuda:{local}")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype, why = choose_dtype(device, cfg.dtype)
    autocast = torch.bfloat16 if dtype == torch.bfloat16 else None
    set_matmul_dtype(dtype)  # BitLinear's QAT matmuls: bf16 integer operands on AMX, or the fp32 reference
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    ops.set_num_threads(torch.get_num_threads())  # one thread budget for torch and Rust
    if device.type == "cpu":
        keep_freed_memory()
    return Runtime(device, autocast, why, rank, world, local)


def keep_freed_memory() -> None:
    """Ask glibc to keep freed memory for reuse instead of returning it to the OS after every step.

    A training step allocates and frees the same large activations every time. With glibc's defaults each one above
    the mmap threshold is a fresh ``mmap`` whose pages fault in on first touch: measured here, a d20 step took
    ~300k minor page faults (1.2 GB of first touches) and its elementwise ops ran 4-6x slower than on warm memory.
    ``M_MMAP_MAX = 0`` serves every allocation from the heap and a huge ``M_TRIM_THRESHOLD`` keeps the heap's pages,
    so after the first step a step faults in nothing (measured: 0). The cost is that the process keeps its peak
    memory until it exits, which is what a training process does anyway. A no-op where glibc is not the allocator.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_mmap_max = -1, -4
        libc.mallopt(m_mmap_max, 0)
        libc.mallopt(m_trim_threshold, 2**31 - 1)  # an int: keep up to 2 GiB of free heap
    except (OSError, AttributeError):
        pass


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(legacy=True),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def rng_to_checkpoint(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Split RNG state into JSON-able parts and tensors."""
    py = state["python"]
    npst = state["numpy"]
    js = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [npst[0], npst[1].tolist(), int(npst[2]), int(npst[3]), float(npst[4])],
    }
    tensors = {"rng.torch": state["torch"]}
    for i, t in enumerate(state["cuda"]):
        tensors[f"rng.cuda{i}"] = t
    return js, tensors


def restore_rng(js: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    py = js["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = js["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


# ----------------------------------------------------------------------------- model helpers


def build_model(cfg: TrainConfig, vocab_size: int) -> tuple[GPT, GPTConfig, dict[str, Any]]:
    model_cfg, train_defaults = load_config(cfg.config)
    model_cfg = model_cfg.replace(vocab_size=vocab_size, **cfg.model_overrides)
    return GPT(model_cfg), model_cfg, train_defaults


def load_teacher(path: str, device: torch.device) -> GPT:
    ckpt = find_checkpoint(Path(path))
    teacher = GPT(checkpoint_model_config(ckpt))
    load_checkpoint(ckpt, teacher)
    teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def compute_loss(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, teacher: GPT | None, cfg: TrainConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """(total loss to backprop, plain cross-entropy for logging).

    Without a teacher the model computes the loss in its own forward (``model(x, y)``), so that under
    ``torch.compile`` the head's float cast, log-softmax and NLL (and their backward) fuse into the compiled graph
    instead of writing and re-reading a (B, T, V) float32 logits tensor outside it."""
    if teacher is None:
        ce = model(x, y)
        return ce, ce.detach()
    logits = model(x)  # (B, T, V)
    ce = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1), ignore_index=-1)
    with torch.no_grad():
        t_logits = teacher(x).float()
    tau = cfg.distill_temp
    kl = (
        F.kl_div(
            F.log_softmax(logits.float() / tau, dim=-1),
            F.log_softmax(t_logits / tau, dim=-1),
            log_target=True,
            reduction="batchmean",
        )
        * (tau * tau)
        / x.size(1)
    )
    return (1 - cfg.distill_weight) * ce + cfg.distill_weight * kl, ce.detach()


@torch.no_grad()
def evaluate(model: GPT, loader: TokenLoader, token_bytes: torch.Tensor, rt: Runtime, max_batches: int) -> dict:
    """Validation loss (nats/token over all targets) and bits per byte (the one definition, ``data.bpb``: targets
    that decode to no byte, the special tokens, are left out) over the first ``max_batches`` val batches."""
    was_training = model.training
    model.train()  # the same fake-quant math as training, so val loss is comparable to train loss
    nats, tokens, bpb_nats, nbytes = 0.0, 0, 0.0, 0
    for x, y in loader.iter_eval(max_batches):
        x, y = x.to(rt.device), y.to(rt.device)
        with _autocast(rt):
            logits = model(x)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1), reduction="none")
        nats += loss.sum().item()
        tokens += y.numel()
        s, b = bpb_sums(loss.cpu(), y.view(-1).cpu(), token_bytes)
        bpb_nats, nbytes = bpb_nats + s, nbytes + b
    model.train(was_training)
    return {
        "val_loss": nats / max(tokens, 1),
        "val_bpb": bits_per_byte(bpb_nats, nbytes),
        "val_tokens": tokens,
        "val_bytes": nbytes,
    }


def _autocast(rt: Runtime):
    if rt.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(rt.device.type, dtype=rt.autocast_dtype)


# ----------------------------------------------------------------------------- the loop


class StopFlag:
    """Set by SIGINT/SIGTERM; the loop checks it between steps."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        for s in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None:  # second Ctrl-C: give up at once
            raise KeyboardInterrupt
        self.signal = signum
        console.print(f"[yellow]signal {signal.Signals(signum).name}: finishing this step, saving, exiting")

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def default_run_dir(cfg: TrainConfig) -> Path:
    name = Path(cfg.config).stem
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) training; returns the summary dict (also written to summary.json). The process-wide
    BitLinear matmul dtype the run chose is restored afterwards, so a caller's later forwards are unaffected."""
    prev = get_matmul_dtype()
    try:
        return _train(cfg)
    finally:
        set_matmul_dtype(prev)


def _train(cfg: TrainConfig) -> dict[str, Any]:
    resume_dir = Path(cfg.resume) if cfg.resume else None
    rt = setup_runtime(cfg)
    if cfg.numa_node is not None:
        from nanochat.train.numa import pin_to_node

        _, msg = pin_to_node(cfg.numa_node)
        if rt.is_main:
            console.print(msg)
    run_dir = resume_dir or (Path(cfg.out) if cfg.out else default_run_dir(cfg))
    seed_everything(cfg.seed + rt.rank)

    # --- data (rank 0 builds the tokenizer and shards; the others wait and reuse them)
    data_dir = (
        Path(cfg.data_dir)
        if cfg.data_dir
        else Path(os.environ.get("NANOCHAT_CACHE", Path.home() / ".cache/nanochat")) / "data"
    )

    def data() -> tuple[Any, Any]:
        return prepare_data(
            data_dir,
            cfg.vocab_size,
            data_path=cfg.data,
            synthetic_ratio=cfg.synthetic_ratio,
            val_fraction=cfg.val_fraction,
            seed=0,
            fim_rate=cfg.fim_rate,
            fim_spm_rate=cfg.fim_spm_rate,
            fim_line_rate=cfg.fim_line_rate,
            fim_chunk_chars=chunk_chars_for(cfg.seq_len),
        )

    if rt.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        tok, index = data()
    if rt.ddp:
        dist.barrier()
    if not rt.is_main:
        tok, index = data()
    if rt.is_main:
        tok.save(run_dir / "tokenizer.json")
        seen = Path(index.root) / "data.json"  # sources, files, bytes, dropped, tokens and the corpus fingerprint
        if seen.exists():
            shutil.copyfile(seen, run_dir / "data.json")
    token_bytes = torch.as_tensor(tok.token_bytes(), dtype=torch.long)
    train_loader = TokenLoader(
        index, "train", cfg.batch_size, cfg.seq_len, rank=rt.rank, world_size=rt.world_size, seed=cfg.seed
    )
    val_loader = TokenLoader(index, "val", cfg.batch_size, cfg.seq_len, rank=0, world_size=1, seed=cfg.seed)

    # --- model and optimizers
    torch.manual_seed(cfg.seed)  # identical init on every rank
    model, model_cfg, _ = build_model(cfg, tok.vocab_size)
    if resume_dir is not None and (resume_dir / "config.json").exists():
        # resume builds the model the run was trained with, not what the TOML says today
        saved_cfg = GPTConfig.from_dict(json.loads((resume_dir / "config.json").read_text())["model"])
        if saved_cfg != model_cfg:
            changed = sorted(k for k, v in saved_cfg.to_dict().items() if model_cfg.to_dict().get(k) != v)
            if rt.is_main:
                console.print(
                    f"[yellow]note[/]: {cfg.config} now differs from the run in {changed}; resuming the run's model"
                )
            model, model_cfg = GPT(saved_cfg), saved_cfg
    model.to(rt.device)
    opt = build_optimizers(
        model,
        muon_lr=cfg.lr_muon,
        lion_lr=cfg.lr_lion,
        weight_decay=cfg.weight_decay,
        hidden=cfg.optimizer,
        adamw_lr=cfg.lr_adamw,
    )
    optimizers = list(opt)
    teacher = load_teacher(cfg.teacher, rt.device) if cfg.teacher else None
    if teacher is not None and teacher.config.vocab_size != model_cfg.vocab_size:
        raise ValueError(f"teacher vocab {teacher.config.vocab_size} differs from the student's {model_cfg.vocab_size}")

    start_step, best_val = 0, math.inf
    ckpts = CheckpointManager(run_dir, keep_last=cfg.keep_last)
    if rt.is_main:
        ckpts.clean_leftovers()  # temp and trash files of killed runs
        disk_can_hold_one_checkpoint(run_dir, state_bytes(model))  # warns now, not after hours of training
    if resume_dir is not None:
        ckpt = ckpts.latest()
        if ckpt is None:
            raise FileNotFoundError(f"--resume {resume_dir}: no checkpoint in {ckpts.ckpt_dir}")
        state, extra = load_checkpoint(ckpt, model, optimizers)
        start_step = state["step"]
        if start_step >= cfg.steps:
            raise ValueError(
                f"--resume {resume_dir}: the checkpoint is at step {start_step}, and --steps {cfg.steps} leaves "
                f"nothing to train; pass --steps larger than {start_step} (the schedule then stretches to it)"
            )
        train_loader.load_state_dict(
            state["loader"][str(rt.rank)] if str(rt.rank) in state["loader"] else state["loader"]["0"]
        )
        restore_rng(state["rng"], extra)
        best_val = math.inf if state.get("best_val") is None else float(state["best_val"])
        if rt.is_main:
            console.print(f"resumed from {ckpt} at step {start_step}")
    counts = model.param_counts()
    if rt.is_main:
        write_json_atomic(
            run_dir / "config.json", {"train": cfg.to_dict(), "model": model_cfg.to_dict(), "params": counts}
        )
        kernel, why = ops.default_kernel()
        console.print(
            f"[bold]nanochat-train[/] {cfg.config}: {counts['total'] / 1e6:.2f}M params "
            f"({counts['non_embedding'] / 1e6:.2f}M non-embedding), residual={model_cfg.residual}, "
            f"quant={model_cfg.quant}, device={rt.device}, dtype={rt.autocast_dtype or torch.float32} "
            f"({rt.dtype_reason}), "
            f"world={rt.world_size}, threads={torch.get_num_threads()}, kernel={kernel} ({why})\n  run dir: {run_dir}"
        )

    train_model: torch.nn.Module = model
    if cfg.compile:
        for _, res in model.residuals():  # build the constant permutation bases now, outside the traced graph
            if res.kind == "mhc_lite":
                res.basis(torch.empty(0, device=rt.device))
        train_model = cast(torch.nn.Module, torch.compile(train_model))
    if rt.ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(train_model, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None)

    log = MetricsLog(run_dir / "metrics.jsonl", resume_step=start_step) if rt.is_main else None
    # wall time already spent by earlier segments of this run, so `time` (and elapsed_s) cover the whole run
    time_before = log.last_time() if log is not None and resume_dir is not None else 0.0
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * rt.world_size
    end_step = min(cfg.steps, cfg.stop_after) if cfg.stop_after is not None else cfg.steps
    warmup = min(cfg.warmup_steps, max(cfg.steps - 1, 0))

    def save(step: int, val_loss: float | None) -> None:
        loader_states = {str(rt.rank): train_loader.state_dict()}
        if rt.ddp:
            gathered: list[Any] = [None] * rt.world_size
            dist.all_gather_object(gathered, train_loader.state_dict())
            loader_states = {str(i): s for i, s in enumerate(gathered)}
        if not rt.is_main:
            return
        rng_js, rng_t = rng_to_checkpoint(rng_state())
        state = {
            "loader": loader_states,
            "rng": rng_js,
            "best_val": best_val,
            "model_config": model_cfg.to_dict(),
            "train_config": cfg.to_dict(),
            "tokens_seen": step * tokens_per_step,
        }
        ckpts.save(step, model, optimizers, state, extra_tensors=rng_t, val_loss=val_loss)

    model.train()
    step = start_step
    last_loss = math.nan
    t_start = time.perf_counter() - time_before
    meter = Throughput()
    val: dict[str, Any] = {}
    budget_pending = bool(cfg.time_budget) and resume_dir is None
    replan_at: int | None = None  # the step at which the budget is planned again (then None: done)
    planned_from = (0, 0.0)  # (step, time) of the first plan
    budget_plans: list[dict[str, float]] = []  # each plan's step, total and pace, for the summary
    step_ends: list[float] = []
    with StopFlag() as stop, make_progress(rt.is_main) as progress:
        task = progress.add_task("train", total=cfg.steps, completed=start_step, loss="-", lr="-", tok_s="-")
        if rt.is_main and start_step == 0:
            progress.console.print(
                "first step: torch.compile compiles the model (~40 s the first time, seconds from its cache) ..."
                if cfg.compile
                else "first step (allocations, kernel selection) ..."
            )
        while step < end_step:
            mult = wsd(step, cfg.steps, warmup, cfg.decay_frac)
            opt.set_lr_multiplier(mult)
            loss_acc = torch.zeros((), device=rt.device)
            for micro in range(cfg.grad_accum):
                x, y = train_loader.next_batch()
                x, y = x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True)
                sync = contextlib.nullcontext()
                if rt.ddp and micro < cfg.grad_accum - 1:
                    sync = cast(Any, train_model).no_sync()
                with sync, _autocast(rt):
                    loss, ce = compute_loss(train_model, x, y, teacher, cfg)
                    (loss / cfg.grad_accum).backward()
                loss_acc += ce / cfg.grad_accum
            if rt.ddp:
                dist.all_reduce(loss_acc, op=dist.ReduceOp.AVG)
            grad_norm = torch.nn.utils.clip_grad_norm_(
                model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf
            )
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            last_loss = loss_acc.item()
            tok_s = meter.tick(tokens_per_step)
            step_ends.append(time.perf_counter())
            if (budget_pending and len(step_ends) == BUDGET_CALIBRATION_STEPS) or step == replan_at:
                assert cfg.time_budget is not None  # set only with a budget
                first = budget_pending
                if first:  # from the pace of steps 2..6, so that the schedule has its length early
                    pace = (step_ends[-1] - step_ends[1]) / max(len(step_ends) - 2, 1)
                    planned_from = (step, step_ends[-1])
                else:  # from the pace since then: warmed caches, periodic evaluations and saves included
                    pace = (step_ends[-1] - planned_from[1]) / (step - planned_from[0])
                budget_pending = False
                total = budget_steps(cfg.time_budget, step, time.perf_counter() - t_start, pace)
                # the WSD decay must still lie ahead: never end so soon that it should have started already
                total = max(total, math.ceil(step / max(1.0 - cfg.decay_frac, 1e-9)) + 1)
                if rt.ddp:  # every rank must take the same number of steps (and plan again at the same step)
                    t = torch.tensor([total], device=rt.device)
                    dist.broadcast(t, src=0)
                    total = int(t.item())
                replan_at = max(step + 1, int(BUDGET_REPLAN_FRACTION * total)) if first else None
                budget_plans.append({"at_step": step, "steps": total, "s_per_step": round(pace, 5)})
                cfg.steps = total
                end_step = min(cfg.steps, cfg.stop_after) if cfg.stop_after is not None else cfg.steps
                warmup = min(cfg.warmup_steps, max(cfg.steps - 1, 0))
                if rt.is_main:
                    progress.update(task, total=cfg.steps)
                    progress.console.print(
                        f"time budget {cfg.time_budget:.0f} s: {cfg.steps} steps at the measured pace "
                        f"({pace:.3f} s/step{', planned again at step ' + str(replan_at) if first else ''})"
                    )
                    # the fixed step count is the run's setting from now on (resume and the schedule use it)
                    write_json_atomic(
                        run_dir / "config.json",
                        {"train": cfg.to_dict(), "model": model_cfg.to_dict(), "params": counts},
                    )
            if not math.isfinite(last_loss):
                raise FloatingPointError(
                    f"loss is {last_loss} at step {step}; lower the learning rate or check the data"
                )
            if rt.is_main:
                lr_now = optimizers[0].param_groups[0]["lr"]
                rec = {
                    "step": step,
                    "loss": last_loss,
                    "lr": lr_now,
                    "grad_norm": float(grad_norm),
                    "tok_s": tok_s,
                    "lr_mult": mult,
                    "time": time.perf_counter() - t_start,
                }
                if model_cfg.residual != "standard" and cfg.mhc_diag_every and step % cfg.mhc_diag_every == 0:
                    rec.update(
                        {f"mhc_{k}": v for k, v in model.mhc_diagnostics().items() if isinstance(v, (int, float))}
                    )
                if log is not None:
                    log.write(rec)
                progress.update(
                    task, completed=step, loss=f"{last_loss:.4f}", lr=f"{lr_now:.2e}", tok_s=f"{tok_s:,.0f}"
                )
                if cfg.log_every and (step % cfg.log_every == 0 or step == 1):
                    progress.console.print(
                        f"step {step:5d}/{cfg.steps} | loss {last_loss:.4f} | lr×{mult:.3f} | "
                        f"grad {float(grad_norm):.3f} | {tok_s:,.0f} tok/s"
                    )
            is_last = step == end_step
            val_loss = None
            if rt.is_main and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps):
                val = evaluate(model, val_loader, token_bytes, rt, cfg.eval_batches)
                val_loss = val["val_loss"]  # the same batches every time: the curve and "best" compare like with like
                best_val = min(best_val, val_loss)
                rec = {"step": step, **val}
                if step == cfg.steps and cfg.final_eval_batches > cfg.eval_batches:
                    # the run's reported held-out numbers come from a larger, steadier set, logged beside the curve
                    val = evaluate(model, val_loader, token_bytes, rt, cfg.final_eval_batches)
                    rec.update({f"final_{k}": v for k, v in val.items()})
                if log is not None:
                    log.write(rec)
                progress.console.print(
                    f"step {step:5d} | val loss {val['val_loss']:.4f} | val bpb {val['val_bpb']:.4f} "
                    f"({val['val_tokens']:,} held-out tokens)"
                )
            stop_now = stop.signal is not None
            if rt.ddp:
                flag = torch.tensor([1 if stop_now else 0], device=rt.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                stop_now = bool(flag.item())
            if (cfg.save_every and step % cfg.save_every == 0) or is_last or stop_now:
                save(step, val_loss)
            if stop_now:
                break

    summary: dict[str, Any] = {}
    in_sync = check_replicas_in_sync(model, rt)
    if log is not None:
        log.close()
        finished = step >= cfg.steps
        evals = final_evaluations(model, tok, run_dir, cfg, rt) if finished and not stop.signal else {}
        records = MetricsLog.read(run_dir / "metrics.jsonl")
        train_recs = [r for r in records if "loss" in r]
        elapsed = sum(1 for _ in train_recs) and train_recs[-1].get("time", 0.0)
        summary = {
            "config": cfg.config,
            "run_dir": str(run_dir),
            "steps": step,
            "planned_steps": cfg.steps,
            "budget_plans": budget_plans,
            "finished": finished,
            "stopped_by": signal.Signals(stop.signal).name if stop.signal else None,
            "params": counts,
            "model_config": model_cfg.to_dict(),
            "dtype": str(rt.autocast_dtype or torch.float32).replace("torch.", ""),
            "dtype_reason": rt.dtype_reason,
            "first_loss": train_recs[0]["loss"] if train_recs else None,
            "final_loss": last_loss if math.isfinite(last_loss) else None,
            "final_val_loss": val.get("val_loss"),
            "final_val_bpb": val.get("val_bpb"),
            "val_tokens": val.get("val_tokens"),
            "best_val_loss": None if math.isinf(best_val) else best_val,
            "tokens": step * tokens_per_step,
            "mean_tok_s": (float(np.mean([r["tok_s"] for r in train_recs[1:]])) if len(train_recs) > 1 else None),
            "world_size": rt.world_size,
            "replicas_in_sync": in_sync,
            "elapsed_s": elapsed,
            **evals,
        }
        summary["checkpoint"] = ckpts.outcome()
        safe_write(lambda: write_json_atomic(run_dir / "summary.json", summary), "summary.json")
        title = f"{Path(cfg.config).stem} ({model_cfg.quant}, {model_cfg.residual})"
        safe_write(lambda: plot_losses(records, run_dir / "loss.png", title), "loss.png")
        print_outcome(summary, run_dir)
    if rt.ddp:
        dist.barrier()
    return summary


BUDGET_CALIBRATION_STEPS = 6  # steps timed before a --time-budget run first fixes its step count
BUDGET_REPLAN_FRACTION = 0.25  # ... and the fraction of that count after which it fixes it again, for good


def budget_steps(budget_s: float, step: int, elapsed: float, pace: float) -> int:
    """Total steps that fit ``budget_s`` seconds of training, ``elapsed`` of them spent on ``step`` steps, at
    ``pace`` seconds per step from here on.

    Planned twice: after :data:`BUDGET_CALIBRATION_STEPS` steps from the pace of steps 2..6 (the first pays for
    compilation), then at :data:`BUDGET_REPLAN_FRACTION` of that plan from the pace since the first plan, which
    includes the periodic evaluations and saves and no longer the first steps' warm-up (d20's first plan was 7%
    slow: its run ended 70 s early). The WSD schedule's warmup does not depend on the total and its decay starts
    after both plans, so the steps already taken keep their learning rates."""
    return max(step + 1, step + int(max(budget_s - elapsed, 0.0) / max(pace, 1e-6)))


def final_evaluations(model: GPT, tok: Any, run_dir: Path, cfg: TrainConfig, rt: Runtime) -> dict[str, Any]:
    """End-of-run metrics that move at small scale (issue: HumanEval pass@1 stays 0 below ~50M parameters):
    bits-per-byte of HumanEval's canonical solutions given their prompts, and single-line completion of those
    solutions run against the problems' tests (greedy, left to right; and with FIM when the run trained it).
    Results land in the run directory (``lines.json``, ``lines_fim.json``) where ``nanochat-eval report`` looks."""
    if not cfg.final_eval:
        return {}
    from nanochat.eval.lines import evaluate_lines, humaneval_bpb

    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    console.print("final evaluation: HumanEval bits-per-byte ...")
    hb = humaneval_bpb(model, tok)
    out["humaneval_bpb"] = hb["bpb"]
    limit = cfg.eval_lines_problems
    max_new = max(1, min(64, model.config.seq_len // 2))  # nanochat-eval lines uses 64
    if limit > 0:
        res = evaluate_lines(model, tok, limit=limit, max_new_tokens=max_new, out=run_dir / "lines.json")
        out.update(lines_pass_rate=res["pass_rate"], lines_passed=res["passed"], lines_tasks=res["tasks"])
        out["lines_passed_per_kind"] = {kind: e["passed"] for kind, e in res["per_kind"].items()}
        if cfg.fim_rate > 0 and tok.fim_ids() is not None:
            res = evaluate_lines(
                model, tok, fim=True, limit=limit, max_new_tokens=max_new, out=run_dir / "lines_fim.json"
            )
            out.update(lines_fim_pass_rate=res["pass_rate"], lines_fim_passed=res["passed"])
    out["final_eval_s"] = time.perf_counter() - t0
    return out


def print_outcome(summary: dict[str, Any], run_dir: Path) -> None:
    """The last lines a user reads: what happened, the metrics, and the next commands with this run's path."""
    step, planned = summary["steps"], summary["planned_steps"]
    if not summary["finished"]:
        why = f" ({summary['stopped_by']})" if summary.get("stopped_by") else ""
        console.print(f"[yellow]stopped at step {step} of {planned}{why}[/]; {summary['checkpoint']}", soft_wrap=True)
        console.print(f"resume with: nanochat-train --resume {run_dir}", soft_wrap=True)
        return
    loss = summary.get("final_loss")
    parts = [f"{step} steps", f"{summary['tokens']:,} tokens", f"{summary['elapsed_s'] / 60:.1f} min"]
    if loss is not None:
        parts.append(f"final loss {loss:.4f}")
    for key, label, fmt in (
        ("final_val_bpb", "val bpb", "{:.4f}"),
        ("humaneval_bpb", "HumanEval bpb", "{:.4f}"),
        ("lines_pass_rate", "line completion", "{:.1%}"),
        ("lines_fim_pass_rate", "line completion (FIM)", "{:.1%}"),
    ):
        if summary.get(key) is not None:
            parts.append(f"{label} {fmt.format(summary[key])}")
    console.print("[green]done[/]: " + ", ".join(parts))
    console.print(
        f"summary.json, metrics.jsonl and loss.png in {run_dir}; {summary['checkpoint']}\nnext:", soft_wrap=True
    )
    console.print(
        f"  nanochat-export {run_dir} --format gguf --out {run_dir}/model.gguf   # for llama.cpp / the server"
    )
    console.print(f'  nanochat-sample --model {run_dir} --prompt "def fibonacci(n):"', soft_wrap=True)
    console.print(f"  python -m nanochat.serve --model {run_dir}   # API + chat page", soft_wrap=True)


def check_replicas_in_sync(model: torch.nn.Module, rt: Runtime) -> bool:
    """True when every rank holds bit-identical parameters (always true for one process).

    Each rank hashes its parameters' raw bytes (names, dtypes and shapes too) with SHA-256 and the 32-byte digests
    are all-gathered: any differing bit anywhere shows, where a sum/sum-of-squares checksum misses swapped or
    compensating values. Costs one pass over the weights and 32 bytes per rank on the wire."""
    if not rt.ddp:
        return True
    import hashlib

    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            t = p.detach().contiguous().cpu()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    digest = torch.tensor(list(h.digest()), dtype=torch.uint8, device=rt.device)
    gathered = [torch.zeros_like(digest) for _ in range(rt.world_size)]
    dist.all_gather(gathered, digest)
    return all(torch.equal(g, gathered[0]) for g in gathered)

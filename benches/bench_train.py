"""Training-step throughput: today's fp32 default vs the new default (bf16 on the CPU's matrix unit), in one run.

    python benches/bench_train.py [--configs tiny_cpu,d20] [--steps 5] [--rounds 2] [--threads N] [--json PATH]
    python benches/bench_train.py --device cuda --configs d20,nano_125m   # tokens/s and MFU on a GPU
                                  [--extra]   # also the plain-torch dense baseline and torch.compile

Variants, each in a fresh subprocess (so the allocator settings and thread pools of one never leak into the next),
interleaved A B A B over ``--rounds`` (the median is reported), all on the config's batch and sequence length with
the real training step (forward, cross-entropy, backward, clipping, Muon + Lion):
- ``qat_fp32``: ternary QAT as trained before this change (fp32 fake-quant matmuls, fp32 Newton–Schulz, glibc's
  default allocator thresholds): "today's fp32 default"
- ``qat``: the new default: the dtype ``nanochat.hardware.choose_dtype`` picks here (bf16 where the CPU has
  AMX-BF16/AVX512-BF16) with BitLinear's exact-operand bf16 matmuls, bf16 batched Newton–Schulz, freed pages kept
  (no page faults per step), the loss computed inside the model's forward (so it compiles with it, as the trainer
  does), and ``torch.compile`` (its compilation falls in the untimed warm-up steps; its cost,
  ~40 s cold and ~8 s from the on-disk cache for d20, is reported by the trainer, not here)
- ``qat_eager``: the same without ``torch.compile``, to separate the two gains
- ``fp_fp32`` / ``fp``: the full-precision twin (``quant="fp"``) under the old and the new settings
- with ``--extra``: ``plain`` (a minimal dense torch GPT of the same shape, fp32)

Achieved FLOP/s counts ``GPT.flops_per_token`` (6 per matmul weight plus ``12·L·C·T`` for attention) per token;
``% peak`` is against the machine's best matrix unit (``nanochat.hardware.cpu_matrix_unit``: FLOP/cycle/core ×
clock × threads; AMX-BF16 here). ``--json PATH`` writes records with keys ``config, variant, dtype, step_s,
tok_s, tflops, pct_peak, peak_tflops, unit, speedup_vs_qat_fp32, qat_over_fp, batch, seq, threads, load_avg``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

from nanochat.model import GPT, GPTConfig, load_config
from nanochat.optim import build_optimizers


class PlainBlock(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        C, H = cfg.n_embd, cfg.mlp_hidden
        self.n_head, self.n_kv = cfg.n_head, cfg.n_kv_head
        self.hd = C // cfg.n_head
        self.q = nn.Linear(C, C, bias=False)
        self.k = nn.Linear(C, self.n_kv * self.hd, bias=False)
        self.v = nn.Linear(C, self.n_kv * self.hd, bias=False)
        self.o = nn.Linear(C, C, bias=False)
        self.gate = nn.Linear(C, H, bias=False)
        self.up = nn.Linear(C, H, bias=False)
        self.down = nn.Linear(H, C, bias=False)
        self.n1 = nn.RMSNorm(C)
        self.n2 = nn.RMSNorm(C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        h = self.n1(x)
        q = self.q(h).view(B, T, self.n_head, self.hd).transpose(1, 2)
        k = self.k(h).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        v = self.v(h).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv != self.n_head)
        x = x + self.o(y.transpose(1, 2).reshape(B, T, C))
        h = self.n2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class PlainGPT(nn.Module):
    """A minimal GPT (no RoPE, no sub-norms, standard residual) of the same shape: the dense baseline."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(PlainBlock(cfg) for _ in range(cfg.n_layer))
        self.norm = nn.RMSNorm(cfg.n_embd)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx)
        for b in self.blocks:
            x = b(x)
        return F.linear(self.norm(x), self.wte.weight)


VARIANTS = {
    # name: (quant, new dtype/allocator settings, torch.compile)
    "qat_fp32": ("ternary", False, False),
    "qat_eager": ("ternary", True, False),
    "qat": ("ternary", True, True),
    "fp_fp32": ("fp", False, False),
    "fp": ("fp", True, True),
}


def worker(spec: dict) -> dict:
    """One variant's timed steps in this (fresh) process; returns its record."""
    from nanochat.hardware import choose_dtype
    from nanochat.model.bitlinear import set_matmul_dtype
    from nanochat.train.loop import keep_freed_memory

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    cfg, tr = load_config(spec["config"])
    variant = spec["variant"]
    quant, new, compile_ = ("fp", False, False) if variant == "plain" else VARIANTS[variant]
    device = torch.device(spec.get("device", "cpu"))
    dtype = choose_dtype(device)[0] if new else torch.float32
    set_matmul_dtype(dtype)
    if new:
        keep_freed_memory()
    torch.manual_seed(0)
    model: nn.Module = PlainGPT(cfg) if variant == "plain" else GPT(cfg.replace(quant=quant))
    model.to(device)
    flops_tok = GPT.flops_per_token(model, spec["seq"]) if isinstance(model, GPT) else None
    opt = build_optimizers(model, ns_dtype=dtype if new else torch.float32)
    if compile_:
        model = torch.compile(model)
    model.train()
    g = torch.Generator().manual_seed(0)
    batch, seq = spec["batch"], spec["seq"]
    x = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g).to(device)
    y = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g).to(device)
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == torch.bfloat16 else contextlib.nullcontext()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for i in range(spec["warmup"] + spec["steps"]):
        t0 = time.perf_counter()
        if new and variant != "plain":  # the trainer's step: the loss inside the (compiled) forward
            with ctx:
                loss = model(x, y)
        else:  # the old step: float32 logits out of the model, the loss outside it
            with ctx:
                logits = model(x)
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - t0)
    if flops_tok is None:  # the plain baseline: the same matmul shapes as the fp twin
        flops_tok = GPT(cfg.replace(quant="fp")).flops_per_token(seq)
    return {
        "step_s": statistics.median(times),
        "dtype": str(dtype).replace("torch.", ""),
        "flops_per_token": flops_tok,
        "threads": torch.get_num_threads(),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def run_variant(spec: dict) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"{spec['config']}/{spec['variant']} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="tiny_cpu,d20")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps (torch.compile compiles in the first)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of every variant (median)")
    ap.add_argument("--batch", type=int, default=None, help="default: the config's batch_size")
    ap.add_argument("--seq", type=int, default=None, help="default: the config's seq_len")
    ap.add_argument("--threads", type=int, default=0, help="0: torch's default")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: MFU against the GPU's bf16 peak")
    ap.add_argument("--extra", action="store_true", help="also the plain dense torch baseline")
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    from nanochat.hardware import cpu_matrix_unit, cuda_matrix_unit

    console = Console(width=150)
    threads = args.threads or torch.get_num_threads()
    best = cuda_matrix_unit() if args.device == "cuda" else cpu_matrix_unit(torch.bfloat16, threads)
    names = list(VARIANTS) + (["plain"] if args.extra else [])
    load0 = os.getloadavg()
    console.print(
        f"load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}; {threads} threads; machine peak "
        f"{best.peak_flops / 1e12:.2f} TFLOP/s ({best.name}, {best.flop_per_cycle_core} FLOP/cycle/core "
        f"at {best.mhz:.0f} MHz)"
    )
    samples: dict[tuple[str, str], list[dict]] = {}
    specs = []
    for name in args.configs.split(","):
        _, tr = load_config(name)
        batch = args.batch or int(tr.get("batch_size", 8))
        seq = args.seq or int(tr.get("seq_len", 256))
        specs += [
            {"config": name, "variant": v, "batch": batch, "seq": seq, "steps": args.steps,
             "warmup": args.warmup, "threads": args.threads, "device": args.device}
            for v in names
        ]  # fmt: skip
    for r in range(args.rounds):
        for spec in specs:
            res = run_variant(spec)
            samples.setdefault((spec["config"], spec["variant"]), []).append({**spec, **res})
            console.print(
                f"round {r + 1}/{args.rounds} {spec['config']:>9} {spec['variant']:>12}: "
                f"{res['step_s'] * 1000:8.1f} ms/step"
            )
    records = []
    for (cfg_name, variant), runs in samples.items():
        step_s = statistics.median(x["step_s"] for x in runs)
        first = runs[0]
        tokens = first["batch"] * first["seq"]
        tflops = first["flops_per_token"] * tokens / step_s / 1e12
        records.append({
            "config": cfg_name, "variant": variant, "dtype": first["dtype"], "step_s": step_s,
            "tok_s": tokens / step_s, "tflops": tflops, "pct_peak": 100 * tflops * 1e12 / best.peak_flops,
            "peak_tflops": best.peak_flops / 1e12, "unit": best.name, "batch": first["batch"],
            "seq": first["seq"], "threads": first["threads"], "rounds": len(runs),
            "step_s_all": [x["step_s"] for x in runs], "peak_rss_mb": max(x["peak_rss_mb"] for x in runs),
        })  # fmt: skip
    by = {(r["config"], r["variant"]): r for r in records}
    for r in records:
        base = by.get((r["config"], "qat_fp32"))
        r["speedup_vs_qat_fp32"] = base["step_s"] / r["step_s"] if base else None
        twin = {"qat": "fp", "qat_fp32": "fp_fp32"}.get(r["variant"])
        r["qat_over_fp"] = (
            r["step_s"] / by[(r["config"], twin)]["step_s"] if twin and (r["config"], twin) in by else None
        )
        r["load_avg"] = list(os.getloadavg())
    table = Table(title=f"training step, {threads} threads (median of {args.rounds} interleaved rounds)")
    for col in ["config", "variant", "dtype", "ms/step", "tok/s", "TFLOP/s", "% peak", "× qat_fp32", "qat/fp"]:
        table.add_column(col, justify="right")
    for r in records:
        table.add_row(
            r["config"], r["variant"], r["dtype"], f"{r['step_s'] * 1000:.0f}", f"{r['tok_s']:,.0f}",
            f"{r['tflops']:.3f}", f"{r['pct_peak']:.1f}",
            f"{r['speedup_vs_qat_fp32']:.2f}" if r["speedup_vs_qat_fp32"] else "-",
            f"{r['qat_over_fp']:.2f}" if r["qat_over_fp"] else "-",
        )  # fmt: skip
    console.print(table)
    load1 = os.getloadavg()
    console.print(f"load average at the end {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=2)


if __name__ == "__main__":
    main()

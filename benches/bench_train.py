"""Training-step benchmark: ternary QAT vs the fp twin vs a plain torch GPT of the same shape, in one run.

    python benches/bench_train.py [--configs tiny_cpu,d20] [--steps 6] [--batch 8] [--seq 256] [--json PATH]
                                  [--extra]   # also QAT with torch.compile and with bf16 autocast

Variants (same config, same batch, same optimizers — Muon + Lion):
- ``qat``: the model as trained (ternary BitLinear with STE, the config's residual streams)
- ``fp``: the same model with ``quant="fp"`` (plain linears, same residual streams)
- ``plain``: a minimal torch GPT of the same width/depth/MLP (nn.Linear, standard residual, no sub-norms)
- ``qat_standard``: QAT with ``residual="standard"`` (isolates the cost of mHC streams)
- with ``--extra``: ``qat_compile`` (torch.compile) and ``qat_bf16`` (CPU bf16 autocast)

``--json PATH`` writes records with keys ``config, variant, step_s, tok_s, peak_rss_mb, ratio_vs_plain``.
Step time is the median of the timed steps after warm-up steps.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
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


def time_steps(
    model: nn.Module, vocab: int, batch: int, seq: int, steps: int, warmup: int, autocast: torch.dtype | None = None
) -> float:
    opt = build_optimizers(model)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (batch, seq), generator=g)
    y = torch.randint(0, vocab, (batch, seq), generator=g)
    times = []
    ctx = torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext()
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        with ctx:
            logits = model(x)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="tiny_cpu,d20")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=None, help="default: the config's batch_size")
    ap.add_argument("--seq", type=int, default=None, help="default: the config's seq_len")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--extra", action="store_true", help="also torch.compile and bf16 variants")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    records = []
    console = Console()
    for name in args.configs.split(","):
        cfg, tr = load_config(name)
        batch = args.batch or int(tr.get("batch_size", 8))
        seq = args.seq or int(tr.get("seq_len", cfg.seq_len))
        variants: dict[str, tuple[nn.Module, torch.dtype | None]] = {}
        torch.manual_seed(0)
        variants["plain"] = (PlainGPT(cfg), None)
        variants["fp"] = (GPT(cfg.replace(quant="fp")), None)
        variants["qat"] = (GPT(cfg), None)
        if cfg.residual != "standard":
            variants["qat_standard"] = (GPT(cfg.replace(residual="standard")), None)
        if args.extra:
            variants["qat_bf16"] = (GPT(cfg), torch.bfloat16)
            variants["qat_compile"] = (torch.compile(GPT(cfg)), None)
        base = None
        for vname, (model, ac) in variants.items():
            model.train()
            step_s = time_steps(model, cfg.vocab_size, batch, seq, args.steps, args.warmup, ac)
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            base = base or step_s
            rec = {
                "config": name,
                "variant": vname,
                "step_s": step_s,
                "tok_s": batch * seq / step_s,
                "peak_rss_mb": rss,
                "ratio_vs_plain": step_s / base,
                "batch": batch,
                "seq": seq,
                "threads": torch.get_num_threads(),
            }
            records.append(rec)
            console.print(f"{name:>9} {vname:>13}: {step_s * 1000:8.1f} ms/step  {rec['tok_s']:8.0f} tok/s")
    table = Table(title=f"training step (Muon+Lion, {torch.get_num_threads()} threads; ratio = step time / plain)")
    for col in ["config", "variant", "batch×seq", "ms/step", "tok/s", "× plain", "peak RSS MB"]:
        table.add_column(col, justify="right")
    for r in records:
        table.add_row(
            r["config"],
            r["variant"],
            f"{r['batch']}×{r['seq']}",
            f"{r['step_s'] * 1000:.1f}",
            f"{r['tok_s']:.0f}",
            f"{r['ratio_vs_plain']:.2f}",
            f"{r['peak_rss_mb']:.0f}",
        )
    console.print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=2)


if __name__ == "__main__":
    main()

"""GGUF load: time to first token ready and the memory loading adds, for a TQ2_0 file.

    python benches/bench_load.py [--config nano_125m] [--json PATH]

Writes a random-weight model of the config as a TQ2_0 GGUF (the exporter's normal path), then in a fresh Python
process (so imports and allocator state do not blur the numbers) measures, after ``import nanochat``/torch:
``nanochat.load(path)`` (memory-mapped read + TQ2_0 → kernel layout), building the Rust engine, and one decode step
— the time to the first token ready — and the resident-set growth (RSS after minus before) against the file size.
Aims (DESIGN §6): ≤ 50 ms to first token ready; RSS growth ≤ 1.2× the file (no dequantized copies).
``--json`` keys: ``config, file_mb, load_ms, engine_ms, first_token_ms, total_ms, rss_delta_mb, rss_ratio``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, os, sys, time
import torch, numpy  # imported before measuring: the process's baseline
import nanochat.engine, nanochat.export
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
r0 = rss(); t0 = time.perf_counter()
m = nanochat.export.load(sys.argv[1])
t1 = time.perf_counter()
eng = nanochat.engine.Engine(m)
t2 = time.perf_counter()
s = eng.rust.new_session(64)
s.prefill([m.tokenizer.bos_id])
t3 = time.perf_counter()
print(json.dumps({"load_ms": (t1 - t0) * 1e3, "engine_ms": (t2 - t1) * 1e3, "first_token_ms": (t3 - t2) * 1e3,
                  "total_ms": (t3 - t0) * 1e3, "rss_delta": rss() - r0}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="nano_125m")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import torch

    from nanochat.data.tokenizer import Tokenizer
    from nanochat.export import export_gguf
    from nanochat.model import GPT, load_config

    cfg, _ = load_config(args.config)
    with tempfile.TemporaryDirectory() as d:
        tok = Tokenizer.train(["def f(x):\n    return x\n"] * 50, 300)
        torch.manual_seed(0)
        model = GPT(cfg)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
        path = export_gguf(model, tok, Path(d) / "m.gguf")
        del model
        size = path.stat().st_size
        runs = [
            json.loads(
                subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, check=True)
                .stdout.strip()
                .splitlines()[-1]
            )
            for _ in range(args.repeat)
        ]
    best = min(runs, key=lambda r: r["total_ms"])
    rec = {
        "config": args.config,
        "file_mb": size / 2**20,
        "load_ms": best["load_ms"],
        "engine_ms": best["engine_ms"],
        "first_token_ms": best["first_token_ms"],
        "total_ms": best["total_ms"],
        "rss_delta_mb": best["rss_delta"] / 2**20,
        "rss_ratio": best["rss_delta"] / size,
    }
    print(
        f"{args.config}: GGUF {rec['file_mb']:.1f} MiB | load {rec['load_ms']:.1f} ms + engine {rec['engine_ms']:.1f} ms"
        f" + first token {rec['first_token_ms']:.1f} ms = {rec['total_ms']:.1f} ms | RSS +{rec['rss_delta_mb']:.1f} MiB"
        f" ({rec['rss_ratio']:.2f}× the file)  [best of {args.repeat}]"
    )
    if args.json:
        Path(args.json).write_text(json.dumps([rec], indent=2))


if __name__ == "__main__":
    main()

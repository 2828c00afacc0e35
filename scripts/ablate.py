"""Recipe ablations: train variants of one config side by side and tabulate the metrics that move at small scale.

    python scripts/ablate.py --config d20 --steps 150 --lines-problems 60 --out runs/ablate
    python scripts/ablate.py --only base,standard,relu2 ...        # a subset of the variants below

Every variant is one ``nanochat-train`` run of the same config, seed and step count (so the same number of tokens),
differing only in its flags; runs go one after another (never two at once on a small machine). Equal tokens rather
than equal wall clock: on a shared machine a wall-clock budget would hand the noisier runs fewer steps. Each
variant's own speed comes from ``benches/bench_train.py``. The table (markdown, ``ablation.json``) has held-out
bits-per-byte, HumanEval bits-per-byte, single-line completion (left to right, and FIM where trained), the final
training loss, tokens/s and wall time; ``ablation.png`` plots bpb against line completion.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# name: extra nanochat-train flags (on top of the config's defaults). A ``_wall`` variant's own --steps is the
# wall clock of 300 base steps for the d20 named in its comment (measured then); against a later d20, re-time it.
VARIANTS: dict[str, list[str]] = {
    "base": [],
    "fp": ["--quant", "fp"],
    # d20's residual was mhc_lite until standard won at equal wall clock (its compiled step took 1.21x a standard
    # one here, 408 vs 336 ms in the same minute): mhc_lite at equal tokens, and at the wall clock of 300 standard
    # steps (248 steps)
    "mhc_lite": ["--residual", "mhc_lite"],
    "mhc_lite_fp": ["--residual", "mhc_lite", "--quant", "fp"],
    "mhc_lite_wall": ["--residual", "mhc_lite", "--steps", "248"],
    "llama_compatible": ["--llama-compatible"],  # QK-norm off: what llama.cpp's bitnet graph runs
    "relu2": ["--mlp", "relu2"],
    "fim0": ["--fim-rate", "0"],
    "fim_lines": ["--fim-line-rate", "0.5"],  # half the FIM middles are whole lines (an editor's line request)
    "vocab8k": ["--vocab-size", "8192"],
    "lr_x2": ["--lr", "2"],
    "lr_half": ["--lr", "0.5"],
    "batch_x2": ["--batch-size", "__2x__"],
    "batch_x2_fp": ["--batch-size", "__2x__", "--quant", "fp"],
    "batch_half": ["--batch-size", "__half__"],
    "relu2_fp": ["--mlp", "relu2", "--quant", "fp"],
    "fim0_fp": ["--fim-rate", "0", "--quant", "fp"],
    "vocab8k_fp": ["--vocab-size", "8192", "--quant", "fp"],
    "lr_x2_fp": ["--lr", "2", "--quant", "fp"],
    "adamw": ["--optimizer", "adamw"],  # AdamW instead of Muon for the hidden matrices
    "adamw_fp": ["--optimizer", "adamw", "--quant", "fp"],
    "adamw_lr3e-4": ["--optimizer", "adamw", "--lr-adamw", "0.0003"],  # AdamW's rate, around its default 3e-3
    "adamw_lr1e-3": ["--optimizer", "adamw", "--lr-adamw", "0.001"],
    "adamw_lr1e-2": ["--optimizer", "adamw", "--lr-adamw", "0.01"],
    # batch 8 at the wall clock of 300 batch-4 steps (with --steps 300): a compiled batch-8 d20 step took 1.82x a
    # batch-4 step here (1,155 vs 635 ms, same minute), so 165 steps (1.10x the tokens)
    "batch_x2_wall": ["--batch-size", "8", "--steps", "165"],
    "batch_x2_wall_fp": ["--batch-size", "8", "--steps", "165", "--quant", "fp"],
    # the data mix (each a new corpus fingerprint, so its own tokenizer). The default gives a quarter of the
    # training text to the environment's short documented functions (the ``functions`` source); these train without
    # them, and with 40%
    "functions_0": ["--data", "stdlib,site-packages"],
    "functions_40": ["--data", "stdlib:1,site-packages:14,functions:10"],
    # without functions (the default before them), the natural shares give site-packages ~93% of the real code;
    # these move weight towards the standard library
    "mix_1_1": ["--data", "stdlib:1,site-packages:1"],
    "mix_stdlib": ["--data", "stdlib"],
    "synthetic_01": ["--synthetic-ratio", "0.1"],
    "synthetic_04": ["--synthetic-ratio", "0.4"],
    "decay_05": ["--decay-frac", "0.5"],  # WSD: the last half of the steps decays (d20: 0.2)
    # model shape (--model-set: this script's own flag, a derived TOML with [model] overrides): d20's MLP was 8x
    # (2,048) until the 4x MLP won at equal wall clock (a compiled 4x step took 401.5 vs 530.4 ms here, the same
    # minute); the 8x MLP at equal tokens, and at the wall clock of 300 4x steps (227 steps)
    "mlp2048": ["--model-set", "mlp_hidden=2048"],
    "mlp2048_wall": ["--model-set", "mlp_hidden=2048", "--steps", "227"],
    # a 2x MLP (512) with the standard residual: its compiled step took 280 vs 336 ms here (same minutes), so 360
    # steps at the wall clock of 300
    "mlp512_wall": ["--model-set", "mlp_hidden=512", "--steps", "360"],
    # with the 2x MLP d20 (281 ms a step here): a 1x MLP (257 ms, so 328 steps) and an 8k vocabulary (248 ms: 340)
    "mlp256_wall": ["--model-set", "mlp_hidden=256", "--steps", "328"],
    "vocab8k_wall": ["--vocab-size", "8192", "--steps", "340"],
}

MODEL_SET = "--model-set"


def derived_config(base: str, sets: list[str], path: Path) -> Path:
    """``base``'s TOML with ``[model]`` keys overridden (``key=value``, values as TOML/JSON scalars) at ``path``."""
    import tomllib

    from nanochat.model.config import config_path

    doc = tomllib.loads(config_path(base).read_text())
    for kv in sets:
        key, _, value = kv.partition("=")
        doc["model"][key] = json.loads(value)  # JSON scalars are TOML scalars: 1024, 0.5, true, "relu2"
    out = []
    for table in ("model", "train"):
        out.append(f"[{table}]")
        for k, v in doc.get(table, {}).items():
            out.append(f"{k} = {json.dumps(v)}")
    path.write_text("\n".join(out) + "\n")
    return path


def run_variant(name: str, flags: list[str], args: argparse.Namespace, out: Path) -> dict:
    run_dir = out / name
    summary = run_dir / "summary.json"
    if summary.exists() and not args.force:
        return json.loads(summary.read_text())
    cmd = [
        sys.executable, "-m", "nanochat.train", "--config", args.config, "--steps", str(args.steps),
        "--out", str(run_dir), "--eval-every", "0", "--save-every", "0", "--log-every", "50",
    ]  # fmt: skip
    if args.data:
        cmd += ["--data", args.data]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    flags = list(flags)
    sets: list[str] = []
    while MODEL_SET in flags:
        i = flags.index(MODEL_SET)
        sets.append(flags[i + 1])
        del flags[i : i + 2]
    if sets:
        cmd[cmd.index("--config") + 1] = str(derived_config(args.config, sets, out / f"{name}.toml"))
    if "--steps" in flags:  # a variant's own step count (equal wall clock) replaces the common one
        i = flags.index("--steps")
        cmd[cmd.index("--steps") + 1] = flags[i + 1]
        del flags[i : i + 2]
    for mark, factor in (("__2x__", 2.0), ("__half__", 0.5)):  # another batch: same tokens, other step count
        if mark in flags:
            from nanochat.model import load_config

            _, tr = load_config(args.config)
            flags[flags.index(mark)] = str(int(int(tr["batch_size"]) * factor))
            cmd[cmd.index("--steps") + 1] = str(int(args.steps / factor))
    cmd += flags
    cmd += ["--eval-lines-problems", str(args.lines_problems)]
    t0 = time.perf_counter()
    print(f"== {name}: {' '.join(cmd[2:])}", flush=True)
    with open(out / f"{name}.log", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
    if rc != 0:
        raise SystemExit(f"{name} failed (exit {rc}); see {out / f'{name}.log'}")
    s = json.loads(summary.read_text())
    s["wall_s"] = time.perf_counter() - t0
    summary.write_text(json.dumps(s, indent=2))
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="d20")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lines-problems", type=int, default=60, help="HumanEval problems for line completion")
    ap.add_argument("--data", default=None, help="data spec (default: the trainer's)")
    ap.add_argument("--only", default=None, help="comma-separated variant names")
    ap.add_argument(
        "--threads", type=int, default=0, help="threads per run (0: the trainer's default; 1 on a busy machine)"
    )
    ap.add_argument("--out", default="runs/ablate")
    ap.add_argument("--force", action="store_true", help="rerun variants that already have a summary")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = args.only.split(",") if args.only else list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    rows = []
    for name in names:
        s = run_variant(name, VARIANTS[name], args, out)
        rows.append({
            "variant": name, "flags": " ".join(VARIANTS[name]), "tokens": s.get("tokens"),
            "val_bpb": s.get("final_val_bpb"), "humaneval_bpb": s.get("humaneval_bpb"),
            "lines": s.get("lines_pass_rate"), "lines_fim": s.get("lines_fim_pass_rate"),
            "final_loss": s.get("final_loss"), "tok_s": s.get("mean_tok_s"), "wall_s": s.get("wall_s"),
            "load_avg": list(os.getloadavg()),
        })  # fmt: skip
        (out / "ablation.json").write_text(json.dumps(rows, indent=2))

    def f(v: object, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    lines = [
        f"Ablation of {args.config}, {args.steps} steps each (equal tokens), line completion on "
        f"{args.lines_problems} HumanEval problems",
        "",
        "| variant | flags | val bpb | HumanEval bpb | line pass (L→R) | line pass (FIM) | final loss | tok/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | `{r['flags'] or '(config)'}` | {f(r['val_bpb'], '.4f')} | "
            f"{f(r['humaneval_bpb'], '.4f')} | {f(r['lines'], '.1%')} | {f(r['lines_fim'], '.1%')} | "
            f"{f(r['final_loss'], '.4f')} | {f(r['tok_s'], ',.0f')} |"
        )
    table = "\n".join(lines)
    (out / "ablation.md").write_text(table + "\n")
    print(table)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
        for r in rows:
            if r["val_bpb"] is not None and r["lines"] is not None:
                ax.scatter(r["val_bpb"], 100 * r["lines"])
                ax.annotate(r["variant"], (r["val_bpb"], 100 * r["lines"]), fontsize=8)
        ax.set_xlabel("held-out bits per byte (lower is better)")
        ax.set_ylabel("single-line completion pass rate, % (higher is better)")
        ax.set_title(f"{args.config} ablation, {args.steps} steps each")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "ablation.png")
    except Exception as e:  # the table is the result; the plot is a convenience
        print(f"(no plot: {e})")


if __name__ == "__main__":
    main()

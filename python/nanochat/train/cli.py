"""``nanochat-train``: train a ternary GPT on the built-in corpus (or your own).

Examples::

    nanochat-train --config d20                      # the default job: ~15 min on a 2-core CPU
    nanochat-train --config tiny_cpu --steps 50      # a quick smoke run
    nanochat-train --config d20 --quant fp           # the full-precision twin (baseline)
    nanochat-train --config d20 --llama-compatible   # a model llama.cpp runs: nanochat-export --arch bitnet
    nanochat-train --config d20 --residual standard  # the same (QK-norm off unless --qk-norm)
    nanochat-train --config nano_125m --device cuda  # on a GPU (bf16 autocast)
    nanochat-train --resume runs/d20-20261124-101500 # continue exactly where it stopped
    nanochat-train --config d20 --dry-run            # print the resolved config and parameter counts
    torchrun --standalone --nproc_per_node=2 -m nanochat.train --config tiny_cpu   # DDP (gloo on CPU, nccl on GPU)

The whole configuration (the TOML's tables, or a resumed run's config.json, then the flags) is checked before any data
is prepared or any model is built: unknown keys, wrong types, non-finite numbers, out-of-range and absurd values,
paths that cannot work. Each is one line, ``error: <file or "command line">: <key> ...``, with exit code 2.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from nanochat.data.sources import DEFAULT_SPEC
from nanochat.train.config import TrainConfig

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode="rich")

MODEL = "Model"
OPT = "Optimisation"
DATA = "Data"
RUN = "Runtime"
LOG = "Logging and checkpoints"
DISTILL = "Distillation"


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", err=True, fg="red")
    raise typer.Exit(2)


@app.command()
def main(
    config: Annotated[
        str | None,
        typer.Option(
            help="config name (tiny_cpu, d20, nano_125m, nano_1b) or a .toml path (default: d20; on --resume, the "
            "run's). Options left out take the config's values: (d20: ...) after an option shows d20's",
            rich_help_panel=MODEL,
        ),
    ] = None,
    quant: Annotated[
        str | None, typer.Option(help="ternary | fp (full-precision baseline)", rich_help_panel=MODEL)
    ] = None,
    residual: Annotated[
        str | None,
        typer.Option(
            help="mhc_lite | mhc | standard (standard turns QK-norm off unless --qk-norm: llama.cpp's bitnet has none)",
            rich_help_panel=MODEL,
        ),
    ] = None,
    mlp: Annotated[
        str | None, typer.Option(help="swiglu (llama.cpp bitnet) | relu2 (nanochat arch only)", rich_help_panel=MODEL)
    ] = None,
    qk_norm: Annotated[
        bool | None,
        typer.Option("--qk-norm/--no-qk-norm", help="RMSNorm on q and k per head", rich_help_panel=MODEL),
    ] = None,
    llama_compatible: Annotated[
        bool,
        typer.Option(
            "--llama-compatible",
            help="a model llama.cpp's bitnet runs: residual standard, swiglu, no QK-norm, tied head, ternary",
            rich_help_panel=MODEL,
        ),
    ] = False,
    steps: Annotated[int | None, typer.Option(help="optimizer steps", rich_help_panel=OPT)] = None,
    time_budget: Annotated[
        str | None,
        typer.Option(
            help="train for this long instead (90s, 20m, 2h): the step count is fixed from the pace of the first "
            "steps; data preparation and the final evaluation come on top",
            rich_help_panel=OPT,
        ),
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="sequences per micro-batch per process", rich_help_panel=OPT)
    ] = None,
    seq_len: Annotated[int | None, typer.Option(help="tokens per sequence", rich_help_panel=OPT)] = None,
    grad_accum: Annotated[
        int | None, typer.Option(help="micro-batches per optimizer step", rich_help_panel=OPT)
    ] = None,
    lr: Annotated[
        float | None, typer.Option(help="scale every learning rate by this factor", rich_help_panel=OPT)
    ] = None,
    lr_muon: Annotated[float | None, typer.Option(help="Muon learning rate", rich_help_panel=OPT)] = None,
    lr_lion: Annotated[float | None, typer.Option(help="Lion learning rate", rich_help_panel=OPT)] = None,
    optimizer: Annotated[
        str | None, typer.Option(help="hidden matrices: muon or adamw (the ablation baseline)", rich_help_panel=OPT)
    ] = None,
    lr_adamw: Annotated[
        float | None, typer.Option(help="AdamW learning rate (--optimizer adamw)", rich_help_panel=OPT)
    ] = None,
    warmup_steps: Annotated[int | None, typer.Option(help="WSD warmup steps", rich_help_panel=OPT)] = None,
    decay_frac: Annotated[float | None, typer.Option(help="WSD decay fraction", rich_help_panel=OPT)] = None,
    grad_clip: Annotated[
        float | None, typer.Option(help="global grad-norm clip (0 = off)", rich_help_panel=OPT)
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(
            help=f"data spec: sources with optional weights (default {DEFAULT_SPEC}; also a directory, a file, "
            ".jsonl/.parquet shards)",
            rich_help_panel=DATA,
        ),
    ] = None,
    data_dir: Annotated[str | None, typer.Option(help="tokenizer/shard cache directory", rich_help_panel=DATA)] = None,
    vocab_size: Annotated[int | None, typer.Option(help="BPE vocabulary size", rich_help_panel=DATA)] = None,
    synthetic_ratio: Annotated[
        float | None, typer.Option(help="fraction of synthetic code tasks", rich_help_panel=DATA)
    ] = None,
    fim_rate: Annotated[
        float | None,
        typer.Option(help="share of train chunks in fill-in-the-middle form (0 = off)", rich_help_panel=DATA),
    ] = None,
    fim_line_rate: Annotated[
        float | None,
        typer.Option(help="share of FIM examples whose middle is whole lines (0 = off)", rich_help_panel=DATA),
    ] = None,
    device: Annotated[str | None, typer.Option(help="cpu | cuda | cuda:N | auto", rich_help_panel=RUN)] = None,
    dtype: Annotated[str | None, typer.Option(help="float32 | bfloat16 | auto", rich_help_panel=RUN)] = None,
    compile: Annotated[
        bool | None, typer.Option("--compile/--no-compile", help="torch.compile the model", rich_help_panel=RUN)
    ] = None,
    threads: Annotated[
        int | None, typer.Option(help="CPU threads for torch and the Rust kernels", rich_help_panel=RUN)
    ] = None,
    numa_node: Annotated[int | None, typer.Option(help="pin threads to this NUMA node", rich_help_panel=RUN)] = None,
    seed: Annotated[int | None, typer.Option(help="random seed", rich_help_panel=RUN)] = None,
    out: Annotated[
        str | None, typer.Option(help="run directory (default runs/<config>-<time>)", rich_help_panel=LOG)
    ] = None,
    resume: Annotated[str | None, typer.Option(help="resume the run in this directory", rich_help_panel=LOG)] = None,
    stop_after: Annotated[
        int | None, typer.Option(help="stop with a checkpoint after this step", rich_help_panel=LOG)
    ] = None,
    eval_every: Annotated[int | None, typer.Option(help="validate every N steps", rich_help_panel=LOG)] = None,
    save_every: Annotated[int | None, typer.Option(help="checkpoint every N steps", rich_help_panel=LOG)] = None,
    keep_last: Annotated[
        int | None, typer.Option(help="checkpoints to keep (plus the best)", rich_help_panel=LOG)
    ] = None,
    log_every: Annotated[int | None, typer.Option(help="print a log line every N steps", rich_help_panel=LOG)] = None,
    final_eval: Annotated[
        bool | None,
        typer.Option(
            "--final-eval/--no-final-eval",
            help="HumanEval bpb and line completion at the end (summary.json, lines*.json)",
            rich_help_panel=LOG,
        ),
    ] = None,
    eval_lines_problems: Annotated[
        int | None,
        typer.Option(help="HumanEval problems for the final line completion (0 = skip)", rich_help_panel=LOG),
    ] = None,
    teacher: Annotated[
        str | None, typer.Option(help="teacher checkpoint/run dir for distillation", rich_help_panel=DISTILL)
    ] = None,
    distill_weight: Annotated[float | None, typer.Option(help="weight of the KL term", rich_help_panel=DISTILL)] = None,
    distill_temp: Annotated[
        float | None, typer.Option(help="distillation temperature", rich_help_panel=DISTILL)
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="print the resolved config and parameter counts, then exit")
    ] = False,
) -> None:
    """Train a ternary (BitNet b1.58) GPT with mHC residual streams.

    Examples:

        nanochat-train --config d20

        nanochat-train --config tiny_cpu --steps 50

        nanochat-train --resume runs/d20-20261124-101500

    Options left out take the --config's values (d20 by default): nanochat-train --config d20 --dry-run prints them.
    """
    model_flags: dict[str, Any] = {"quant": quant, "residual": residual, "mlp": mlp, "qk_norm": qk_norm}
    cli = {
        k: v
        for k, v in locals().items()
        if v is not None and k not in ("dry_run", "lr", "llama_compatible", "model_flags", *model_flags)
    }
    try:
        if time_budget is not None:
            cli["time_budget"] = parse_duration(time_budget)
        cfg = resolve_config(
            cli,
            lr_scale=lr,
            llama_compatible=llama_compatible,
            **{k: v for k, v in model_flags.items() if v is not None},
        )
    except (ValueError, OSError, TypeError) as e:
        _fail(str(e))
    except KeyError as e:  # (nothing should raise one; if something does, say what was missing)
        _fail(f"missing setting {e}")
    if dry_run:
        dry_run_report(cfg)
        return
    from nanochat.train.loop import train

    try:
        summary = train(cfg)
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError) as e:
        _fail(str(e))
    stopped = summary.get("stopped_by")
    if stopped:  # a stopped run is not a finished one: 128 + signal number, as shells report it
        import signal

        raise typer.Exit(128 + int(signal.Signals[stopped]))


def parse_duration(text: str) -> float:
    """Seconds in ``90``, ``90s``, ``20m``, ``2h`` or ``1.5h``."""
    t = text.strip().lower()
    mult = {"s": 1.0, "m": 60.0, "h": 3600.0}.get(t[-1:], None)
    num = t[:-1] if mult is not None else t
    try:
        value = float(num) * (mult or 1.0)
    except ValueError:
        raise ValueError(f"--time-budget {text!r}: expected a duration like 90s, 20m or 2h") from None
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"--time-budget {text!r} must be a positive, finite duration")
    return value


# [train] keys a TOML may not set: they name the config, the run or the model, which come from elsewhere
NOT_IN_TOML = ("config", "resume", "model_overrides", "stop_after")
# what --llama-compatible sets: the model llama.cpp's `bitnet` graph runs (export/gguf_io.check_bitnet_compatible)
LLAMA_COMPATIBLE = {
    "residual": "standard",
    "mlp": "swiglu",
    "qk_norm": False,
    "tie_embeddings": True,
    "quant": "ternary",
}


def read_run_config(run: str | Path) -> dict[str, Any]:
    """A run directory's ``config.json`` (``{"train": ..., "model": ...}``); errors name the file and what is wrong."""
    path = Path(run) / "config.json"
    if not Path(run).is_dir():
        raise FileNotFoundError(f"--resume {run}: no such directory (expected a run directory with config.json)")
    if not path.is_file():
        raise FileNotFoundError(f"--resume {run}: no config.json there (is it a run directory?)")
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable or invalid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected a JSON object with 'train' and 'model', got {type(doc).__name__}")
    for key in ("train", "model"):
        if not isinstance(doc.get(key), dict):
            raise ValueError(f"{path}: {key!r} is missing or not an object (was the run written by nanochat-train?)")
    return doc


def resolve_config(
    cli: dict[str, Any],
    quant: str | None = None,
    residual: str | None = None,
    lr_scale: float | None = None,
    mlp: str | None = None,
    qk_norm: bool | None = None,
    llama_compatible: bool = False,
) -> TrainConfig:
    """Defaults < config's [train] table (or the resumed run's settings) < command-line flags.

    Everything is validated here, before any data is prepared or any model is built: every key (unknown ones are
    errors), type, range and path, and the model config the run will build; errors are one line naming the key."""
    from nanochat.model import GPTConfig, load_config
    from nanochat.model.config import config_path

    flags: dict[str, Any] = {"quant": quant, "residual": residual, "mlp": mlp, "qk_norm": qk_norm}
    model_flags = {k: v for k, v in flags.items() if v is not None}
    if llama_compatible:
        clash = {k: v for k, v in model_flags.items() if v != LLAMA_COMPATIBLE[k]}
        if clash:
            named = ", ".join(_flag(k, v) for k, v in clash.items())
            raise ValueError(f"--llama-compatible builds a bitnet-compatible model; {named} contradicts it")
        model_flags = dict(LLAMA_COMPATIBLE)
    cfg = TrainConfig()
    saved_model: dict[str, Any] | None = None
    if cli.get("resume"):
        saved = read_run_config(cli["resume"])
        cfg.update(saved["train"], f"{Path(cli['resume']) / 'config.json'} 'train'")
        saved_model = saved["model"]
        cfg.stop_after = None  # an interruption point is not a setting to inherit
        # the model is the run's: a flag that would build a different one cannot apply to its checkpoint
        for key in ("config", "vocab_size"):
            if key in cli and cli[key] != getattr(cfg, key):
                raise ValueError(
                    f"--resume {cli['resume']}: the run was trained with {key} = {getattr(cfg, key)!r}; "
                    f"--{key.replace('_', '-')} {cli[key]!r} would build a different model (leave it out)"
                )
        if model_flags or llama_compatible:
            raise ValueError(
                f"--resume {cli['resume']}: --quant/--residual/--mlp/--qk-norm/--llama-compatible cannot change a "
                "run's model"
            )
    else:
        name = cli.get("config", cfg.config)
        if not isinstance(name, str):
            raise ValueError(f"config must be a config name or a .toml path, got {name!r}")
        _, train_defaults = load_config(name)
        source = f"{config_path(name)} [train]"
        bad = sorted(set(train_defaults) & set(NOT_IN_TOML))
        if bad:
            raise ValueError(f"{source}: {bad} cannot be set in a config file (they are command-line settings)")
        cfg.update(train_defaults, source)
        if model_flags.get("residual") == "standard" and "qk_norm" not in model_flags and not llama_compatible:
            # a standard-residual model is the one llama.cpp's bitnet graph runs, and that graph has no QK-norm
            model_flags["qk_norm"] = False
            print(
                "note: --residual standard: QK-norm off so the model exports to llama.cpp (--qk-norm keeps it)",
                file=sys.stderr,
            )
    cfg.update(cli, "command line")
    if "steps" in cli and "time_budget" not in cli and not cli.get("resume"):
        cfg.time_budget = None  # an explicit --steps wins over a config's time budget
    cfg.model_overrides = {**cfg.model_overrides, **model_flags}
    if lr_scale is not None:
        if not (math.isfinite(lr_scale) and lr_scale > 0):
            raise ValueError(f"--lr must be a positive, finite factor, got {lr_scale}")
        cfg.lr_muon *= lr_scale
        cfg.lr_lion *= lr_scale
        cfg.lr_adamw *= lr_scale
    try:
        cfg.validate()
    except ValueError as e:
        raise ValueError(f"command line: {e}") from None
    for k in sorted(set(cli) - {"resume", "config"}):
        if cli.get("resume") and k not in ("threads", "numa_node", "device", "resume", "out"):
            print(f"note: --{k.replace('_', '-')} {cli[k]!r} overrides the resumed run's setting", file=sys.stderr)
    # the model the run will build, validated now so a bad value is a one-line error, not a traceback mid-setup
    if saved_model is not None:
        try:
            model_cfg = GPTConfig.from_dict(saved_model).check_limits()
        except (ValueError, TypeError) as e:
            raise ValueError(f"{Path(cli['resume']) / 'config.json'} 'model': {e}") from None
        where = "the resumed run's model"
    else:
        model_cfg, _ = load_config(cfg.config)
        model_cfg = model_cfg.replace(vocab_size=cfg.vocab_size, **cfg.model_overrides).check_limits()
        where = f"model.seq_len in {cfg.config}"
    if cfg.seq_len > model_cfg.seq_len:
        raise ValueError(
            f"seq_len {cfg.seq_len} exceeds the model's context of {model_cfg.seq_len} ({where}); "
            f"pass --seq-len {model_cfg.seq_len} or less"
        )
    check_paths(cfg)
    return cfg


def _flag(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return f"--{'' if value else 'no-'}{key.replace('_', '-')}"
    return f"--{key.replace('_', '-')} {value}"


def check_paths(cfg: TrainConfig) -> None:
    """Paths the run will write or read, checked before any work: a clear error instead of a traceback later."""
    if cfg.out is not None and not cfg.resume and Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise ValueError(f"--out {cfg.out} is an existing file; the run directory must be a directory")
    if cfg.data_dir is not None and Path(cfg.data_dir).exists() and not Path(cfg.data_dir).is_dir():
        raise ValueError(f"--data-dir {cfg.data_dir} is an existing file; the data cache must be a directory")
    if cfg.data is not None:
        from nanochat.data.sources import parse_spec

        try:
            parse_spec(cfg.data)  # cheap: checks that each named source exists, reads nothing
        except (ValueError, OSError) as e:
            raise ValueError(f"--data {cfg.data}: {e}") from None
    if cfg.teacher is not None and not Path(cfg.teacher).exists():
        raise FileNotFoundError(f"--teacher {cfg.teacher}: no such checkpoint or run directory")


def dry_run_report(cfg: TrainConfig) -> None:
    import torch

    from nanochat.model import GPT, load_config

    model_cfg, _ = load_config(cfg.config)
    model_cfg = model_cfg.replace(vocab_size=cfg.vocab_size, **cfg.model_overrides)
    with torch.device("meta"):
        model = GPT(model_cfg)
    counts = model.param_counts()
    print(json.dumps({"train": cfg.to_dict(), "model": model_cfg.to_dict(), "params": counts}, indent=2))


def command_with_config_defaults(name: str = "d20") -> Any:
    """The click command behind :data:`app`, with ``(d20: VALUE)`` appended to the help of every option the default
    config sets (its [model] and [train] tables): ``--help`` shows what a run without the flag uses. Reads one small
    TOML file, no torch."""
    from importlib import resources

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib

    cmd = typer.main.get_command(app)
    try:
        doc = tomllib.loads(resources.files("nanochat").joinpath("configs").joinpath(f"{name}.toml").read_text())
    except (OSError, ValueError):
        return cmd
    values = {**doc.get("model", {}), **doc.get("train", {})}
    opt: Any  # typer's own (vendored) click Option: it has .help
    for opt in cmd.params:
        if opt.name not in values or not getattr(opt, "help", None):
            continue
        v = values[opt.name]
        shown = f"{v:g}" if isinstance(v, float) else str(v).lower() if isinstance(v, bool) else str(v)
        unit = " s" if opt.name == "time_budget" else ""
        opt.help = f"{opt.help} ({name}: {shown}{unit})"
    return cmd


def entry() -> None:
    """Console-script entry point."""
    command_with_config_defaults()(prog_name="nanochat-train")


if __name__ == "__main__":
    entry()

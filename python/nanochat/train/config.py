"""Training settings: one dataclass, filled from a config's ``[train]`` table then CLI overrides."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainConfig:
    # --- what to train
    config: str = "d20"  # config name (configs/NAME.toml) or path to a .toml
    model_overrides: dict[str, Any] = field(default_factory=dict)  # GPTConfig fields set from the CLI
    # --- data
    data: str | None = None  # user corpus (dir of sources, .txt or .jsonl); None = stdlib + synthetic
    data_dir: str | None = None  # where tokenizer + shards are cached (default: ~/.cache/nanochat/data)
    vocab_size: int = 8192  # BPE vocabulary size
    synthetic_ratio: float = 0.2  # fraction of synthetic code-task documents mixed into the default corpus
    val_fraction: float = 0.02  # fraction of documents held out for validation (stable path hash)
    fim_rate: float = 0.5  # fill-in-the-middle: share of train chunks rewritten as FIM (StarCoder); 0 = off
    fim_spm_rate: float = 0.5  # share of FIM examples in SPM order (the rest PSM)
    fim_line_rate: float = 0.0  # share of FIM examples whose middle is whole lines (an editor's line request)
    # --- optimisation
    steps: int = 1000  # optimizer steps
    time_budget: float | None = None  # seconds of training: fixes `steps` from the pace of the first steps
    batch_size: int = 8  # sequences per micro-batch (per process)
    seq_len: int = 256  # tokens per sequence
    grad_accum: int = 1  # micro-batches per optimizer step
    lr_muon: float = 0.02  # Muon learning rate (2-D hidden matrices)
    lr_lion: float = 3e-4  # Lion learning rate (embeddings, norms, mHC parameters)
    weight_decay: float = 0.0  # decoupled weight decay (both optimizers)
    warmup_steps: int = 50  # WSD: linear warmup steps
    decay_frac: float = 0.2  # WSD: fraction of steps in the final linear decay
    grad_clip: float = 1.0  # global-norm clipping (0 disables)
    # --- runtime
    device: str = "auto"  # cpu | cuda | cuda:N | auto
    dtype: str = "auto"  # float32 | bfloat16 | auto (bf16 on CUDA and on CPUs with AMX/AVX512-BF16, else fp32)
    compile: bool = False  # torch.compile the model
    threads: int = 0  # CPU threads for torch and the Rust kernels (0 = torch's default)
    numa_node: int | None = None  # pin to this NUMA node's CPUs
    seed: int = 1337
    # --- logging / evaluation / checkpoints
    out: str | None = None  # run directory (default runs/<config>-<timestamp>)
    resume: str | None = None  # run directory to resume from (its latest checkpoint)
    log_every: int = 10  # plain log line every N steps (the progress bar updates every step)
    eval_every: int = 100  # validation loss/bpb every N steps (0 = only at the end)
    eval_batches: int = 8  # validation batches per evaluation
    final_eval_batches: int = 0  # validation batches at the last step (0 = eval_batches): a larger, steadier val set
    mhc_diag_every: int = 50  # mHC diagnostics every N steps
    final_eval: bool = True  # at the end: HumanEval bpb and line completion (lines.json, summary.json)
    eval_lines_problems: int = 164  # HumanEval problems whose solution lines are completed at the end (0 = skip)
    save_every: int = 200  # checkpoint every N steps (0 = only at the end)
    keep_last: int = 2  # checkpoints kept besides the best
    stop_after: int | None = None  # stop (with a checkpoint) after this step, keeping the schedule of `steps`
    # --- distillation
    teacher: str | None = None  # checkpoint or run dir of a frozen teacher (same tokenizer)
    distill_weight: float = 0.5  # weight of the KL term: loss = (1-w)·CE + w·KL
    distill_temp: float = 1.0  # softmax temperature for the KL term

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    def update(self, values: dict[str, Any], source: str) -> None:
        """Set fields from a mapping; unknown keys are an error naming ``source``."""
        unknown = sorted(set(values) - self.field_names())
        if unknown:
            raise ValueError(f"{source}: unknown training setting(s) {unknown}")
        for k, v in values.items():
            setattr(self, k, v)
        self.validate()

    def validate(self) -> None:
        if int(self.eval_lines_problems) < 0:
            raise ValueError(f"eval_lines_problems must be >= 0, got {self.eval_lines_problems}")
        positive = ["steps", "batch_size", "seq_len", "grad_accum", "vocab_size", "eval_batches", "keep_last"]
        for k in positive:
            if int(getattr(self, k)) < 1:
                raise ValueError(f"{k} must be ≥ 1, got {getattr(self, k)}")
        for k in ["lr_muon", "lr_lion", "weight_decay", "grad_clip"]:
            if float(getattr(self, k)) < 0:
                raise ValueError(f"{k} must be ≥ 0, got {getattr(self, k)}")
        if not 0 <= self.decay_frac <= 1:
            raise ValueError(f"decay_frac must be in [0, 1], got {self.decay_frac}")
        if self.time_budget is not None and not float(self.time_budget) > 0:
            raise ValueError(f"time_budget must be > 0 seconds, got {self.time_budget}")
        for k in ("fim_rate", "fim_spm_rate", "fim_line_rate"):
            if not 0 <= float(getattr(self, k)) <= 1:
                raise ValueError(f"{k} must be in [0, 1], got {getattr(self, k)}")
        if not 0 <= self.synthetic_ratio <= 1:
            raise ValueError(f"synthetic_ratio must be in [0, 1], got {self.synthetic_ratio}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        if not 0 <= self.distill_weight <= 1:
            raise ValueError(f"distill_weight must be in [0, 1], got {self.distill_weight}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

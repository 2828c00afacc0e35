"""Training settings: one dataclass, filled from a config's ``[train]`` table then CLI overrides.

Every value is checked when it is set (:meth:`TrainConfig.update`), against the type its field declares (an ``int``
field refuses ``2.7`` and ``"2"``, a float field NaN and infinities) and its range, so a bad setting is a one-line
error naming the key and where it came from, before any data is prepared or any model is built.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from nanochat.model.config import MAX_VALUES

DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
# (low, high) per integer field; None = unbounded on that side. High bounds only catch typos.
INT_RANGES: dict[str, tuple[int | None, int | None]] = {
    "vocab_size": (1, MAX_VALUES["vocab_size"]),
    "steps": (1, 10**9),
    "batch_size": (1, 1 << 20),
    "seq_len": (1, MAX_VALUES["seq_len"]),
    "grad_accum": (1, 1 << 20),
    "warmup_steps": (0, None),
    # 0 = torch's default. Not the machine's cap (the Rust core refuses more than 4 per core when the run starts): a
    # run resumed on a smaller machine keeps its saved setting until then, and --threads can lower it
    "threads": (0, 4096),
    "numa_node": (0, 4095),
    "seed": (0, 2**63 - 1),
    "log_every": (0, None),
    "eval_every": (0, None),
    "eval_batches": (1, 1 << 20),
    "final_eval_batches": (0, 1 << 20),
    "mhc_diag_every": (0, None),
    "eval_lines_problems": (0, None),
    "save_every": (0, None),
    "keep_last": (1, None),
    "stop_after": (1, None),
}


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
    optimizer: str = "muon"  # hidden matrices: muon | adamw (the ablation baseline)
    lr_adamw: float = 3e-3  # AdamW learning rate (hidden matrices, with optimizer = "adamw")
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
        """Set fields from a mapping; unknown keys and bad values are errors naming the key and ``source``."""
        unknown = sorted(set(values) - self.field_names())
        if unknown:
            near = {k: difflib.get_close_matches(k, self.field_names(), n=1) for k in unknown}
            hints = "; ".join(f"did you mean {m[0]!r} for {k!r}?" for k, m in near.items() if m)
            raise ValueError(f"{source}: unknown training setting(s) {unknown}" + (f" ({hints})" if hints else ""))
        for k, v in values.items():
            problem = _type_problem(k, v)
            if problem:
                raise ValueError(f"{source}: {problem}")
        for k, v in values.items():
            setattr(self, k, v)
        try:
            self.validate()
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    def validate(self) -> None:
        """Types, ranges and finiteness of every field; a ValueError naming the key."""
        for f in dataclasses.fields(self):
            problem = _type_problem(f.name, getattr(self, f.name))
            if problem:
                raise ValueError(problem)
        for k, (lo, hi) in INT_RANGES.items():
            v = getattr(self, k)
            if v is None:
                continue
            if lo is not None and v < lo:
                raise ValueError(f"{k} must be ≥ {lo}, got {v}")
            if hi is not None and v > hi:
                raise ValueError(f"{k} = {v} is beyond the sane limit {hi}")
        if self.optimizer not in ("muon", "adamw"):
            raise ValueError(f"optimizer must be 'muon' or 'adamw', got {self.optimizer!r}")
        for k in ["lr_muon", "lr_lion", "lr_adamw", "weight_decay", "grad_clip"]:
            if float(getattr(self, k)) < 0:
                raise ValueError(f"{k} must be ≥ 0, got {getattr(self, k)}")
        if not self.distill_temp > 0:
            raise ValueError(f"distill_temp must be > 0, got {self.distill_temp}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if not DEVICE_RE.match(self.device):
            raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
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


_HINTS: dict[str, Any] = {}


def _type_problem(key: str, value: Any) -> str | None:
    """Why ``value`` does not fit field ``key``'s declared type (None when it does). Strict where TOML and JSON are
    loose: bool is not an int, a float with a fraction is not an int, and floats must be finite."""
    if not _HINTS:
        _HINTS.update(typing.get_type_hints(TrainConfig))
    hint = _HINTS[key]
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None:
        return None if type(None) in allowed else f"{key} must be set, got null"
    for t in allowed:
        base = typing.get_origin(t) or t
        if base is bool and isinstance(value, bool):
            return None
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            return None
        if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return None if math.isfinite(value) else f"{key} must be a finite number, got {value}"
        if base in (str, dict) and isinstance(value, base):
            return None
    want = " or ".join(
        "number" if t is float else getattr(t, "__name__", str(t)) for t in allowed if t is not type(None)
    )
    return f"{key} must be {'an' if want[0] in 'aeiou' else 'a'} {want}, got {type(value).__name__} {value!r}"[:300]

"""WSD (warmup–stable–decay) learning-rate multiplier.

``wsd(step, total_steps, warmup_steps, decay_frac, min_lr_frac)`` for 0-based ``step``:
- warmup: ``(step + 1) / warmup_steps`` for ``step < warmup_steps`` — the first step trains at a small
  nonzero rate and step ``warmup_steps − 1`` reaches 1;
- stable: 1;
- decay over the last ``decay_steps = round(decay_frac · total_steps)`` steps: linear from 1 at
  ``step = total_steps − decay_steps`` to ``min_lr_frac`` at ``step = total_steps`` (one past the last step,
  as in nanochat, so the last step still has a nonzero rate when ``min_lr_frac = 0``); constant after.
If warmup and decay overlap (very short runs), the smaller of the two applies.
"""

from __future__ import annotations


def wsd(step: int, total_steps: int, warmup_steps: int, decay_frac: float, min_lr_frac: float = 0.0) -> float:
    if total_steps < 1 or warmup_steps < 0 or not 0.0 <= decay_frac <= 1.0 or not 0.0 <= min_lr_frac <= 1.0:
        raise ValueError(
            f"invalid WSD arguments total={total_steps} warmup={warmup_steps} decay_frac={decay_frac} "
            f"min_lr_frac={min_lr_frac}"
        )
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    mult = 1.0
    if step < warmup_steps:
        mult = (step + 1) / warmup_steps
    decay_steps = round(decay_frac * total_steps)
    decay_start = total_steps - decay_steps
    if decay_steps > 0 and step >= decay_start:
        progress = min(1.0, (step - decay_start) / decay_steps)
        mult = min(mult, 1.0 - progress * (1.0 - min_lr_frac))
    return mult

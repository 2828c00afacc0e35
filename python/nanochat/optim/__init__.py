"""Optimizers for nanochat: Muon for the hidden matrices, Lion for everything else, and the WSD schedule.

``hidden="adamw"`` puts the hidden matrices on AdamW instead of Muon (the ablation baseline; Lion keeps the rest).

THE rule (:func:`is_muon_param`, used by :func:`split_params`): a parameter goes to Muon iff it is 2-D,
its name starts with ``blocks.`` and does not contain ``mhc``. Everything else — token embedding ``wte``,
``lm_head``, norms, mHC mixing parameters — goes to Lion. Wrapper prefixes (``module.`` from DDP,
``_orig_mod.`` from ``torch.compile``) are stripped first, so the rule sees the model's own names.

Within Lion, weight decay applies only to the 2-D non-mHC tensors (embedding, head); norms and mHC
parameters are never decayed (decaying a gain towards 0 or an mHC bias towards uniform mixing is not
regularisation). Each group keeps its base rate in ``group["initial_lr"]`` (the key torch's LR schedulers
use); :meth:`Optimizers.set_lr_multiplier` sets ``lr = initial_lr · multiplier`` from :func:`wsd`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from nanochat.optim.lion import Lion
from nanochat.optim.muon import NS_COEFFS, NS_STEPS, Muon, newton_schulz
from nanochat.optim.schedule import wsd

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def canonical_name(name: str) -> str:
    """``name`` without DDP / torch.compile wrapper prefixes."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                changed = True
    return name


def is_muon_param(name: str, p: torch.Tensor) -> bool:
    """THE rule: Muon iff 2-D, under ``blocks.``, and not an mHC parameter."""
    name = canonical_name(name)
    return p.ndim == 2 and name.startswith("blocks.") and "mhc" not in name


def split_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(muon_params, lion_params)`` of the trainable parameters, in ``named_parameters`` order."""
    muon: list[nn.Parameter] = []
    lion: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (muon if is_muon_param(name, p) else lion).append(p)
    return muon, lion


class Optimizers:
    """Several optimizers driven as one: ``step``, ``zero_grad``, ``state_dict``, lr multipliers."""

    def __init__(self, optimizers: dict[str, Optimizer]) -> None:
        self.optimizers = dict(optimizers)
        for opt in self.optimizers.values():
            for group in opt.param_groups:
                group.setdefault("initial_lr", group["lr"])

    def __iter__(self) -> Iterator[Optimizer]:
        return iter(self.optimizers.values())

    def __getitem__(self, name: str) -> Optimizer:
        return self.optimizers[name]

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    def step(self, closure: Callable[[], float] | None = None) -> None:
        if closure is not None:
            with torch.enable_grad():
                closure()
        for opt in self.optimizers.values():
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def set_lr_multiplier(self, mult: float) -> None:
        for g in self.param_groups:
            g["lr"] = g["initial_lr"] * mult

    def lrs(self) -> dict[str, float]:
        """Current lr of each group, keyed ``<optimizer>/<group name or index>`` (for logs)."""
        return {
            f"{name}/{g.get('name', i)}": float(g["lr"])
            for name, opt in self.optimizers.items()
            for i, g in enumerate(opt.param_groups)
        }

    def state_dict(self) -> dict[str, Any]:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != set(self.optimizers):
            raise ValueError(f"optimizer state has {sorted(state)}, expected {sorted(self.optimizers)}")
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])


def build_optimizers(
    model: nn.Module,
    muon_lr: float = 0.02,
    lion_lr: float = 3e-4,
    weight_decay: float = 0.0,
    lion_weight_decay: float | None = None,
    muon_momentum: float = 0.95,
    lion_betas: tuple[float, float] = (0.9, 0.99),
    ns_dtype: torch.dtype | None = None,
    hidden: str = "muon",
    adamw_lr: float = 3e-3,
    adamw_betas: tuple[float, float] = (0.9, 0.95),
) -> Optimizers:
    """Muon (or, with ``hidden="adamw"``, AdamW) over :func:`split_params`' first list, Lion over the second;
    empty optimizers are left out.

    ``weight_decay`` is Muon's; ``lion_weight_decay`` (default: the same) applies to Lion's 2-D non-mHC
    tensors only. Groups are named (``muon``, ``lion_decay``, ``lion_no_decay``) for logs.
    """
    lion_wd = weight_decay if lion_weight_decay is None else lion_weight_decay
    muon_params: list[nn.Parameter] = []
    lion_decay: list[nn.Parameter] = []
    lion_no_decay: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if is_muon_param(name, p):
            muon_params.append(p)
        elif p.ndim >= 2 and "mhc" not in canonical_name(name):
            lion_decay.append(p)
        else:
            lion_no_decay.append(p)
    if hidden not in ("muon", "adamw"):
        raise ValueError(f"hidden-matrix optimizer must be 'muon' or 'adamw', got {hidden!r}")
    opts: dict[str, Optimizer] = {}
    if muon_params and hidden == "adamw":
        # decoupled weight decay as Muon's (lr-scaled); foreach: one pass per op over all the matrices
        opts["adamw"] = torch.optim.AdamW(
            [{"params": muon_params, "name": "adamw"}],
            lr=adamw_lr,
            betas=adamw_betas,
            weight_decay=weight_decay,
            foreach=True,
        )
    elif muon_params:
        opts["muon"] = Muon(
            [{"params": muon_params, "name": "muon"}],
            lr=muon_lr,
            momentum=muon_momentum,
            weight_decay=weight_decay,
            ns_dtype=ns_dtype,
        )
    lion_groups = [
        {"params": ps, "name": n, "weight_decay": wd}
        for ps, n, wd in ((lion_decay, "lion_decay", lion_wd), (lion_no_decay, "lion_no_decay", 0.0))
        if ps
    ]
    if lion_groups:
        opts["lion"] = Lion(lion_groups, lr=lion_lr, betas=lion_betas)
    if not opts:
        raise ValueError("model has no trainable parameters")
    return Optimizers(opts)


__all__ = [
    "NS_COEFFS",
    "NS_STEPS",
    "Lion",
    "Muon",
    "Optimizers",
    "build_optimizers",
    "canonical_name",
    "is_muon_param",
    "newton_schulz",
    "split_params",
    "wsd",
]

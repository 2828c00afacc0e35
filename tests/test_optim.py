"""Tests of nanochat.optim: Newton–Schulz against the scalar polynomial map, Lion against a hand-computed
step, Muon+Lion against a straightforward reference written here, the WSD schedule at its boundaries,
state_dict round trips, and the Muon/Lion parameter rule."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from nanochat.optim import (
    Lion,
    Muon,
    Optimizers,
    build_optimizers,
    canonical_name,
    is_muon_param,
    newton_schulz,
    split_params,
    wsd,
)

A, B, C = 3.4445, -4.7750, 2.0315


def quintic5(x: float) -> float:
    """The scalar map Newton–Schulz applies to each normalised singular value: p∘p∘p∘p∘p."""
    for _ in range(5):
        x = A * x + B * x**3 + C * x**5
    return x


def matrix_with_singular_values(s: torch.Tensor, rows: int, cols: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    k = min(rows, cols)
    U, _ = torch.linalg.qr(torch.randn(rows, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(cols, k, generator=g, dtype=torch.float64))
    return U @ torch.diag(s) @ V.T, U, V


# ------------------------------------------------------------------------------------------ Newton–Schulz
@pytest.mark.parametrize("rows,cols", [(24, 40), (40, 24), (32, 32)])
def test_newton_schulz_equals_scalar_map_on_singular_values(rows: int, cols: int) -> None:
    # NS is a polynomial in G Gᵀ times G, so it keeps singular vectors and maps each σ/‖G‖_F by quintic5
    k = min(rows, cols)
    s = torch.linspace(0.05, 3.0, k, dtype=torch.float64)
    G, U, V = matrix_with_singular_values(s, rows, cols, seed=rows * 100 + cols)
    s_rel = s / torch.linalg.norm(s)
    expected = U @ torch.diag(torch.tensor([quintic5(float(x)) for x in s_rel], dtype=torch.float64)) @ V.T
    out = newton_schulz(G, dtype=torch.float64, eps=0.0)
    assert out.shape == G.shape and out.dtype == torch.float64
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)


def test_quintic_band() -> None:
    # the band the docstring claims: σ_rel >= 0.01 -> [0.68, 1.14]; >= 0.003 -> [0.68, 1.21]
    xs = torch.linspace(0.003, 1.0, 100_001, dtype=torch.float64).tolist()
    ys = [quintic5(x) for x in xs]
    assert 0.68 < min(ys) < 0.685 and 1.20 < max(ys) < 1.21
    ys01 = [quintic5(x) for x in xs if x >= 0.01]
    assert 0.68 < min(ys01) and max(ys01) < 1.14
    assert quintic5(1e-4) < 0.05  # tiny directions are not amplified into the band in 5 steps


@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (96, 384)])
def test_newton_schulz_singular_value_band_random(shape: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(0)
    G = torch.randn(*shape, generator=g)
    # the relative singular values of these Gaussian matrices are all >= 0.05, so the output band is
    # that of the scalar map: [0.68, 1.14] (float32 adds ~1e-5)
    s_in = torch.linalg.svdvals(G.double()) / torch.linalg.norm(G.double())
    assert s_in.min() > 0.01
    out = newton_schulz(G, dtype=torch.float32)
    assert out.dtype == torch.float32
    s = torch.linalg.svdvals(out.double())
    assert s.min() > 0.67 and s.max() < 1.15, (s.min().item(), s.max().item())
    # and every σ lands where the scalar map sends it
    expected = torch.tensor(sorted((quintic5(float(x)) for x in s_in), reverse=True), dtype=torch.float64)
    torch.testing.assert_close(torch.sort(s, descending=True).values, expected, rtol=0, atol=1e-4)


def test_newton_schulz_bf16_band() -> None:
    G = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    out = newton_schulz(G, dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    s = torch.linalg.svdvals(out.double())
    assert s.min() > 0.6 and s.max() < 1.25


def test_newton_schulz_transpose_symmetry() -> None:
    G = torch.randn(20, 50, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.testing.assert_close(newton_schulz(G.T, dtype=torch.float64), newton_schulz(G, dtype=torch.float64).T)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_newton_schulz_cuda_bf16_matches_cpu() -> None:
    G = torch.randn(128, 512, generator=torch.Generator().manual_seed(3))
    out = newton_schulz(G.cuda())
    assert out.dtype == torch.bfloat16  # bf16 on CUDA by default
    s = torch.linalg.svdvals(out.double().cpu())
    assert s.min() > 0.6 and s.max() < 1.25
    ref = newton_schulz(G)
    assert (out.float().cpu() - ref).abs().max() < 0.05


# ------------------------------------------------------------------------------------------ Lion
def test_lion_hand_computed_steps() -> None:
    p = nn.Parameter(torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64))
    opt = Lion([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)
    p.grad = torch.tensor([0.5, -1.0, 0.0, 0.0], dtype=torch.float64)
    opt.step()
    # c = 0.1·g -> sign [1, -1, 0, 0]; θ = 0.95·θ - 0.1·sign; m = 0.01·g
    torch.testing.assert_close(p.data, torch.tensor([0.85, -1.8, 0.475, 0.0], dtype=torch.float64))
    torch.testing.assert_close(opt.state[p]["exp_avg"], torch.tensor([0.005, -0.01, 0.0, 0.0], dtype=torch.float64))
    p.grad = torch.tensor([-1.0, 0.2, 0.3, 0.0], dtype=torch.float64)
    opt.step()
    # c = 0.9·m + 0.1·g = [-0.0955, 0.011, 0.03, 0] -> sign [-1, 1, 1, 0]
    torch.testing.assert_close(p.data, torch.tensor([0.9075, -1.81, 0.35125, 0.0], dtype=torch.float64))
    # m = 0.99·m + 0.01·g
    torch.testing.assert_close(
        opt.state[p]["exp_avg"], torch.tensor([-0.00505, -0.0079, 0.003, 0.0], dtype=torch.float64)
    )


def test_muon_rejects_non_matrices() -> None:
    with pytest.raises(ValueError, match="2-D"):
        Muon([nn.Parameter(torch.zeros(4))])


# ------------------------------------------------------------------------------------------ fake model
class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.attn_q = nn.Linear(d, d, bias=False)  # square
        self.mlp_up = nn.Linear(d, 4 * d, bias=False)  # weight (4d, d): tall, Muon scale 2
        self.mlp_down = nn.Linear(4 * d, d, bias=False)  # weight (d, 4d): wide, scale 1
        self.norm = nn.Parameter(torch.ones(d))
        self.mhc_pre = nn.Linear(d, 4, bias=False)  # 2-D but mHC -> Lion
        self.mhc_alpha = nn.Parameter(torch.zeros(24))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x * self.norm
        h = h + self.attn_q(h)
        h = h + self.mlp_down(torch.relu(self.mlp_up(h)))
        gate = torch.sigmoid(self.mhc_pre(h)).mean(-1, keepdim=True) + self.mhc_alpha.softmax(0)[0]
        return h * gate


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 16, d: int = 8, n_layer: int = 2) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([Block(d) for _ in range(n_layer)])
        self.norm_f = nn.Parameter(torch.ones(d))
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx)
        for b in self.blocks:
            x = b(x)
        return self.lm_head(x * self.norm_f)


def lm_loss(model: nn.Module, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    idx = torch.randint(0, 16, (4, 6), generator=g)
    tgt = torch.randint(0, 16, (4, 6), generator=g)
    return nn.functional.cross_entropy(model(idx).reshape(-1, 16), tgt.reshape(-1))


def make_model(seed: int = 0) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM()


# ------------------------------------------------------------------------------------------ the rule
def test_split_params_rule() -> None:
    model = make_model()
    muon, lion = split_params(model)
    names = {id(p): n for n, p in model.named_parameters()}
    muon_names = sorted(names[id(p)] for p in muon)
    lion_names = sorted(names[id(p)] for p in lion)
    assert muon_names == sorted(f"blocks.{i}.{m}.weight" for i in range(2) for m in ("attn_q", "mlp_up", "mlp_down"))
    assert lion_names == sorted(
        ["wte.weight", "norm_f", "lm_head.weight"]
        + [f"blocks.{i}.{m}" for i in range(2) for m in ("norm", "mhc_pre.weight", "mhc_alpha")]
    )


def test_rule_sees_through_wrappers() -> None:
    class Wrapper(nn.Module):
        def __init__(self, m: nn.Module) -> None:
            super().__init__()
            self.module = m

    wrapped = Wrapper(make_model())
    name = "module.blocks.0.attn_q.weight"
    assert canonical_name("_orig_mod.module.blocks.0.x") == "blocks.0.x"
    assert is_muon_param(name, dict(wrapped.named_parameters())[name])
    assert len(split_params(wrapped)[0]) == 6
    assert not is_muon_param("blocks.0.norm", torch.zeros(8))
    assert not is_muon_param("wte.weight", torch.zeros(16, 8))
    assert not is_muon_param("blocks.0.mhc.h_res", torch.zeros(4, 4))
    assert not is_muon_param("blocks.0.conv", torch.zeros(4, 4, 3))


def test_frozen_params_are_left_out() -> None:
    model = make_model()
    model.wte.weight.requires_grad_(False)
    _, lion = split_params(model)
    assert all(p is not model.wte.weight for p in lion)


# ------------------------------------------------------------------------------------------ reference step
def reference_newton_schulz(G: torch.Tensor) -> torch.Tensor:
    X = G.float()
    transpose = X.shape[0] > X.shape[1]
    if transpose:
        X = X.T
    X = X / (torch.linalg.norm(X) + 1e-7)
    for _ in range(5):
        XXt = X @ X.T
        X = A * X + (B * XXt + C * XXt @ XXt) @ X
    return X.T if transpose else X


def reference_training(model: TinyLM, steps: int, mults: list[float], muon_lr: float, lion_lr: float, wd: float,
                       lion_wd: float) -> None:  # fmt: skip
    """Muon + Lion written out plainly, parameter by parameter, from the formulas in DESIGN.md §3."""
    mom: dict[str, torch.Tensor] = {}
    for step in range(steps):
        model.zero_grad()
        lm_loss(model, step).backward()
        with torch.no_grad():
            for name, p in model.named_parameters():
                g = p.grad
                if p.ndim == 2 and name.startswith("blocks.") and "mhc" not in name:
                    lr = muon_lr * mults[step]
                    m = mom.get(name, torch.zeros_like(p))
                    m = 0.95 * m + g
                    mom[name] = m
                    o = reference_newton_schulz(g + 0.95 * m)
                    scale = math.sqrt(max(1.0, p.shape[0] / p.shape[1]))
                    p.copy_(p * (1 - lr * wd) - lr * scale * o)
                else:
                    lr = lion_lr * mults[step]
                    lam = lion_wd if (p.ndim >= 2 and "mhc" not in name) else 0.0
                    m = mom.get(name, torch.zeros_like(p))
                    c = 0.9 * m + 0.1 * g
                    p.copy_(p - lr * (torch.sign(c) + lam * p))
                    mom[name] = 0.99 * m + 0.01 * g


def run_ours(model: TinyLM, opt: Optimizers, steps: range, mults: list[float]) -> None:
    for step in steps:
        opt.zero_grad()
        lm_loss(model, step).backward()
        opt.set_lr_multiplier(mults[step])
        opt.step()


def test_muon_lion_step_matches_reference() -> None:
    steps = 4
    mults = [wsd(s, steps, 2, 0.5, 0.1) for s in range(steps)]
    ours, ref = make_model(), make_model()
    opt = build_optimizers(
        ours, muon_lr=0.05, lion_lr=0.01, weight_decay=0.1, lion_weight_decay=0.2, ns_dtype=torch.float32
    )
    assert set(opt.optimizers) == {"muon", "lion"}
    run_ours(ours, opt, range(steps), mults)
    reference_training(ref, steps, mults, muon_lr=0.05, lion_lr=0.01, wd=0.1, lion_wd=0.2)
    start = make_model()
    for (name, p), q, p0 in zip(ours.named_parameters(), ref.parameters(), start.parameters(), strict=True):
        assert not torch.equal(p, p0), f"{name} did not move"
        torch.testing.assert_close(p, q, rtol=0, atol=2e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_lr_multiplier_and_initial_lr() -> None:
    opt = build_optimizers(make_model(), muon_lr=0.02, lion_lr=1e-3, weight_decay=0.1)
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"muon", "lion_decay", "lion_no_decay"}
    assert groups["lion_no_decay"]["weight_decay"] == 0.0 and groups["lion_decay"]["weight_decay"] == 0.1
    opt.set_lr_multiplier(0.25)
    assert groups["muon"]["lr"] == pytest.approx(0.005) and groups["muon"]["initial_lr"] == 0.02
    assert groups["lion_decay"]["lr"] == pytest.approx(2.5e-4)
    assert opt.lrs()["muon/muon"] == pytest.approx(0.005)


# ------------------------------------------------------------------------------------------ state dicts
def test_state_dict_round_trip_gives_identical_steps() -> None:
    mults = [1.0] * 6
    model = make_model()
    opt = build_optimizers(model, muon_lr=0.05, lion_lr=0.01, weight_decay=0.1)
    run_ours(model, opt, range(2), mults)
    saved_model = copy.deepcopy(model.state_dict())
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)  # must survive serialisation, not just a Python reference
    run_ours(model, opt, range(2, 5), mults)

    resumed = make_model(seed=123)  # different init: everything must come from the saved state
    resumed.load_state_dict(saved_model)
    opt2 = build_optimizers(resumed, muon_lr=0.05, lion_lr=0.01, weight_decay=0.1)
    buf.seek(0)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    run_ours(resumed, opt2, range(2, 5), mults)
    for (name, p), q in zip(model.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_load_state_dict_rejects_other_optimizers() -> None:
    opt = build_optimizers(make_model())
    with pytest.raises(ValueError):
        opt.load_state_dict({"muon": opt["muon"].state_dict()})


def test_no_muon_params_gives_lion_only() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    opt = build_optimizers(model)
    assert list(opt.optimizers) == ["lion"]


# ------------------------------------------------------------------------------------------ WSD
def test_wsd_boundaries() -> None:
    f = lambda s: wsd(s, total_steps=100, warmup_steps=10, decay_frac=0.2, min_lr_frac=0.1)
    assert f(0) == pytest.approx(0.1)  # first warmup step: 1/warmup
    assert f(4) == pytest.approx(0.5)
    assert f(9) == 1.0  # end of warmup
    assert f(10) == 1.0 and f(50) == 1.0 and f(79) == 1.0
    assert f(80) == 1.0  # start of decay
    assert f(81) == pytest.approx(1 - 0.9 / 20)
    assert f(90) == pytest.approx(0.55)
    assert f(99) == pytest.approx(1 - 0.9 * 19 / 20)  # last step: still above the floor
    assert f(100) == pytest.approx(0.1)  # end of decay
    assert f(150) == pytest.approx(0.1)
    values = [f(s) for s in range(101)]
    assert all(b >= a for a, b in zip(values[:10], values[1:11], strict=True))
    assert all(b <= a for a, b in zip(values[80:], values[81:], strict=False))


def test_wsd_edge_cases() -> None:
    assert wsd(0, 10, 0, 0.0) == 1.0  # no warmup, no decay
    assert wsd(9, 10, 0, 0.0) == 1.0
    assert wsd(10, 10, 0, 1.0) == 0.0  # all decay, min 0
    assert wsd(0, 10, 0, 1.0) == 1.0
    assert wsd(6, 10, 8, 0.5) == pytest.approx(min(7 / 8, 1 - 1 / 5))  # overlap: the smaller applies
    with pytest.raises(ValueError):
        wsd(0, 0, 0, 0.1)
    with pytest.raises(ValueError):
        wsd(0, 10, 0, 1.5)


# ------------------------------------------------------------------------------------------ AdamW (ablation)
def test_adamw_hidden_matches_reference() -> None:
    """``hidden="adamw"``: the Muon-rule matrices go to AdamW (same lr-scaled decoupled decay), the rest to Lion;
    steps equal torch's own for-loop AdamW plus our Lion built by hand on the same split."""
    steps = 4
    mults = [wsd(s, steps, 2, 0.5, 0.1) for s in range(steps)]
    ours, ref = make_model(), make_model()
    opt = build_optimizers(ours, lion_lr=0.01, weight_decay=0.1, hidden="adamw", adamw_lr=0.02)
    assert set(opt.optimizers) == {"adamw", "lion"}
    hidden, rest = split_params(ours)
    assert [id(p) for p in opt["adamw"].param_groups[0]["params"]] == [id(p) for p in hidden]
    ref_hidden, ref_rest = split_params(ref)
    ref_2d = [p for n, p in ref.named_parameters() if p.ndim >= 2 and "mhc" not in n and not is_muon_param(n, p)]
    ref_other = [p for p in ref_rest if all(p is not q for q in ref_2d)]
    ref_opts = [
        torch.optim.AdamW(ref_hidden, lr=0.02, betas=(0.9, 0.95), weight_decay=0.1, foreach=False),
        Lion([{"params": ref_2d, "weight_decay": 0.1}, {"params": ref_other, "weight_decay": 0.0}], lr=0.01),
    ]
    for o in ref_opts:
        for g in o.param_groups:
            g["initial_lr"] = g["lr"]
    run_ours(ours, opt, range(steps), mults)
    for step in range(steps):
        for o in ref_opts:
            o.zero_grad()
        lm_loss(ref, step).backward()
        for o in ref_opts:
            for g in o.param_groups:
                g["lr"] = g["initial_lr"] * mults[step]
            o.step()
    start = make_model()
    for (name, p), q, p0 in zip(ours.named_parameters(), ref.parameters(), start.parameters(), strict=True):
        assert not torch.equal(p, p0), f"{name} did not move"
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_adamw_and_muon_differ_and_bad_name_is_refused() -> None:
    a, m = make_model(), make_model()
    run_ours(a, build_optimizers(a, hidden="adamw"), range(2), [1.0, 1.0])
    run_ours(m, build_optimizers(m), range(2), [1.0, 1.0])
    assert not torch.equal(a.blocks[0].attn_q.weight, m.blocks[0].attn_q.weight)
    with pytest.raises(ValueError, match="adamw"):
        build_optimizers(make_model(), hidden="sgd")

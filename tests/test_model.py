"""Model tests: quantizers and the STE, mHC residual streams, the GPT forward/backward, configs, the Rust eval path.

References are independent of the code under test where it matters: numpy quantizers, an itertools-built
Birkhoff mixture, a numpy Sinkhorn, complex-number RoPE, and a per-token loop for the stream update.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nanochat.model import (
    GPT,
    BitLinear,
    Block,
    ConfigError,
    GPTConfig,
    StreamResidual,
    apply_rope,
    config_path,
    load_config,
    rope_cos_sin,
    torch_path_only,
)
from nanochat.model.config import CONFIG_NAMES, TRAIN_KEYS

REPO = Path(__file__).resolve().parents[1]
RESIDUALS = ("standard", "mhc_lite", "mhc")

# small enough to run everything in a few seconds on 2 cores
SMALL = dict(vocab_size=64, seq_len=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=256, mlp_hidden=256)


def small_cfg(**kw: object) -> GPTConfig:
    return GPTConfig(**{**SMALL, **kw})  # type: ignore[arg-type]


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every BitLinear a random weight (init zeroes o_proj/down_proj, which would hide the sublayers)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BitLinear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / math.sqrt(m.in_features))


def np_absmean(w: np.ndarray) -> tuple[np.ndarray, float]:
    s = max(float(np.abs(w).mean()), 1e-5)
    return np.clip(np.round(w / s), -1, 1), s


def np_acts_int8(x: np.ndarray) -> np.ndarray:
    amax = np.maximum(np.abs(x).max(-1, keepdims=True), 1e-5)
    return np.clip(np.round(x * (127.0 / amax)), -128, 127) * (amax / 127.0)


# ----------------------------------------------------------------------------- BitLinear


def test_weight_quantizer_trits_and_scale() -> None:
    torch.manual_seed(0)
    lin = BitLinear(256, 64)
    torch.nn.init.normal_(lin.weight, std=0.05)
    packed, scale = lin.packed_weight()
    from nanochat import ops

    trits = ops.unpack_ternary(packed)
    assert set(trits.unique().tolist()) <= {-1.0, 0.0, 1.0}
    ref_trits, ref_s = np_absmean(lin.weight.detach().double().numpy())
    assert scale.item() == pytest.approx(ref_s, rel=1e-6)
    assert scale.item() == pytest.approx(lin.weight.detach().abs().mean().item(), rel=1e-6)
    np.testing.assert_array_equal(trits.numpy(), ref_trits)
    # the training path uses the same values: fake-quant weight = trits · scale
    from nanochat.model import fake_quant_weight

    np.testing.assert_allclose(fake_quant_weight(lin.weight).detach().numpy(), ref_trits * ref_s, rtol=1e-6, atol=1e-7)


def test_activation_quantizer_matches_numpy() -> None:
    from nanochat.model import fake_quant_acts

    x = torch.randn(5, 7, 256) * torch.logspace(-3, 2, 7)[None, :, None]
    got = fake_quant_acts(x).numpy()
    np.testing.assert_allclose(got, np_acts_int8(x.numpy().astype(np.float64)), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("in_features", [256, 96])
def test_ste_gradients_equal_fp_linear_on_quantized_values(in_features: int) -> None:
    torch.manual_seed(1)
    lin = BitLinear(in_features, 48)
    torch.nn.init.normal_(lin.weight, std=0.1)
    x = torch.randn(3, 5, in_features, requires_grad=True)
    g = torch.randn(3, 5, 48)
    (lin(x) * g).sum().backward()
    # reference: an fp linear whose inputs *are* the quantized values (leaves), built with numpy quantizers
    trits, s = np_absmean(lin.weight.detach().double().numpy())
    wq = torch.tensor(trits * s, dtype=torch.float32, requires_grad=True)
    xq = torch.tensor(np_acts_int8(x.detach().double().numpy()), dtype=torch.float32, requires_grad=True)
    y_ref = F.linear(xq, wq)
    (y_ref * g).sum().backward()
    torch.testing.assert_close(lin(x), y_ref, rtol=1e-5, atol=1e-5)
    assert lin.weight.grad is not None and x.grad is not None
    torch.testing.assert_close(lin.weight.grad, wq.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, xq.grad, rtol=1e-5, atol=1e-5)


def test_fp_bitlinear_is_plain_linear() -> None:
    lin = BitLinear(96, 32, quant="fp")
    torch.nn.init.normal_(lin.weight)
    x = torch.randn(4, 96)
    torch.testing.assert_close(lin(x), x @ lin.weight.detach().t())


def test_bitlinear_rust_path_equals_torch_path_and_cache_invalidates() -> None:
    torch.manual_seed(2)
    lin = BitLinear(512, 128).eval()
    torch.nn.init.normal_(lin.weight, std=0.02)
    x = torch.randn(2, 9, 512)
    with torch.no_grad():
        fast = lin(x)
        assert lin._packed is not None, "eval + no_grad on CPU should use the packed Rust kernel"
        with torch_path_only():
            slow = lin(x)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)
    # an in-place update (what an optimizer step does) must invalidate the packed cache
    with torch.no_grad():
        lin.weight.mul_(-1.0).add_(0.01)
        fast2 = lin(x)
        with torch_path_only():
            slow2 = lin(x)
    torch.testing.assert_close(fast2, slow2, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(fast, fast2)
    # grad wanted -> torch path even in eval mode (the kernel has no backward)
    xg = x.clone().requires_grad_()
    lin(xg).sum().backward()
    assert xg.grad is not None


# ----------------------------------------------------------------------------- mHC


def random_residual(kind: str, n: int = 4, C: int = 32, seed: int = 0, scale: float = 1.0) -> StreamResidual:
    torch.manual_seed(seed)
    m = StreamResidual(C, n, kind, home=1)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, scale)
        m.proj.div_(math.sqrt(n * C))  # dynamic logits of the same O(scale) spread as the static ones
    return m


def test_mhc_lite_hres_exactly_doubly_stochastic() -> None:
    m = random_residual("mhc_lite", scale=2.0)
    x = torch.randn(3, 11, 4, 32) * 5
    _, _, h = m.mappings(x)  # (3, 11, 4, 4)
    assert h.shape == (3, 11, 4, 4)
    assert (h >= 0).all()
    torch.testing.assert_close(h.sum(-1), torch.ones(3, 11, 4), atol=1e-6, rtol=0)
    torch.testing.assert_close(h.sum(-2), torch.ones(3, 11, 4), atol=1e-6, rtol=0)


def test_mhc_lite_hres_is_the_birkhoff_mixture() -> None:
    """Independent construction: Σ_k softmax(a)_k P_k with P_k built from itertools permutations."""
    m = random_residual("mhc_lite", n=3, C=16)
    a = m.res_logits.detach().double()
    w = torch.softmax(a, 0).numpy()
    ref = np.zeros((3, 3))
    for wk, perm in zip(w, itertools.permutations(range(3)), strict=True):
        ref[np.arange(3), list(perm)] += wk
    np.testing.assert_allclose(m.static_h_res().numpy(), ref, atol=1e-6)


def np_sinkhorn(logits: np.ndarray, iters: int) -> np.ndarray:
    p = np.exp(logits - logits.max())
    for _ in range(iters):
        p = p / p.sum(-1, keepdims=True)
        p = p / p.sum(-2, keepdims=True)
    return p


def test_mhc_sinkhorn_hres_doubly_stochastic_within_tolerance() -> None:
    m = random_residual("mhc", scale=0.5)
    x = torch.randn(3, 11, 4, 32)
    _, _, h = m.mappings(x)
    assert (h >= 0).all()
    # 20 Sinkhorn iterations from logits of O(1) spread: converged to ~1e-4 (the last step normalises columns)
    torch.testing.assert_close(h.sum(-1), torch.ones(3, 11, 4), atol=1e-3, rtol=0)
    torch.testing.assert_close(h.sum(-2), torch.ones(3, 11, 4), atol=1e-3, rtol=0)
    ref = np_sinkhorn(m.res_logits.detach().double().view(4, 4).numpy(), 200)  # the converged projection
    np.testing.assert_allclose(m.static_h_res().numpy(), ref, atol=1e-3)


@pytest.mark.parametrize("kind", ["mhc_lite", "mhc"])
def test_stream_update_matches_per_token_formula(kind: str) -> None:
    """x_next = H_res·x + H_postᵀ·F(H_pre·x), checked token by token with H_* recomputed from the definition."""
    n, C = 4, 32
    m = random_residual(kind, n=n, C=C, scale=0.3, seed=3)
    x = torch.randn(2, 3, n, C)
    lin = torch.randn(C, C) / math.sqrt(C)
    f = lambda u: torch.tanh(u @ lin)  # noqa: E731
    out = m(x, f).detach()
    _check_stream_update(m, kind, x, f, out)


@pytest.mark.parametrize("kind", ["mhc_lite", "mhc"])
def test_stream_update_compiled_matches_formula_and_eager_gradients(kind: str) -> None:
    """Under torch.compile the read-in and the update are written elementwise (so inductor fuses them): the same
    per-token formula, the same gradients as the eager batched-matmul form, and one graph (``fullgraph``: no call
    into the Rust core or other graph break at any connection)."""
    n, C = 4, 32
    m = random_residual(kind, n=n, C=C, scale=0.3, seed=3)
    x = torch.randn(2, 3, n, C, requires_grad=True)
    lin = torch.randn(C, C) / math.sqrt(C)
    f = lambda u: torch.tanh(u @ lin)  # noqa: E731
    torch._dynamo.reset()
    out_c = torch.compile(m, fullgraph=True)(x, f)
    _check_stream_update(m, kind, x.detach(), f, out_c.detach())
    g = torch.randn_like(out_c)
    wrt = [x, *m.parameters()]
    grads_c = torch.autograd.grad(out_c, wrt, g)
    grads_e = torch.autograd.grad(m(x, f), wrt, g)
    for gc, ge in zip(grads_c, grads_e, strict=True):
        torch.testing.assert_close(gc, ge, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def _check_stream_update(
    m: StreamResidual, kind: str, x: torch.Tensor, f: Callable[[torch.Tensor], torch.Tensor], out: torch.Tensor
) -> None:
    n = m.n
    P = m.proj.double()
    a = m.alpha.double()
    for b, t in itertools.product(range(x.shape[0]), range(x.shape[1])):
        xt = x[b, t].double()  # (n, C)
        flat = xt.reshape(-1)
        d = (P @ flat) / flat.pow(2).mean().add(m.eps).sqrt()
        pre = torch.sigmoid(m.pre_bias.double() + a[0] * d[:n])
        post = 2 * torch.sigmoid(m.post_bias.double() + a[1] * d[n : 2 * n])
        logits = m.res_logits.double() + a[2] * d[2 * n :]
        if kind == "mhc_lite":
            w = torch.softmax(logits, 0)
            h = torch.zeros(n, n, dtype=torch.float64)
            for wk, perm in zip(w, itertools.permutations(range(n)), strict=True):
                h[torch.arange(n), list(perm)] += wk
        else:
            h = torch.tensor(np_sinkhorn(logits.view(n, n).numpy(), m.iters))
        y = f((pre @ xt).float()).double()
        ref = h @ xt + post[:, None] * y[None, :]
        torch.testing.assert_close(out[b, t].double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["mhc_lite", "mhc"])
def test_block_at_init_equals_standard_residual(kind: str) -> None:
    """With identical streams (how the model starts) an mHC block runs x + F(norm(x)) on every stream."""
    torch.manual_seed(4)
    std_blk = Block(small_cfg(residual="standard"), layer=1)
    mhc_blk = Block(small_cfg(residual=kind), layer=1)
    for blk in (std_blk, mhc_blk):
        for mod in blk.modules():
            if hasattr(mod, "reset_parameters") and not isinstance(mod, BitLinear):
                mod.reset_parameters()
    randomize(std_blk)
    missing, unexpected = mhc_blk.load_state_dict(std_blk.state_dict(), strict=False)
    assert not unexpected and all("mhc" in k for k in missing)
    x = torch.randn(2, 10, 256)
    cos, sin = rope_cos_sin(10, 64, 10000.0, x.device)
    ref = std_blk(x, cos, sin)
    out = mhc_blk(x.unsqueeze(-2).expand(2, 10, 4, 256), cos, sin)
    assert (ref - x).abs().max() > 0.1  # the sublayers contribute (not a trivially-identity comparison)
    for i in range(4):
        torch.testing.assert_close(out[:, :, i], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["mhc_lite", "mhc"])
def test_model_at_init_equals_standard_model(kind: str) -> None:
    torch.manual_seed(5)
    std = GPT(small_cfg(residual="standard"))
    randomize(std)
    mhc = GPT(small_cfg(residual=kind))
    mhc.load_state_dict(std.state_dict(), strict=False)
    idx = torch.randint(0, 64, (2, 12))
    with torch.no_grad(), torch_path_only():
        a, b = mhc(idx), std(idx)
    if kind == "mhc_lite":  # exactly doubly stochastic: the same numbers
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    else:  # Sinkhorn rows sum to 1 only to ~1e-7; such differences can flip an int8 activation rounding step
        assert ((a - b).norm() / b.norm()).item() < 1e-2


def test_hres_matrices_and_diagnostics() -> None:
    torch.manual_seed(6)
    model = GPT(small_cfg(residual="mhc_lite"))
    static = model.hres_matrices()
    assert list(static) == ["blocks.0.mhc_attn", "blocks.0.mhc_mlp", "blocks.1.mhc_attn", "blocks.1.mhc_mlp"]
    for h in static.values():
        assert h.shape == (4, 4)
        assert torch.diagonal(h).min() > 0.9  # identity-dominant at init
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "mhc" in name:
                p.normal_(0.0, 1.0)
    idx = torch.randint(0, 64, (2, 8))
    batch = model.hres_matrices(idx)
    assert list(batch) == list(static)
    d = model.mhc_diagnostics(idx, per_sublayer=True)
    assert d["max_row_sum_err"] < 1e-6 and d["max_col_sum_err"] < 1e-6
    assert d["blocks.1.mhc_mlp.row_sum_err"] <= d["max_row_sum_err"]
    # independent composite: the product in forward order; its Amax gains are 1 for doubly stochastic factors
    comp = torch.eye(4, dtype=torch.float64)
    for h in batch.values():
        comp = h.double() @ comp
    assert d["composite_gain"] == pytest.approx(comp.abs().sum(-1).max().item(), abs=1e-9)
    assert d["composite_col_gain"] == pytest.approx(comp.abs().sum(-2).max().item(), abs=1e-9)
    assert d["composite_identity"] == pytest.approx(comp.diagonal().mean().item(), abs=1e-9)
    assert d["composite_gain"] == pytest.approx(1.0, abs=1e-5)
    assert d["composite_col_gain"] == pytest.approx(1.0, abs=1e-5)
    assert set(model.mhc_diagnostics()) == {
        "max_row_sum_err",
        "max_col_sum_err",
        "composite_gain",
        "composite_col_gain",
        "composite_identity",
        "min_identity",
    }
    assert GPT(small_cfg(residual="standard")).mhc_diagnostics() == {}


# ----------------------------------------------------------------------------- attention pieces


def test_rope_matches_complex_rotation_neox_pairs() -> None:
    hd, T, offset = 16, 7, 5
    x = torch.randn(2, T, 3, hd, dtype=torch.float64)
    cos, sin = rope_cos_sin(T, hd, 10000.0, x.device, offset=offset)
    got = apply_rope(x, cos.double(), sin.double()).numpy()
    xn = x.numpy()
    z = xn[..., : hd // 2] + 1j * xn[..., hd // 2 :]  # pair (i, i + hd/2) as one complex number
    freqs = 10000.0 ** (-np.arange(0, hd, 2) / hd)
    angle = np.arange(offset, offset + T)[:, None] * freqs[None, :]  # (T, hd/2)
    zr = z * np.exp(1j * angle)[None, :, None, :]
    np.testing.assert_allclose(got, np.concatenate([zr.real, zr.imag], -1), atol=1e-5)


def test_model_rope_table_equals_direct_computation() -> None:
    """GPT.rope slices a table: bit-identical to rope_cos_sin at any offset, past the table's end (it grows), and
    on a model built on the meta device and materialised (the table is built at the first eager use)."""
    cfg = small_cfg()
    cpu = torch.device("cpu")
    with torch.device("meta"):
        lazy = GPT(cfg)
    lazy.to_empty(device=cpu)
    for model in (GPT(cfg), lazy):
        for T, offset in [(64, 0), (10, 5), (1, 63), (8, 100), (300, 0), (3, 299)]:
            cos, sin = model.rope(T, cpu, offset)
            ref_cos, ref_sin = rope_cos_sin(T, cfg.head_dim, cfg.rope_theta, cpu, offset)
            assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin), (T, offset)


def test_compiled_forward_has_no_trig() -> None:
    """Under torch.compile the RoPE angles come from the table, not from cos/sin in the graph (which inductor would
    recompute for every element of q and k in the fused kernels)."""
    seen: list[str] = []

    def capture(gm: torch.fx.GraphModule, inputs: list[torch.Tensor]) -> Callable[..., object]:
        seen.extend(str(n.target) for n in gm.graph.nodes)
        return gm.forward

    torch.manual_seed(0)
    model = GPT(small_cfg())
    torch._dynamo.reset()
    idx = torch.randint(0, 64, (2, 16))
    torch.compile(model, backend=capture, fullgraph=True)(idx, idx)
    assert seen and any("linear" in t for t in seen)
    assert not [t for t in seen if t.split(".")[-1] in ("cos", "sin")]


def test_attention_is_causal() -> None:
    torch.manual_seed(7)
    model = GPT(small_cfg(residual="mhc_lite"))
    randomize(model)
    idx = torch.randint(0, 64, (1, 16))
    idx2 = idx.clone()
    idx2[0, 10:] = (idx2[0, 10:] + 1) % 64
    with torch.no_grad(), torch_path_only():
        a, b = model(idx), model(idx2)
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_gqa_equals_mha_with_repeated_kv_heads() -> None:
    torch.manual_seed(8)
    gqa = GPT(small_cfg(n_kv_head=2, residual="standard"))
    randomize(gqa)
    mha = GPT(small_cfg(n_kv_head=4, residual="standard"))
    sd = gqa.state_dict()
    for k in list(sd):
        if k.endswith(("k_proj.weight", "v_proj.weight")):
            sd[k] = sd[k].view(2, 64, 256).repeat_interleave(2, dim=0).reshape(256, 256)
    mha.load_state_dict(sd)
    idx = torch.randint(0, 64, (2, 9))
    with torch.no_grad(), torch_path_only():
        torch.testing.assert_close(gqa(idx), mha(idx), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- full model


@pytest.mark.parametrize("residual", RESIDUALS)
@pytest.mark.parametrize("name", ["tiny_cpu", "d20"])
def test_config_forward_backward(name: str, residual: str) -> None:
    torch.manual_seed(9)
    cfg, _ = load_config(name)
    model = GPT(cfg.replace(residual=residual))
    B, T = 2, 16
    idx = torch.randint(0, cfg.vocab_size, (B, T))
    targets = torch.randint(0, cfg.vocab_size, (B, T))
    logits, loss = model(idx, targets, return_logits=True)
    assert logits.shape == (B, T, cfg.vocab_size) and logits.dtype == torch.float32
    assert loss.item() == pytest.approx(math.log(cfg.vocab_size), abs=0.5)  # near-uniform at init
    loss.backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, n
        assert torch.isfinite(p.grad).all(), n
    # zero-initialised output projections still learn: the STE gives them a gradient at step 0
    assert model.blocks[0].attn.o_proj.weight.grad.abs().sum() > 0  # type: ignore[union-attr]


def test_loss_ignores_minus_one_targets() -> None:
    torch.manual_seed(10)
    model = GPT(small_cfg())
    randomize(model)
    idx = torch.randint(0, 64, (2, 8))
    targets = torch.randint(0, 64, (2, 8))
    targets[0, :5] = -1
    logits, loss = model(idx, targets, return_logits=True)
    keep = targets != -1
    ref = F.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(loss, ref)


@pytest.mark.parametrize("compiled", [False, True], ids=["function", "compiled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_matches_torch(dtype: torch.dtype, compiled: bool) -> None:
    """The model's loss under torch.compile (its autograd Function, run as is and compiled): value and gradient of
    F.cross_entropy on the float32 logits (-1 ignored), the gradient in the logits' dtype; every target ignored
    gives nan, as torch does."""
    from nanochat.model.gpt import _CrossEntropy

    def cross_entropy(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return _CrossEntropy.apply(x, t)  # type: ignore[no-any-return]

    if compiled:
        torch._dynamo.reset()
        cross_entropy = torch.compile(cross_entropy, fullgraph=True)
    torch.manual_seed(11)
    logits = (torch.randn(40, 300) * 4).to(dtype).requires_grad_()
    targets = torch.randint(0, 300, (40,))
    targets[::6] = -1
    loss = cross_entropy(logits, targets)
    (grad,) = torch.autograd.grad(loss * 2.5, logits)
    ref_in = logits.detach().float().requires_grad_()
    ref = F.cross_entropy(ref_in, targets, ignore_index=-1)
    (ref_grad,) = torch.autograd.grad(ref * 2.5, ref_in)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    tol = 1e-6 if dtype == torch.float32 else 4e-3  # bf16: the gradient's own rounding
    torch.testing.assert_close(grad.float(), ref_grad.to(dtype).float(), rtol=tol, atol=tol * 0.1)
    assert grad[::6].abs().max() == 0  # ignored rows get no gradient
    assert torch.isnan(cross_entropy(logits, torch.full((40,), -1)))


@pytest.mark.slow
def test_nano_125m_forward() -> None:
    cfg, _ = load_config("nano_125m")
    model = GPT(cfg)
    with torch.no_grad():
        logits = model(torch.randint(0, cfg.vocab_size, (1, 4)))
    assert logits.shape == (1, 4, cfg.vocab_size) and torch.isfinite(logits).all()


def expected_params(cfg: GPTConfig) -> int:
    """Parameter count from the architecture's definition, written out independently of the model code."""
    C, H, hd = cfg.n_embd, cfg.mlp_hidden, cfg.head_dim
    kv = cfg.n_kv_head * hd
    attn = C * C + 2 * C * kv + C * C + C + (2 * hd if cfg.qk_norm else 0)  # q, k, v, o, sub_norm, qk norms
    mlp = (3 if cfg.mlp == "swiglu" else 2) * C * H + H  # projections + sub_norm
    block = attn + mlp + 2 * C  # + attn_norm, mlp_norm
    if cfg.residual != "standard":
        n = cfg.n_streams
        n_res = math.factorial(n) if cfg.residual == "mhc_lite" else n * n
        block += 2 * (n + n + n_res + 3 + (2 * n + n_res) * n * C)  # per connection: biases, alphas, projection
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * C
    return cfg.vocab_size * C + cfg.n_layer * block + C + head


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_param_counts_on_meta(name: str) -> None:
    cfg, _ = load_config(name)
    with torch.device("meta"):
        model = GPT(cfg)
    assert all(p.device.type == "meta" for p in model.parameters())
    counts = model.param_counts()
    assert counts["total"] == expected_params(cfg)
    assert counts["embedding"] == cfg.vocab_size * cfg.n_embd
    assert counts["total"] == counts["embedding"] + counts["non_embedding"]
    lo, hi = {"tiny_cpu": (3.5e6, 4.5e6), "d20": (7e6, 9e6), "nano_125m": (115e6, 135e6), "nano_1b": (0.95e9, 1.1e9)}[
        name
    ]
    assert lo <= counts["total"] <= hi


def test_untied_head_counts_and_meta_then_materialise() -> None:
    cfg = small_cfg(tie_embeddings=False, mlp="relu2", residual="mhc")
    with torch.device("meta"):
        model = GPT(cfg)
    assert model.param_counts()["total"] == expected_params(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    loss = model(torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8)))
    assert torch.isfinite(loss)


def test_eval_rust_path_equals_torch_path() -> None:
    """model.eval() on CPU runs every BitLinear through the Rust kernel; each equals the fake-quant torch math on
    the same input. End to end the two paths agree closely but not bit for bit: a 1-ulp difference can move an
    activation across an int8 rounding boundary, and a random (untrained) network amplifies such flips."""
    from nanochat.model import fake_quant_acts, fake_quant_weight

    torch.manual_seed(11)
    cfg, _ = load_config("tiny_cpu")
    model = GPT(cfg).eval()
    randomize(model)
    idx = torch.randint(0, cfg.vocab_size, (2, 24))
    errs: list[float] = []

    def check(mod: torch.nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        assert isinstance(mod, BitLinear) and mod._packed is not None, "the Rust kernel should have run"
        ref = F.linear(fake_quant_acts(inp[0]), fake_quant_weight(mod.weight))
        errs.append(((out - ref).abs().max() / ref.abs().max()).item())

    hooks = [m.register_forward_hook(check) for m in model.modules() if isinstance(m, BitLinear)]
    with torch.no_grad():
        fast = model(idx)
    for h in hooks:
        h.remove()
    assert len(errs) == 7 * cfg.n_layer and max(errs) < 1e-5
    with torch.no_grad(), torch_path_only():
        slow = model(idx)
    assert (fast - slow).abs().mean() < 0.02 * slow.std()


# ----------------------------------------------------------------------------- overfitting


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny tensors: one thread avoids OpenMP barrier costs on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.slow
@pytest.mark.parametrize("residual", RESIDUALS)
def test_overfits_one_batch(residual: str, one_thread: None) -> None:
    """Memorise 4 random sequences (needs attention: the current token alone does not determine the next)."""
    torch.manual_seed(12)
    model = GPT(small_cfg(residual=residual, n_kv_head=4))
    idx = torch.randint(0, 64, (4, 64))
    targets = torch.roll(idx, -1, dims=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(60):
        loss = model(idx, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] / losses[-1] >= 5.0 and losses[-1] < 0.1, (losses[0], losses[-1])
    if residual != "standard":
        # the streams have stopped being copies: the H_post gates no longer agree across streams
        post = model.blocks[0].mhc_attn.post_bias  # type: ignore[union-attr]
        assert post.detach().std() > 1e-4


# ----------------------------------------------------------------------------- configs


def test_shipped_configs_load_and_repo_copies_match() -> None:
    for name in CONFIG_NAMES:
        cfg, train = load_config(name)
        assert isinstance(cfg, GPTConfig)
        assert set(TRAIN_KEYS) <= set(train), name
        assert train["vocab_size"] == cfg.vocab_size and train["seq_len"] <= cfg.seq_len
        packaged = config_path(name)
        assert packaged.read_bytes() == (REPO / "configs" / f"{name}.toml").read_bytes(), name
        assert load_config(REPO / "configs" / f"{name}.toml")[0] == cfg


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        (dict(n_embd=250, n_head=4), "n_embd"),
        (dict(n_head=4, n_kv_head=3), "n_kv_head"),
        (dict(n_embd=256, n_head=256), "head_dim"),
        (dict(n_streams=0), "n_streams"),
        (dict(mlp_hidden=300), "mlp_hidden"),
        (dict(n_embd=384, n_head=6, n_kv_head=6), "n_embd"),
        (dict(residual="hyper"), "residual"),
        (dict(mlp="gelu"), "mlp"),
        (dict(quant="int4"), "quant"),
        (dict(n_layer=0), "n_layer"),
        (dict(norm_eps=-1.0), "norm_eps"),
        (dict(qk_norm=1), "qk_norm"),
        (dict(vocab_size=True), "vocab_size"),
    ],
)
def test_config_validation_names_the_key(changes: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        GPTConfig(**changes)  # type: ignore[arg-type]


def test_fp_quant_lifts_the_256_rule() -> None:
    cfg = GPTConfig(n_embd=384, n_head=6, n_kv_head=6, mlp_hidden=1000, quant="fp")
    assert GPT(cfg).param_counts()["total"] > 0


def test_unknown_keys_are_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="n_heads"):
        GPTConfig().replace(n_heads=8)
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nn_layer = 2\nn_heads = 8\n[train]\nsteps = 1\n")
    with pytest.raises(ConfigError, match="n_heads"):
        load_config(bad)
    bad.write_text("[model]\nn_layer = 2\n[optim]\nlr = 1\n")
    with pytest.raises(ConfigError, match="optim"):
        load_config(bad)
    bad.write_text("[model]\nseq_len = 128\n[train]\nseq_len = 512\n")
    with pytest.raises(ConfigError, match="seq_len"):
        load_config(bad)
    with pytest.raises(FileNotFoundError, match="tiny_cpu"):
        load_config("no_such_config")


@pytest.mark.parametrize("residual", RESIDUALS)
def test_bf16_autocast_keeps_fp32_residual_streams(residual: str) -> None:
    torch.manual_seed(13)
    model = GPT(small_cfg(residual=residual))
    randomize(model)
    dtypes: list[torch.dtype] = []
    hooks = [b.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype)) for b in model.blocks]
    idx = torch.randint(0, 64, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(idx, idx)
    loss.backward()
    for h in hooks:
        h.remove()
    assert dtypes == [torch.float32] * len(model.blocks)
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)

"""mHC ops: the Rust Sinkhorn op against the torch reference (forward, gradients, gradcheck, opcheck), the
permutation basis against itertools, BvN reconstructions, error paths, diagnostics against numpy, and an fp mHC model
at init against the standard residual model."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from nanochat import _core, ops

SHAPES = [(4, 4), (3, 4, 4), (2, 5, 3, 3), (6, 2, 2), (2, 6, 6), (1, 1), (3, 1, 8, 8)]


def _logits(shape, dtype=torch.float64, scale=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


# ----------------------------------------------------------------------------- Sinkhorn forward


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("iters", [0, 1, 5, 20])
def test_forward_matches_reference_f64(shape, iters):
    x = _logits(shape, seed=iters)
    got = ops.sinkhorn(x, iters)
    want = ops.sinkhorn_reference(x, iters)
    assert got.dtype == torch.float64 and got.shape == x.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_f32_matches_f64_reference(shape):
    x = _logits(shape, torch.float32, seed=1)
    got = ops.sinkhorn(x)
    assert got.dtype == torch.float32
    # Rust computes in f64: closer to the f64 oracle than the f32 torch reference is.
    want = ops.sinkhorn_reference(x.double())
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)
    torch.testing.assert_close(got, ops.sinkhorn_reference(x), rtol=0, atol=1e-5)


def test_default_iters_is_twenty():
    x = _logits((3, 4, 4))
    torch.testing.assert_close(ops.sinkhorn(x), ops.sinkhorn_reference(x, 20), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("n", [2, 3, 4, 6, 8])
def test_rows_and_columns_sum_to_one(n):
    x = _logits((500, n, n), scale=0.5, seed=n)
    p = ops.sinkhorn(x, 20)
    assert (p.sum(-2) - 1).abs().max() < 1e-12  # the last step normalises columns
    assert (p.sum(-1) - 1).abs().max() < 1e-6
    assert (p >= 0).all()


def test_wide_logits_stay_finite_and_match_reference():
    # Spread ≫ 200 takes the log-domain path in Rust; exp() of such logits underflows.
    x = _logits((8, 4, 4), scale=1.0)
    x[:, 0, 1] = -900.0
    x[:, 2, 2] = 400.0
    got = ops.sinkhorn(x, 20)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ops.sinkhorn_reference(x, 20), rtol=1e-10, atol=1e-13)


def test_low_precision_and_non_contiguous_inputs():
    x = _logits((5, 4, 4), seed=3)
    xb = x.to(torch.bfloat16)
    got = ops.sinkhorn(xb)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ops.sinkhorn_reference(xb.float()), rtol=0, atol=1e-2)
    xt = x.transpose(-1, -2)
    assert not xt.is_contiguous()
    torch.testing.assert_close(ops.sinkhorn(xt), ops.sinkhorn_reference(xt), rtol=1e-12, atol=1e-13)


def test_empty_batch():
    x = torch.zeros(0, 4, 4, dtype=torch.float64, requires_grad=True)
    p = ops.sinkhorn(x)
    assert p.shape == (0, 4, 4)
    p.sum().backward()
    assert x.grad is not None and x.grad.shape == (0, 4, 4)


def test_threads_do_not_change_results():
    x = _logits((4096, 4, 4), seed=4).numpy()
    g = _logits((4096, 4, 4), seed=5).numpy()
    np.testing.assert_array_equal(_core.sinkhorn_forward(x, 20, threads=1), _core.sinkhorn_forward(x, 20, threads=2))
    np.testing.assert_array_equal(
        _core.sinkhorn_backward(x, g, 20, threads=1), _core.sinkhorn_backward(x, g, 20, threads=2)
    )


# ----------------------------------------------------------------------------- Sinkhorn backward


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("iters", [0, 1, 20])
def test_grad_matches_autograd_through_reference(shape, iters):
    x = _logits(shape, seed=10 + iters).requires_grad_(True)
    g = _logits(shape, scale=1.0, seed=99)
    (got,) = torch.autograd.grad(ops.sinkhorn(x, iters), x, g)
    (want,) = torch.autograd.grad(ops.sinkhorn_reference(x, iters), x, g)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # The torch backward that other devices use is the same sweep.
    torch.testing.assert_close(ops.sinkhorn_backward_reference(x.detach(), g, iters), want, rtol=1e-10, atol=1e-12)


def test_grad_f32_close_to_f64():
    x = _logits((64, 4, 4), seed=6)
    g = _logits((64, 4, 4), scale=1.0, seed=7)
    x32 = x.float().requires_grad_(True)
    x64 = x.clone().requires_grad_(True)
    (a,) = torch.autograd.grad(ops.sinkhorn(x32), x32, g.float())
    (b,) = torch.autograd.grad(ops.sinkhorn_reference(x64), x64, g)
    assert a.dtype == torch.float32
    torch.testing.assert_close(a.double(), b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("iters", [0, 1, 3, 20])
def test_gradcheck(iters):
    x = _logits((2, 3, 4, 4), scale=1.5, seed=iters).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: ops.sinkhorn(t, iters), (x,))


def test_gradcheck_torch_backward_sweep():
    # The non-CPU backward, checked against finite differences of the reference itself.
    x = _logits((3, 3, 3), seed=8).requires_grad_(True)
    g = _logits((3, 3, 3), scale=1.0, seed=9)
    fd = torch.autograd.functional.vjp(lambda t: ops.sinkhorn_reference(t, 6), x.detach(), g)[1]
    torch.testing.assert_close(ops.sinkhorn_backward_reference(x.detach(), g, 6), fd, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_sinkhorn(dtype, requires_grad):
    x = _logits((3, 4, 4), dtype).requires_grad_(requires_grad)
    torch.library.opcheck(ops.sinkhorn, (x, 20))
    torch.library.opcheck(ops.sinkhorn, (x.detach(), 3))


def test_opcheck_sinkhorn_backward():
    x = _logits((2, 3, 3))
    g = _logits((2, 3, 3), seed=1)
    torch.library.opcheck(ops.sinkhorn_backward, (x, g, 20))


def test_sinkhorn_argument_errors():
    with pytest.raises(ValueError, match=r"\(\.\.\., n, n\)"):
        ops.sinkhorn(torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"\(\.\.\., n, n\)"):
        ops.sinkhorn(torch.zeros(4))
    with pytest.raises(TypeError, match="floating"):
        ops.sinkhorn(torch.zeros(4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="iters"):
        ops.sinkhorn(torch.zeros(4, 4), -1)
    with pytest.raises(ValueError, match="grad_out"):
        ops.sinkhorn_backward(torch.zeros(4, 4), torch.zeros(3, 3), 20)


def test_binding_errors():
    with pytest.raises(TypeError, match="float32 or float64"):
        _core.sinkhorn_forward(np.zeros((4, 4), np.int32), 20)
    with pytest.raises(TypeError, match="float32 or float64"):
        _core.sinkhorn_forward([[1.0]], 20)
    with pytest.raises(ValueError, match="contiguous"):
        _core.sinkhorn_forward(np.zeros((4, 8))[:, ::2], 20)
    with pytest.raises(_core.ShapeError, match=r"\(\.\.\., n, n\)"):
        _core.sinkhorn_forward(np.zeros((4, 3)), 20)
    with pytest.raises(_core.ShapeError, match="grad_out"):
        _core.sinkhorn_backward(np.zeros((2, 4, 4)), np.zeros((4, 4)), 20)
    with pytest.raises(TypeError, match="float64"):
        _core.sinkhorn_backward(np.zeros((4, 4)), np.zeros((4, 4), np.float32), 20)
    with pytest.raises(ValueError, match="iterations"):
        _core.sinkhorn_backward(np.zeros((4, 4)), np.zeros((4, 4)), 2**60)


# ----------------------------------------------------------------------------- permutation basis


@pytest.mark.parametrize("n", range(1, 7))
def test_permutation_basis_order_and_shape(n):
    basis = ops.permutation_basis(n)
    perms = list(itertools.permutations(range(n)))
    assert basis.shape == (math.factorial(n), n, n) and basis.dtype == torch.float32
    assert torch.equal(basis[0], torch.eye(n))
    assert ops.permutations(n).tolist() == [list(p) for p in perms]
    for k, p in enumerate(perms):
        want = torch.zeros(n, n)
        want[torch.arange(n), torch.tensor(p)] = 1.0
        assert torch.equal(basis[k], want)
    # Each is a permutation matrix: 0/1 entries, one 1 per row and per column.
    assert ((basis == 0) | (basis == 1)).all()
    assert (basis.sum(-1) == 1).all() and (basis.sum(-2) == 1).all()
    assert len({tuple(b.flatten().tolist()) for b in basis}) == len(perms)


def test_permutation_basis_dtype_device_and_rust_matrices():
    b = ops.permutation_basis(4, dtype=torch.float64, device="cpu")
    assert b.dtype == torch.float64 and b.device.type == "cpu"
    np.testing.assert_array_equal(_core.permutation_basis(4), b.float().numpy())
    assert ops.permutation_basis(8).shape == (40320, 8, 8)


@pytest.mark.parametrize("n", [0, 9])
def test_permutation_basis_rejects_bad_n(n):
    with pytest.raises(ValueError, match="1..=8"):
        ops.permutation_basis(n)


# ----------------------------------------------------------------------------- BvN


def _random_mixture(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    w = rng.uniform(0.01, 1.0, k)
    w /= w.sum()
    m = np.zeros((n, n))
    for wi in w:
        m[np.arange(n), rng.permutation(n)] += wi
    return m


def _check_bvn(m: np.ndarray, weights: torch.Tensor, perms: torch.Tensor) -> None:
    n = m.shape[0]
    k = weights.shape[0]
    assert weights.dtype == torch.float64 and perms.dtype == torch.int64
    assert perms.shape == (k, n)
    assert 1 <= k <= (n - 1) ** 2 + 1
    assert (weights > 0).all()
    assert abs(weights.sum().item() - 1) < 1e-12
    for p in perms.tolist():
        assert sorted(p) == list(range(n))
    rec = np.zeros((n, n))
    for w, p in zip(weights.tolist(), perms.tolist(), strict=True):
        rec[np.arange(n), p] += w
    assert np.abs(rec - m).max() < 1e-6


@pytest.mark.parametrize("n", range(2, 7))
def test_bvn_reconstructs_random_mixtures(n):
    rng = np.random.default_rng(n)
    for k in (1, 2, n, n * n, 4 * n * n):
        m = _random_mixture(n, k, rng)
        weights, perms = ops.bvn_decompose(torch.from_numpy(m))
        _check_bvn(m, weights, perms)


@pytest.mark.parametrize("n", range(2, 7))
def test_bvn_reconstructs_sinkhorn_outputs(n):
    for seed in range(3):
        m = ops.sinkhorn(_logits((n, n), scale=1.0, seed=seed), 1000)
        weights, perms = ops.bvn_decompose(m)
        _check_bvn(m.numpy(), weights, perms)


def test_bvn_recovers_known_terms_and_basis_weights():
    basis = ops.permutation_basis(4, dtype=torch.float64)
    m = 0.6 * basis[7] + 0.3 * basis[0] + 0.1 * basis[23]
    weights, perms = ops.bvn_decompose(m)
    torch.testing.assert_close(weights, torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64))
    assert perms.tolist() == ops.permutations(4)[[7, 0, 23]].tolist()
    w = ops.bvn_basis_weights(m)
    assert w.shape == (24,)
    torch.testing.assert_close((w[:, None, None] * basis).sum(0), m)
    # mhc_lite logits log(w) reproduce the matrix through the softmax.
    torch.testing.assert_close(w[[7, 0, 23]], torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64))


def test_bvn_accepts_numpy_and_tolerance():
    rng = np.random.default_rng(0)
    m = _random_mixture(5, 8, rng) + rng.uniform(-1e-9, 1e-9, (5, 5))
    weights, perms = ops.bvn_decompose(m, tol=1e-6)
    _check_bvn(m, weights, perms)
    with pytest.raises(_core.NotDoublyStochasticError):
        ops.bvn_decompose(m, tol=1e-12)


def test_bvn_rejects_non_doubly_stochastic():
    eye = np.eye(3)
    bad_row = eye.copy()
    bad_row[1, 1] = 0.7
    with pytest.raises(_core.NotDoublyStochasticError, match=r"row 1 sums to 0\.7.*tolerance"):
        ops.bvn_decompose(bad_row)
    bad_col = np.array([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.5, 0.0, 0.5]])
    with pytest.raises(_core.NotDoublyStochasticError, match=r"column 0 sums to 1\.5"):
        ops.bvn_decompose(bad_col)
    negative = np.array([[1.5, -0.5, 0.0], [-0.5, 1.5, 0.0], [0.0, 0.0, 1.0]])
    with pytest.raises(_core.NotDoublyStochasticError, match=r"entry \(0, 1\).*negative"):
        ops.bvn_decompose(negative)
    nan = eye.copy()
    nan[2, 0] = np.nan
    with pytest.raises(_core.NotDoublyStochasticError, match="NaN"):
        ops.bvn_decompose(nan)
    # It is a ValueError for callers that do not know the specific class.
    with pytest.raises(ValueError):
        ops.bvn_decompose(bad_row)


def test_bvn_rejects_wrong_shapes_and_types():
    with pytest.raises(_core.ShapeError, match="square"):
        ops.bvn_decompose(np.ones((2, 3)) / 3)
    with pytest.raises(_core.ShapeError, match="square"):
        ops.bvn_decompose(np.ones((2, 2, 2)) / 2)
    with pytest.raises(_core.ShapeError, match="square"):
        ops.bvn_decompose(np.zeros((0, 0)))
    with pytest.raises(TypeError, match="float64"):
        _core.bvn_decompose(np.eye(3, dtype=np.float32))
    with pytest.raises(ValueError, match="tolerance"):
        ops.bvn_decompose(np.eye(3), tol=-1.0)


# ----------------------------------------------------------------------------- diagnostics


def test_hres_diagnostics_match_numpy():
    rng = np.random.default_rng(1)
    mats = [rng.uniform(0, 0.6, (4, 4)) for _ in range(6)]
    d = ops.hres_diagnostics([torch.from_numpy(m).float() for m in mats])
    mats32 = [m.astype(np.float32).astype(np.float64) for m in mats]
    row = [np.abs(m.sum(1) - 1).max() for m in mats32]
    col = [np.abs(m.sum(0) - 1).max() for m in mats32]
    comp = np.eye(4)
    for m in mats32:
        comp = m @ comp  # x_{l+1} = H_l x_l
    np.testing.assert_allclose(d["row_sum_err"].numpy(), row, rtol=1e-12)
    np.testing.assert_allclose(d["col_sum_err"].numpy(), col, rtol=1e-12)
    assert d["max_row_sum_err"] == pytest.approx(max(row), rel=1e-12)
    assert d["max_col_sum_err"] == pytest.approx(max(col), rel=1e-12)
    np.testing.assert_allclose(d["composite"].numpy(), comp, rtol=1e-12)
    assert d["composite_gain"] == pytest.approx(np.abs(comp).sum(1).max(), rel=1e-12)
    assert d["composite_col_gain"] == pytest.approx(np.abs(comp).sum(0).max(), rel=1e-12)


def test_hres_diagnostics_of_doubly_stochastic_stack():
    mats = ops.sinkhorn(_logits((12, 4, 4), scale=0.5), 50)
    d = ops.hres_diagnostics(mats)
    assert d["max_row_sum_err"] < 1e-12 and d["max_col_sum_err"] < 1e-12
    assert d["composite_gain"] == pytest.approx(1.0, abs=1e-12)
    assert d["composite_col_gain"] == pytest.approx(1.0, abs=1e-12)


def test_hres_diagnostics_errors():
    with pytest.raises(ValueError, match="at least one"):
        ops.hres_diagnostics([])
    with pytest.raises(ValueError, match=r"\(L, n, n\)"):
        ops.hres_diagnostics(torch.zeros(3, 4))
    with pytest.raises(_core.ShapeError):
        _core.hres_diagnostics(np.zeros((2, 3, 4)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_path_matches_cpu_rust():
    x = _logits((64, 4, 4), torch.float32, seed=2)
    g = _logits((64, 4, 4), torch.float32, scale=1.0, seed=3)
    xc = x.cuda().requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    pc, pr = ops.sinkhorn(xc), ops.sinkhorn(xr)
    torch.testing.assert_close(pc.cpu(), pr, rtol=0, atol=1e-5)
    (gc,) = torch.autograd.grad(pc, xc, g.cuda())
    (gr,) = torch.autograd.grad(pr, xr, g)
    torch.testing.assert_close(gc.cpu(), gr, rtol=0, atol=1e-4)
    torch.library.opcheck(ops.sinkhorn, (xc, 20))


# ----------------------------------------------------------------------------- the model at init


@pytest.mark.parametrize("kind", ["mhc_lite", "mhc"])
def test_fp_model_at_init_equals_standard_model(kind):
    """At init (identical streams, identity-dominant H_res) an mHC model computes the standard residual model.
    With quant="fp" there is no int8 activation rounding to amplify Sinkhorn's ~1e-7 row-sum error, so the
    logits agree to 1e-6 for ``mhc`` as for ``mhc_lite`` (test_model.py's ternary twin needs 1e-2 for ``mhc``)."""
    from nanochat.model import GPT, GPTConfig, torch_path_only

    def cfg(residual: str) -> GPTConfig:
        return GPTConfig(vocab_size=64, seq_len=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=256, mlp_hidden=256,
                         residual=residual, quant="fp")  # fmt: skip

    torch.manual_seed(5)
    std = GPT(cfg("standard"))
    idx = torch.randint(0, 64, (2, 12))
    with torch.no_grad(), torch_path_only():
        before = std(idx)
        g = torch.Generator().manual_seed(0)
        for name, p in std.named_parameters():  # every linear random (init zeroes o_proj/down_proj)
            if p.ndim == 2 and "wte" not in name:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
        mhc = GPT(cfg(kind))
        missing, unexpected = mhc.load_state_dict(std.state_dict(), strict=False)
        assert not unexpected and missing and all("mhc" in k for k in missing)
        a, b = mhc(idx), std(idx)
    assert (b - before).abs().max() > 0.1  # the sublayers contribute: not an identity-vs-identity comparison
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # float32 sums in another order already differ by ~1e-6; in float64 the two agree to the float32 logits' last
    # bit, which also catches an init that is off by 1e-5 (e.g. H_post = 2·sigmoid(1e-5))
    with torch.no_grad():
        a, b = mhc.double()(idx), std.double()(idx)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-8)

"""Ternary quantization, GGUF block formats and the ternary linear op.

References: `gguf.quants` (the package llama.cpp's converter uses) for the byte formats, numpy
for absmean/int8 quantization, dense torch matmul for the kernels.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

import nanochat.ops as ops
from nanochat import _core

TQ2 = gguf.GGMLQuantizationType.TQ2_0
TQ1 = gguf.GGMLQuantizationType.TQ1_0
FORMATS = [
    (TQ2, _core.quantize_tq2_0, _core.dequantize_tq2_0, _core.pack_tq2_0, _core.unpack_tq2_0),
    (TQ1, _core.quantize_tq1_0, _core.dequantize_tq1_0, _core.pack_tq1_0, _core.unpack_tq1_0),
]


def random_trits(rng: np.random.Generator, shape: tuple[int, ...], p_zero: float = 0.4) -> np.ndarray:
    p = [(1 - p_zero) / 2, p_zero, (1 - p_zero) / 2]
    return rng.choice(np.array([-1, 0, 1], dtype=np.int8), size=shape, p=p)


# ------------------------------------------------------------------------------ gguf byte identity


@pytest.mark.parametrize("qtype,quantize,dequantize,pack,unpack", FORMATS, ids=["TQ2_0", "TQ1_0"])
@pytest.mark.parametrize("shape", [(1, 256), (3, 512), (16, 1024), (5, 2816)])
def test_quantize_matches_gguf_bytes(qtype, quantize, dequantize, pack, unpack, shape):
    rng = np.random.default_rng(sum(shape))
    x = (rng.standard_normal(shape) * rng.uniform(0.01, 3)).astype(np.float32)
    x[0, :256] = 0.0  # an all-zero block: d = 0 in both
    ours, theirs = quantize(x), gguf.quants.quantize(x, qtype)
    assert ours.dtype == np.uint8 and ours.shape == theirs.shape
    np.testing.assert_array_equal(ours, theirs)
    # and the other direction: our dequantizer on their bytes
    np.testing.assert_array_equal(dequantize(theirs), gguf.quants.dequantize(theirs, qtype))


@pytest.mark.parametrize("qtype,quantize,dequantize,pack,unpack", FORMATS, ids=["TQ2_0", "TQ1_0"])
def test_pack_ternary_matches_gguf(qtype, quantize, dequantize, pack, unpack):
    """A ternary tensor with scale s packs to the bytes gguf writes for trits*s (no all-zero blocks)."""
    rng = np.random.default_rng(1)
    trits = random_trits(rng, (8, 768), p_zero=0.3)
    scale = np.float32(0.0423)
    ours = pack(trits, float(scale))
    np.testing.assert_array_equal(ours, gguf.quants.quantize(trits.astype(np.float32) * scale, qtype))
    back, d = unpack(ours)
    np.testing.assert_array_equal(back, trits)
    np.testing.assert_array_equal(d, np.full(d.shape, np.float16(scale), dtype=np.float32))
    np.testing.assert_array_equal(
        gguf.quants.dequantize(ours, qtype), trits.astype(np.float32) * np.float32(np.float16(scale))
    )


def test_pack_all_zero_block_keeps_scale():
    trits = np.zeros((1, 256), dtype=np.int8)
    (d,) = _core.unpack_tq2_0(_core.pack_tq2_0(trits, 0.5))[1][0]
    assert d == 0.5
    packed, scale = _core.tq2_0_to_kernel_layout(gguf.quants.quantize(np.zeros((2, 256), np.float32) + 0, TQ2))
    assert packed.shape == (2, 64) and scale == 0.0


def test_block_layout_element_positions():
    """Element e lives in byte 32*(e//128) + e%32 at shift 2*((e%128)//32)."""
    for e in [0, 1, 31, 32, 100, 127, 128, 130, 200, 255]:
        t = np.zeros((1, 256), dtype=np.int8)
        t[0, e] = 1
        qs = _core.pack_tq2_0(t, 1.0)[0, :64]
        byte, shift = 32 * (e // 128) + e % 32, 2 * ((e % 128) // 32)
        assert (qs[byte] >> shift) & 3 == 2
        others = np.delete(np.arange(256), e)
        codes = np.array([(qs[32 * (o // 128) + o % 32] >> (2 * ((o % 128) // 32))) & 3 for o in others])
        assert (codes == 1).all()


def test_kernel_layout_from_gguf_bytes():
    rng = np.random.default_rng(2)
    trits = random_trits(rng, (6, 512))
    data = gguf.quants.quantize(trits.astype(np.float32) * 0.25, TQ2)
    packed, scale = _core.tq2_0_to_kernel_layout(data)
    assert scale == 0.25
    np.testing.assert_array_equal(packed, _core.pack_trits(trits))
    np.testing.assert_array_equal(ops.unpack_ternary(torch.from_numpy(packed)).numpy(), trits.astype(np.float32))


# ------------------------------------------------------------------------------ quantizers


def test_absmean_matches_numpy():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((64, 300)).astype(np.float32)
    trits, scale = _core.quantize_absmean(w)
    ref_scale = np.abs(w.astype(np.float64)).mean()
    assert scale == pytest.approx(ref_scale, rel=1e-6)
    np.testing.assert_array_equal(trits, np.clip(np.round(w / np.float32(scale)), -1, 1).astype(np.int8))
    assert set(np.unique(trits)) <= {-1, 0, 1}


def test_acts_int8_matches_torch():
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((7, 512)) * 3).astype(np.float32)
    q, s = _core.quantize_acts_i8(x)
    qt, st = ops.quantize_acts_int8(torch.from_numpy(x))
    np.testing.assert_array_equal(q, qt.numpy().astype(np.int8))
    np.testing.assert_allclose(s, st.numpy()[:, 0], rtol=1e-7)
    assert np.abs(q).max() == 127


# ------------------------------------------------------------------------------ kernels


@pytest.mark.parametrize("kernel", _core.available_kernels())
@pytest.mark.parametrize(
    "rows,cols,n", [(1, 256, 1), (7, 256, 3), (33, 512, 1), (64, 768, 5), (100, 1024, 2), (257, 2048, 9)]
)
def test_gemm_i32_exact(kernel, rows, cols, n):
    rng = np.random.default_rng(rows * 31 + cols + n)
    trits = random_trits(rng, (rows, cols))
    x = rng.integers(-128, 128, size=(n, cols), dtype=np.int8)
    x[0, :8] = -128
    out = _core.ternary_gemm_i32(_core.pack_trits(trits), x, kernel=kernel)
    ref = x.astype(np.int64) @ trits.astype(np.int64).T
    assert out.dtype == np.int32 and out.shape == (n, rows)
    np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_gemm_threads_agree(threads):
    rng = np.random.default_rng(5)
    trits = random_trits(rng, (301, 512))
    x = rng.integers(-127, 128, size=(4, 512), dtype=np.int8)
    ref = x.astype(np.int64) @ trits.astype(np.int64).T
    np.testing.assert_array_equal(_core.ternary_gemm_i32(_core.pack_trits(trits), x, threads=threads), ref)


@pytest.mark.parametrize("kernel", _core.available_kernels())
@pytest.mark.parametrize("shape", [(2, 256), (3, 5, 768), (1, 1, 1, 512)])
def test_ternary_linear_matches_dense(kernel, shape):
    torch.manual_seed(sum(shape))
    rows = 320
    w = torch.randn(rows, shape[-1])
    x = torch.randn(*shape) * 2
    packed, scale = ops.pack_ternary(w)
    trits, s_ref = ops.absmean_quantize(w)
    assert float(scale) == pytest.approx(float(s_ref))
    ops.set_kernel(kernel)
    try:
        y = ops.ternary_linear(x, packed, scale)
    finally:
        ops.set_kernel(None)
    q, xs = ops.quantize_acts_int8(x)
    dense = (q @ trits.t()) * xs * s_ref  # dense fp32 reference of the same math
    assert y.shape == (*shape[:-1], rows)
    torch.testing.assert_close(y, dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, ops.ternary_linear_reference(x, packed, scale), rtol=1e-5, atol=1e-5)
    # and it approximates the unquantized product
    rel = (y - x @ (trits * s_ref).t()).norm() / (x @ (trits * s_ref).t()).norm()
    assert rel < 0.05


def test_integer_math_exact_before_scaling():
    torch.manual_seed(0)
    w, x = torch.randn(64, 512), torch.randn(3, 512)
    packed, scale = ops.pack_ternary(w)
    q, xs = ops.quantize_acts_int8(x)
    acc = _core.ternary_gemm_i32(packed.numpy(), q.numpy().astype(np.int8))
    ref = (q.double() @ ops.unpack_ternary(packed, torch.float64).t()).numpy()
    np.testing.assert_array_equal(acc, ref.astype(np.int64))


def test_pack_ternary_cpu_matches_torch_path():
    """The CPU (Rust) packing equals the plain-torch packing other devices use."""
    from nanochat.ops.ternary import _pack_codes_torch

    w = torch.randn(96, 512)
    packed_cpu, s_cpu = ops.pack_ternary(w)
    trits, s = ops.absmean_quantize(w)
    torch.testing.assert_close(packed_cpu, _pack_codes_torch(trits))
    torch.testing.assert_close(ops.unpack_ternary(packed_cpu), trits)
    assert float(s_cpu) == float(s)


def test_opcheck():
    w, x = torch.randn(64, 256), torch.randn(4, 256)
    torch.library.opcheck(torch.ops.nanochat.pack_ternary.default, (w,))
    packed, scale = ops.pack_ternary(w)
    torch.library.opcheck(torch.ops.nanochat.ternary_linear.default, (x, packed, scale))


def test_fake_tensor_shapes_for_compile():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        w = torch.empty(128, 512)
        x = torch.empty(2, 7, 512)
        packed, scale = ops.pack_ternary(w)
        y = ops.ternary_linear(x, packed, scale)
    assert packed.shape == (128, 128) and packed.dtype == torch.uint8 and y.shape == (2, 7, 128)


# ------------------------------------------------------------------------------ bad input


def test_bad_inputs_raise_clear_errors():
    x = np.zeros((2, 256), np.float32)
    with pytest.raises(TypeError, match="x: expected dtype float32, got"):
        _core.quantize_tq2_0(x.astype(np.float64))
    with pytest.raises(TypeError, match="expected a numpy.ndarray"):
        _core.quantize_tq2_0([[0.0] * 256])
    with pytest.raises(ValueError, match="C-contiguous"):
        _core.quantize_tq2_0(np.zeros((256, 2), np.float32).T)
    with pytest.raises(_core.ShapeError, match="multiple of 256"):
        _core.quantize_tq2_0(np.zeros((2, 300), np.float32))
    with pytest.raises(_core.ShapeError, match="2-D"):
        _core.quantize_tq2_0(np.zeros(256, np.float32))
    with pytest.raises(_core.ShapeError, match="whole number"):
        _core.dequantize_tq2_0(np.zeros((1, 65), np.uint8))
    with pytest.raises(ValueError, match="outside"):
        _core.pack_tq2_0(np.full((1, 256), 2, np.int8), 1.0)
    with pytest.raises(ValueError, match="code 3"):
        _core.unpack_tq2_0(np.full((1, 66), 0xFF, np.uint8))
    packed = _core.pack_trits(np.zeros((4, 256), np.int8))
    with pytest.raises(_core.ShapeError, match="columns"):
        _core.ternary_gemm_i32(packed, np.zeros((1, 512), np.int8))
    with pytest.raises(ValueError, match="unknown kernel"):
        _core.ternary_gemm_i32(packed, np.zeros((1, 256), np.int8), kernel="nope")
    with pytest.raises(ValueError, match="multiple of 256"):
        ops.pack_ternary(torch.randn(4, 100))
    with pytest.raises(ValueError, match="features"):
        ops.ternary_linear(torch.randn(2, 512), torch.from_numpy(packed), torch.tensor(1.0))
    with pytest.raises(ValueError, match="not available"):
        ops.set_kernel("avx9000")


def test_kernel_dispatch_reports_choice():
    name, why = ops.default_kernel()
    assert name in ops.available_kernels() and why
    assert ops.available_kernels()[0] == "scalar"

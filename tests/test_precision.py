"""bf16 training on the CPU's matrix unit: the dtype choice, BitLinear's bf16 QAT path and batched Muon.

The bf16 QAT forward multiplies integer operands (int8 activation codes, trits) that bf16 holds exactly, so its
result must equal the exact integer matmul rounded once to bf16, then scaled: that is checked bit for bit against
a float64 reference. Gradients are compared with the fp32 straight-through reference within bf16 rounding.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nanochat import hardware
from nanochat.model import fake_quant_acts, fake_quant_weight
from nanochat.model.bitlinear import BitLinear, get_matmul_dtype, set_matmul_dtype
from nanochat.optim.muon import Muon, default_ns_dtype, newton_schulz


@pytest.fixture
def bf16_matmuls():
    prev = get_matmul_dtype()
    set_matmul_dtype(torch.bfloat16)
    yield
    set_matmul_dtype(prev)


def _codes(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference integer operands and scales in float64: (q, t, step, s)."""
    s = w.abs().mean().clamp(min=1e-5)
    t = (w / s).round().clamp(-1, 1)
    amax = x.abs().amax(-1, keepdim=True).clamp(min=1e-5)
    q = (x * (127.0 / amax)).round().clamp(-128, 127)
    return q.double(), t.double(), (amax / 127.0), s


@pytest.mark.parametrize("shape", [(3, 5, 256), (7, 512), (1, 1, 768)])
def test_bf16_forward_is_the_exact_integer_matmul_rounded_once(bf16_matmuls: None, shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(sum(shape))
    lin = BitLinear(shape[-1], 384)
    torch.nn.init.normal_(lin.weight, generator=g)
    x = torch.randn(*shape, generator=g) * 3.0
    x[..., 0] = 40.0  # one outlier per row, as real activations have
    y = lin(x)
    assert y.dtype == torch.float32 and y.shape == (*shape[:-1], 384)
    q, t, step, s = _codes(x.reshape(-1, shape[-1]), lin.weight.detach())
    exact = q @ t.T  # integer sums, exact in float64
    ref = exact.to(torch.bfloat16).float() * (step * s)
    assert torch.equal(y.reshape(-1, 384), ref)
    # and close to the fp32 fake-quant reference (bf16 keeps 8 significant bits of each sum)
    fp = F.linear(fake_quant_acts(x), fake_quant_weight(lin.weight)).detach()
    torch.testing.assert_close(y.detach(), fp, rtol=2**-7, atol=1e-4 * fp.abs().max().item())


def test_bf16_gradients_match_the_fp32_straight_through_reference(bf16_matmuls: None) -> None:
    g = torch.Generator().manual_seed(0)
    lin = BitLinear(512, 256)
    torch.nn.init.normal_(lin.weight, generator=g)
    x = torch.randn(4, 6, 512, generator=g, requires_grad=True)
    gy = torch.randn(4, 6, 256, generator=g)
    lin(x).backward(gy)
    gx, gw = x.grad.clone(), lin.weight.grad.clone()
    # reference: fp32 STE, dX = dY·W_q and dW = dYᵀ·x_q
    x.grad, lin.weight.grad = None, None
    set_matmul_dtype(torch.float32)
    lin(x).backward(gy)
    rx, rw = x.grad, lin.weight.grad
    assert gx.dtype == torch.float32 and gw.dtype == torch.float32
    assert (gx - rx).norm() / rx.norm() < 1e-2
    assert (gw - rw).norm() / rw.norm() < 1e-2


def test_bf16_output_follows_autocast(bf16_matmuls: None) -> None:
    lin = BitLinear(256, 256)
    torch.nn.init.normal_(lin.weight)
    x = torch.randn(2, 256)
    assert lin(x).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lin(x).dtype == torch.bfloat16


def test_fp_twin_and_eval_kernel_are_untouched_by_bf16(bf16_matmuls: None) -> None:
    fp = BitLinear(256, 128, quant="fp")
    torch.nn.init.normal_(fp.weight)  # BitLinear allocates with torch.empty: initialise before comparing
    x = torch.randn(3, 256)
    torch.testing.assert_close(fp(x), F.linear(x, fp.weight), rtol=0, atol=0)
    tern = BitLinear(256, 128).eval()
    torch.nn.init.normal_(tern.weight)
    with torch.no_grad():
        y = tern(x)  # the Rust kernel path (packed weights), exact int math then one fp32 scale
        ref = F.linear(fake_quant_acts(x), fake_quant_weight(tern.weight))
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_choose_dtype_follows_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.delenv("NANOCHAT_DTYPE", raising=False)
    monkeypatch.setattr(hardware, "has_amx_bf16", lambda: True)
    dt, why = hardware.choose_dtype(cpu)
    assert dt == torch.bfloat16 and "AMX" in why
    monkeypatch.setattr(hardware, "has_amx_bf16", lambda: False)
    monkeypatch.setattr(hardware, "has_avx512_bf16", lambda: False)
    dt, why = hardware.choose_dtype(cpu)
    assert dt == torch.float32 and "no bf16" in why
    assert hardware.choose_dtype(cpu, "bfloat16")[0] == torch.bfloat16
    monkeypatch.setattr(hardware, "has_amx_bf16", lambda: True)
    assert hardware.choose_dtype(cpu, "float32") == (torch.float32, "--dtype float32")
    with pytest.raises(ValueError, match="dtype must be"):
        hardware.choose_dtype(cpu, "float16")


def test_matrix_unit_peak_is_flops_per_cycle_times_clock() -> None:
    u = hardware.cpu_matrix_unit(torch.float32, threads=2)
    assert u.peak_flops == pytest.approx(u.flop_per_cycle_core * u.mhz * 1e6 * 2)
    assert u.name in hardware.FLOP_PER_CYCLE
    if hardware.has_amx_bf16():
        assert hardware.cpu_matrix_unit(torch.bfloat16, threads=1).name == "amx_bf16"
        assert default_ns_dtype(torch.device("cpu")) == torch.bfloat16


def test_batched_muon_equals_one_matrix_at_a_time() -> None:
    """Muon groups same-shaped matrices into one batched Newton–Schulz: the update must equal the per-matrix one."""
    g = torch.Generator().manual_seed(3)
    shapes = [(64, 32), (64, 32), (32, 64), (64, 32)]
    ps = [torch.nn.Parameter(torch.randn(*s, generator=g, dtype=torch.float64)) for s in shapes]
    refs = [p.detach().clone() for p in ps]
    grads = [torch.randn(*s, generator=g, dtype=torch.float64) for s in shapes]
    opt = Muon(ps, lr=0.05, weight_decay=0.1, ns_dtype=torch.float64)
    for p, gr in zip(ps, grads, strict=True):
        p.grad = gr.clone()
    opt.step()
    for p, r, gr in zip(ps, refs, grads, strict=True):
        u = gr + 0.95 * gr  # first step: m = g, Nesterov u = g + β·m
        o = newton_schulz(u, dtype=torch.float64)
        scale = max(1.0, p.size(0) / p.size(1)) ** 0.5
        expected = r * (1 - 0.05 * 0.1) - 0.05 * scale * o
        torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-12)

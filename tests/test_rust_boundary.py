"""The Rust boundary (issue 14, items 13-15): nothing a caller passes aborts, hangs or silently coerces.

- Thread counts from 2^31 to 2^64-1 (and 100000) for every entry point that takes one, an ``n_layer`` of 2^40 and
  absurd Sinkhorn iteration counts each raise a clear ValueError at once. These calls used to abort the whole process
  (SIGABRT in the allocator) or spawn threads until the OS refused, so they run in a child process: a regression
  shows as a failed test, not a crashed pytest.
- A long Sinkhorn call answers Ctrl-C: SIGINT sent to a child in the middle of a minutes-long call gives
  KeyboardInterrupt within seconds (the binding checks for signals between chunks of the batch).
- NaN or ±inf in a ``ternary_linear`` input row: the Rust (CPU) path and the plain-torch path agree, NaN rows out,
  the other rows untouched.
- ``tq2_0_to_kernel_layout`` refuses arrays that are not uint8 instead of casting them.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from nanochat import _core, ops

# ----------------------------------------------------------------------------- no abort: run in a child

_CHILD = r"""
import json, sys
import numpy as np
import torch
from nanochat import _core, ops
from nanochat.engine import Engine
from nanochat.model import GPT, GPTConfig
from nanochat.engine.rust_engine import engine_weights, _config_dict

torch.manual_seed(0)
cfg = GPTConfig(vocab_size=320, seq_len=64, n_layer=1, n_head=4, n_kv_head=2, n_embd=256, mlp_hidden=512,
                residual="standard")
model = GPT(cfg).eval()
ternary, dense = engine_weights(model)
weights = {**{k: v for k, v in ternary.items()}, **dense}
conf = _config_dict(cfg)
results = {}

def case(name, fn):
    try:
        fn()
        results[name] = ["ok", ""]
    except BaseException as e:  # noqa: BLE001 - report every outcome
        results[name] = [type(e).__name__, str(e)]

BIG = [2**31, 2**40, 2**64 - 1]
for t in BIG:
    case(f"Engine(threads={t})", lambda t=t: Engine(model, threads=t))
    case(f"EngineModel(threads={t})", lambda t=t: _core.EngineModel(conf, weights, threads=t))
    case(f"set_num_threads({t})", lambda t=t: _core.set_num_threads(t))
    case(f"ops.set_num_threads({t})", lambda t=t: ops.set_num_threads(t))
x = np.ones((2, 256), np.float32)
packed, scale = ternary["blocks.0.attn.q_proj.weight"]
for t in BIG + [100000]:
    case(f"ternary_linear(threads={t})", lambda t=t: _core.ternary_linear(x, packed, scale, threads=t))
    case(f"ternary_gemm_i32(threads={t})", lambda t=t: _core.ternary_gemm_i32(packed, np.ones((2, 256), np.int8), threads=t))
    case(f"sinkhorn_forward(threads={t})", lambda t=t: _core.sinkhorn_forward(np.zeros((2, 4, 4)), threads=t))
    case(f"sinkhorn_backward(threads={t})", lambda t=t: _core.sinkhorn_backward(np.zeros((2, 4, 4)), np.zeros((2, 4, 4)), threads=t))
for it in [2**40, 2**64 - 1]:
    case(f"sinkhorn_forward(iters={it})", lambda it=it: _core.sinkhorn_forward(np.zeros((2, 4, 4)), iters=it))
    case(f"sinkhorn_backward(iters={it})", lambda it=it: _core.sinkhorn_backward(np.zeros((2, 4, 4)), np.zeros((2, 4, 4)), iters=it))
case("EngineModel(n_layer=2**40)", lambda: _core.EngineModel({**conf, "n_layer": 2**40}, weights))
case("EngineModel(n_layer=1000)", lambda: _core.EngineModel({**conf, "n_layer": 1000}, weights))

eng = Engine(model, threads=1)
for t in [2**40, 2**31, 100000]:
    case(f"rust.set_threads({t})", lambda t=t: eng.rust.set_threads(t))
results["threads after refusals"] = ["ok", str(eng.rust.threads)]
results["max_threads"] = ["ok", str(_core.max_threads())]
# Still usable after every refusal: a forward step and a legal thread count.
eng.rust.set_threads(2)
s = eng.rust.new_session()
results["logits finite"] = ["ok", str(bool(np.isfinite(s.prefill([1, 2, 3])).all()))]
results["get_num_threads"] = ["ok", str(_core.get_num_threads())]
print("RESULTS" + json.dumps(results))
"""


@pytest.fixture(scope="module")
def child_results() -> dict[str, list[str]]:
    p = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"child exited with {p.returncode} (134 = abort)\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
    line = next(ln for ln in p.stdout.splitlines() if ln.startswith("RESULTS"))
    return json.loads(line[len("RESULTS") :])


def test_no_call_aborts_and_each_is_refused_clearly(child_results: dict[str, list[str]]):
    refused = {k: v for k, v in child_results.items() if "threads=" in k or "threads(" in k or "iters=" in k}
    assert len(refused) == 4 * 3 + 4 * 4 + 2 * 2 + 3  # every case ran
    for name, (kind, msg) in refused.items():
        assert kind == "ValueError", (name, kind, msg)
        if name.startswith("Engine("):  # the facade checks its argument before choosing a backend
            assert "out of range" in msg and "threads" in msg, (name, msg)
        else:
            assert ("threads requested" in msg and "at most" in msg) or "above the limit" in msg, (name, msg)
    # The limit is the one the extension reports: 4 x cores, at least 8.
    assert int(child_results["max_threads"][1]) >= 8


def test_n_layer_beyond_the_weights_is_refused(child_results: dict[str, list[str]]):
    for name in ("EngineModel(n_layer=2**40)", "EngineModel(n_layer=1000)"):
        kind, msg = child_results[name]
        assert kind == "ValueError", (name, kind, msg)
        assert "n_layer" in msg, msg


def test_refusals_leave_the_engine_usable(child_results: dict[str, list[str]]):
    assert child_results["threads after refusals"][1] == "1"
    assert child_results["logits finite"][1] == "True"
    # set_num_threads refusals did not change the shared default.
    assert 1 <= int(child_results["get_num_threads"][1]) <= int(child_results["max_threads"][1])


def test_set_num_threads_limits_in_process():
    """Legal values still work (0 = automatic), and the limit itself is accepted."""
    before = _core.get_num_threads()
    try:
        _core.set_num_threads(_core.max_threads())
        assert _core.get_num_threads() == _core.max_threads()
        with pytest.raises(ValueError, match="at most"):
            _core.set_num_threads(_core.max_threads() + 1)
        assert _core.get_num_threads() == _core.max_threads()
        with pytest.raises(OverflowError):
            _core.set_num_threads(2**64)
        with pytest.raises(OverflowError):
            _core.set_num_threads(-1)
    finally:
        _core.set_num_threads(before)


def test_sinkhorn_iteration_limit_is_exact():
    x = np.random.default_rng(0).standard_normal((3, 4, 4))
    _core.sinkhorn_forward(x, iters=_core.SINKHORN_MAX_ITERS)  # the limit itself is fine
    with pytest.raises(ValueError, match="above the limit"):
        _core.sinkhorn_forward(x, iters=_core.SINKHORN_MAX_ITERS + 1)
    # One huge matrix: bounded by its work (n^2 * iters), so no single call runs unbounded.
    with pytest.raises(ValueError, match="entry-iterations"):
        _core.sinkhorn_forward(np.zeros((2048, 2048), np.float32), iters=100)


# ----------------------------------------------------------------------------- Ctrl-C in a long Rust loop

_LONG = r"""
import signal, sys, time
import numpy as np
from nanochat import _core
# Python installs its KeyboardInterrupt handler only if SIGINT was not ignored at start-up, and a shell starts
# background jobs (`cmd &`) with SIGINT ignored: install it here so the test does not depend on how it was launched.
signal.signal(signal.SIGINT, signal.default_int_handler)
which = sys.argv[1]
x = np.random.default_rng(0).standard_normal((100_000, 8, 8))  # 6.4e10 entry-iterations: minutes of work
print("ready", flush=True)
t = time.monotonic()
try:
    if which == "forward":
        _core.sinkhorn_forward(x, iters=10_000, threads=1)
    else:
        _core.sinkhorn_backward(x, x, iters=10_000, threads=1)
    print("finished", flush=True)
except KeyboardInterrupt:
    print(f"interrupted after {time.monotonic() - t:.1f}s", flush=True)
    sys.exit(3)
"""


@pytest.mark.parametrize("which", ["forward", "backward"])
def test_ctrl_c_interrupts_a_long_sinkhorn(which: str):
    p = subprocess.Popen(
        [sys.executable, "-c", _LONG, which], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "ready"
        time.sleep(1.5)  # well inside the Rust call
        p.send_signal(signal.SIGINT)
        # Generous for a loaded machine; without the signal checks the call runs for minutes.
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 3, (p.returncode, out, err[-2000:])
    assert out.startswith("interrupted"), out


# ----------------------------------------------------------------------------- NaN in, NaN out on both paths


def _nan_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    packed, scale = ops.pack_ternary(torch.randn(96, 512))
    x = torch.randn(6, 512)
    x[1, 3] = math.nan
    x[2, 7] = math.inf
    x[3, 0] = -math.inf
    x[4, :] = math.nan
    return x, packed, scale


def test_ternary_linear_nan_rows_agree_between_rust_and_torch():
    x, packed, scale = _nan_inputs()
    ref = ops.ternary_linear_reference(x, packed, scale)  # plain torch: the CUDA path and the oracle
    cpu = ops.ternary_linear(x, packed, scale)  # dispatches to the Rust kernel on CPU
    bad = torch.tensor([False, True, True, True, True, False])
    assert torch.isnan(ref).all(dim=1).equal(bad)
    assert torch.isnan(cpu).all(dim=1).equal(bad)
    assert not torch.isnan(cpu[~bad]).any()
    torch.testing.assert_close(cpu[~bad], ref[~bad], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", _core.available_kernels())
def test_every_kernel_propagates_nan_rows(kernel: str):
    x, packed, scale = _nan_inputs()
    y = _core.ternary_linear(x.numpy(), packed.numpy(), float(scale), kernel=kernel)
    assert np.isnan(y[1:5]).all()
    assert np.isfinite(y[[0, 5]]).all()
    clean = _core.ternary_linear(x[[0, 5]].numpy(), packed.numpy(), float(scale), kernel=kernel)
    np.testing.assert_array_equal(y[[0, 5]], clean)  # rows are independent


# ----------------------------------------------------------------------------- no silent casts


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64, np.int8])
def test_tq2_0_to_kernel_layout_refuses_other_dtypes(dtype):
    data = np.zeros((2, 66), dtype)
    with pytest.raises(TypeError, match="uint8"):
        ops.tq2_0_to_kernel_layout(data)
    with pytest.raises(TypeError, match="uint8"):
        _core.tq2_0_to_kernel_layout(data)
    packed, scale = ops.tq2_0_to_kernel_layout(np.zeros((2, 66), np.uint8))
    assert packed.shape == (2, 64) and packed.dtype == np.uint8 and scale == 0.0


@pytest.mark.parametrize("kernel", _core.available_kernels())
@pytest.mark.parametrize("n", [16, 37, 130])
def test_every_kernel_equals_scalar_on_prefill_sized_batches(kernel: str, n: int):
    """Prefill-sized activation batches (where ``amx`` switches to its tiles, n >= 16, ragged on purpose): the
    integer products of every kernel equal the scalar oracle exactly, on 1 and 2 threads, raw code 3 included."""
    rng = np.random.default_rng(n)
    packed = rng.integers(0, 256, (70, 512 // 4), dtype=np.uint8)
    x = rng.integers(-128, 128, (n, 512), dtype=np.int8)
    want = _core.ternary_gemm_i32(packed, x, kernel="scalar", threads=1)
    for threads in (1, 2):
        np.testing.assert_array_equal(_core.ternary_gemm_i32(packed, x, kernel=kernel, threads=threads), want)


# ----------------------------------------------------------------------------- inputs owned across a released GIL


def _race(call, arr: np.ndarray, attack: str) -> tuple[np.ndarray, np.ndarray]:
    """``call()`` on an untouched ``arr``, then again while another Python thread attacks ``arr`` from the moment
    the call releases the GIL: ``"write"`` scribbles over it in GIL-holding slices of 256 elements, ``"free"``
    resizes it to one element with ``refcheck=False`` (freeing its buffer) and fills fresh arrays of the same size.
    The switch interval is raised so that the attacker cannot run before the call releases the GIL."""
    want = call()
    go, stop = threading.Event(), threading.Event()

    def attacker() -> None:
        go.wait()
        if attack == "free":
            size = arr.nbytes
            arr.resize((1,), refcheck=False)
            while not stop.is_set():
                np.full(size, 0x7F, dtype=np.uint8)  # likely reuses the freed block
                time.sleep(0)  # let the caller back in once its call returns
            return
        flat = arr.reshape(-1)
        while not stop.is_set():
            for i in range(0, flat.size, 256):
                flat[i : i + 256] = 100 if flat.dtype == np.int8 else 50.0
            time.sleep(0)

    t = threading.Thread(target=attacker)
    old = sys.getswitchinterval()
    sys.setswitchinterval(10.0)
    try:
        t.start()
        time.sleep(0.05)  # the attacker now waits on `go`, GIL released
        go.set()
        got = call()
    finally:
        stop.set()
        sys.setswitchinterval(old)
        t.join()
    return got, want


@pytest.mark.parametrize("attack", ["write", "free"])
def test_activations_are_copied_before_the_gil_is_released(attack: str) -> None:
    """A ternary product reads its activations through the whole call: a copy taken under the GIL keeps another
    thread's writes (or a freed buffer) out of the result. The packed weights stay borrowed (documented contract).
    The scalar kernel reads the activations row by row to the end (the SIMD ones prepare a copy of their own)."""
    rng = np.random.default_rng(0)
    rows, cols, n = 1024, 4096, 2
    packed = _core.pack_trits(rng.integers(-1, 2, size=(rows, cols), dtype=np.int8))
    x = rng.integers(-127, 128, size=(n, cols), dtype=np.int8)
    arg = x.copy()
    got, want = _race(lambda: _core.ternary_gemm_i32(packed, arg, kernel="scalar", threads=1), arg, attack)
    np.testing.assert_array_equal(want, _core.ternary_gemm_i32(packed, x, kernel="scalar", threads=1))
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("attack", ["write", "free"])
def test_sinkhorn_logits_are_copied_before_the_gil_is_released(attack: str) -> None:
    """Sinkhorn releases the GIL once per chunk of the batch, so a borrowed input would be read long after the call
    began; the copy makes the result that of the input as passed."""
    logits = np.random.default_rng(1).standard_normal((200_000, 4, 4)).astype(np.float32)
    arg = logits.copy()
    got, want = _race(lambda: _core.sinkhorn_forward(arg, iters=20, threads=1), arg, attack)
    np.testing.assert_array_equal(want, _core.sinkhorn_forward(logits, iters=20, threads=1))
    np.testing.assert_array_equal(got, want)

//! `nanochat._core`: the thin PyO3 layer over `nanochat-core`.
//!
//! Arguments are checked here (dtype, shape, contiguity) with messages that name the argument;
//! contiguous numpy inputs are borrowed, never copied; the work runs with the GIL released; core
//! errors map to Python exceptions in one place ([`to_py_err`]); a panic in the core is caught
//! and raised as `RuntimeError`, never crossing into Python as a `PanicException`; thread counts
//! above `max_threads()` and iteration counts above the core's limits are refused at once, and
//! buffers sized by the caller's numbers are allocated fallibly (`MemoryError`, never an abort).

mod checksum;
mod convert;
mod engine;
mod mhc;

use convert::{array_i8, array_u8, f32_array, guarded, owned, shape2, to_py_err};
use nanochat_core::error::{checked_len, try_zeroed};
use nanochat_core::kernels::{self, Kernel, TernaryView};
use nanochat_core::ternary::{self, tq1_0, tq2_0, QK_K};
use numpy::{IntoPyArray, PyArray1, PyArray2, PyArrayDyn, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

pyo3::create_exception!(
    _core,
    ShapeError,
    PyValueError,
    "Array shapes or sizes that do not fit together."
);
pyo3::create_exception!(
    _core,
    KernelUnavailableError,
    pyo3::exceptions::PyRuntimeError,
    "The requested kernel cannot run on this CPU."
);
pyo3::create_exception!(
    _core,
    NotDoublyStochasticError,
    PyValueError,
    "A matrix that must be doubly stochastic is not (within tolerance)."
);

fn kernel_arg(kernel: Option<&str>) -> PyResult<Kernel> {
    match kernel {
        None | Some("auto") => Ok(Kernel::default_choice().0),
        Some(name) => Kernel::from_name(name).map_err(to_py_err),
    }
}

/// BitNet b1.58 absmean quantization of an f32 array: returns `(trits int8 same shape, scale)`
/// with `scale = max(mean|w|, 1e-5)` and `trits = clamp(round_half_even(w / scale), -1, 1)`.
#[pyfunction]
fn quantize_absmean<'py>(
    py: Python<'py>,
    w: &Bound<'py, PyAny>,
) -> PyResult<(Bound<'py, PyArrayDyn<i8>>, f32)> {
    let arr = f32_array(w, "w")?;
    let shape = arr.shape().to_vec();
    let data = owned(arr, "w")?;
    let t = py.detach(|| guarded(|| ternary::quantize_absmean(&data)))?;
    Ok((PyArray1::from_vec(py, t.trits).reshape(shape)?, t.scale))
}

/// Per-row absmax int8 quantization of `x` (`n × k` f32): returns `(q int8 n × k, scales f32 n)`
/// with `q = clamp(round_half_even(x · 127/absmax), -128, 127)` and `scale = absmax / 127`.
#[pyfunction]
fn quantize_acts_i8<'py>(py: Python<'py>, x: &Bound<'py, PyAny>) -> PyResult<Int8WithScales<'py>> {
    let arr = f32_array(x, "x")?;
    let (n, k) = shape2(arr.shape(), "x")?;
    let data = owned(arr, "x")?;
    let q = py.detach(|| guarded(|| ternary::quantize_acts_i8(&data, k)))?;
    Ok((
        PyArray1::from_vec(py, q.values).reshape([n, k])?,
        q.scales.into_pyarray(py),
    ))
}

type Int8WithScales<'py> = (Bound<'py, PyArray2<i8>>, Bound<'py, PyArray1<f32>>);

macro_rules! block_format {
    ($fmt:ident, $quantize:ident, $dequantize:ident, $pack:ident, $unpack:ident, $name:literal) => {
        #[doc = concat!("Quantize an f32 array (`rows × cols`, cols a multiple of 256) to ", $name, " exactly as `gguf.quants.quantize`; returns uint8 `rows × bytes`.")]
        #[pyfunction]
        fn $quantize<'py>(py: Python<'py>, x: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyArray2<u8>>> {
            let arr = f32_array(x, "x")?;
            let (rows, cols) = shape2(arr.shape(), "x")?;
            ternary::check_block_multiple(cols, concat!($name, " quantize")).map_err(to_py_err)?;
            let data = owned(arr, "x")?;
            let out = py.detach(|| guarded(|| $fmt::quantize(&data)))?;
            let bytes = cols / QK_K * $fmt::BLOCK_BYTES;
            PyArray1::from_vec(py, out).reshape([rows, bytes])
        }

        #[doc = concat!("Dequantize ", $name, " bytes (`rows × bytes` uint8) to f32 `rows × cols`, exactly as `gguf.quants.dequantize`.")]
        #[pyfunction]
        fn $dequantize<'py>(py: Python<'py>, data: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyArray2<f32>>> {
            let arr = array_u8(data, "data")?;
            let (rows, nbytes) = shape2(arr.shape(), "data")?;
            if nbytes % $fmt::BLOCK_BYTES != 0 {
                return Err(ShapeError::new_err(format!(
                    "data: row of {nbytes} bytes is not a whole number of {}-byte {} blocks",
                    $fmt::BLOCK_BYTES, $name
                )));
            }
            let data = owned(arr, "data")?;
            let out = py.detach(|| guarded(|| $fmt::dequantize(&data)))?;
            PyArray1::from_vec(py, out).reshape([rows, nbytes / $fmt::BLOCK_BYTES * QK_K])
        }

        #[doc = concat!("Pack trits (`rows × cols` int8 in {-1,0,1}) with one scale into ", $name, " blocks (each block's d = fp16(scale)).")]
        #[pyfunction]
        fn $pack<'py>(py: Python<'py>, trits: &Bound<'py, PyAny>, scale: f32) -> PyResult<Bound<'py, PyArray2<u8>>> {
            let arr = array_i8(trits, "trits")?;
            let (rows, cols) = shape2(arr.shape(), "trits")?;
            ternary::check_block_multiple(cols, concat!($name, " pack")).map_err(to_py_err)?;
            let data = owned(arr, "trits")?;
            let out = py.detach(|| guarded(|| $fmt::pack(&data, scale)))?;
            PyArray1::from_vec(py, out).reshape([rows, cols / QK_K * $fmt::BLOCK_BYTES])
        }

        #[doc = concat!("Unpack ", $name, " bytes (`rows × bytes`) into `(trits int8 rows × cols, d f32 rows × blocks)`.")]
        #[pyfunction]
        fn $unpack<'py>(
            py: Python<'py>,
            data: &Bound<'py, PyAny>,
        ) -> PyResult<(Bound<'py, PyArray2<i8>>, Bound<'py, PyArray2<f32>>)> {
            let arr = array_u8(data, "data")?;
            let (rows, nbytes) = shape2(arr.shape(), "data")?;
            if nbytes % $fmt::BLOCK_BYTES != 0 {
                return Err(ShapeError::new_err(format!(
                    "data: row of {nbytes} bytes is not a whole number of {}-byte {} blocks",
                    $fmt::BLOCK_BYTES, $name
                )));
            }
            let data = owned(arr, "data")?;
            let (t, d) = py.detach(|| guarded(|| $fmt::unpack(&data)))?;
            let nb = nbytes / $fmt::BLOCK_BYTES;
            Ok((
                PyArray1::from_vec(py, t).reshape([rows, nb * QK_K])?,
                PyArray1::from_vec(py, d).reshape([rows, nb])?,
            ))
        }
    };
}

block_format!(
    tq2_0,
    quantize_tq2_0,
    dequantize_tq2_0,
    pack_tq2_0,
    unpack_tq2_0,
    "TQ2_0"
);
block_format!(
    tq1_0,
    quantize_tq1_0,
    dequantize_tq1_0,
    pack_tq1_0,
    unpack_tq1_0,
    "TQ1_0"
);

/// Pack trits (`rows × cols` int8, cols a multiple of 256) into the kernel layout: uint8
/// `rows × cols/4`, TQ2_0's `qs` codes without the per-block scale.
#[pyfunction]
fn pack_trits<'py>(
    py: Python<'py>,
    trits: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyArray2<u8>>> {
    let arr = array_i8(trits, "trits")?;
    let (rows, cols) = shape2(arr.shape(), "trits")?;
    let data = owned(arr, "trits")?;
    let m = py.detach(|| guarded(|| kernels::TernaryMatrix::from_trits(&data, rows, cols, 1.0)))?;
    PyArray1::from_vec(py, m.qs).reshape([rows, cols / 4])
}

/// Convert TQ2_0 bytes (`rows × bytes`) to the kernel layout: `(uint8 rows × cols/4, scale)`.
/// Fails if blocks carry different non-zero scales.
#[pyfunction]
fn tq2_0_to_kernel_layout<'py>(
    py: Python<'py>,
    data: &Bound<'py, PyAny>,
) -> PyResult<(Bound<'py, PyArray2<u8>>, f32)> {
    let arr = array_u8(data, "data")?;
    let (rows, nbytes) = shape2(arr.shape(), "data")?;
    if nbytes % tq2_0::BLOCK_BYTES != 0 {
        return Err(ShapeError::new_err(format!(
            "data: row of {nbytes} bytes is not whole TQ2_0 blocks"
        )));
    }
    let cols = nbytes / tq2_0::BLOCK_BYTES * QK_K;
    // A load's blocks (tens of MB of a memory-mapped file) are borrowed and repacked with the GIL
    // held: copying them first, to release it, cost as much again (issue 13: load time).
    let blocks = arr.as_slice()?;
    let m = guarded(|| kernels::TernaryMatrix::from_tq2_0(blocks, rows, cols))?;
    Ok((
        PyArray1::from_vec(py, m.qs).reshape([rows, cols / 4])?,
        m.scale,
    ))
}

/// Exact integer products `out[i, r] = Σ_c trit[r, c] · x[i, c]` for packed weights
/// (`rows × cols/4` uint8, kernel layout) and int8 activations (`n × cols`). Returns int32 `n × rows`.
///
/// The GIL is released during the product. `x` is copied first; `packed` is *borrowed* (copying
/// the weights would cost as much as the product itself): the call holds a reference, so the
/// array stays alive, and numpy's borrow tracking keeps other Rust code from writing it, but the
/// caller must not write it from another Python thread (or `resize(refcheck=False)` it) until the
/// call returns. `ops.ternary_linear` passes a module's packed buffer, which nothing writes
/// during a forward (the custom op declares no mutated arguments).
#[pyfunction]
#[pyo3(signature = (packed, x, kernel=None, threads=0))]
fn ternary_gemm_i32<'py>(
    py: Python<'py>,
    packed: &Bound<'py, PyAny>,
    x: &Bound<'py, PyAny>,
    kernel: Option<&str>,
    threads: usize,
) -> PyResult<Bound<'py, PyArray2<i32>>> {
    kernels::check_threads(threads, "ternary_gemm_i32").map_err(to_py_err)?;
    let k = kernel_arg(kernel)?;
    let w = array_u8(packed, "packed")?;
    let (rows, rb) = shape2(w.shape(), "packed")?;
    let xa = array_i8(x, "x")?;
    let (n, cols) = shape2(xa.shape(), "x")?;
    if cols != rb * 4 {
        return Err(ShapeError::new_err(format!(
            "x has {cols} columns but packed weights have {} (= 4 × {rb} bytes per row)",
            rb * 4
        )));
    }
    // The activations are copied (see `owned`); the weights are borrowed (see the docs above).
    let (ws, xs) = (w.as_slice()?, owned(xa, "x")?);
    let out = py.detach(|| {
        guarded(|| {
            let view = TernaryView::new(ws, rows, cols, 1.0)?;
            let mut out = try_zeroed(checked_len(n, rows, "output")?, "output")?;
            kernels::gemm_i32(k, &view, &xs, n, &mut out, threads)?;
            Ok(out)
        })
    })?;
    PyArray1::from_vec(py, out).reshape([n, rows])
}

/// `y = x · Wᵀ` with `W = trits · scale` packed (`rows × cols/4` uint8) and `x` f32 `n × cols`
/// quantized to int8 per row inside. Returns f32 `n × rows`. `x` is copied and `packed` borrowed
/// while the GIL is released, as in `ternary_gemm_i32`.
#[pyfunction]
#[pyo3(signature = (x, packed, scale, kernel=None, threads=0))]
fn ternary_linear<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    packed: &Bound<'py, PyAny>,
    scale: f32,
    kernel: Option<&str>,
    threads: usize,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    kernels::check_threads(threads, "ternary_linear").map_err(to_py_err)?;
    let k = kernel_arg(kernel)?;
    let w = array_u8(packed, "packed")?;
    let (rows, rb) = shape2(w.shape(), "packed")?;
    let xa = f32_array(x, "x")?;
    let (n, cols) = shape2(xa.shape(), "x")?;
    if cols != rb * 4 {
        return Err(ShapeError::new_err(format!(
            "x has {cols} features but packed weights have {} (= 4 × {rb} bytes per row)",
            rb * 4
        )));
    }
    // The activations are copied (see `owned`); the weights are borrowed (see the docs above).
    let (ws, xs) = (w.as_slice()?, owned(xa, "x")?);
    let out = py.detach(|| {
        guarded(|| {
            let view = TernaryView::new(ws, rows, cols, scale)?;
            let mut out = try_zeroed(checked_len(n, rows, "output")?, "output")?;
            kernels::ternary_linear(k, &view, &xs, n, &mut out, threads)?;
            Ok(out)
        })
    })?;
    PyArray1::from_vec(py, out).reshape([n, rows])
}

/// Names of the kernels this CPU runs, slowest first.
#[pyfunction]
fn available_kernels() -> Vec<&'static str> {
    Kernel::available().iter().map(|k| k.name()).collect()
}

/// The kernel used when none is named, and why it was chosen (`NANOCHAT_KERNEL` or detection).
#[pyfunction]
fn default_kernel() -> (&'static str, String) {
    let (k, why) = Kernel::default_choice();
    (k.name(), why.clone())
}

/// Set the kernels' default thread count (0 = automatic: `NANOCHAT_THREADS` or all cores);
/// more than `max_threads()` raises ValueError.
#[pyfunction]
fn set_num_threads(n: usize) -> PyResult<()> {
    kernels::set_num_threads(n).map_err(to_py_err)
}

/// The most threads any call accepts (4 × the cores, at least 8).
#[pyfunction]
fn max_threads() -> usize {
    kernels::max_threads()
}

/// The kernels' default thread count.
#[pyfunction]
fn get_num_threads() -> usize {
    kernels::num_threads()
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("ShapeError", py.get_type::<ShapeError>())?;
    m.add(
        "KernelUnavailableError",
        py.get_type::<KernelUnavailableError>(),
    )?;
    m.add(
        "NotDoublyStochasticError",
        py.get_type::<NotDoublyStochasticError>(),
    )?;
    m.add("QK_K", QK_K)?;
    m.add("TQ2_0_BLOCK_BYTES", tq2_0::BLOCK_BYTES)?;
    m.add("TQ1_0_BLOCK_BYTES", tq1_0::BLOCK_BYTES)?;
    m.add_function(wrap_pyfunction!(quantize_absmean, m)?)?;
    m.add_function(wrap_pyfunction!(quantize_acts_i8, m)?)?;
    m.add_function(wrap_pyfunction!(quantize_tq2_0, m)?)?;
    m.add_function(wrap_pyfunction!(dequantize_tq2_0, m)?)?;
    m.add_function(wrap_pyfunction!(pack_tq2_0, m)?)?;
    m.add_function(wrap_pyfunction!(unpack_tq2_0, m)?)?;
    m.add_function(wrap_pyfunction!(quantize_tq1_0, m)?)?;
    m.add_function(wrap_pyfunction!(dequantize_tq1_0, m)?)?;
    m.add_function(wrap_pyfunction!(pack_tq1_0, m)?)?;
    m.add_function(wrap_pyfunction!(unpack_tq1_0, m)?)?;
    m.add_function(wrap_pyfunction!(pack_trits, m)?)?;
    m.add_function(wrap_pyfunction!(tq2_0_to_kernel_layout, m)?)?;
    m.add_function(wrap_pyfunction!(ternary_gemm_i32, m)?)?;
    m.add_function(wrap_pyfunction!(ternary_linear, m)?)?;
    m.add_function(wrap_pyfunction!(available_kernels, m)?)?;
    m.add_function(wrap_pyfunction!(default_kernel, m)?)?;
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(get_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(max_threads, m)?)?;
    mhc::register(m)?;
    engine::register(m)?;
    checksum::register(m)?;
    Ok(())
}

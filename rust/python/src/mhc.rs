//! Bindings for the mHC projections (Sinkhorn-Knopp, permutation basis, BvN, diagnostics).

use crate::convert::{f32_array, f64_array, guarded, owned, to_py_err};
use crate::ShapeError;
use nanochat_core::error::try_zeroed;
use nanochat_core::mhc;
use numpy::{
    Element, IntoPyArray, PyArray1, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArray,
    PyUntypedArrayMethods,
};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

/// `(batch, n)` of an array of shape `(..., n, n)`.
fn square_batch(shape: &[usize], name: &str) -> PyResult<(usize, usize)> {
    match shape {
        [lead @ .., a, b] if a == b => Ok((lead.iter().product(), *a)),
        _ => Err(ShapeError::new_err(format!(
            "{name}: expected shape (..., n, n), got {shape:?}"
        ))),
    }
}

/// Which float type a numpy array holds, or a TypeError naming the argument.
enum Float {
    F32,
    F64,
}

fn float_kind(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<Float> {
    if obj.cast::<PyArrayDyn<f64>>().is_ok() {
        return Ok(Float::F64);
    }
    if obj.cast::<PyArrayDyn<f32>>().is_ok() {
        return Ok(Float::F32);
    }
    let got = match obj.cast::<PyUntypedArray>() {
        Ok(a) => format!(
            "dtype {}",
            a.dtype()
                .str()
                .map(|s| s.to_string())
                .unwrap_or_else(|_| "?".into())
        ),
        Err(_) => obj
            .get_type()
            .name()
            .map(|n| n.to_string())
            .unwrap_or_else(|_| "?".into()),
    };
    Err(PyTypeError::new_err(format!(
        "{name}: expected a numpy.ndarray of float32 or float64, got {got}"
    )))
}

/// Thread and iteration limits, checked before any allocation or work.
fn precheck(n: usize, iters: usize, threads: usize) -> PyResult<()> {
    nanochat_core::kernels::check_threads(threads, "sinkhorn").map_err(to_py_err)?;
    mhc::sinkhorn::check_iters(n, iters).map_err(to_py_err)
}

fn forward_typed<'py, T: mhc::Real + Element + Default>(
    py: Python<'py>,
    x: PyReadonlyArrayDyn<'py, T>,
    iters: usize,
    threads: usize,
) -> PyResult<Bound<'py, PyAny>> {
    let shape = x.shape().to_vec();
    let (_, n) = square_batch(&shape, "logits")?;
    precheck(n, iters, threads)?;
    let xs = owned(x, "logits")?;
    let mut out = try_zeroed(xs.len(), "sinkhorn output").map_err(to_py_err)?;
    let step = (mhc::sinkhorn::interrupt_chunk(n, iters) * n * n).max(1);
    for (xc, oc) in xs.chunks(step).zip(out.chunks_mut(step)) {
        py.detach(|| guarded(|| mhc::sinkhorn_forward(xc, n, iters, oc, threads)))?;
        // Between chunks: let Ctrl-C (and other signal handlers) run.
        py.check_signals()?;
    }
    Ok(PyArray1::from_vec(py, out).reshape(shape)?.into_any())
}

fn backward_typed<'py, T: mhc::Real + Element + Default>(
    py: Python<'py>,
    x: PyReadonlyArrayDyn<'py, T>,
    g: PyReadonlyArrayDyn<'py, T>,
    iters: usize,
    threads: usize,
) -> PyResult<Bound<'py, PyAny>> {
    let shape = x.shape().to_vec();
    square_batch(&shape, "logits")?;
    if g.shape() != shape.as_slice() {
        return Err(ShapeError::new_err(format!(
            "grad_out has shape {:?} but logits have {shape:?}",
            g.shape()
        )));
    }
    let n = shape[shape.len() - 1];
    precheck(n, iters, threads)?;
    let (xs, gs) = (owned(x, "logits")?, owned(g, "grad_out")?);
    let mut out = try_zeroed(xs.len(), "sinkhorn gradient").map_err(to_py_err)?;
    let step = (mhc::sinkhorn::interrupt_chunk(n, iters) * n * n).max(1);
    for ((xc, gc), oc) in xs
        .chunks(step)
        .zip(gs.chunks(step))
        .zip(out.chunks_mut(step))
    {
        py.detach(|| guarded(|| mhc::sinkhorn_backward(xc, gc, n, iters, oc, threads)))?;
        py.check_signals()?;
    }
    Ok(PyArray1::from_vec(py, out).reshape(shape)?.into_any())
}

/// Sinkhorn-Knopp projection of `exp(logits)` for `logits` of shape `(..., n, n)` (float32 or
/// float64, C-contiguous): `iters` times normalise rows then columns, in the log domain's
/// semantics (computed in f64). Returns `P`, same shape and dtype. `threads = 0` uses the
/// shared thread budget (`set_num_threads`). `iters` is at most `SINKHORN_MAX_ITERS`; a long
/// batch runs in chunks with a check for Ctrl-C between them.
#[pyfunction]
#[pyo3(signature = (logits, iters=20, threads=0))]
fn sinkhorn_forward<'py>(
    py: Python<'py>,
    logits: &Bound<'py, PyAny>,
    iters: usize,
    threads: usize,
) -> PyResult<Bound<'py, PyAny>> {
    match float_kind(logits, "logits")? {
        Float::F64 => forward_typed(py, f64_array(logits, "logits")?, iters, threads),
        Float::F32 => forward_typed(py, f32_array(logits, "logits")?, iters, threads),
    }
}

/// Exact gradient of `sinkhorn_forward(logits, iters)` w.r.t. `logits` for the upstream gradient
/// `grad_out = ∂L/∂P` (same shape and dtype as `logits`), by unrolling the iterations.
#[pyfunction]
#[pyo3(signature = (logits, grad_out, iters=20, threads=0))]
fn sinkhorn_backward<'py>(
    py: Python<'py>,
    logits: &Bound<'py, PyAny>,
    grad_out: &Bound<'py, PyAny>,
    iters: usize,
    threads: usize,
) -> PyResult<Bound<'py, PyAny>> {
    match float_kind(logits, "logits")? {
        Float::F64 => backward_typed(
            py,
            f64_array(logits, "logits")?,
            f64_array(grad_out, "grad_out")?,
            iters,
            threads,
        ),
        Float::F32 => backward_typed(
            py,
            f32_array(logits, "logits")?,
            f32_array(grad_out, "grad_out")?,
            iters,
            threads,
        ),
    }
}

/// All `n!` permutations of `range(n)` as int64 index vectors `(n!, n)`, in the order of
/// `itertools.permutations(range(n))` (identity first). `1 ≤ n ≤ 8`.
#[pyfunction]
fn permutations<'py>(py: Python<'py>, n: usize) -> PyResult<Bound<'py, PyAny>> {
    let p = guarded(|| mhc::permutations(n))?;
    let rows = p.len() / n;
    let p: Vec<i64> = p.into_iter().map(|v| v as i64).collect();
    Ok(PyArray1::from_vec(py, p).reshape([rows, n])?.into_any())
}

/// All `n!` permutation matrices as float32 `(n!, n, n)`, in `permutations(n)` order:
/// `P[k, i, j] = 1` iff `j == permutations(n)[k, i]`. `1 ≤ n ≤ 8`.
#[pyfunction]
fn permutation_basis<'py>(py: Python<'py>, n: usize) -> PyResult<Bound<'py, PyAny>> {
    let m = py.detach(|| guarded(|| mhc::permutation_matrices(n)))?;
    let k = m.len() / (n * n);
    Ok(PyArray1::from_vec(py, m).reshape([k, n, n])?.into_any())
}

fn square_f64<'py>(
    m: &Bound<'py, PyAny>,
    name: &str,
) -> PyResult<(PyReadonlyArrayDyn<'py, f64>, usize)> {
    let arr = f64_array(m, name)?;
    let n = match arr.shape() {
        [a, b] if a == b && *a > 0 => *a,
        s => {
            return Err(ShapeError::new_err(format!(
                "{name}: expected a non-empty square 2-D array (n, n), got shape {s:?}"
            )))
        }
    };
    Ok((arr, n))
}

/// Birkhoff–von Neumann decomposition of a doubly stochastic float64 `(n, n)` matrix (rows and
/// columns summing to 1 within `tol`, entries ≥ −tol): returns `(weights float64 (k,),
/// perms int64 (k, n))` with `k ≤ (n−1)²+1`, positive weights summing to 1 (largest first) and
/// `m ≈ Σ_k weights[k] · P(perms[k])`, where `P(p)[i, p[i]] = 1`. Raises
/// `NotDoublyStochasticError` otherwise.
#[pyfunction]
#[pyo3(signature = (m, tol=1e-6))]
fn bvn_decompose<'py>(
    py: Python<'py>,
    m: &Bound<'py, PyAny>,
    tol: f64,
) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
    let (arr, n) = square_f64(m, "m")?;
    let data = owned(arr, "m")?;
    let bvn = py.detach(|| guarded(|| mhc::bvn_decompose(&data, n, tol)))?;
    let k = bvn.weights.len();
    let perms: Vec<i64> = bvn.perms.iter().map(|&v| v as i64).collect();
    Ok((
        bvn.weights.into_pyarray(py).into_any(),
        PyArray1::from_vec(py, perms).reshape([k, n])?.into_any(),
    ))
}

/// BvN decomposition of `m` (as `bvn_decompose`) spread over the permutation basis: float64
/// `(n!,)` weights in `permutations(n)` order (`n ≤ 8`), so that
/// `m ≈ Σ_k w[k] · permutation_basis(n)[k]` — the `mhc_lite` form of an `mhc` matrix.
#[pyfunction]
#[pyo3(signature = (m, tol=1e-6))]
fn bvn_basis_weights<'py>(
    py: Python<'py>,
    m: &Bound<'py, PyAny>,
    tol: f64,
) -> PyResult<Bound<'py, PyAny>> {
    let (arr, n) = square_f64(m, "m")?;
    let data = owned(arr, "m")?;
    let w = py.detach(|| guarded(|| mhc::bvn_decompose(&data, n, tol)?.basis_weights()))?;
    Ok(w.into_pyarray(py).into_any())
}

/// Diagnostics of the residual mixing matrices of all layers, float64 `(L, n, n)` in layer
/// order. Returns a dict: `row_sum_err`, `col_sum_err` (float64 `(L,)`: per matrix the largest
/// `|sum − 1|` over rows / columns), `max_row_sum_err`, `max_col_sum_err` (floats),
/// `composite` (float64 `(n, n)`: `H[L−1] ⋯ H[1] H[0]`, the map from the first layer's stream
/// to the last's), `composite_gain` (its largest absolute row sum) and `composite_col_gain`
/// (its largest absolute column sum).
#[pyfunction]
fn hres_diagnostics<'py>(
    py: Python<'py>,
    mats: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyDict>> {
    let arr = f64_array(mats, "mats")?;
    let n = match arr.shape() {
        [_, a, b] if a == b && *a > 0 => *a,
        s => {
            return Err(ShapeError::new_err(format!(
                "mats: expected shape (L, n, n) with n ≥ 1, got {s:?}"
            )))
        }
    };
    let data = owned(arr, "mats")?;
    let d = py.detach(|| guarded(|| mhc::hres_diagnostics(&data, n)))?;
    let out = PyDict::new(py);
    out.set_item("max_row_sum_err", d.max_row_sum_err())?;
    out.set_item("max_col_sum_err", d.max_col_sum_err())?;
    out.set_item("composite_gain", d.composite_gain)?;
    out.set_item("composite_col_gain", d.composite_col_gain)?;
    out.set_item("row_sum_err", d.row_sum_err.into_pyarray(py))?;
    out.set_item("col_sum_err", d.col_sum_err.into_pyarray(py))?;
    out.set_item(
        "composite",
        PyArray1::from_vec(py, d.composite).reshape([n, n])?,
    )?;
    Ok(out)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("SINKHORN_DEFAULT_ITERS", mhc::DEFAULT_ITERS)?;
    m.add("MAX_BASIS_N", mhc::MAX_BASIS_N)?;
    m.add("SINKHORN_MAX_ITERS", mhc::sinkhorn::MAX_ITERS)?;
    m.add_function(wrap_pyfunction!(sinkhorn_forward, m)?)?;
    m.add_function(wrap_pyfunction!(sinkhorn_backward, m)?)?;
    m.add_function(wrap_pyfunction!(permutations, m)?)?;
    m.add_function(wrap_pyfunction!(permutation_basis, m)?)?;
    m.add_function(wrap_pyfunction!(bvn_decompose, m)?)?;
    m.add_function(wrap_pyfunction!(bvn_basis_weights, m)?)?;
    m.add_function(wrap_pyfunction!(hres_diagnostics, m)?)?;
    Ok(())
}

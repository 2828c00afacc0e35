//! Argument conversion and error mapping shared by all bindings.

use crate::{KernelUnavailableError, NotDoublyStochasticError, ShapeError};
use nanochat_core::Error;
use numpy::{
    Element, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyMemoryError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;

/// The one place core errors become Python exceptions.
pub fn to_py_err(e: Error) -> PyErr {
    match e {
        Error::Shape(m) => ShapeError::new_err(m),
        Error::Value(m) => PyValueError::new_err(m),
        e @ Error::KernelUnavailable(..) => KernelUnavailableError::new_err(e.to_string()),
        Error::NotDoublyStochastic(m) => NotDoublyStochasticError::new_err(m),
        Error::OutOfMemory(m) => PyMemoryError::new_err(m),
        // A fault of the library or the OS, not of the caller: never ValueError (which the
        // server would report as the client's mistake).
        Error::Internal(m) => {
            PyRuntimeError::new_err(format!("internal error in nanochat core: {m}"))
        }
    }
}

/// Run core code, turning its errors into Python exceptions and any panic into `RuntimeError`.
pub fn guarded<T>(f: impl FnOnce() -> nanochat_core::Result<T>) -> PyResult<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r.map_err(to_py_err),
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            Err(PyRuntimeError::new_err(format!(
                "internal error in nanochat core: {msg}"
            )))
        }
    }
}

/// Borrow a C-contiguous numpy array of element type `T`, or raise a TypeError/ValueError
/// naming the argument, the expected and the actual dtype.
fn typed_array<'py, T: Element>(
    obj: &Bound<'py, PyAny>,
    name: &str,
    dtype: &str,
) -> PyResult<PyReadonlyArrayDyn<'py, T>> {
    let untyped = obj.cast::<PyUntypedArray>().map_err(|_| {
        let ty = obj
            .get_type()
            .name()
            .map(|n| n.to_string())
            .unwrap_or_else(|_| "?".into());
        PyTypeError::new_err(format!(
            "{name}: expected a numpy.ndarray of {dtype}, got {ty}"
        ))
    })?;
    let arr = untyped.cast::<PyArrayDyn<T>>().map_err(|_| {
        let got = untyped
            .dtype()
            .str()
            .map(|s| s.to_string())
            .unwrap_or_else(|_| "?".into());
        PyTypeError::new_err(format!("{name}: expected dtype {dtype}, got {got}"))
    })?;
    if !untyped.is_c_contiguous() {
        return Err(PyValueError::new_err(format!(
            "{name}: array must be C-contiguous (use numpy.ascontiguousarray)"
        )));
    }
    Ok(arr.readonly())
}

/// A copy of an array's elements, taken while the GIL is held. Work that runs after
/// `py.detach` reads only owned inputs (STYLE): without the GIL another Python thread may write
/// the array meanwhile (a data race, i.e. undefined behaviour for a `&[T]`), or free its buffer
/// (`ndarray.resize(refcheck=False)`). Activations, token ids, Sinkhorn logits and load-time
/// conversions are copied; only the packed weights of the two kernel entry points are borrowed
/// (see `ternary_gemm_i32`). The borrow is consumed, so numpy's borrow flag is released before the
/// GIL is (numpy-rs keys it by the data pointer, which a resize moves). An allocation failure is
/// a MemoryError naming the argument.
pub fn owned<T: Element + Copy>(arr: PyReadonlyArrayDyn<'_, T>, name: &str) -> PyResult<Vec<T>> {
    let s = arr.as_slice()?;
    let mut v = Vec::new();
    v.try_reserve_exact(s.len())
        .map_err(|_| PyMemoryError::new_err(format!("{name}: cannot copy {} elements", s.len())))?;
    v.extend_from_slice(s);
    Ok(v)
}

pub fn f32_array<'py>(
    obj: &Bound<'py, PyAny>,
    name: &str,
) -> PyResult<PyReadonlyArrayDyn<'py, f32>> {
    typed_array(obj, name, "float32")
}

pub fn array_u8<'py>(obj: &Bound<'py, PyAny>, name: &str) -> PyResult<PyReadonlyArrayDyn<'py, u8>> {
    typed_array(obj, name, "uint8")
}

pub fn array_u16<'py>(
    obj: &Bound<'py, PyAny>,
    name: &str,
) -> PyResult<PyReadonlyArrayDyn<'py, u16>> {
    typed_array(obj, name, "uint16")
}

pub fn array_i8<'py>(obj: &Bound<'py, PyAny>, name: &str) -> PyResult<PyReadonlyArrayDyn<'py, i8>> {
    typed_array(obj, name, "int8")
}

pub fn f64_array<'py>(
    obj: &Bound<'py, PyAny>,
    name: &str,
) -> PyResult<PyReadonlyArrayDyn<'py, f64>> {
    typed_array(obj, name, "float64")
}

/// Dimensions of a 2-D array, or a ShapeError naming the argument.
pub fn shape2(shape: &[usize], name: &str) -> PyResult<(usize, usize)> {
    match shape {
        [a, b] if *a > 0 && *b > 0 => Ok((*a, *b)),
        [_, _] => Err(ShapeError::new_err(format!(
            "{name}: empty array of shape {shape:?}"
        ))),
        _ => Err(ShapeError::new_err(format!(
            "{name}: expected a 2-D array, got {} dimension(s) with shape {shape:?}",
            shape.len()
        ))),
    }
}

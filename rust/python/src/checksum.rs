//! Binding for the content checksum of model files (`nanochat_core::checksum`).

use crate::convert::array_u8;
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

/// XXH3-128 (seed 0) of the concatenation of `parts`, as 32 lowercase hex digits. Each part is
/// `bytes` or a C-contiguous numpy uint8 array (e.g. `np.frombuffer` of a memory map: no copy).
///
/// The parts are borrowed, so the hash runs with the GIL held (no other Python thread can write
/// or free them meanwhile; copying them to release it would cost more than the hash, ~5 ms for
/// a 50 MB model).
#[pyfunction]
fn xxh3_128_hex(parts: Vec<Bound<'_, PyAny>>) -> PyResult<String> {
    let mut arrays = Vec::new();
    let mut bytes: Vec<(usize, &[u8])> = Vec::new();
    for (i, p) in parts.iter().enumerate() {
        if let Ok(b) = p.cast::<PyBytes>() {
            bytes.push((i, b.as_bytes()));
        } else if p.cast::<numpy::PyUntypedArray>().is_ok() {
            arrays.push((i, array_u8(p, &format!("parts[{i}]"))?));
        } else {
            let ty = p
                .get_type()
                .name()
                .map(|n| n.to_string())
                .unwrap_or_else(|_| "?".into());
            return Err(PyTypeError::new_err(format!(
                "parts[{i}]: expected bytes or a numpy uint8 array, got {ty}"
            )));
        }
    }
    let mut slices: Vec<(usize, &[u8])> = bytes;
    for (i, a) in &arrays {
        slices.push((*i, a.as_slice()?));
    }
    slices.sort_unstable_by_key(|(i, _)| *i);
    let ordered: Vec<&[u8]> = slices.into_iter().map(|(_, s)| s).collect();
    Ok(nanochat_core::checksum::xxh3_128_hex(&ordered))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(xxh3_128_hex, m)?)?;
    Ok(())
}

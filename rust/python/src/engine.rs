//! Bindings for the Rust inference engine (KV-cache forward step).

use pyo3::prelude::*;

pub fn register(_m: &Bound<'_, PyModule>) -> PyResult<()> {
    Ok(())
}

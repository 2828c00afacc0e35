//! The one error type of the core. The binding crate maps each variant to a Python exception.

use thiserror::Error;

/// Everything a caller of `nanochat-core` can get wrong, or that can go wrong for them.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum Error {
    /// Sizes that do not fit together (wrong lengths, mismatched dimensions).
    #[error("shape error: {0}")]
    Shape(String),
    /// A value outside what the operation accepts (NaN scale, unknown kernel name, ...).
    #[error("invalid value: {0}")]
    Value(String),
    /// The requested kernel cannot run on this CPU.
    #[error("kernel '{0}' is not supported on this CPU (available: {1})")]
    KernelUnavailable(String, String),
    /// A matrix that should be doubly stochastic is not (within tolerance).
    #[error("not doubly stochastic: {0}")]
    NotDoublyStochastic(String),
    /// A buffer the request needs cannot be allocated (reported instead of aborting the process).
    #[error("out of memory: {0}")]
    OutOfMemory(String),
    /// A fault of the library or the OS, not of the caller's input (a worker thread panicked, a
    /// thread could not be started). The binding maps it to `RuntimeError`, never `ValueError`.
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Build a [`Error::Shape`] from format arguments.
#[macro_export]
macro_rules! shape_err {
    ($($arg:tt)*) => { $crate::error::Error::Shape(format!($($arg)*)) };
}

/// A zero-filled vector of `len` elements, or [`Error::OutOfMemory`] naming `what` (never the
/// allocator's abort): for buffers whose size follows from caller-controlled numbers.
pub fn try_zeroed<T: Clone + Default>(len: usize, what: &str) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(len).map_err(|_| {
        Error::OutOfMemory(format!(
            "{what}: cannot allocate {len} elements of {} bytes",
            std::mem::size_of::<T>()
        ))
    })?;
    v.resize(len, T::default());
    Ok(v)
}

/// `a · b`, or [`Error::OutOfMemory`] naming `what` when the product overflows `usize`.
pub fn checked_len(a: usize, b: usize, what: &str) -> Result<usize> {
    a.checked_mul(b).ok_or_else(|| {
        Error::OutOfMemory(format!(
            "{what}: {a} × {b} elements overflow the address space"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_allocations_are_errors_not_aborts() {
        let e = try_zeroed::<u64>(1 << 60, "probe").unwrap_err();
        assert!(matches!(e, Error::OutOfMemory(_)), "{e}");
        assert!(e.to_string().contains("probe"), "{e}");
        assert_eq!(try_zeroed::<u8>(3, "small").unwrap(), vec![0u8; 3]);
        assert!(checked_len(usize::MAX, 2, "x").is_err());
        assert_eq!(checked_len(3, 4, "x").unwrap(), 12);
    }
}

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
}

pub type Result<T> = std::result::Result<T, Error>;

/// Build a [`Error::Shape`] from format arguments.
#[macro_export]
macro_rules! shape_err {
    ($($arg:tt)*) => { $crate::error::Error::Shape(format!($($arg)*)) };
}

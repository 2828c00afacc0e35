//! x86-64 SIMD kernels, each behind runtime CPU-feature detection.

use super::{Kernel, PrepareFn, RowsFn};

/// The (prepare, rows) pair of a SIMD kernel if this CPU supports it.
pub fn fns(kernel: Kernel) -> Option<(PrepareFn, RowsFn)> {
    let _ = kernel;
    None
}

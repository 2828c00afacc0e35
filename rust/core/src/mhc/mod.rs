//! mHC residual-stream projections: Sinkhorn-Knopp (forward and backward), the permutation
//! basis of n streams, and the Birkhoff–von Neumann decomposition.
//!
//! * [`sinkhorn`]: batched Sinkhorn-Knopp of `exp(logits)` with an exact unrolled backward —
//!   the `mhc` residual mapping `H_res`.
//! * [`perm`]: all `n!` permutation matrices in lexicographic order (identity first) — the
//!   basis of `mhc_lite`, where `H_res = Σ_k softmax(a)_k P_k`.
//! * [`bvn`]: the inverse of that map, Birkhoff's algorithm: a doubly stochastic matrix as at
//!   most `(n−1)²+1` weighted permutations (diagnostics, `mhc` → `mhc_lite` conversion).
//! * [`diag`]: the training diagnostics of a stack of `H_res` (row/column-sum errors and the
//!   gain of their product).
//!
//! Matrices are row-major `n × n` slices of `f64` (Sinkhorn also reads and writes `f32`); a batch
//! is `b` such matrices back to back. Permutations are index vectors: `perm[i] = j` means
//! `P[i, j] = 1`.

pub mod bvn;
pub mod diag;
pub mod perm;
pub mod sinkhorn;

pub use bvn::{bvn_decompose, Bvn};
pub use diag::{hres_diagnostics, HresDiagnostics};
pub use perm::{permutation_matrices, permutation_rank, permutations, MAX_BASIS_N};
pub use sinkhorn::{sinkhorn_backward, sinkhorn_forward, Real, DEFAULT_ITERS};

// The mHC ops run on the crate's one thread team ([`crate::team`]), sized by the same thread
// budget as the kernels ([`crate::kernels::num_threads`]), so `set_num_threads` governs both.

/// Resolve a thread count (0 = the shared default; too many is an error).
fn resolve_threads(threads: usize) -> crate::Result<usize> {
    crate::kernels::resolve_threads(threads, "sinkhorn")
}

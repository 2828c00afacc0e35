//! nanochat-core: the pure-Rust heart of nanochat.
//!
//! * [`ternary`]: BitNet b1.58 absmean weight quantization, int8 per-token activation
//!   quantization, and the GGUF block formats TQ2_0 and TQ1_0 (byte-identical with `gguf-py`).
//! * [`kernels`]: ternary × int8 GEMV/GEMM — a scalar reference (the oracle) and SIMD variants
//!   chosen at run time, multi-threaded over output rows.
//! * [`checksum`]: XXH3-128 content checksums of model files.
//! * [`mhc`]: Sinkhorn-Knopp and Birkhoff–von Neumann projections for mHC residual streams.
//! * [`engine`]: the GPT forward step with a KV cache on the ternary kernels.
//! * [`team`]: the one thread runtime (a process-wide work-stealing team) of all the above.
//!
//! Nothing here knows about Python or torch: inputs are slices, outputs are plain structs, and
//! every failure a caller can trigger is an [`Error`], never a panic.

#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod checksum;
pub mod engine;
pub mod error;
pub mod kernels;
pub mod mhc;
pub mod team;
pub mod ternary;

pub use error::{Error, Result};

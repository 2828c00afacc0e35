//! Inference engine: a CPU forward step with KV cache over the ternary kernels.

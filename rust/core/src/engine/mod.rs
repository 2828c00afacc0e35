//! Inference engine: the GPT forward step with a KV cache, on the ternary kernels.
//!
//! The math mirrors `python/nanochat/model/gpt.py` in eval mode, operation for operation:
//! token embedding (copied into `n` streams for mHC), per block an attention and an MLP
//! sublayer (pre-norm, BitLinear = int8 per-token absmax activations × ternary weights, QK-norm
//! then NEOX RoPE, causal attention with GQA, BitNet sub-norms before `o_proj` / `down_proj`,
//! SwiGLU or ReLU²), wrapped in a standard residual or an mHC connection (`H_pre`, `H_post`,
//! `H_res` from static biases plus the gated projection of the RMS-normalised flattened streams;
//! `mhc_lite` mixes the `n!` permutation matrices, `mhc` runs Sinkhorn), then the stream mean,
//! the final RMSNorm and the tied (or untied) f32 head.
//!
//! Notable choices:
//! * **One forward for everything.** [`Model::forward`] advances any number of [`Session`]s by
//!   any number of tokens each: all rows go through every matrix in one batched ternary GEMM
//!   (prefill: `n` = prompt length; batched decode: `n` = number of sessions), and attention runs
//!   per session over its own cache. So prefill, decode and the server's batched decode are the
//!   same code.
//! * **Fused projections.** q/k/v are one packed matrix and gate/up another: one activation
//!   quantization and one parallel section instead of three or two. Each keeps its own
//!   per-tensor scale (applied per output row), so results equal the separate products.
//! * **The crate's spinning thread team** ([`crate::team`], borrowed once per forward step) for
//!   the ~50 short parallel sections of a decode step, with work stealing and jobs that close behind late workers so a
//!   busy machine degrades to one-thread speed instead of stalling; the kernels are called
//!   single-threaded on row ranges. Prefill feeds the kernels 32 activation rows at a time over
//!   ~48 KiB weight chunks (cache blocking: ~2× on a 128-token prompt); the `amx` kernel up to
//!   256 rows (it unpacks each weight block once per call). A matrix's activations are prepared
//!   for the kernel once ([`crate::kernels::Kernel::prepare`]) and shared by every work item.
//! * **No allocation per token in the hot loop** of the engine: the workspace is sized on first
//!   use and only grows (longer prompts, bigger batches); the KV cache (head-major, so one head's
//!   keys are contiguous) grows in chunks of [`CACHE_CHUNK`] positions up to the session's
//!   `max_seq`. (The kernels' `gemm_i32` still allocates its small prepared-activation buffers per
//!   call.)
//! * The head only computes the logits that are asked for (the last position of each session by
//!   default): a 128-token prefill does one head product, not 128.
//! * The LM head is the biggest single read of a decode step (`vocab × C` f32: 50 MB for
//!   nano_125m, more than all its ternary weights). [`HeadPrecision`] offers an fp16 copy
//!   (half the bytes, ~1e-4 relative logit error) and a per-row absmax int8 copy with int8
//!   activations (a quarter, ~1e-2). f16 is the default: it halves the biggest read of a decode
//!   step and kept every greedy token of a trained d20 (2,048 positions of code; int8: 98.7%).
//!   A tied f16 head is the only copy besides the f32 embedding rows (no second f32 copy).
//!   [`KvPrecision::F16`] likewise halves the KV cache (its reads dominate at long contexts).
//! * Profiling: [`Model::profile`] returns cumulative time per section when built with
//!   profiling on (timing costs ~0.1 µs per section, off by default).

pub mod attention;
mod forward;
pub mod math;
/// Config keys and tensor names, generated from `nanochat.model.schema`
/// (`scripts/gen_rust_schema.py`).
pub mod schema_gen;

use crate::kernels::{Kernel, TernaryMatrix};
use crate::{shape_err, Error, Result};
use schema_gen as names;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

pub use forward::{Profile, Section};

/// KV-cache growth step, in positions.
pub const CACHE_CHUNK: usize = 256;

/// MLP kind (`GPTConfig.mlp`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MlpKind {
    /// `down(sub_norm(silu(gate(x)) · up(x)))`
    SwiGlu,
    /// `down(sub_norm(relu(up(x))²))`
    Relu2,
}

/// Residual connection (`GPTConfig.residual`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Residual {
    Standard,
    /// `H_res` = softmax-weighted sum of the `n!` permutation matrices.
    MhcLite,
    /// `H_res` = Sinkhorn-Knopp of `exp(logits)`.
    Mhc,
}

/// Precision of the LM head's weight copy ([`HeadPrecision::F16`] by default).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadPrecision {
    /// The f32 embedding (exact to the reference).
    F32,
    /// An fp16 copy (half the bytes; ~1e-4 relative logit error).
    F16,
    /// Per-row absmax int8 copy and int8 activations (a quarter of the bytes; ~1e-2 error).
    Int8,
}

impl HeadPrecision {
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Int8 => "int8",
        }
    }

    pub fn from_name(s: &str) -> Result<Self> {
        match s {
            "f32" | "fp32" => Ok(Self::F32),
            "f16" | "fp16" => Ok(Self::F16),
            "int8" | "i8" => Ok(Self::Int8),
            _ => Err(Error::Value(format!(
                "head precision must be 'f32', 'f16' or 'int8', got '{s}'"
            ))),
        }
    }
}

/// Element type of the KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvPrecision {
    /// f32: exact to the reference.
    F32,
    /// fp16 (round to nearest even): half the cache memory and the attention's reads, which
    /// dominate a decode step at long contexts; ~1e-3 relative error in the attention output.
    F16,
}

impl KvPrecision {
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
        }
    }

    pub fn from_name(s: &str) -> Result<Self> {
        match s {
            "f32" | "fp32" => Ok(Self::F32),
            "f16" | "fp16" => Ok(Self::F16),
            _ => Err(Error::Value(format!(
                "KV cache precision must be 'f32' or 'f16', got '{s}'"
            ))),
        }
    }
}

/// One layer's keys or values in the session's precision.
#[derive(Clone, Debug)]
pub(crate) enum KvBuf {
    F32(Vec<f32>),
    F16(Vec<half::f16>),
}

impl KvBuf {
    fn len(&self) -> usize {
        match self {
            KvBuf::F32(v) => v.len(),
            KvBuf::F16(v) => v.len(),
        }
    }

    fn bytes(&self) -> usize {
        match self {
            KvBuf::F32(v) => v.len() * 4,
            KvBuf::F16(v) => v.len() * 2,
        }
    }

    pub(crate) fn as_ptr(&self) -> *const u8 {
        match self {
            KvBuf::F32(v) => v.as_ptr() as *const u8,
            KvBuf::F16(v) => v.as_ptr() as *const u8,
        }
    }

    /// A copy, or [`Error::OutOfMemory`] (a fork of a long session is a large allocation).
    fn try_clone(&self) -> Result<KvBuf> {
        fn go<T: Copy>(b: &[T]) -> Result<Vec<T>> {
            let mut v = Vec::new();
            v.try_reserve_exact(b.len()).map_err(|_| {
                Error::OutOfMemory(format!(
                    "session fork: cannot copy a KV cache of {} elements",
                    b.len()
                ))
            })?;
            v.extend_from_slice(b);
            Ok(v)
        }
        Ok(match self {
            KvBuf::F32(b) => KvBuf::F32(go(b)?),
            KvBuf::F16(b) => KvBuf::F16(go(b)?),
        })
    }

    /// Store `src` at element offset `at` (rounding to the cache precision).
    pub(crate) fn write(&mut self, at: usize, src: &[f32]) {
        match self {
            KvBuf::F32(v) => v[at..at + src.len()].copy_from_slice(src),
            KvBuf::F16(v) => {
                use half::slice::HalfFloatSliceExt;
                v[at..at + src.len()].convert_from_f32_slice(src)
            }
        }
    }

    /// A zeroed buffer of `len` elements with `self`'s head rows `0..pos` moved from stride
    /// `old` to stride `cap` (positions per head).
    /// A failed allocation is [`Error::OutOfMemory`] (a session's `max_seq` is the caller's).
    fn regrow(&self, heads: usize, hd: usize, pos: usize, old: usize, cap: usize) -> Result<KvBuf> {
        fn go<T: Copy + Default>(
            b: &[T],
            heads: usize,
            hd: usize,
            pos: usize,
            old: usize,
            cap: usize,
        ) -> Result<Vec<T>> {
            let len = crate::error::checked_len(heads * hd, cap, "KV cache")?;
            let mut nb = crate::error::try_zeroed(len, "KV cache")?;
            for h in 0..heads {
                nb[h * cap * hd..(h * cap + pos) * hd]
                    .copy_from_slice(&b[h * old * hd..(h * old + pos) * hd]);
            }
            Ok(nb)
        }
        Ok(match self {
            KvBuf::F32(b) => KvBuf::F32(go(b, heads, hd, pos, old, cap)?),
            KvBuf::F16(b) => KvBuf::F16(go(b, heads, hd, pos, old, cap)?),
        })
    }
}

/// Model hyperparameters: the fields of `GPTConfig` the forward needs.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub vocab_size: usize,
    pub seq_len: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub n_embd: usize,
    pub mlp: MlpKind,
    pub mlp_hidden: usize,
    pub qk_norm: bool,
    pub tie_embeddings: bool,
    pub residual: Residual,
    pub n_streams: usize,
    pub sinkhorn_iters: usize,
    pub rope_theta: f64,
    pub norm_eps: f32,
}

impl Config {
    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// Residual streams actually used (1 for `standard`).
    pub fn streams(&self) -> usize {
        if self.residual == Residual::Standard {
            1
        } else {
            self.n_streams
        }
    }

    /// Width of one position's K (or V) in the cache.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_head * self.head_dim()
    }

    /// `n!` mixture weights (`mhc_lite`) or `n·n` logits (`mhc`) per `H_res`.
    pub fn n_res(&self) -> usize {
        match self.residual {
            Residual::Standard => 0,
            Residual::MhcLite => crate::mhc::perm::factorial(self.n_streams),
            Residual::Mhc => self.n_streams * self.n_streams,
        }
    }

    pub fn validate(&self) -> Result<()> {
        let pos = [
            ("vocab_size", self.vocab_size),
            ("seq_len", self.seq_len),
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
            ("n_kv_head", self.n_kv_head),
            ("n_embd", self.n_embd),
            ("mlp_hidden", self.mlp_hidden),
            ("n_streams", self.n_streams),
            ("sinkhorn_iters", self.sinkhorn_iters),
        ];
        for (k, v) in pos {
            if v == 0 {
                return Err(Error::Value(format!("config: {k} must be >= 1")));
            }
        }
        // Upper bounds far above any real model, so a corrupt or mistyped number is refused
        // here instead of sizing allocations and loops.
        let max = [
            ("seq_len", self.seq_len, 1usize << 24),
            ("n_layer", self.n_layer, 1 << 12),
            ("n_head", self.n_head, 1 << 16),
            ("n_kv_head", self.n_kv_head, 1 << 16),
            ("n_embd", self.n_embd, 1 << 20),
            ("mlp_hidden", self.mlp_hidden, 1 << 22),
            (
                "sinkhorn_iters",
                self.sinkhorn_iters,
                crate::mhc::sinkhorn::MAX_ITERS,
            ),
        ];
        for (k, v, m) in max {
            if v > m {
                return Err(Error::Value(format!(
                    "config: {k} = {v} is above the limit {m}"
                )));
            }
        }
        if self.vocab_size > u32::MAX as usize {
            return Err(Error::Value("config: vocab_size too large".into()));
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return Err(Error::Value(format!(
                "config: n_embd {} is not divisible by n_head {}",
                self.n_embd, self.n_head
            )));
        }
        if !self.n_head.is_multiple_of(self.n_kv_head) {
            return Err(Error::Value(format!(
                "config: n_head {} is not divisible by n_kv_head {}",
                self.n_head, self.n_kv_head
            )));
        }
        if self.head_dim() > 512 {
            return Err(Error::Value(format!(
                "config: head_dim {} > 512 is not supported",
                self.head_dim()
            )));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(Error::Value(format!(
                "config: head_dim {} must be even (RoPE)",
                self.head_dim()
            )));
        }
        crate::ternary::check_block_multiple(self.n_embd, "config n_embd")?;
        crate::ternary::check_block_multiple(self.mlp_hidden, "config mlp_hidden")?;
        if self.residual != Residual::Standard && self.n_streams > 6 {
            return Err(Error::Value(format!(
                "config: n_streams {} > 6 is not supported",
                self.n_streams
            )));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(Error::Value("config: rope_theta must be positive".into()));
        }
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0) {
            return Err(Error::Value("config: norm_eps must be positive".into()));
        }
        Ok(())
    }
}

/// One named input tensor: f32 or fp16 (bits) with a shape, or a packed ternary matrix. An fp16
/// tensor is widened to f32 exactly, except a tied embedding read by an fp16 head: that one is
/// kept as is, the head and the lookups sharing the one copy (a GGUF's `token_embd`).
#[derive(Clone, Debug)]
pub enum Tensor {
    F32 { data: Vec<f32>, shape: Vec<usize> },
    F16 { data: Vec<u16>, shape: Vec<usize> },
    Ternary(TernaryMatrix),
}

/// Options that do not change the math (apart from the int8 head).
#[derive(Clone, Debug)]
pub struct Options {
    /// Threads per forward step, borrowed from the crate's team (0 = [`crate::kernels::num_threads`]).
    pub threads: usize,
    /// Ternary kernel (None = the process default).
    pub kernel: Option<Kernel>,
    pub head: HeadPrecision,
    /// KV cache element type of the sessions this model creates.
    pub kv: KvPrecision,
    /// Accumulate per-section timings ([`Model::profile`]).
    pub profile: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            threads: 0,
            kernel: None,
            head: HeadPrecision::F16,
            kv: KvPrecision::F32,
            profile: false,
        }
    }
}

/// A ternary matrix or several stacked (sharing the input), with a scale per output row.
pub(crate) struct Fused {
    pub rows: usize,
    pub cols: usize,
    pub qs: Vec<u8>,
    pub row_scale: Vec<f32>,
}

impl Fused {
    /// The parts stacked, consumed: one part keeps its bytes (moved, not copied: a load holds
    /// one copy of the weights, not two); several are copied once into a buffer of exact size.
    fn new(parts: Vec<TernaryMatrix>) -> Result<Self> {
        let cols = parts[0].cols;
        if parts.iter().any(|p| p.cols != cols) {
            return Err(shape_err!("fused matrices differ in width"));
        }
        let rows = parts.iter().map(|p| p.rows).sum();
        let mut row_scale = Vec::with_capacity(rows);
        for p in &parts {
            row_scale.extend(std::iter::repeat_n(p.scale, p.rows));
        }
        let qs = if parts.len() == 1 {
            parts.into_iter().next().map(|p| p.qs).unwrap_or_default()
        } else {
            let mut qs = Vec::with_capacity(parts.iter().map(|p| p.qs.len()).sum());
            for p in parts {
                qs.extend_from_slice(&p.qs); // each part is freed as soon as it is copied
            }
            qs
        };
        Ok(Fused {
            rows,
            cols,
            qs,
            row_scale,
        })
    }
}

/// The mHC parameters of one sublayer (`blocks.N.mhc_attn.*` / `mhc_mlp.*`).
pub(crate) struct MhcParams {
    pub pre_bias: Vec<f32>,
    pub post_bias: Vec<f32>,
    pub res_logits: Vec<f32>,
    pub alpha: [f32; 3],
    /// `(2n + n_res) × n·C`, row-major.
    pub proj: Vec<f32>,
}

pub(crate) struct Layer {
    pub attn_norm: Vec<f32>,
    pub qkv: Fused,
    pub q_norm: Option<Vec<f32>>,
    pub k_norm: Option<Vec<f32>>,
    pub attn_sub_norm: Vec<f32>,
    pub o: Fused,
    pub mlp_norm: Vec<f32>,
    /// `[gate; up]` (SwiGLU) or `up` (ReLU²).
    pub gate_up: Fused,
    pub mlp_sub_norm: Vec<f32>,
    pub down: Fused,
    pub mhc_attn: Option<MhcParams>,
    pub mhc_mlp: Option<MhcParams>,
}

/// The token embedding, `vocab × C`: f32, or the fp16 bits it was given in when an fp16 head is
/// tied to it (one copy for both).
pub(crate) enum Emb {
    F32(Vec<f32>),
    F16(Vec<u16>),
}

impl Emb {
    fn bytes(&self) -> usize {
        match self {
            Emb::F32(v) => v.len() * 4,
            Emb::F16(v) => v.len() * 2,
        }
    }
}

/// The LM head weights in the chosen precision.
pub(crate) enum Head {
    /// `vocab × C` f32 (the embedding itself when tied: stored once).
    F32(Option<Vec<f32>>),
    /// `vocab × C` fp16 bits (`None`: the fp16 embedding itself, tied).
    F16(Option<Vec<u16>>),
    /// `vocab × C` int8 and per-row scales.
    Int8 { q: Vec<i8>, scale: Vec<f32> },
}

static NEXT_MODEL_ID: AtomicU64 = AtomicU64::new(1);

/// An immutable model plus the engine's (locked) thread count and workspace.
pub struct Model {
    pub(crate) cfg: Config,
    pub(crate) id: u64,
    pub(crate) kernel: Kernel,
    pub(crate) kv: KvPrecision,
    pub(crate) tok_emb: Emb,
    pub(crate) head: Head,
    pub(crate) norm: Vec<f32>,
    pub(crate) layers: Vec<Layer>,
    /// `n! × n·n` permutation matrices (`mhc_lite`).
    pub(crate) basis: Vec<f32>,
    /// RoPE inverse frequencies (`hd/2`), f32 as `rope_cos_sin` computes them.
    pub(crate) inv_freq: Vec<f32>,
    pub(crate) runtime: Mutex<forward::Runtime>,
}

/// A sequence's state: its KV cache and position.
pub struct Session {
    pub(crate) model_id: u64,
    pub(crate) max_seq: usize,
    pub(crate) pos: usize,
    /// Per layer: keys and values, head-major `n_kv_head × cap × head_dim`, so one head's
    /// cache is contiguous (the attention loop streams it front to back).
    pub(crate) k: Vec<KvBuf>,
    pub(crate) v: Vec<KvBuf>,
    /// Positions allocated per head.
    pub(crate) cap: usize,
    pub(crate) n_kv_head: usize,
    pub(crate) head_dim: usize,
}

impl Session {
    /// Tokens processed so far (the position of the next token).
    pub fn position(&self) -> usize {
        self.pos
    }

    pub fn max_seq(&self) -> usize {
        self.max_seq
    }

    /// Bytes held by the KV cache.
    pub fn cache_bytes(&self) -> usize {
        self.k.iter().chain(&self.v).map(KvBuf::bytes).sum()
    }

    /// An independent copy (KV cache and position) of the same model: after a shared prefill,
    /// `n` samples of one prompt each decode from their own fork instead of prefilling `n` times.
    /// The copy holds only the allocated positions (a multiple of [`CACHE_CHUNK`]), not `max_seq`.
    /// A failed allocation is [`Error::OutOfMemory`], not an abort.
    pub fn fork(&self) -> Result<Session> {
        let copy = |bufs: &[KvBuf]| {
            bufs.iter()
                .map(KvBuf::try_clone)
                .collect::<Result<Vec<_>>>()
        };
        Ok(Session {
            model_id: self.model_id,
            max_seq: self.max_seq,
            pos: self.pos,
            k: copy(&self.k)?,
            v: copy(&self.v)?,
            cap: self.cap,
            n_kv_head: self.n_kv_head,
            head_dim: self.head_dim,
        })
    }

    /// Forget the sequence (keeps the allocated cache).
    pub fn reset(&mut self) {
        self.pos = 0;
    }

    /// Drop the sequence back to `pos` tokens (e.g. to rewind a rejected continuation).
    pub fn truncate(&mut self, pos: usize) -> Result<()> {
        if pos > self.pos {
            return Err(Error::Value(format!(
                "cannot truncate a session at position {} to {pos}",
                self.pos
            )));
        }
        self.pos = pos;
        Ok(())
    }

    /// Make room for `n` more positions (grows in [`CACHE_CHUNK`] steps, copying each head's
    /// rows to its new place).
    pub(crate) fn reserve(&mut self, n: usize) -> Result<()> {
        let need = self.pos + n;
        if need > self.max_seq {
            return Err(Error::Value(format!(
                "context overflow: the session holds {} tokens and {n} more would exceed max_seq = {}",
                self.pos, self.max_seq
            )));
        }
        if need > self.cap {
            let cap = (need.div_ceil(CACHE_CHUNK) * CACHE_CHUNK).min(self.max_seq);
            let (hd, old) = (self.head_dim, self.cap);
            for b in self.k.iter_mut().chain(self.v.iter_mut()) {
                *b = b.regrow(self.n_kv_head, hd, self.pos, old, cap)?;
                debug_assert_eq!(b.len(), self.n_kv_head * cap * hd);
            }
            self.cap = cap;
        }
        Ok(())
    }
}

/// Which logits a forward returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// One row per session: its last new position.
    Last,
    /// Every new position of every session, in order.
    All,
}

fn take_f32(t: &mut HashMap<String, Tensor>, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
    match t.remove(name) {
        None => Err(Error::Value(format!("missing weight '{name}'"))),
        Some(Tensor::F32 { data, shape: s }) => {
            if s != shape {
                return Err(shape_err!(
                    "weight '{name}' has shape {s:?}, expected {shape:?}"
                ));
            }
            if data.len() != shape.iter().product::<usize>() {
                return Err(shape_err!("weight '{name}' holds {} values", data.len()));
            }
            if data.iter().any(|v| !v.is_finite()) {
                return Err(Error::Value(format!(
                    "weight '{name}' contains NaN or infinity"
                )));
            }
            Ok(data)
        }
        Some(Tensor::F16 { data, shape: s }) => {
            let data = data
                .iter()
                .map(|&b| half::f16::from_bits(b).to_f32())
                .collect();
            t.insert(name.to_string(), Tensor::F32 { data, shape: s });
            take_f32(t, name, shape)
        }
        Some(Tensor::Ternary(_)) => Err(Error::Value(format!(
            "weight '{name}' must be a float32 array, got a packed ternary matrix"
        ))),
    }
}

/// The embedding: kept as fp16 bits when given so and `keep_f16` (an fp16 head tied to it),
/// else as f32 (checked as [`take_f32`] does).
fn take_emb(t: &mut HashMap<String, Tensor>, shape: &[usize], keep_f16: bool) -> Result<Emb> {
    let name = names::WTE;
    match t.remove(name) {
        Some(Tensor::F16 { data, shape: s }) if keep_f16 => {
            if s != shape || data.len() != shape.iter().product::<usize>() {
                return Err(shape_err!(
                    "weight '{name}' has shape {s:?}, expected {shape:?}"
                ));
            }
            // exponent bits all set = inf or NaN; a fold without early exit vectorises (~1 ms for
            // 12.6M values, against ~10 ms for `any` over `f16::is_finite`)
            if data
                .iter()
                .fold(false, |bad, &b| bad | (b & 0x7c00 == 0x7c00))
            {
                return Err(Error::Value(format!(
                    "weight '{name}' contains NaN or infinity"
                )));
            }
            Ok(Emb::F16(data))
        }
        Some(other) => {
            t.insert(name.to_string(), other);
            Ok(Emb::F32(take_f32(t, name, shape)?))
        }
        None => Err(Error::Value(format!("missing weight '{name}'"))),
    }
}

fn take_ternary(
    t: &mut HashMap<String, Tensor>,
    name: &str,
    rows: usize,
    cols: usize,
) -> Result<TernaryMatrix> {
    match t.remove(name) {
        None => Err(Error::Value(format!("missing weight '{name}'"))),
        Some(Tensor::Ternary(m)) => {
            if m.rows != rows || m.cols != cols {
                return Err(shape_err!(
                    "ternary weight '{name}' is {} × {}, expected {rows} × {cols}",
                    m.rows,
                    m.cols
                ));
            }
            m.view()?;
            Ok(m)
        }
        Some(Tensor::F32 { .. } | Tensor::F16 { .. }) => Err(Error::Value(format!(
            "weight '{name}' must be a packed ternary matrix (uint8 rows × cols/4, scale); \
             got float32 (pack it with ops.pack_ternary)"
        ))),
    }
}

fn take_mhc(t: &mut HashMap<String, Tensor>, p: &str, cfg: &Config) -> Result<MhcParams> {
    let n = cfg.n_streams;
    let nr = cfg.n_res();
    let alpha = take_f32(t, &format!("{p}.{}", names::MHC_ALPHA), &[3])?;
    Ok(MhcParams {
        pre_bias: take_f32(t, &format!("{p}.{}", names::MHC_PRE_BIAS), &[n])?,
        post_bias: take_f32(t, &format!("{p}.{}", names::MHC_POST_BIAS), &[n])?,
        res_logits: take_f32(t, &format!("{p}.{}", names::MHC_RES_LOGITS), &[nr])?,
        alpha: [alpha[0], alpha[1], alpha[2]],
        proj: take_f32(
            t,
            &format!("{p}.{}", names::MHC_PROJ),
            &[2 * n + nr, n * cfg.n_embd],
        )?,
    })
}

impl Model {
    /// Build from tensors named as in the torch model's `state_dict()` (see the binding's docs);
    /// every BitLinear weight is a [`Tensor::Ternary`]. Unknown names are refused (they usually
    /// mean a config that does not match the weights).
    pub fn new(cfg: Config, mut t: HashMap<String, Tensor>, opts: Options) -> Result<Self> {
        cfg.validate()?;
        // Threads first: an absurd count is refused before any work or allocation.
        let threads = crate::kernels::resolve_threads(opts.threads, "engine threads")?;
        // Every layer needs at least 10 tensors (6 ternary, 4 norms) plus `wte` and `norm`:
        // refuse a layer count the weights cannot hold before sizing anything by it.
        let need = cfg.n_layer.saturating_mul(10).saturating_add(2);
        if need > t.len() {
            return Err(Error::Value(format!(
                "config: n_layer = {} needs at least {need} weights, but {} were given \
                 (does the config match the checkpoint?)",
                cfg.n_layer,
                t.len()
            )));
        }
        let (c, v, hd) = (cfg.n_embd, cfg.vocab_size, cfg.head_dim());
        let kv = cfg.kv_dim();
        let hid = cfg.mlp_hidden;
        let share_f16 = cfg.tie_embeddings && opts.head == HeadPrecision::F16;
        let tok_emb = take_emb(&mut t, &[v, c], share_f16)?;
        let norm = take_f32(&mut t, names::NORM, &[c])?;
        let untied = if cfg.tie_embeddings {
            if t.contains_key(names::LM_HEAD) {
                return Err(Error::Value(format!(
                    "config says tie_embeddings = true but an '{}' was given",
                    names::LM_HEAD
                )));
            }
            None
        } else {
            Some(take_f32(&mut t, names::LM_HEAD, &[v, c])?)
        };
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let p = |name: &str| names::block_tensor(i, name);
            let q = take_ternary(&mut t, &p(names::ATTN_Q_PROJ), c, c)?;
            let k = take_ternary(&mut t, &p(names::ATTN_K_PROJ), kv, c)?;
            let vv = take_ternary(&mut t, &p(names::ATTN_V_PROJ), kv, c)?;
            let o = take_ternary(&mut t, &p(names::ATTN_O_PROJ), c, c)?;
            let up = take_ternary(&mut t, &p(names::MLP_UP_PROJ), hid, c)?;
            let gate_up = match cfg.mlp {
                MlpKind::SwiGlu => {
                    let g = take_ternary(&mut t, &p(names::MLP_GATE_PROJ), hid, c)?;
                    Fused::new(vec![g, up])?
                }
                MlpKind::Relu2 => Fused::new(vec![up])?,
            };
            let down = take_ternary(&mut t, &p(names::MLP_DOWN_PROJ), c, hid)?;
            let (q_norm, k_norm) = if cfg.qk_norm {
                (
                    Some(take_f32(&mut t, &p(names::ATTN_Q_NORM), &[hd])?),
                    Some(take_f32(&mut t, &p(names::ATTN_K_NORM), &[hd])?),
                )
            } else {
                (None, None)
            };
            let (mhc_attn, mhc_mlp) = if cfg.residual == Residual::Standard {
                (None, None)
            } else {
                (
                    Some(take_mhc(&mut t, &p(names::MHC_ATTN), &cfg)?),
                    Some(take_mhc(&mut t, &p(names::MHC_MLP), &cfg)?),
                )
            };
            layers.push(Layer {
                attn_norm: take_f32(&mut t, &p(names::ATTN_NORM), &[c])?,
                qkv: Fused::new(vec![q, k, vv])?,
                q_norm,
                k_norm,
                attn_sub_norm: take_f32(&mut t, &p(names::ATTN_SUB_NORM), &[c])?,
                o: Fused::new(vec![o])?,
                mlp_norm: take_f32(&mut t, &p(names::MLP_NORM), &[c])?,
                gate_up,
                mlp_sub_norm: take_f32(&mut t, &p(names::MLP_SUB_NORM), &[hid])?,
                down: Fused::new(vec![down])?,
                mhc_attn,
                mhc_mlp,
            });
        }
        if !t.is_empty() {
            let mut extra: Vec<_> = t.keys().cloned().collect();
            extra.sort();
            extra.truncate(8);
            return Err(Error::Value(format!(
                "unexpected weights {extra:?} (does the config match the checkpoint?)"
            )));
        }
        let to_f16 = |w: &[f32]| -> Vec<u16> {
            w.iter()
                .map(|&x| half::f16::from_f32(x).to_bits())
                .collect()
        };
        let head = match (opts.head, &tok_emb) {
            (HeadPrecision::F32, _) => Head::F32(untied),
            (HeadPrecision::F16, Emb::F16(_)) => Head::F16(None),
            (HeadPrecision::F16, Emb::F32(e)) => {
                Head::F16(Some(to_f16(untied.as_deref().unwrap_or(e))))
            }
            (HeadPrecision::Int8, _) => {
                let Emb::F32(e) = &tok_emb else {
                    unreachable!("an fp16 embedding is kept only for a tied fp16 head")
                };
                let w = untied.as_deref().unwrap_or(e);
                let mut q = vec![0i8; w.len()];
                let mut scale = vec![0f32; v];
                for (r, (row, qr)) in w.chunks_exact(c).zip(q.chunks_exact_mut(c)).enumerate() {
                    scale[r] = math::quantize_row(row, qr);
                }
                Head::Int8 { q, scale }
            }
        };
        let basis = if cfg.residual == Residual::MhcLite {
            crate::mhc::permutation_matrices(cfg.n_streams)?
        } else {
            Vec::new()
        };
        // As rope_cos_sin: theta ** (-arange(0, hd, 2) / hd) in float32.
        let inv_freq = (0..hd / 2)
            .map(|i| {
                let e = -((2 * i) as f32) / hd as f32;
                (cfg.rope_theta.powf(e as f64)) as f32
            })
            .collect();
        let kernel = opts.kernel.unwrap_or(Kernel::default_choice().0);
        if !kernel.is_available() {
            return Err(Error::KernelUnavailable(
                kernel.name().into(),
                String::new(),
            ));
        }
        let runtime = forward::Runtime::new(threads, opts.profile)?;
        Ok(Model {
            cfg,
            id: NEXT_MODEL_ID.fetch_add(1, Ordering::Relaxed),
            kernel,
            kv: opts.kv,
            tok_emb,
            head,
            norm,
            layers,
            basis,
            inv_freq,
            runtime: Mutex::new(runtime),
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn kernel(&self) -> Kernel {
        self.kernel
    }

    pub fn head_precision(&self) -> HeadPrecision {
        match self.head {
            Head::F32(_) => HeadPrecision::F32,
            Head::F16(_) => HeadPrecision::F16,
            Head::Int8 { .. } => HeadPrecision::Int8,
        }
    }

    /// Threads the engine asks of the crate's team ([`crate::team::borrow`]) per forward step.
    pub fn threads(&self) -> usize {
        self.lock().threads
    }

    /// Set the threads per forward step (0 = [`crate::kernels::num_threads`]; more than
    /// [`crate::kernels::max_threads`] is refused).
    pub fn set_threads(&self, n: usize) -> Result<()> {
        let n = crate::kernels::resolve_threads(n, "engine set_threads")?;
        self.lock().threads = n;
        Ok(())
    }

    /// Bytes of weights held (packed ternary + f32 / int8 tensors).
    pub fn weight_bytes(&self) -> usize {
        let f = |v: &Vec<f32>| v.len() * 4;
        let mut b = self.tok_emb.bytes() + f(&self.norm);
        b += match &self.head {
            Head::F32(Some(w)) => f(w),
            Head::F32(None) | Head::F16(None) => 0,
            Head::F16(Some(w)) => w.len() * 2,
            Head::Int8 { q, scale } => q.len() + scale.len() * 4,
        };
        for l in &self.layers {
            b += l.qkv.qs.len() + l.o.qs.len() + l.gate_up.qs.len() + l.down.qs.len();
            b += f(&l.attn_norm) + f(&l.mlp_norm) + f(&l.attn_sub_norm) + f(&l.mlp_sub_norm);
            for m in [&l.mhc_attn, &l.mhc_mlp].into_iter().flatten() {
                b += f(&m.proj);
            }
        }
        b
    }

    /// A new empty session of at most `max_seq` positions (0 = the model's `seq_len`).
    pub fn new_session(&self, max_seq: usize) -> Session {
        let max_seq = if max_seq == 0 {
            self.cfg.seq_len
        } else {
            max_seq
        };
        Session {
            model_id: self.id,
            max_seq,
            pos: 0,
            k: vec![self.empty_kv(); self.cfg.n_layer],
            v: vec![self.empty_kv(); self.cfg.n_layer],
            cap: 0,
            n_kv_head: self.cfg.n_kv_head,
            head_dim: self.cfg.head_dim(),
        }
    }

    fn empty_kv(&self) -> KvBuf {
        match self.kv {
            KvPrecision::F32 => KvBuf::F32(Vec::new()),
            KvPrecision::F16 => KvBuf::F16(Vec::new()),
        }
    }

    pub fn kv_precision(&self) -> KvPrecision {
        self.kv
    }

    /// Cumulative per-section timings since the last reset (profiling builds of the model only).
    pub fn profile(&self, reset: bool) -> Profile {
        let mut rt = self.lock();
        let p = rt.profile.clone();
        if reset {
            rt.profile = Profile::new(p.enabled);
        }
        p
    }

    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, forward::Runtime> {
        self.runtime.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Advance each session by its tokens and return logits (`rows × vocab`, row-major) for the
    /// last position of each session ([`Logits::Last`]) or for every new position
    /// ([`Logits::All`]). Sessions are left unchanged if any input is invalid.
    pub fn forward(&self, batch: &mut [(&mut Session, &[u32])], which: Logits) -> Result<Vec<f32>> {
        forward::forward(self, batch, which)
    }

    /// Prefill or decode one session; returns the logits of its last position (`vocab`).
    pub fn step(&self, session: &mut Session, tokens: &[u32]) -> Result<Vec<f32>> {
        self.forward(&mut [(session, tokens)], Logits::Last)
    }
}

#[cfg(test)]
mod tests;

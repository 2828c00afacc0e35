//! Ternary × int8 matrix kernels: `acc[i][r] = Σ_c trit(r, c) · x[i][c]` in exact integer
//! arithmetic, then `y[i][r] = acc · w_scale · x_scale[i]`.
//!
//! Weights use the *kernel layout* [`TernaryView`]: TQ2_0's `qs` bytes with the fp16 `d` stripped,
//! `rows × cols/4` bytes, so a row is contiguous and a TQ2_0 file maps onto it with one copy per
//! block (or none, for data already in this layout). Codes are `trit + 1` ∈ {0, 1, 2}; SIMD
//! kernels multiply unsigned codes by signed activations and subtract `Σx` once per activation
//! row (`Σ (c − 1)·x = Σ c·x − Σ x`), which is exact.
//!
//! Every kernel shares one signature ([`RowsFn`]); [`Kernel`] names them, detects which run on
//! this CPU, and picks the best by default (overridable with `NANOCHAT_KERNEL`). The scalar
//! kernel is the oracle every SIMD kernel is tested equal to.

pub mod scalar;
#[cfg(target_arch = "x86_64")]
pub mod x86;

use crate::ternary::{act_row_scale, check_block_multiple, Ternary, QK_K};
use crate::{shape_err, Error, Result};
use rayon::prelude::*;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// Borrowed ternary weights in the kernel layout (see module docs).
#[derive(Clone, Copy, Debug)]
pub struct TernaryView<'a> {
    pub rows: usize,
    pub cols: usize,
    /// Per-tensor weight scale: weight = trit · scale.
    pub scale: f32,
    /// `rows × cols/4` bytes of TQ2_0 `qs` codes.
    pub qs: &'a [u8],
}

impl<'a> TernaryView<'a> {
    pub fn new(qs: &'a [u8], rows: usize, cols: usize, scale: f32) -> Result<Self> {
        check_block_multiple(cols, "ternary weights")?;
        if rows == 0 {
            return Err(shape_err!("ternary weights need at least one row"));
        }
        if qs.len() != rows * cols / 4 {
            return Err(shape_err!(
                "packed weights hold {} bytes but {} rows × {} cols need {}",
                qs.len(),
                rows,
                cols,
                rows * cols / 4
            ));
        }
        if !scale.is_finite() {
            return Err(Error::Value(format!("weight scale {scale} is not finite")));
        }
        Ok(Self {
            rows,
            cols,
            scale,
            qs,
        })
    }

    /// Packed bytes of one row.
    #[inline(always)]
    pub fn row(&self, r: usize) -> &'a [u8] {
        let rb = self.cols / 4;
        &self.qs[r * rb..(r + 1) * rb]
    }
}

/// Owned ternary weights in the kernel layout.
#[derive(Clone, Debug, PartialEq)]
pub struct TernaryMatrix {
    pub rows: usize,
    pub cols: usize,
    pub scale: f32,
    pub qs: Vec<u8>,
}

impl TernaryMatrix {
    /// Pack row-major trits (`rows × cols`) into the kernel layout.
    pub fn from_trits(trits: &[i8], rows: usize, cols: usize, scale: f32) -> Result<Self> {
        if trits.len() != rows * cols {
            return Err(shape_err!(
                "{} trits do not make a {rows} × {cols} matrix",
                trits.len()
            ));
        }
        let packed = crate::ternary::tq2_0::pack(trits, scale)?;
        let qs = crate::ternary::tq2_0::qs_rows(&packed, rows, cols)?;
        let m = Self {
            rows,
            cols,
            scale,
            qs,
        };
        m.view()?;
        Ok(m)
    }

    /// Absmean-quantize an f32 matrix and pack it.
    pub fn quantize(w: &[f32], rows: usize, cols: usize) -> Result<Self> {
        let Ternary { trits, scale } = crate::ternary::quantize_absmean(w)?;
        Self::from_trits(&trits, rows, cols, scale)
    }

    /// From TQ2_0 blocks. The scale is the largest block `d` (all-zero blocks written by gguf
    /// carry `d = 0`); blocks with a different non-zero `d` are refused, since the kernels
    /// apply one scale per tensor.
    pub fn from_tq2_0(data: &[u8], rows: usize, cols: usize) -> Result<Self> {
        use crate::ternary::tq2_0::{block_d, qs_rows, BLOCK_BYTES};
        let qs = qs_rows(data, rows, cols)?;
        let ds: Vec<f32> = data.chunks_exact(BLOCK_BYTES).map(block_d).collect();
        let scale = ds.iter().fold(0f32, |m, &d| m.max(d.abs()));
        if let Some(d) = ds.iter().find(|&&d| d != 0.0 && d != scale) {
            return Err(Error::Value(format!(
                "TQ2_0 blocks carry different scales ({d} and {scale}); per-block scales are not \
                 supported by the ternary kernels (expected one per-tensor scale)"
            )));
        }
        Ok(Self {
            rows,
            cols,
            scale,
            qs,
        })
    }

    pub fn view(&self) -> Result<TernaryView<'_>> {
        TernaryView::new(&self.qs, self.rows, self.cols, self.scale)
    }
}

/// Activations prepared once per call for one kernel: int8 values plus what the kernel needs
/// (row sums for the code offset, kernel-specific rearrangements in `extra`).
pub struct PreparedActs<'a> {
    /// `n × cols` int8 values, row-major.
    pub x: &'a [i8],
    pub n: usize,
    pub cols: usize,
    /// `Σ_c x[i][c]` per activation row.
    pub sums: Vec<i32>,
    /// Kernel-specific data (e.g. permuted activations or lookup tables), built by its `prepare`.
    pub extra: Vec<i8>,
}

/// The common signature of all kernels: fill `out[(r − r0)·n + i]` for weight rows
/// `r0 .. r0 + out.len()/n` with exact integer dot products against every activation row.
///
/// Safety: SIMD variants may only be called when their CPU features are present, which
/// [`Kernel::rows_fn`] guarantees.
pub type RowsFn = unsafe fn(w: &TernaryView, r0: usize, acts: &PreparedActs, out: &mut [i32]);

/// A kernel's activation preparation (fills `sums` and `extra`).
pub type PrepareFn = fn(acts: &mut PreparedActs);

/// The ternary kernels this crate provides.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// Portable reference; the oracle.
    Scalar,
    /// AVX2 lookup-table kernel (`vpshufb` over tabulated pair sums).
    Avx2Lut,
    /// AVX2 `vpmaddubsw` kernel.
    Avx2,
    /// AVX-512 VNNI `vpdpbusd` kernel.
    Avx512Vnni,
}

pub const ALL_KERNELS: [Kernel; 4] = [
    Kernel::Scalar,
    Kernel::Avx2Lut,
    Kernel::Avx2,
    Kernel::Avx512Vnni,
];

impl Kernel {
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Scalar => "scalar",
            Kernel::Avx2Lut => "avx2_lut",
            Kernel::Avx2 => "avx2",
            Kernel::Avx512Vnni => "avx512_vnni",
        }
    }

    pub fn from_name(name: &str) -> Result<Self> {
        let k = ALL_KERNELS
            .into_iter()
            .find(|k| k.name() == name.trim().to_ascii_lowercase())
            .ok_or_else(|| {
                Error::Value(format!(
                    "unknown kernel '{name}' (known: {})",
                    ALL_KERNELS.map(|k| k.name()).join(", ")
                ))
            })?;
        if !k.is_available() {
            return Err(Error::KernelUnavailable(k.name().into(), available_names()));
        }
        Ok(k)
    }

    /// Whether this CPU can run the kernel (and this build contains it).
    pub fn is_available(self) -> bool {
        self.fns().is_some()
    }

    /// All kernels runnable here, slowest first.
    pub fn available() -> Vec<Kernel> {
        ALL_KERNELS
            .into_iter()
            .filter(|k| k.is_available())
            .collect()
    }

    /// The fastest kernel this CPU runs.
    pub fn best() -> Kernel {
        *Self::available()
            .last()
            .expect("scalar is always available")
    }

    /// The process-wide default, resolved once: `NANOCHAT_KERNEL` if set (and valid), else
    /// [`Kernel::best`]. Returns the kernel and the reason it was chosen.
    pub fn default_choice() -> &'static (Kernel, String) {
        static CHOICE: OnceLock<(Kernel, String)> = OnceLock::new();
        CHOICE.get_or_init(|| match std::env::var("NANOCHAT_KERNEL") {
            Ok(name) if !name.trim().is_empty() && name.trim() != "auto" => {
                match Kernel::from_name(&name) {
                    Ok(k) => (k, format!("NANOCHAT_KERNEL={name}")),
                    Err(e) => (
                        Kernel::best(),
                        format!("NANOCHAT_KERNEL ignored ({e}); best available"),
                    ),
                }
            }
            _ => (
                Kernel::best(),
                format!("best available on this CPU ({})", available_names()),
            ),
        })
    }

    fn fns(self) -> Option<(PrepareFn, RowsFn)> {
        match self {
            Kernel::Scalar => Some((scalar::prepare, scalar::rows as RowsFn)),
            #[cfg(target_arch = "x86_64")]
            _ => x86::fns(self),
            #[cfg(not(target_arch = "x86_64"))]
            _ => None,
        }
    }
}

fn available_names() -> String {
    Kernel::available()
        .iter()
        .map(|k| k.name())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Rows per parallel work item: a multiple of 32 (the widest row tile any kernel uses).
const ROW_TILE: usize = 32;

fn thread_pool(threads: usize) -> Result<Arc<rayon::ThreadPool>> {
    static POOLS: OnceLock<Mutex<HashMap<usize, Arc<rayon::ThreadPool>>>> = OnceLock::new();
    let mut pools = POOLS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(p) = pools.get(&threads) {
        return Ok(p.clone());
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("nanochat-kernel-{i}"))
        .build()
        .map_err(|e| Error::Value(format!("cannot start {threads} kernel threads: {e}")))?;
    let pool = Arc::new(pool);
    pools.insert(threads, pool.clone());
    Ok(pool)
}

/// Default thread count: set by [`set_num_threads`], else `NANOCHAT_THREADS`, else all cores.
pub fn num_threads() -> usize {
    let n = THREADS.load(std::sync::atomic::Ordering::Relaxed);
    if n > 0 {
        return n;
    }
    std::env::var("NANOCHAT_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n: &usize| n > 0)
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
}

static THREADS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Set the default kernel thread count (0 restores the automatic choice).
pub fn set_num_threads(n: usize) {
    THREADS.store(n, std::sync::atomic::Ordering::Relaxed);
}

/// Integer products of `n` int8 activation rows (`x`, `n × cols`) with the ternary rows of `w`:
/// `out[i·rows + r] = Σ_c trit(r, c) · x[i·cols + c]`. `threads = 0` means [`num_threads`].
pub fn gemm_i32(
    kernel: Kernel,
    w: &TernaryView,
    x: &[i8],
    n: usize,
    out: &mut [i32],
    threads: usize,
) -> Result<()> {
    let acc = gemm_rows_major(kernel, w, x, n, threads)?;
    if out.len() != n * w.rows {
        return Err(shape_err!(
            "output holds {} values, expected {} × {}",
            out.len(),
            n,
            w.rows
        ));
    }
    for r in 0..w.rows {
        for i in 0..n {
            out[i * w.rows + r] = acc[r * n + i];
        }
    }
    Ok(())
}

/// As [`gemm_i32`] but returns the accumulators weight-row-major (`acc[r·n + i]`).
fn gemm_rows_major(
    kernel: Kernel,
    w: &TernaryView,
    x: &[i8],
    n: usize,
    threads: usize,
) -> Result<Vec<i32>> {
    if n == 0 {
        return Err(shape_err!("need at least one activation row"));
    }
    if x.len() != n * w.cols {
        return Err(shape_err!(
            "activations hold {} values but {} rows × {} cols need {}",
            x.len(),
            n,
            w.cols,
            n * w.cols
        ));
    }
    let (prepare, rows_fn) = kernel
        .fns()
        .ok_or_else(|| Error::KernelUnavailable(kernel.name().into(), available_names()))?;
    let mut acts = PreparedActs {
        x,
        n,
        cols: w.cols,
        sums: Vec::new(),
        extra: Vec::new(),
    };
    prepare(&mut acts);
    let mut acc = vec![0i32; w.rows * n];
    let threads = if threads == 0 { num_threads() } else { threads };
    // Work items: ~4 per thread for balance, at least one 32-row tile each.
    let tiles = w.rows.div_ceil(ROW_TILE);
    let per_item = tiles.div_ceil(threads * 4).max(1) * ROW_TILE;
    let run = |(j, chunk): (usize, &mut [i32])| {
        // SAFETY: `fns` only returns SIMD kernels whose CPU features were detected.
        unsafe { rows_fn(w, j * per_item, &acts, chunk) }
    };
    if threads <= 1 || tiles <= 1 {
        acc.chunks_mut(per_item * n).enumerate().for_each(run);
    } else {
        thread_pool(threads)?
            .install(|| acc.par_chunks_mut(per_item * n).enumerate().for_each(run));
    }
    Ok(acc)
}

/// `y = x · Wᵀ` for f32 activations `x` (`n × cols`): int8 per-row absmax quantization of `x`,
/// exact integer products, then scaling by `w.scale · absmax_i / 127`. `out` is `n × rows`.
pub fn ternary_linear(
    kernel: Kernel,
    w: &TernaryView,
    x: &[f32],
    n: usize,
    out: &mut [f32],
    threads: usize,
) -> Result<()> {
    if x.len() != n * w.cols {
        return Err(shape_err!(
            "input holds {} values, expected {} × {}",
            x.len(),
            n,
            w.cols
        ));
    }
    if out.len() != n * w.rows {
        return Err(shape_err!(
            "output holds {} values, expected {} × {}",
            out.len(),
            n,
            w.rows
        ));
    }
    let q = crate::ternary::quantize_acts_i8(x, w.cols)?;
    let acc = gemm_rows_major(kernel, w, &q.values, n, threads)?;
    for i in 0..n {
        let s = w.scale * q.scales[i];
        let row = &mut out[i * w.rows..(i + 1) * w.rows];
        for (r, o) in row.iter_mut().enumerate() {
            *o = acc[r * n + i] as f32 * s;
        }
    }
    Ok(())
}

/// The f32 scale a kernel caller applies to row `i`'s accumulators (kept for bindings that
/// quantize activations themselves).
pub fn output_scale(w: &TernaryView, x_row: &[f32]) -> f32 {
    w.scale * act_row_scale(x_row).1
}

/// Row count of blocks for a weight of `cols` columns (helper for callers sizing buffers).
pub const fn blocks_per_row(cols: usize) -> usize {
    cols / QK_K
}

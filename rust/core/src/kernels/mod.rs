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
//! this CPU, and picks the best by default (overridable with `NANOCHAT_KERNEL`): `amx` (AMX-INT8
//! tiles for 16+ activation rows, `avx512_vnni` below) where the CPU and Linux allow it. The
//! scalar kernel is the oracle every SIMD kernel is tested equal to. Activations can be prepared
//! once ([`Kernel::prepare`]) for several products ([`gemm_i32_prepared`]).
//!
//! Batching: with `n > 1` activation rows every kernel decodes each weight vector once and uses
//! it for up to 4 activation rows (`avx2_lut`: all of them) while it is in registers, and keeps
//! a weight row tile in L1 while all activation rows pass over it, so the weights stream from
//! memory once per call and a batch costs much less than `n` GEMVs (prefill, several sequences).
//!
//! Threading: output rows are split in whole 32-row tiles into ~4 work items per thread, run by
//! the crate's one thread team ([`crate::team`], shared with the mHC ops and the engine): the
//! caller starts at once; a worker that wakes late takes fewer items, or none, and is then not
//! waited for. Calls whose estimated single-thread time is below [`PAR_MIN_US`], and calls made
//! while the team is lent elsewhere, run on the calling thread alone. Thread counts above
//! [`max_threads`] are refused.

pub mod scalar;
#[cfg(target_arch = "x86_64")]
pub mod x86;

use crate::ternary::{check_block_multiple, Ternary};
use crate::{shape_err, Error, Result};
use std::sync::OnceLock;

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
    /// AMX-INT8 `tdpbssd` tiles for 16 or more activation rows (prefill, batched decode),
    /// `avx512_vnni` below that.
    Amx,
}

pub const ALL_KERNELS: [Kernel; 5] = [
    Kernel::Scalar,
    Kernel::Avx2Lut,
    Kernel::Avx2,
    Kernel::Avx512Vnni,
    Kernel::Amx,
];

impl Kernel {
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Scalar => "scalar",
            Kernel::Avx2Lut => "avx2_lut",
            Kernel::Avx2 => "avx2",
            Kernel::Avx512Vnni => "avx512_vnni",
            Kernel::Amx => "amx",
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

/// Cores this process may use (`available_parallelism`, at least 1), read once: on Linux
/// `available_parallelism` reads the cgroup quota files and the affinity mask on every call,
/// tens of microseconds that a decode step (dozens of kernel calls) must not pay each time.
pub fn cores() -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    })
}

/// The most threads any pool or team of this crate may have: 4 × the cores, at least 8. More
/// only oversubscribes the cores, and a count from a typo (or `2**40`) would otherwise try to
/// spawn threads until the OS refuses, or allocate per-thread state until the process aborts.
pub fn max_threads() -> usize {
    (4 * cores()).max(8)
}

/// Check a requested thread count (0 = automatic) against [`max_threads`]: a clear error at
/// once for anything larger, naming `what` asked.
pub fn check_threads(n: usize, what: &str) -> Result<usize> {
    let max = max_threads();
    if n > max {
        return Err(Error::Value(format!(
            "{what}: {n} threads requested, at most {max} allowed (4 × the {} cores this process \
             may use, at least 8); use 0 for the automatic choice",
            cores()
        )));
    }
    Ok(n)
}

/// A requested thread count resolved: checked by [`check_threads`], 0 meaning [`num_threads`].
pub fn resolve_threads(n: usize, what: &str) -> Result<usize> {
    Ok(match check_threads(n, what)? {
        0 => num_threads(),
        n => n,
    })
}

/// Default thread count: set by [`set_num_threads`], else `NANOCHAT_THREADS`, else all cores
/// (capped at [`max_threads`]).
pub fn num_threads() -> usize {
    let n = THREADS.load(std::sync::atomic::Ordering::Relaxed);
    if n > 0 {
        return n;
    }
    std::env::var("NANOCHAT_THREADS")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .filter(|&n: &usize| n > 0)
        .unwrap_or_else(cores)
        .min(max_threads())
}

static THREADS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Set the default kernel thread count (0 restores the automatic choice); more than
/// [`max_threads`] is refused.
pub fn set_num_threads(n: usize) -> Result<()> {
    check_threads(n, "set_num_threads")?;
    THREADS.store(n, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

/// Calls estimated to take less than this many microseconds on one thread run on the calling
/// thread alone (see [`Kernel::macs_per_us`]): below it, spawning the helper job (~1–2 µs)
/// costs about what a second core could save. Above it the call is split, and since a helper
/// that wakes late is simply not waited for (see [`crate::team`]), splitting does not make a call
/// slower when the other core is busy or asleep (on this VM an idle worker takes ~80 µs to
/// wake).
pub const PAR_MIN_US: f64 = 8.0;

impl Kernel {
    /// Rough single-thread speed in multiply-adds per microsecond (measured on a 4 GHz
    /// Sapphire-Rapids-class core, 2048 × 2048 GEMV), used only to decide when to use threads.
    pub fn macs_per_us(self) -> f64 {
        match self {
            Kernel::Scalar => 500.0,
            Kernel::Avx2Lut => 45_000.0,
            Kernel::Avx2 => 85_000.0,
            Kernel::Avx512Vnni => 170_000.0,
            // n = 1 runs avx512_vnni; the tiles (n ≥ 16) are faster still.
            Kernel::Amx => 170_000.0,
        }
    }
}

/// Smallest `rows × cols × n` that [`gemm_i32`] splits over threads with `kernel`.
pub fn par_min_macs(kernel: Kernel) -> usize {
    (PAR_MIN_US * kernel.macs_per_us()) as usize
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
    if out.len() != n * w.rows {
        return Err(shape_err!(
            "output holds {} values, expected {} × {}",
            out.len(),
            n,
            w.rows
        ));
    }
    run(kernel, w, x, n, threads, out)
}

/// Rows per work item when `n > 1`: the kernels write weight-row-major (`acc[r·n + i]`) into a
/// per-thread scratch this big, which is then transposed into `out[i·rows + r]` while it is
/// still in L1 (and with sequential writes: a column-wise pass over a whole output whose row
/// stride is a multiple of 4 KiB thrashes one L1 set and used to cost as much as the kernel).
const BATCH_ROWS: usize = 8 * ROW_TILE;

thread_local! {
    /// Per-thread weight-row-major accumulators of one work item (reused across calls).
    static SCRATCH: std::cell::RefCell<Vec<i32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The output pointer shared by work items that write disjoint rows.
#[derive(Clone, Copy)]
struct OutPtr(*mut i32);
// SAFETY: every work item writes a disjoint set of elements (its own weight rows).
unsafe impl Send for OutPtr {}
// SAFETY: as for `Send` above.
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// A method (not `.0`) so closures capture the whole `Sync` wrapper, not the raw pointer.
    fn at(self, offset: usize) -> *mut i32 {
        self.0.wrapping_add(offset)
    }
}

/// Activations prepared once for one kernel ([`Kernel::prepare`]), then multiplied with any
/// number of weight matrices or row ranges of `cols` columns ([`gemm_i32_prepared`]): the engine
/// prepares a prefill's activations once per matrix instead of once per thread work item.
pub struct Prepared<'a> {
    kernel: Kernel,
    rows_fn: RowsFn,
    acts: PreparedActs<'a>,
}

impl<'a> Prepared<'a> {
    /// Activation rows.
    pub fn n(&self) -> usize {
        self.acts.n
    }
}

impl Kernel {
    /// Prepare `n` int8 activation rows of `cols` columns (`x`, `n × cols`) for this kernel.
    pub fn prepare<'a>(self, x: &'a [i8], n: usize, cols: usize) -> Result<Prepared<'a>> {
        if n == 0 {
            return Err(shape_err!("need at least one activation row"));
        }
        check_block_multiple(cols, "ternary weights")?;
        if x.len() != n * cols {
            return Err(shape_err!(
                "activations hold {} values but {} rows × {} cols need {}",
                x.len(),
                n,
                cols,
                n * cols
            ));
        }
        let (prepare, rows_fn) = self
            .fns()
            .ok_or_else(|| Error::KernelUnavailable(self.name().into(), available_names()))?;
        let mut acts = PreparedActs {
            x,
            n,
            cols,
            sums: Vec::new(),
            extra: Vec::new(),
        };
        prepare(&mut acts);
        Ok(Prepared {
            kernel: self,
            rows_fn,
            acts,
        })
    }
}

/// [`gemm_i32`] with activations prepared by [`Kernel::prepare`]: `out[i·rows + r]`, on the
/// calling thread and `threads − 1` helpers (0 = [`num_threads`]).
pub fn gemm_i32_prepared(
    w: &TernaryView,
    p: &Prepared,
    out: &mut [i32],
    threads: usize,
) -> Result<()> {
    if out.len() != p.acts.n * w.rows {
        return Err(shape_err!(
            "output holds {} values, expected {} × {}",
            out.len(),
            p.acts.n,
            w.rows
        ));
    }
    if w.cols != p.acts.cols {
        return Err(shape_err!(
            "activations were prepared for {} columns, the weights have {}",
            p.acts.cols,
            w.cols
        ));
    }
    run_prepared(p.kernel, w, &p.acts, p.rows_fn, threads, out)
}

/// Checks, prepares the activations once, then runs the kernel over row ranges (on the calling
/// thread or the pool) writing `out[i·rows + r]`.
fn run(
    kernel: Kernel,
    w: &TernaryView,
    x: &[i8],
    n: usize,
    threads: usize,
    out: &mut [i32],
) -> Result<()> {
    let p = kernel.prepare(x, n, w.cols)?;
    run_prepared(kernel, w, &p.acts, p.rows_fn, threads, out)
}

/// The kernel over row ranges of `w` for prepared activations (see [`run`]).
fn run_prepared(
    kernel: Kernel,
    w: &TernaryView,
    acts: &PreparedActs,
    rows_fn: RowsFn,
    threads: usize,
    out: &mut [i32],
) -> Result<()> {
    let n = acts.n;
    assert_eq!(out.len(), w.rows * n);
    assert_eq!(acts.cols, w.cols);
    // `TernaryView`'s fields are public: re-check what `TernaryView::new` checks, since the SIMD
    // kernels read through raw pointers.
    check_block_multiple(w.cols, "ternary weights")?;
    if w.qs.len() != w.rows * w.cols / 4 {
        return Err(shape_err!(
            "packed weights hold {} bytes but {} rows × {} cols need {}",
            w.qs.len(),
            w.rows,
            w.cols,
            w.rows * w.cols / 4
        ));
    }
    let rows = w.rows;
    let ptr = OutPtr(out.as_mut_ptr());
    // Rows r0..r1 of every activation row.
    let range = |r0: usize, r1: usize| {
        if n == 1 {
            // SAFETY: rows r0..r1 of a single activation row are out[r0..r1], disjoint between
            // ranges; `fns` only returns SIMD kernels whose CPU features were detected.
            unsafe {
                let chunk = std::slice::from_raw_parts_mut(ptr.at(r0), r1 - r0);
                rows_fn(w, r0, acts, chunk);
            }
            return;
        }
        SCRATCH.with(|s| {
            let mut acc = s.borrow_mut();
            // Keep the scratch within ~32 KiB (L1) for the transposition below: BATCH_ROWS
            // rows up to n = 32, fewer (whole 32-row tiles) for more activation rows.
            let batch = (BATCH_ROWS * 32 / n).clamp(ROW_TILE, BATCH_ROWS) / ROW_TILE * ROW_TILE;
            for b0 in (r0..r1).step_by(batch) {
                let b1 = r1.min(b0 + batch);
                acc.resize((b1 - b0) * n, 0);
                // SAFETY: as above.
                unsafe { rows_fn(w, b0, acts, &mut acc[..(b1 - b0) * n]) };
                // One activation row at a time: sequential writes, reads with stride n from
                // the L1-resident scratch. (Writing all n rows at once interleaves n streams
                // whose stride, rows·4 bytes, is often a multiple of 4 KiB: they all fall in one
                // L1 set and thrash it.)
                let acc = &acc[..(b1 - b0) * n];
                for i in 0..n {
                    // SAFETY: out[i·rows + b0 .. i·rows + b1] lies inside `out` (b1 ≤ rows) and
                    // belongs to this range alone.
                    let o =
                        unsafe { std::slice::from_raw_parts_mut(ptr.at(i * rows + b0), b1 - b0) };
                    for (o, a) in o.iter_mut().zip(acc.chunks_exact(n)) {
                        *o = a[i];
                    }
                }
            }
        });
    };
    let threads = resolve_threads(threads, "ternary kernel")?;
    let tiles = rows.div_ceil(ROW_TILE);
    if threads <= 1 || tiles <= 1 || rows * w.cols * n < par_min_macs(kernel) {
        range(0, rows);
        return Ok(());
    }
    // Work items: ~4 per thread, each a whole number of 32-row tiles (the widest row tile any
    // kernel uses), run by the crate's team (the calling thread alone if the team is lent).
    let per_item = tiles.div_ceil(threads * 4).max(1) * ROW_TILE;
    crate::team::borrow(threads)?.run(rows, per_item, |_, r0, r1| range(r0, r1))
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
    let mut acc = vec![0i32; n * w.rows];
    run(kernel, w, &q.values, n, threads, &mut acc)?;
    for ((o_i, a_i), &xs) in out
        .chunks_exact_mut(w.rows)
        .zip(acc.chunks_exact(w.rows))
        .zip(&q.scales)
    {
        let s = w.scale * xs;
        for (o, &a) in o_i.iter_mut().zip(a_i) {
            *o = a as f32 * s;
        }
    }
    Ok(())
}

//! Batched Sinkhorn-Knopp projection of `exp(logits)` towards the doubly stochastic matrices,
//! with an exact backward.
//!
//! The forward is defined in the log domain, exactly as the torch reference
//! (`nanochat.ops.sinkhorn_reference`):
//!
//! ```text
//! x⁰ = logits
//! repeat t = 1..iters:   y^t = x^{t-1} − lse_row(x^{t-1})     (rows of exp(y^t) sum to 1)
//!                        x^t = y^t     − lse_col(y^t)         (columns of exp(x^t) sum to 1)
//! P = exp(x^iters)
//! ```
//!
//! Notable choices:
//! * **Arithmetic is f64** whatever the element type ([`Real`]: f32 or f64 in and out), so the
//!   f32 op is at least as accurate as the f32 torch reference.
//! * **Exp-domain evaluation when it is exact enough.** `exp(y^t)` is the row-normalised matrix
//!   and `exp(x^t)` the column-normalised one, so the same iterates are obtained by dividing
//!   rows and columns of `exp(logits)` by their sums: one `exp` per entry instead of two per
//!   entry per iteration (~20× fewer transcendental calls at 20 iterations). This loses nothing
//!   while no iterate underflows: all iterates are `D₁ exp(logits) D₂` with unit row or column
//!   sums, so their entries stay above roughly `e^{−2·spread}/n`, where `spread` is the range of
//!   the matrix's logits. Matrices whose spread exceeds [`EXP_DOMAIN_MAX_SPREAD`] (far inside
//!   f64's `e^{−708}`), or that hold non-finite values, take the literal log-domain path, with
//!   torch's `logsumexp` conventions for infinities.
//! * **Backward by recomputation.** For an upstream gradient `G = ∂L/∂P`, the backward reruns
//!   the forward of one matrix, keeping its `2·iters` half-step iterates (`R^t = exp(y^t)`,
//!   `C^t = exp(x^t)`, a few KiB for 4×4 at 20 iterations, in cache), then sweeps back:
//!
//!   ```text
//!   g = G ⊙ P
//!   for t = iters..1:   g ← g − C^t ⊙ colsum(g)     (through x^t = y^t − lse_col(y^t))
//!                       g ← g − R^t ⊙ rowsum(g)     (through y^t = x^{t-1} − lse_row(x^{t-1}))
//!   ∂L/∂logits = g
//!   ```
//!
//!   since `∂ lse_row(x)_i / ∂x_ij = softmax_row(x)_ij = exp(y)_ij`. This is the exact gradient
//!   of the unrolled forward (not the implicit-function gradient of the fixed point), so it
//!   matches torch autograd through the reference and finite differences.
//! * **Blocked SIMD.** Exp-domain matrices are processed 4 at a time (`LANES`), stored lane-minor
//!   so that row and column sums are vertical vector adds and the divisions (2n per iteration,
//!   the bound on speed) of 4 matrices share one instruction; the loops are unrolled for common
//!   n and built for AVX2 when the CPU has it. Per matrix the arithmetic (and its order) is the
//!   scalar path's, without FMA contraction, so results are bit-identical whichever path, SIMD
//!   level, batch size or thread count.
//! * Batches are split over the shared thread budget when there is enough work.

use super::resolve_threads;
use crate::{shape_err, Error, Result};

/// The element types the Sinkhorn ops read and write; arithmetic is always f64.
pub trait Real: Copy + Send + Sync + 'static {
    fn to_f64(self) -> f64;
    fn from_f64(v: f64) -> Self;
}

impl Real for f64 {
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v
    }
}

impl Real for f32 {
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v as f32
    }
}

/// Iterations used by the model unless configured otherwise.
pub const DEFAULT_ITERS: usize = 20;

/// Largest logit range (max − min within one matrix) evaluated in the exp domain; iterates then
/// stay above ~`e^{−400}/n`, far from f64 underflow (`e^{−708}`).
pub const EXP_DOMAIN_MAX_SPREAD: f64 = 200.0;

/// Most iterations accepted. Sinkhorn converges in tens of iterations; an absurd count
/// (`2**40`) would otherwise run for hours.
pub const MAX_ITERS: usize = 10_000;

/// Most `n² · iters` for one matrix: a matrix is projected without a pause, so this bounds how
/// long a caller waits between [`interrupt_chunk`]s (~1 s here) and so how late Ctrl-C lands.
pub const MAX_MATRIX_WORK: usize = 1 << 28;

/// Entries × iterations per [`interrupt_chunk`] (~0.05–0.1 s of work on one core).
const CHUNK_WORK: usize = 1 << 24;

/// Refuse iteration counts above [`MAX_ITERS`] or one matrix's work above [`MAX_MATRIX_WORK`].
pub fn check_iters(n: usize, iters: usize) -> Result<()> {
    if iters > MAX_ITERS {
        return Err(Error::Value(format!(
            "sinkhorn: {iters} iterations are above the limit {MAX_ITERS} (it converges in tens)"
        )));
    }
    let work = n.saturating_mul(n).saturating_mul(iters);
    if work > MAX_MATRIX_WORK {
        return Err(Error::Value(format!(
            "sinkhorn: {iters} iterations of a {n} × {n} matrix ({work} entry-iterations) exceed \
             the limit {MAX_MATRIX_WORK}; use fewer iterations or smaller matrices"
        )));
    }
    Ok(())
}

/// Matrices per call for a caller that splits a long batch into calls (to check for Ctrl-C
/// between them): about `CHUNK_WORK` entry-iterations, a whole number of SIMD blocks, at least
/// one block. Each matrix's result does not depend on how the batch is split.
pub fn interrupt_chunk(n: usize, iters: usize) -> usize {
    let per = n.saturating_mul(n).saturating_mul(iters.max(1)).max(1);
    (CHUNK_WORK / per).max(1).next_multiple_of(LANES)
}

/// Cap on the per-task iterate store of the backward (`2·iters·n²` f64).
const MAX_TRACE_BYTES: usize = 1 << 30;

/// Work (matrix entries × iterations) below which a batch runs on the calling thread.
const PAR_MIN_WORK: usize = 1 << 15;

/// Number of `n × n` matrices in a buffer of `len` values.
fn batch_len(len: usize, n: usize, what: &str) -> Result<usize> {
    if n == 0 {
        return if len == 0 {
            Ok(0)
        } else {
            Err(shape_err!("{what}: n = 0 but {len} values given"))
        };
    }
    let nn = n
        .checked_mul(n)
        .ok_or_else(|| shape_err!("{what}: n = {n} is too large"))?;
    if !len.is_multiple_of(nn) {
        return Err(shape_err!(
            "{what}: {len} values are not a whole number of {n} × {n} matrices"
        ));
    }
    Ok(len / nn)
}

/// Which evaluation of the (identical) recurrence to use; see the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Domain {
    /// Exp domain when the logit spread allows (blocks of [`LANES`] matrices), else log domain.
    Auto,
    /// As `Auto`, one matrix at a time: the same arithmetic in the same order, so the same bits
    /// (the tests hold the blocked path to it).
    #[cfg_attr(not(test), allow(dead_code))]
    Scalar,
    /// Always the literal log-domain recurrence (tests compare the two).
    #[cfg_attr(not(test), allow(dead_code))]
    Log,
}

/// Per-matrix scratch: the working matrix, two n-vectors and (backward only) the iterates.
struct Scratch {
    m: Vec<f64>,
    v: Vec<f64>,
    trace: Vec<f64>,
}

impl Scratch {
    fn new(n: usize, trace_len: usize) -> Self {
        Self {
            m: vec![0.0; n * n],
            v: vec![0.0; 2 * n],
            trace: vec![0.0; trace_len],
        }
    }

    fn load<T: Real>(&mut self, x: &[T]) {
        self.m.iter_mut().zip(x).for_each(|(d, &x)| *d = x.to_f64());
    }
}

/// Whether a matrix may be evaluated in the exp domain: finite, with a small enough spread.
fn exp_domain_ok(m: &[f64]) -> bool {
    let (lo, hi, finite) = m.iter().fold(
        (f64::INFINITY, f64::NEG_INFINITY, true),
        |(lo, hi, f), &x| (lo.min(x), hi.max(x), f && x.is_finite()),
    );
    finite && hi - lo <= EXP_DOMAIN_MAX_SPREAD
}

/// `exp(x − rowmax)`: shifting each row by its max changes nothing after the first row
/// normalisation and keeps every row sum ≥ 1 (no underflow, no division by zero).
fn exp_rows_shifted(m: &mut [f64], n: usize) {
    for row in m.chunks_exact_mut(n) {
        let mx = row.iter().fold(f64::NEG_INFINITY, |a, &x| a.max(x));
        row.iter_mut().for_each(|x| *x = (*x - mx).exp());
    }
}

#[inline]
fn normalize_rows(m: &mut [f64], n: usize) {
    for row in m.chunks_exact_mut(n) {
        let mut s = 0.0;
        row.iter().for_each(|x| s += x);
        let r = 1.0 / s;
        row.iter_mut().for_each(|x| *x *= r);
    }
}

#[inline]
fn normalize_cols(m: &mut [f64], n: usize, v: &mut [f64]) {
    let s = &mut v[..n];
    s.copy_from_slice(&m[..n]);
    for row in m[n..].chunks_exact(n) {
        s.iter_mut().zip(row).for_each(|(s, x)| *s += x);
    }
    s.iter_mut().for_each(|s| *s = 1.0 / *s);
    for row in m.chunks_exact_mut(n) {
        row.iter_mut().zip(s.iter()).for_each(|(x, r)| *x *= r);
    }
}

/// torch's `logsumexp` shift: the max, or 0 when the max is infinite (so that all-`−inf`
/// gives `−inf` and a `+inf` gives `+inf`, as torch does).
#[inline]
fn lse_shift(mx: f64) -> f64 {
    if mx.is_infinite() {
        0.0
    } else {
        mx
    }
}

fn log_normalize_rows(m: &mut [f64], n: usize) {
    for row in m.chunks_exact_mut(n) {
        let c = lse_shift(row.iter().fold(f64::NEG_INFINITY, |a, &x| a.max(x)));
        let lse = row.iter().map(|&x| (x - c).exp()).sum::<f64>().ln() + c;
        row.iter_mut().for_each(|x| *x -= lse);
    }
}

fn log_normalize_cols(m: &mut [f64], n: usize, v: &mut [f64]) {
    let (mx, sum) = v.split_at_mut(n);
    mx.fill(f64::NEG_INFINITY);
    for row in m.chunks_exact(n) {
        mx.iter_mut().zip(row).for_each(|(a, &x)| *a = a.max(x));
    }
    mx.iter_mut().for_each(|a| *a = lse_shift(*a));
    sum.fill(0.0);
    for row in m.chunks_exact(n) {
        sum.iter_mut()
            .zip(row.iter().zip(mx.iter()))
            .for_each(|(s, (&x, &c))| *s += (x - c).exp());
    }
    sum.iter_mut()
        .zip(mx.iter())
        .for_each(|(s, &c)| *s = s.ln() + c);
    for row in m.chunks_exact_mut(n) {
        row.iter_mut().zip(sum.iter()).for_each(|(x, l)| *x -= l);
    }
}

/// Replace the logits in `m` (one matrix) by `P`. With `trace` (`2·iters·n²` values) the
/// half-step iterates are recorded: `trace[2t]` = `R^{t+1}` (after the row step),
/// `trace[2t+1]` = `C^{t+1}`.
fn project(
    m: &mut [f64],
    n: usize,
    iters: usize,
    v: &mut [f64],
    mut trace: Option<&mut [f64]>,
    domain: Domain,
) {
    let nn = n * n;
    if iters == 0 {
        m.iter_mut().for_each(|x| *x = x.exp());
        return;
    }
    let mut record = |k: usize, m: &[f64], exp: bool| {
        if let Some(tr) = trace.as_deref_mut() {
            let dst = &mut tr[k * nn..(k + 1) * nn];
            if exp {
                dst.iter_mut().zip(m).for_each(|(d, &x)| *d = x.exp());
            } else {
                dst.copy_from_slice(m);
            }
        }
    };
    if domain != Domain::Log && exp_domain_ok(m) {
        exp_rows_shifted(m, n);
        for t in 0..iters {
            normalize_rows(m, n);
            record(2 * t, m, false);
            normalize_cols(m, n, v);
            record(2 * t + 1, m, false);
        }
    } else {
        for t in 0..iters {
            log_normalize_rows(m, n);
            record(2 * t, m, true);
            log_normalize_cols(m, n, v);
            record(2 * t + 1, m, true);
        }
        m.iter_mut().for_each(|x| *x = x.exp());
    }
}

/// Turn `g` (holding `G = ∂L/∂P`) into `∂L/∂logits`, given `P` and the recorded iterates.
fn backward_sweep(g: &mut [f64], p: &[f64], trace: &[f64], n: usize, iters: usize, v: &mut [f64]) {
    let nn = n * n;
    g.iter_mut().zip(p).for_each(|(g, &p)| *g *= p);
    let s = &mut v[..n];
    for t in (0..iters).rev() {
        // Through the column step: g_ij -= C_ij · Σ_k g_kj.
        let c = &trace[(2 * t + 1) * nn..(2 * t + 2) * nn];
        s.fill(0.0);
        for row in g.chunks_exact(n) {
            s.iter_mut().zip(row).for_each(|(s, x)| *s += x);
        }
        for (grow, crow) in g.chunks_exact_mut(n).zip(c.chunks_exact(n)) {
            grow.iter_mut()
                .zip(crow.iter().zip(s.iter()))
                .for_each(|(g, (&c, &s))| *g -= c * s);
        }
        // Through the row step: g_ij -= R_ij · Σ_k g_ik.
        let r = &trace[2 * t * nn..(2 * t + 1) * nn];
        for (grow, rrow) in g.chunks_exact_mut(n).zip(r.chunks_exact(n)) {
            let mut s = 0.0;
            grow.iter().for_each(|x| s += x);
            grow.iter_mut().zip(rrow).for_each(|(g, &r)| *g -= r * s);
        }
    }
}

// ----------------------------------------------------------------------------------------------
// Blocked exp-domain path: LANES matrices at once, entry-major and lane-minor (`e[i·n + j][l]`),
// so every operation is a vertical SIMD operation across matrices (no horizontal sums) and the
// dependency chains of LANES matrices overlap. Per lane it performs exactly the scalar
// exp-domain arithmetic above, in the same order: same bits, whichever path a matrix takes.

/// Matrices processed together, one per SIMD lane.
const LANES: usize = 4;
type Lanes = [f64; LANES];

#[inline(always)]
fn lanes_add(s: &mut Lanes, x: &Lanes) {
    for l in 0..LANES {
        s[l] += x[l];
    }
}

#[inline(always)]
fn lanes_mul(x: &mut Lanes, r: &Lanes) {
    for l in 0..LANES {
        x[l] *= r[l];
    }
}

#[inline(always)]
fn lanes_recip(s: &mut Lanes) {
    for v in s.iter_mut() {
        *v = 1.0 / *v;
    }
}

/// `x -= a · b` lane-wise (a multiply, then a subtract: no FMA, to match the scalar path).
#[inline(always)]
fn lanes_sub_mul(x: &mut Lanes, a: &Lanes, b: &Lanes) {
    for l in 0..LANES {
        x[l] -= a[l] * b[l];
    }
}

#[inline(always)]
fn block_iterate(
    e: &mut [Lanes],
    n: usize,
    iters: usize,
    s: &mut [Lanes],
    mut trace: Option<&mut [Lanes]>,
) {
    let nn = n * n;
    let s = &mut s[..n];
    for t in 0..iters {
        for row in e.chunks_exact_mut(n) {
            let mut r = [0.0; LANES];
            row.iter().for_each(|x| lanes_add(&mut r, x));
            lanes_recip(&mut r);
            row.iter_mut().for_each(|x| lanes_mul(x, &r));
        }
        if let Some(tr) = trace.as_deref_mut() {
            tr[2 * t * nn..(2 * t + 1) * nn].copy_from_slice(e);
        }
        s.copy_from_slice(&e[..n]);
        for row in e[n..].chunks_exact(n) {
            s.iter_mut().zip(row).for_each(|(s, x)| lanes_add(s, x));
        }
        s.iter_mut().for_each(lanes_recip);
        for row in e.chunks_exact_mut(n) {
            row.iter_mut()
                .zip(s.iter())
                .for_each(|(x, r)| lanes_mul(x, r));
        }
        if let Some(tr) = trace.as_deref_mut() {
            tr[(2 * t + 1) * nn..(2 * t + 2) * nn].copy_from_slice(e);
        }
    }
}

#[inline(always)]
fn block_backward(
    g: &mut [Lanes],
    p: &[Lanes],
    trace: &[Lanes],
    n: usize,
    iters: usize,
    s: &mut [Lanes],
) {
    let nn = n * n;
    let s = &mut s[..n];
    g.iter_mut().zip(p).for_each(|(g, p)| lanes_mul(g, p));
    for t in (0..iters).rev() {
        let c = &trace[(2 * t + 1) * nn..(2 * t + 2) * nn];
        s.iter_mut().for_each(|s| *s = [0.0; LANES]);
        for row in g.chunks_exact(n) {
            s.iter_mut().zip(row).for_each(|(s, x)| lanes_add(s, x));
        }
        for (grow, crow) in g.chunks_exact_mut(n).zip(c.chunks_exact(n)) {
            grow.iter_mut()
                .zip(crow.iter().zip(s.iter()))
                .for_each(|(g, (c, s))| lanes_sub_mul(g, c, s));
        }
        let r = &trace[2 * t * nn..(2 * t + 1) * nn];
        for (grow, rrow) in g.chunks_exact_mut(n).zip(r.chunks_exact(n)) {
            let mut sum = [0.0; LANES];
            grow.iter().for_each(|x| lanes_add(&mut sum, x));
            grow.iter_mut()
                .zip(rrow)
                .for_each(|(g, r)| lanes_sub_mul(g, r, &sum));
        }
    }
}

/// Specialise the block loops for common stream counts (constant `n`: fully unrolled loops).
macro_rules! specialise_n {
    ($f:ident, $n:expr, $($arg:expr),*) => {
        match $n {
            2 => $f($($arg,)* 2),
            3 => $f($($arg,)* 3),
            4 => $f($($arg,)* 4),
            8 => $f($($arg,)* 8),
            n => $f($($arg,)* n),
        }
    };
}

#[inline(always)]
fn block_iterate_any(
    e: &mut [Lanes],
    n: usize,
    iters: usize,
    s: &mut [Lanes],
    trace: Option<&mut [Lanes]>,
) {
    let f = |e: &mut [Lanes], s: &mut [Lanes], trace, n| block_iterate(e, n, iters, s, trace);
    specialise_n!(f, n, e, s, trace)
}

#[inline(always)]
fn block_backward_any(
    g: &mut [Lanes],
    p: &[Lanes],
    trace: &[Lanes],
    n: usize,
    iters: usize,
    s: &mut [Lanes],
) {
    let f = |g: &mut [Lanes], s: &mut [Lanes], n| block_backward(g, p, trace, n, iters, s);
    specialise_n!(f, n, g, s)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn block_iterate_avx2(
    e: &mut [Lanes],
    n: usize,
    iters: usize,
    s: &mut [Lanes],
    trace: Option<&mut [Lanes]>,
) {
    block_iterate_any(e, n, iters, s, trace)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn block_backward_avx2(
    g: &mut [Lanes],
    p: &[Lanes],
    trace: &[Lanes],
    n: usize,
    iters: usize,
    s: &mut [Lanes],
) {
    block_backward_any(g, p, trace, n, iters, s)
}

/// Whether to run the AVX2 build of the block loops (4 f64 lanes in one register). The result
/// is the same bits either way: no FMA contraction, same operation order.
fn use_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn run_block_iterate(
    e: &mut [Lanes],
    n: usize,
    iters: usize,
    s: &mut [Lanes],
    trace: Option<&mut [Lanes]>,
) {
    #[cfg(target_arch = "x86_64")]
    if use_avx2() {
        // SAFETY: the CPU supports AVX2 (checked just above).
        return unsafe { block_iterate_avx2(e, n, iters, s, trace) };
    }
    block_iterate_any(e, n, iters, s, trace)
}

fn run_block_backward(
    g: &mut [Lanes],
    p: &[Lanes],
    trace: &[Lanes],
    n: usize,
    iters: usize,
    s: &mut [Lanes],
) {
    #[cfg(target_arch = "x86_64")]
    if use_avx2() {
        // SAFETY: the CPU supports AVX2 (checked just above).
        return unsafe { block_backward_avx2(g, p, trace, n, iters, s) };
    }
    block_backward_any(g, p, trace, n, iters, s)
}

/// Load up to [`LANES`] matrices of `src` into the lanes of `blk` as `exp(x − rowmax)`.
/// Returns which lanes hold a matrix that takes the exp domain; the other lanes (past the end
/// of `src`, or matrices left to the log-domain path) hold ones, a harmless stand-in.
fn load_block<T: Real>(src: &[T], n: usize, blk: &mut [Lanes], tmp: &mut Scratch) -> [bool; LANES] {
    let nn = n * n;
    let mut ok = [false; LANES];
    for (l, ok) in ok.iter_mut().enumerate() {
        if let Some(x) = src.get(l * nn..(l + 1) * nn) {
            tmp.load(x);
            *ok = exp_domain_ok(&tmp.m);
        }
        if *ok {
            exp_rows_shifted(&mut tmp.m, n);
            blk.iter_mut().zip(&tmp.m).for_each(|(e, &v)| e[l] = v);
        } else {
            blk.iter_mut().for_each(|e| e[l] = 1.0);
        }
    }
    ok
}

/// Forward of the consecutive matrices `x` into `out`.
fn forward_chunk<T: Real>(x: &[T], out: &mut [T], n: usize, iters: usize, domain: Domain) {
    let nn = n * n;
    let mut sc = Scratch::new(n, 0);
    let scalar = |x: &[T], o: &mut [T], sc: &mut Scratch, domain| {
        sc.load(x);
        project(&mut sc.m, n, iters, &mut sc.v, None, domain);
        o.iter_mut()
            .zip(&sc.m)
            .for_each(|(o, &p)| *o = T::from_f64(p));
    };
    if domain != Domain::Auto || iters == 0 {
        for (x, o) in x.chunks_exact(nn).zip(out.chunks_exact_mut(nn)) {
            scalar(x, o, &mut sc, domain);
        }
        return;
    }
    let mut blk = vec![[0.0; LANES]; nn];
    let mut s = vec![[0.0; LANES]; n];
    for (xb, ob) in x.chunks(LANES * nn).zip(out.chunks_mut(LANES * nn)) {
        let ok = load_block(xb, n, &mut blk, &mut sc);
        run_block_iterate(&mut blk, n, iters, &mut s, None);
        for (l, (x, o)) in xb.chunks_exact(nn).zip(ob.chunks_exact_mut(nn)).enumerate() {
            if ok[l] {
                o.iter_mut()
                    .zip(&blk)
                    .for_each(|(o, e)| *o = T::from_f64(e[l]));
            } else {
                scalar(x, o, &mut sc, Domain::Log);
            }
        }
    }
}

/// Backward of the consecutive matrices `x` with upstream gradients `go` into `out`.
fn backward_chunk<T: Real>(
    x: &[T],
    go: &[T],
    out: &mut [T],
    n: usize,
    iters: usize,
    domain: Domain,
) {
    let nn = n * n;
    let mut sc = Scratch::new(n, 0);
    let mut g = vec![0.0; nn];
    let mut scalar = |x: &[T], go: &[T], o: &mut [T], sc: &mut Scratch, domain| {
        if sc.trace.len() != 2 * iters * nn {
            sc.trace = vec![0.0; 2 * iters * nn];
        }
        sc.load(x);
        project(&mut sc.m, n, iters, &mut sc.v, Some(&mut sc.trace), domain);
        g.iter_mut().zip(go).for_each(|(d, &x)| *d = x.to_f64());
        backward_sweep(&mut g, &sc.m, &sc.trace, n, iters, &mut sc.v);
        o.iter_mut().zip(&g).for_each(|(o, &v)| *o = T::from_f64(v));
    };
    fn mats<T>(s: &[T], nn: usize) -> std::slice::ChunksExact<'_, T> {
        s.chunks_exact(nn)
    }
    if domain != Domain::Auto || iters == 0 {
        for ((x, go), o) in mats(x, nn).zip(mats(go, nn)).zip(out.chunks_exact_mut(nn)) {
            scalar(x, go, o, &mut sc, domain);
        }
        return;
    }
    let mut blk = vec![[0.0; LANES]; nn];
    let mut gb = vec![[0.0; LANES]; nn];
    let mut s = vec![[0.0; LANES]; n];
    let mut trace = vec![[0.0; LANES]; 2 * iters * nn];
    let block = LANES * nn;
    for ((xb, gob), ob) in x
        .chunks(block)
        .zip(go.chunks(block))
        .zip(out.chunks_mut(block))
    {
        let ok = load_block(xb, n, &mut blk, &mut sc);
        run_block_iterate(&mut blk, n, iters, &mut s, Some(&mut trace));
        gb.iter_mut().for_each(|e| *e = [0.0; LANES]);
        for (l, gm) in mats(gob, nn).enumerate().filter(|&(l, _)| ok[l]) {
            gb.iter_mut().zip(gm).for_each(|(e, &v)| e[l] = v.to_f64());
        }
        run_block_backward(&mut gb, &blk, &trace, n, iters, &mut s);
        for (l, ((x, go), o)) in mats(xb, nn)
            .zip(mats(gob, nn))
            .zip(ob.chunks_exact_mut(nn))
            .enumerate()
        {
            if ok[l] {
                o.iter_mut()
                    .zip(&gb)
                    .for_each(|(o, e)| *o = T::from_f64(e[l]));
            } else {
                scalar(x, go, o, &mut sc, Domain::Log);
            }
        }
    }
}

/// Run `f(first_matrix, out_chunk)` over `out` in chunks of whole matrices, in parallel when
/// the batch is large enough.
fn for_each_chunk<T: Real>(
    out: &mut [T],
    b: usize,
    n: usize,
    iters: usize,
    threads: usize,
    f: impl Fn(usize, &mut [T]) + Sync + Send,
) -> Result<()> {
    let nn = n * n;
    let threads = resolve_threads(threads)?;
    let work = b.saturating_mul(nn).saturating_mul(iters.max(1));
    if threads <= 1 || b < 2 * LANES || work < PAR_MIN_WORK {
        f(0, out);
        return Ok(());
    }
    // ~4 tasks per thread for balance, whole blocks of LANES matrices each, run by the crate's
    // team (the calling thread alone if the team is lent elsewhere).
    let per = b.div_ceil(threads * 4).next_multiple_of(LANES);
    let ptr = crate::team::SendPtr::new(out);
    crate::team::borrow(threads)?.run(b, per, |_, first, last| {
        // SAFETY: the team runs each chunk first..last of matrices exactly once, so the chunks
        // are disjoint, and `out` outlives the job.
        let chunk = unsafe { ptr.slice(first * nn, last * nn) };
        f(first, chunk);
    })
}

fn forward_impl<T: Real>(
    logits: &[T],
    n: usize,
    iters: usize,
    out: &mut [T],
    threads: usize,
    domain: Domain,
) -> Result<()> {
    let b = batch_len(logits.len(), n, "sinkhorn logits")?;
    check_iters(n, iters)?;
    if out.len() != logits.len() {
        return Err(shape_err!(
            "sinkhorn output holds {} values, logits {}",
            out.len(),
            logits.len()
        ));
    }
    if b == 0 {
        return Ok(());
    }
    let nn = n * n;
    for_each_chunk(out, b, n, iters, threads, |first, chunk| {
        let x = &logits[first * nn..first * nn + chunk.len()];
        forward_chunk(x, chunk, n, iters, domain)
    })
}

fn backward_impl<T: Real>(
    logits: &[T],
    grad_out: &[T],
    n: usize,
    iters: usize,
    grad_logits: &mut [T],
    threads: usize,
    domain: Domain,
) -> Result<()> {
    let b = batch_len(logits.len(), n, "sinkhorn logits")?;
    check_iters(n, iters)?;
    if grad_out.len() != logits.len() || grad_logits.len() != logits.len() {
        return Err(shape_err!(
            "sinkhorn backward: logits hold {} values, grad_out {}, grad_logits {}",
            logits.len(),
            grad_out.len(),
            grad_logits.len()
        ));
    }
    if b == 0 {
        return Ok(());
    }
    let nn = n * n;
    // Iterates kept per task: 2·iters·n² values per lane, plus one scalar matrix's worth.
    let trace_bytes = iters
        .checked_mul(2 * nn)
        .and_then(|l| l.checked_mul((LANES + 1) * 8));
    if trace_bytes.is_none_or(|b| b > MAX_TRACE_BYTES) {
        return Err(Error::Value(format!(
            "sinkhorn backward: {iters} iterations of {n} × {n} matrices need more than \
             {} MiB of iterates per task; use fewer iterations",
            MAX_TRACE_BYTES >> 20
        )));
    }
    for_each_chunk(grad_logits, b, n, iters, threads, |first, chunk| {
        let range = first * nn..first * nn + chunk.len();
        let (x, go) = (&logits[range.clone()], &grad_out[range]);
        backward_chunk(x, go, chunk, n, iters, domain)
    })
}

/// Sinkhorn-Knopp forward of a batch of `n × n` logit matrices (`logits.len() = b·n²`,
/// row-major, back to back) into `out` (same length): `iters` row-then-column normalisations of
/// `exp(logits)` (see the module docs; `iters = 0` gives `exp(logits)`). `threads = 0` uses the
/// shared default ([`crate::kernels::num_threads`]).
pub fn sinkhorn_forward<T: Real>(
    logits: &[T],
    n: usize,
    iters: usize,
    out: &mut [T],
    threads: usize,
) -> Result<()> {
    forward_impl(logits, n, iters, out, threads, Domain::Auto)
}

/// Exact gradient of [`sinkhorn_forward`]'s output w.r.t. `logits` for an upstream gradient
/// `grad_out = ∂L/∂P` (same layout), written to `grad_logits`.
pub fn sinkhorn_backward<T: Real>(
    logits: &[T],
    grad_out: &[T],
    n: usize,
    iters: usize,
    grad_logits: &mut [T],
    threads: usize,
) -> Result<()> {
    backward_impl(
        logits,
        grad_out,
        n,
        iters,
        grad_logits,
        threads,
        Domain::Auto,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn random(len: usize, scale: f64, seed: u64) -> Vec<f64> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..len)
            .map(|_| rng.random_range(-1.0..1.0) * scale)
            .collect()
    }

    /// Independent oracle: the log-domain recurrence on nested vectors, written plainly.
    fn oracle(x: &[f64], n: usize, iters: usize) -> Vec<f64> {
        let mut a: Vec<Vec<f64>> = x.chunks(n).map(|r| r.to_vec()).collect();
        let lse = |v: &[f64]| {
            let m = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            m + v.iter().map(|x| (x - m).exp()).sum::<f64>().ln()
        };
        for _ in 0..iters {
            for row in a.iter_mut() {
                let l = lse(row);
                row.iter_mut().for_each(|x| *x -= l);
            }
            for j in 0..n {
                let col: Vec<f64> = a.iter().map(|r| r[j]).collect();
                let l = lse(&col);
                a.iter_mut().for_each(|r| r[j] -= l);
            }
        }
        a.into_iter().flatten().map(f64::exp).collect()
    }

    fn forward(x: &[f64], n: usize, iters: usize, domain: Domain) -> Vec<f64> {
        let mut out = vec![0.0; x.len()];
        forward_impl(x, n, iters, &mut out, 1, domain).unwrap();
        out
    }

    fn backward(x: &[f64], g: &[f64], n: usize, iters: usize, domain: Domain) -> Vec<f64> {
        let mut out = vec![0.0; x.len()];
        backward_impl(x, g, n, iters, &mut out, 1, domain).unwrap();
        out
    }

    fn max_diff(a: &[f64], b: &[f64]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    }

    #[test]
    fn forward_matches_oracle_in_both_domains() {
        for n in 1..=6 {
            for iters in [0, 1, 2, 5, 20] {
                let x = random(3 * n * n, 3.0, (n * 100 + iters) as u64);
                let want: Vec<f64> = x.chunks(n * n).flat_map(|m| oracle(m, n, iters)).collect();
                for domain in [Domain::Auto, Domain::Log] {
                    let got = forward(&x, n, iters, domain);
                    assert!(
                        max_diff(&got, &want) < 1e-12,
                        "n={n} iters={iters} {domain:?}: {}",
                        max_diff(&got, &want)
                    );
                }
            }
        }
    }

    #[test]
    fn blocked_path_is_bitwise_the_scalar_path() {
        // Batches that leave partial blocks, and blocks mixing exp- and log-domain matrices.
        for n in [1, 2, 3, 4, 5, 8] {
            for b in [1, 3, 4, 5, 9] {
                let nn = n * n;
                let mut x = random(b * nn, 3.0, (n * 10 + b) as u64);
                if b > 2 {
                    x[nn] = -700.0; // matrix 1 takes the log domain
                }
                let g = random(b * nn, 1.0, 77);
                for iters in [1, 20] {
                    let fa = forward(&x, n, iters, Domain::Auto);
                    let fs = forward(&x, n, iters, Domain::Scalar);
                    assert_eq!(fa, fs, "forward n={n} b={b} iters={iters}");
                    let ba = backward(&x, &g, n, iters, Domain::Auto);
                    let bs = backward(&x, &g, n, iters, Domain::Scalar);
                    assert_eq!(ba, bs, "backward n={n} b={b} iters={iters}");
                }
            }
        }
    }

    #[test]
    fn simd_build_is_bitwise_the_portable_build() {
        let (n, iters) = (4, 7);
        let x = random(LANES * n * n, 0.3, 21);
        let mk = || -> Vec<Lanes> {
            (0..n * n)
                .map(|k| std::array::from_fn(|l| 0.1 + x[l * n * n + k].abs()))
                .collect()
        };
        let (mut a, mut b) = (mk(), mk());
        let mut s = vec![[0.0; LANES]; n];
        let mut ta = vec![[0.0; LANES]; 2 * iters * n * n];
        let mut tb = ta.clone();
        run_block_iterate(&mut a, n, iters, &mut s, Some(&mut ta));
        block_iterate_any(&mut b, n, iters, &mut s, Some(&mut tb));
        assert_eq!((&a, &ta), (&b, &tb));
        let (mut ga, mut gb) = (mk(), mk());
        run_block_backward(&mut ga, &a, &ta, n, iters, &mut s);
        block_backward_any(&mut gb, &b, &tb, n, iters, &mut s);
        assert_eq!(ga, gb);
    }

    #[test]
    fn wide_spread_takes_log_domain_and_stays_finite() {
        // Logits spanning 1000: exp() of the shifted logits would underflow to 0 in f64.
        let n = 4;
        let mut x = random(n * n, 2.0, 7);
        x[5] = -1000.0;
        x[0] = 300.0;
        let got = forward(&x, n, 20, Domain::Auto);
        let want = oracle(&x, n, 20);
        assert!(got.iter().all(|v| v.is_finite()));
        assert!(max_diff(&got, &want) < 1e-12);
    }

    #[test]
    fn converges_to_doubly_stochastic() {
        let n = 4;
        let x = random(64 * n * n, 2.0, 11);
        let p = forward(&x, n, 20, Domain::Auto);
        for m in p.chunks(n * n) {
            for i in 0..n {
                let row: f64 = m[i * n..(i + 1) * n].iter().sum();
                let col: f64 = (0..n).map(|k| m[k * n + i]).sum();
                assert!((col - 1.0).abs() < 1e-12, "col {col}");
                assert!((row - 1.0).abs() < 1e-3, "row {row}");
            }
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        let h = 1e-6;
        for (n, iters, scale, domain) in [
            (1, 3, 1.0, Domain::Auto),
            (2, 0, 1.0, Domain::Auto),
            (2, 1, 1.0, Domain::Auto),
            (3, 5, 2.0, Domain::Auto),
            (4, 20, 2.0, Domain::Auto),
            (4, 20, 2.0, Domain::Log),
            (5, 7, 3.0, Domain::Log),
        ] {
            let x = random(2 * n * n, scale, (n * 31 + iters) as u64);
            let gout = random(x.len(), 1.0, 99);
            let loss = |x: &[f64]| -> f64 {
                forward(x, n, iters, domain)
                    .iter()
                    .zip(&gout)
                    .map(|(p, g)| p * g)
                    .sum()
            };
            let grad = backward(&x, &gout, n, iters, domain);
            for k in 0..x.len() {
                let (mut xp, mut xm) = (x.clone(), x.clone());
                xp[k] += h;
                xm[k] -= h;
                let fd = (loss(&xp) - loss(&xm)) / (2.0 * h);
                assert!(
                    (fd - grad[k]).abs() < 1e-7 * (1.0 + fd.abs()),
                    "n={n} iters={iters} {domain:?} k={k}: fd {fd} vs {}",
                    grad[k]
                );
            }
        }
    }

    #[test]
    fn backward_of_wide_spread_matches_log_domain() {
        let n = 3;
        let mut x = random(n * n, 1.0, 5);
        x[4] = -500.0;
        let g = random(n * n, 1.0, 6);
        let a = backward(&x, &g, n, 10, Domain::Auto);
        let b = backward(&x, &g, n, 10, Domain::Log);
        assert!(a.iter().all(|v| v.is_finite()));
        assert!(max_diff(&a, &b) < 1e-12);
    }

    #[test]
    fn f32_agrees_with_f64_and_threads_agree() {
        let n = 4;
        // Not a whole number of SIMD blocks, and enough work to run on the shared pool.
        let b = 3001;
        let x = random(b * n * n, 2.0, 3);
        let g = random(b * n * n, 1.0, 4);
        let mut p1 = vec![0.0; x.len()];
        let mut g1 = vec![0.0; x.len()];
        sinkhorn_forward(&x, n, 20, &mut p1, 1).unwrap();
        sinkhorn_backward(&x, &g, n, 20, &mut g1, 1).unwrap();
        for threads in [2, 3, 5] {
            let mut p2 = vec![0.0; x.len()];
            let mut g2 = vec![0.0; x.len()];
            sinkhorn_forward(&x, n, 20, &mut p2, threads).unwrap();
            assert_eq!(p1, p2, "{threads} threads");
            sinkhorn_backward(&x, &g, n, 20, &mut g2, threads).unwrap();
            assert_eq!(g1, g2, "{threads} threads");
        }

        let x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
        let g32: Vec<f32> = g.iter().map(|&v| v as f32).collect();
        let mut p32 = vec![0f32; x.len()];
        let mut gl32 = vec![0f32; x.len()];
        sinkhorn_forward(&x32, n, 20, &mut p32, 0).unwrap();
        sinkhorn_backward(&x32, &g32, n, 20, &mut gl32, 0).unwrap();
        let p32: Vec<f64> = p32.iter().map(|&v| v as f64).collect();
        let gl32: Vec<f64> = gl32.iter().map(|&v| v as f64).collect();
        assert!(max_diff(&p32, &p1) < 1e-6);
        assert!(max_diff(&gl32, &g1) < 1e-5);
    }

    #[test]
    fn non_finite_inputs_do_not_panic() {
        let n = 3;
        let mut x = random(n * n, 1.0, 8);
        x[0] = f64::NAN;
        x[4] = f64::NEG_INFINITY;
        x[8] = f64::INFINITY;
        let p = forward(&x, n, 5, Domain::Auto);
        assert_eq!(p.len(), n * n);
        let _ = backward(&x, &x, n, 5, Domain::Auto);
        // A masked (−inf) entry in an otherwise finite matrix stays exactly 0.
        let mut y = random(n * n, 1.0, 9);
        y[1] = f64::NEG_INFINITY;
        let p = forward(&y, n, 20, Domain::Auto);
        assert_eq!(p[1], 0.0);
        assert!(p.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn shape_errors() {
        let x = vec![0.0f64; 10];
        let mut out = vec![0.0f64; 10];
        assert!(matches!(
            sinkhorn_forward(&x, 3, 20, &mut out, 1),
            Err(Error::Shape(_))
        ));
        let mut short = vec![0.0f64; 8];
        assert!(matches!(
            sinkhorn_forward(&x[..9], 3, 20, &mut short, 1),
            Err(Error::Shape(_))
        ));
        assert!(matches!(
            sinkhorn_backward(&x[..9], &x[..8], 3, 20, &mut out[..9], 1),
            Err(Error::Shape(_))
        ));
        assert!(matches!(
            sinkhorn_backward(&x[..9], &x[..9], 3, usize::MAX / 4, &mut out[..9], 1),
            Err(Error::Value(_))
        ));
        // Empty batches are fine.
        sinkhorn_forward::<f64>(&[], 4, 20, &mut [], 1).unwrap();
        sinkhorn_backward::<f64>(&[], &[], 0, 20, &mut [], 1).unwrap();
    }

    #[test]
    fn iteration_limits_are_clear_errors_at_once() {
        let x = vec![0.5f64; 16];
        let mut out = vec![0.0; 16];
        for iters in [MAX_ITERS + 1, 1 << 40, usize::MAX] {
            let e = sinkhorn_forward(&x, 4, iters, &mut out, 1).unwrap_err();
            assert!(e.to_string().contains("above the limit"), "{e}");
            let e = sinkhorn_backward(&x, &x, 4, iters, &mut out, 1).unwrap_err();
            assert!(e.to_string().contains("above the limit"), "{e}");
        }
        // One big matrix with many iterations: bounded by the per-matrix work.
        let n = 2048;
        let big = vec![0.0f32; n * n];
        let mut o = vec![0.0f32; n * n];
        let e = sinkhorn_forward(&big, n, 100, &mut o, 1).unwrap_err();
        assert!(e.to_string().contains("entry-iterations"), "{e}");
        sinkhorn_forward(&x, 4, MAX_ITERS, &mut out, 1).unwrap();
        // Absurd thread counts are refused before any pool is built.
        let e = sinkhorn_forward(&x, 4, 20, &mut out, 1 << 40).unwrap_err();
        assert!(e.to_string().contains("threads requested"), "{e}");
    }

    #[test]
    fn split_batches_equal_one_call() {
        let (n, b, iters) = (4usize, 37usize, 20usize);
        let x: Vec<f64> = (0..b * n * n)
            .map(|i| ((i * 7919) % 23) as f64 / 5.0 - 2.0)
            .collect();
        let mut whole = vec![0.0; x.len()];
        sinkhorn_forward(&x, n, iters, &mut whole, 1).unwrap();
        let chunk = interrupt_chunk(n, iters);
        assert_eq!(chunk % LANES, 0);
        for m in [LANES, 2 * LANES, chunk] {
            let mut split = vec![0.0; x.len()];
            for (xs, os) in x.chunks(m * n * n).zip(split.chunks_mut(m * n * n)) {
                sinkhorn_forward(xs, n, iters, os, 1).unwrap();
            }
            assert_eq!(split, whole, "chunks of {m} matrices");
        }
    }
}

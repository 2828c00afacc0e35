//! AVX-512 VNNI ternary × int8 kernel (`gemv_tq2_0_i8_avx512_vnni`).
//!
//! A 64-byte load of one block's `qs` holds four bit planes: plane `k` (bits `2k, 2k+1` of every
//! byte) carries the codes of elements `[32k, 32k+32)` in its low 32 bytes and `[128+32k, ...)`
//! in its high 32 bytes. [`prepare`] permutes the activations once per call into that order, so
//! the inner loop is: load 64 bytes, then per plane move bits `2k, 2k+1` to bits 6, 7 of each
//! byte (the code times 64, at most 192: still an unsigned byte) and `vpdpbusd` it with the
//! plane's 64 activations. With every plane at the same scale, one accumulator per weight row
//! serves all four planes; the final sum is divided by 64 (exactly: every term is a multiple).
//!
//! Moving the bits costs one GFNI `vgf2p8affineqb` (a per-byte 8×8 bit-matrix product, which
//! runs on port 0 while `vpdpbusd` also issues on port 5) when the CPU has GFNI; otherwise a
//! `vpsllw` by `6 − 2k` and a mask with `0xc0` (Cascade Lake has VNNI but no GFNI). Measured on
//! this machine's Sapphire-Rapids-class core: 4 × (gf2p8affine, dpbusd) per 256 weights is
//! bound by the two 512-bit ports at ~4 cycles, i.e. up to 64 MAC/cycle.
//!
//! Tiles of `R` weight rows × `N` activation rows with `R·N = 16` accumulators (16×1, 8×2,
//! 4×4): each activation load serves `R` rows, each decoded weight plane `N` activation rows.
//! The 16 accumulators are reduced together by a transposing add tree (45 shuffles/adds for 16
//! dot products instead of ~10 each), which matters for short rows (768 columns = 3 blocks).
//!
//! Each tile first prefetches the weights [`PREFETCH_BYTES`] ahead of it: a decode GEMV is bound
//! by how fast lines arrive, not by the arithmetic (4 `vpdpbusd` per 64 bytes: ~40 GB/s at this
//! core's clock, against ~25 GB/s from L3).
//!
//! Overflow: one `vpdpbusd` adds four products `u8 ≤ 192` × `i8 ≥ −128`, at most 98 304 in
//! magnitude per lane, four per block (planes); a lane of a row of `cols` weights stays below
//! `cols/256 · 4 · 98 304 = 1536·cols`, below `2^31` for any `cols` under 1.3 million (the i32
//! accumulators of the scalar oracle itself overflow soon after). `vpdpbusd` does not saturate.

use super::super::{PreparedActs, TernaryView};
use crate::ternary::QK_K;
use std::arch::x86_64::*;

/// Row sums, and the activations permuted per 256-block so that 64-byte vector `k` of a block
/// is `[x[32k..32k+32], x[128+32k..128+32k+32]]`, the element order of bit plane `k`.
pub fn prepare(acts: &mut PreparedActs) {
    super::row_sums(acts);
    let mut p = vec![0i8; acts.x.len()];
    for (src, dst) in acts.x.chunks_exact(QK_K).zip(p.chunks_exact_mut(QK_K)) {
        for k in 0..4 {
            dst[64 * k..64 * k + 32].copy_from_slice(&src[32 * k..32 * k + 32]);
            dst[64 * k + 32..64 * k + 64].copy_from_slice(&src[128 + 32 * k..160 + 32 * k]);
        }
    }
    acts.extra = p;
}

/// The kernel for CPUs with GFNI.
///
/// # Safety
/// The CPU must support AVX-512 F, BW, VNNI and GFNI (checked by [`super::fns`]); `acts` must
/// have been prepared by [`prepare`] for `w.cols` columns; rows `r0 .. r0 + out.len()/n` exist.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,gfni")]
pub unsafe fn rows_gfni(w: &TernaryView, r0: usize, acts: &PreparedActs, out: &mut [i32]) {
    // SAFETY: the caller upholds this function's contract (the CPU features it is compiled for were
    // detected; pointers and lengths are in bounds, see its docs).
    unsafe { rows_impl::<true>(w, r0, acts, out) }
}

/// The kernel for CPUs without GFNI (shift + mask instead of the bit-matrix product).
///
/// # Safety
/// As [`rows_gfni`], without the GFNI requirement.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub unsafe fn rows_shift(w: &TernaryView, r0: usize, acts: &PreparedActs, out: &mut [i32]) {
    // SAFETY: the caller upholds this function's contract (the CPU features it is compiled for were
    // detected; pointers and lengths are in bounds, see its docs).
    unsafe { rows_impl::<false>(w, r0, acts, out) }
}

#[inline(always)]
unsafe fn rows_impl<const GFNI: bool>(
    w: &TernaryView,
    r0: usize,
    acts: &PreparedActs,
    out: &mut [i32],
) {
    // SAFETY: the caller upholds this function's contract (the CPU features it is compiled for were
    // detected; pointers and lengths are in bounds, see its docs).
    unsafe {
        let n = acts.n;
        let nrows = out.len() / n;
        assert!(w.qs.len() == w.rows * (w.cols / 4) && w.cols.is_multiple_of(QK_K));
        assert!(r0 + nrows <= w.rows && acts.extra.len() == n * w.cols && acts.cols == w.cols);
        let ctx = Ctx {
            w: w.qs.as_ptr().add(r0 * (w.cols / 4)),
            rb: w.cols / 4,
            x: acts.extra.as_ptr(),
            cols: w.cols,
            n,
            sums: &acts.sums,
        };
        // Rows outer, activation tiles inner: a weight row tile stays in L1 while every activation
        // tile passes over it, so weights stream from memory once per call whatever `n` is.
        let mut r = 0;
        while r < nrows {
            let left = nrows - r;
            let rt = match n {
                1 if left >= 16 => 16,
                2 if left >= 8 => 8,
                _ if left >= 4 => 4,
                _ => 1,
            };
            prefetch_ahead(ctx.w.add(r * ctx.rb), rt * ctx.rb);
            for (i0, ni) in super::act_tiles(n, 4) {
                let o = &mut out[..];
                match (rt, ni) {
                    (16, _) => tile::<GFNI, 16, 1>(&ctx, r, i0, o),
                    (8, _) => tile::<GFNI, 8, 2>(&ctx, r, i0, o),
                    (4, 1) => tile::<GFNI, 4, 1>(&ctx, r, i0, o),
                    (4, 2) => tile::<GFNI, 4, 2>(&ctx, r, i0, o),
                    (4, 3) => tile::<GFNI, 4, 3>(&ctx, r, i0, o),
                    (4, _) => tile::<GFNI, 4, 4>(&ctx, r, i0, o),
                    (_, 1) => tile::<GFNI, 1, 1>(&ctx, r, i0, o),
                    (_, 2) => tile::<GFNI, 1, 2>(&ctx, r, i0, o),
                    (_, 3) => tile::<GFNI, 1, 3>(&ctx, r, i0, o),
                    _ => tile::<GFNI, 1, 4>(&ctx, r, i0, o),
                }
            }
            r += rt;
        }
    }
}

/// How far ahead of the tile being multiplied its weights are prefetched, in bytes.
///
/// A decode GEMV streams every weight byte once and does little work per byte, so it runs at the
/// speed the core can pull lines from L3/DRAM. The hardware streamers stop at each 4 KiB page
/// and restart cold, and the 16-row tile reads its rows in an order they follow poorly (stride
/// of a row, then back); software prefetches a fixed distance ahead keep more lines in flight.
/// Measured on this machine's Sapphire-Rapids-class core (the 48 matrices of a nano_125m decode
/// step, 1 thread): 15–25% faster for any distance from 1 to 4 KiB, less at 8 KiB.
pub const PREFETCH_BYTES: usize = 2048;

/// Prefetch (into L1) the `len` bytes that start [`PREFETCH_BYTES`] after `p`. Addresses past
/// the matrix are harmless: a prefetch never faults, and `wrapping_add` keeps the pointer
/// arithmetic defined.
#[inline(always)]
unsafe fn prefetch_ahead(p: *const u8, len: usize) {
    let base = p.wrapping_add(PREFETCH_BYTES) as *const i8;
    let mut off = 0;
    while off < len {
        // SAFETY: `_mm_prefetch` is a hint: it reads nothing architecturally and cannot fault.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(off)) };
        off += 64;
    }
}

struct Ctx<'a> {
    /// First byte of row `r0`.
    w: *const u8,
    /// Bytes per weight row.
    rb: usize,
    /// Permuted activations (`n × cols`).
    x: *const i8,
    cols: usize,
    n: usize,
    sums: &'a [i32],
}

/// Bits `2k, 2k+1` of every byte moved to bits 6, 7, the rest cleared: the plane-`k` codes × 64.
#[inline(always)]
unsafe fn plane<const GFNI: bool>(
    w: __m512i,
    k: usize,
    mats: &[__m512i; 4],
    hi2: __m512i,
) -> __m512i {
    // SAFETY: the caller upholds this function's contract (the CPU features it is compiled for were
    // detected; pointers and lengths are in bounds, see its docs).
    unsafe {
        if k == 3 {
            // Already in place: a mask (ports 0 and 5) beats the affine product (port 0 only).
            _mm512_and_si512(w, hi2)
        } else if GFNI {
            _mm512_gf2p8affine_epi64_epi8::<0>(w, mats[k])
        } else {
            let s = match k {
                0 => _mm512_slli_epi16::<6>(w),
                1 => _mm512_slli_epi16::<4>(w),
                2 => _mm512_slli_epi16::<2>(w),
                _ => w,
            };
            // A 16-bit shift carries bits across the byte boundary, but only into bits below 6.
            _mm512_and_si512(s, hi2)
        }
    }
}

/// The GF(2) matrix (as `vgf2p8affineqb` reads it: output bit `i` = parity of input AND
/// matrix byte `7 − i`) that copies input bits `2k, 2k+1` to output bits 6, 7.
const fn plane_matrix(k: u32) -> i64 {
    // output bit 7 <- input bit 2k+1 (matrix byte 0); output bit 6 <- input bit 2k (byte 1).
    ((1u64 << (2 * k + 1)) | ((1u64 << (2 * k)) << 8)) as i64
}

/// `R × N` dot products (weight rows `r..r+R` relative to `ctx.w`, activation rows
/// `i0..i0+N`), written to `out[(r + dr)·n + i0 + di]`.
#[inline(always)]
unsafe fn tile<const GFNI: bool, const R: usize, const N: usize>(
    ctx: &Ctx,
    r: usize,
    i0: usize,
    out: &mut [i32],
) {
    // SAFETY: the caller upholds this function's contract (the CPU features it is compiled for were
    // detected; pointers and lengths are in bounds, see its docs).
    unsafe {
        let mats = [
            _mm512_set1_epi64(plane_matrix(0)),
            _mm512_set1_epi64(plane_matrix(1)),
            _mm512_set1_epi64(plane_matrix(2)),
            _mm512_set1_epi64(plane_matrix(3)),
        ];
        let hi2 = _mm512_set1_epi8(0xc0u8 as i8);
        let w = ctx.w.add(r * ctx.rb);
        let x = ctx.x.add(i0 * ctx.cols);
        let mut acc = [[_mm512_setzero_si512(); N]; R];
        for b in 0..ctx.cols / QK_K {
            if N == 1 {
                // One activation row: its 4 plane vectors stay in registers (the compiler hoists
                // the loads) while R = 16 rows stream past.
                for (dr, acc_r) in acc.iter_mut().enumerate() {
                    let wv = _mm512_loadu_si512(w.add(dr * ctx.rb + 64 * b) as *const _);
                    for k in 0..4 {
                        let c = plane::<GFNI>(wv, k, &mats, hi2);
                        let xv = _mm512_loadu_si512(x.add(QK_K * b + 64 * k) as *const _);
                        acc_r[0] = _mm512_dpbusd_epi32(acc_r[0], c, xv);
                    }
                }
            } else {
                // Several activation rows: keep the R weight vectors and, per plane, the N
                // activation vectors in registers (16 accumulators + R + N + constants ≤ 32), so
                // each load is used R or N times.
                let mut wv = [_mm512_setzero_si512(); R];
                for (dr, v) in wv.iter_mut().enumerate() {
                    *v = _mm512_loadu_si512(w.add(dr * ctx.rb + 64 * b) as *const _);
                }
                for k in 0..4 {
                    let mut xv = [_mm512_setzero_si512(); N];
                    for (di, v) in xv.iter_mut().enumerate() {
                        *v = _mm512_loadu_si512(
                            x.add(di * ctx.cols + QK_K * b + 64 * k) as *const _
                        );
                    }
                    for (acc_r, &wr) in acc.iter_mut().zip(&wv) {
                        let c = plane::<GFNI>(wr, k, &mats, hi2);
                        for (a, &xi) in acc_r.iter_mut().zip(&xv) {
                            *a = _mm512_dpbusd_epi32(*a, c, xi);
                        }
                    }
                }
            }
        }
        // Reduce all R·N accumulators at once (flattened row-major, padded to 16 with zeros).
        let mut flat = [_mm512_setzero_si512(); 16];
        for (dr, acc_r) in acc.iter().enumerate() {
            flat[dr * N..dr * N + N].copy_from_slice(acc_r);
        }
        let mut sums = [0i32; 16];
        for (j, s) in sums.iter_mut().enumerate().take(R * N) {
            *s = ctx.sums[i0 + j % N];
        }
        // Codes were scaled by 64; the subtraction of Σx turns Σ code·x into Σ trit·x.
        let v = _mm512_sub_epi32(
            _mm512_srai_epi32::<6>(hsum16(&flat)),
            _mm512_loadu_si512(sums.as_ptr() as *const _),
        );
        let n = ctx.n;
        if N == n {
            // The tile covers whole output rows: its R·N results are contiguous.
            let mask: __mmask16 = if R * N == 16 {
                0xffff
            } else {
                (1 << (R * N)) - 1
            };
            assert!((r + R) * n <= out.len());
            _mm512_mask_storeu_epi32(out.as_mut_ptr().add(r * n) as *mut _, mask, v);
        } else {
            let mut res = [0i32; 16];
            _mm512_storeu_si512(res.as_mut_ptr() as *mut _, v);
            for dr in 0..R {
                out[(r + dr) * n + i0..(r + dr) * n + i0 + N]
                    .copy_from_slice(&res[dr * N..dr * N + N]);
            }
        }
    }
}

/// Horizontal sums of 16 vectors: lane `j` of the result is the sum of `v[j]`'s 16 lanes.
#[inline(always)]
unsafe fn hsum16(v: &[__m512i; 16]) -> __m512i {
    // SAFETY: the caller upholds this function's contract (the CPU features it is compiled for were
    // detected; pointers and lengths are in bounds, see its docs).
    unsafe {
        // 32-bit interleave: per 128-bit lane [a0+a2, b0+b2, a1+a3, b1+b3].
        let mut p = [_mm512_setzero_si512(); 8];
        for (j, pj) in p.iter_mut().enumerate() {
            let (a, b) = (v[2 * j], v[2 * j + 1]);
            *pj = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
        }
        // 64-bit interleave: per 128-bit lane L, [a_L, b_L, c_L, d_L] (each a lane's full sum).
        let mut q = [_mm512_setzero_si512(); 4];
        for (j, qj) in q.iter_mut().enumerate() {
            let (a, b) = (p[2 * j], p[2 * j + 1]);
            *qj = _mm512_add_epi32(_mm512_unpacklo_epi64(a, b), _mm512_unpackhi_epi64(a, b));
        }
        // 128-bit lanes: [abcd_01, abcd_23, efgh_01, efgh_23] and the same for i..p.
        let fold = |a: __m512i, b: __m512i| {
            _mm512_add_epi32(
                _mm512_shuffle_i32x4::<0b10_00_10_00>(a, b),
                _mm512_shuffle_i32x4::<0b11_01_11_01>(a, b),
            )
        };
        let w0 = fold(q[0], q[1]);
        let w1 = fold(q[2], q[3]);
        fold(w0, w1)
    }
}

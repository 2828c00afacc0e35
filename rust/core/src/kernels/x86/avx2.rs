//! AVX2 ternary × int8 kernel (`gemv_tq2_0_i8_avx2`): `vpmaddubsw` on unsigned codes.
//!
//! A 32-byte load of one half-block's `qs` holds four bit planes of 32 consecutive elements each,
//! plane `k` being elements `[128h + 32k, +32)`: the activations are used in their natural order.
//! One 16-bit shift by 4 and four masks give the planes: `w & 0x03` (code of plane 0),
//! `w & 0x0c` (4 × code of plane 1), `(w>>4) & 0x03` (plane 2), `(w>>4) & 0x0c` (4 × plane 3) —
//! one shift instead of three. Planes 0/2 sum into `a`, the 4×-scaled planes 1/3 into `b`, and
//! once per block `4a + b` (= 4 × the block's `Σ code·x`) is widened with `vpmaddwd` into i32.
//!
//! Overflow (i16, codes up to 3 so that any byte is exact): a `vpmaddubsw` pair is at most
//! `2·3·128 = 768` for planes 0/2 and `2·12·128 = 3072` for planes 1/3, with no saturation.
//! Per block (two halves, two planes each) `|a| ≤ 4·768 = 3072`, `|b| ≤ 4·3072 = 12 288`, so
//! `|4a + b| ≤ 24 576 < 32 767`. In i32, a lane gains at most `2·24 576` per block: fine for any
//! realistic `cols` (overflow needs more than ten million columns). The final sum is divided by
//! 4, exactly, since every term is a multiple of 4.

use super::super::{PreparedActs, TernaryView};
use crate::ternary::QK_K;
use std::arch::x86_64::*;

/// Row sums only: the kernel reads the activations in their natural order.
pub fn prepare(acts: &mut PreparedActs) {
    super::row_sums(acts);
}

/// # Safety
/// The CPU must support AVX2 (checked by [`super::fns`]); `acts` must have been prepared by
/// [`prepare`] for `w.cols` columns, and rows `r0 .. r0 + out.len()/n` must exist.
#[target_feature(enable = "avx2")]
pub unsafe fn rows(w: &TernaryView, r0: usize, acts: &PreparedActs, out: &mut [i32]) {
    // SAFETY: the caller upholds this function's contract (the CPU features it is compiled for were
    // detected; pointers and lengths are in bounds, see its docs).
    unsafe {
        let n = acts.n;
        let nrows = out.len() / n;
        assert!(w.qs.len() == w.rows * (w.cols / 4) && w.cols.is_multiple_of(QK_K));
        assert!(r0 + nrows <= w.rows && acts.x.len() == n * w.cols && acts.cols == w.cols);
        let ctx = Ctx {
            w: w.qs.as_ptr().add(r0 * (w.cols / 4)),
            rb: w.cols / 4,
            x: acts.x.as_ptr(),
            cols: w.cols,
        };
        let mut r = 0;
        while r < nrows {
            let rt = if n == 1 && nrows - r >= 4 {
                4
            } else if n == 2 && nrows - r >= 2 {
                2
            } else {
                1
            };
            for (i0, ni) in super::act_tiles(n, 4) {
                let mut put = |dr: usize, di: usize, v: i32| {
                    out[(r + dr) * n + i0 + di] = v - acts.sums[i0 + di];
                };
                match (rt, ni) {
                    (4, 1) => emit(tile::<4, 1>(&ctx, r, i0), &mut put),
                    (2, 2) => emit(tile::<2, 2>(&ctx, r, i0), &mut put),
                    (_, 1) => emit(tile::<1, 1>(&ctx, r, i0), &mut put),
                    (_, 2) => emit(tile::<1, 2>(&ctx, r, i0), &mut put),
                    (_, 3) => emit(tile::<1, 3>(&ctx, r, i0), &mut put),
                    _ => emit(tile::<1, 4>(&ctx, r, i0), &mut put),
                }
            }
            r += rt;
        }
    }
}

struct Ctx {
    w: *const u8,
    rb: usize,
    x: *const i8,
    cols: usize,
}

fn emit<const R: usize, const N: usize>(
    res: [[i32; N]; R],
    put: &mut impl FnMut(usize, usize, i32),
) {
    for (dr, row) in res.iter().enumerate() {
        for (di, &v) in row.iter().enumerate() {
            put(dr, di, v);
        }
    }
}

#[target_feature(enable = "avx2")]
unsafe fn hsum(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
    _mm_cvtsi128_si32(s)
}

/// `Σ code·x` for weight rows `r .. r+R` (relative to `ctx.w`) and activation rows `i0 .. i0+N`.
#[target_feature(enable = "avx2")]
unsafe fn tile<const R: usize, const N: usize>(ctx: &Ctx, r: usize, i0: usize) -> [[i32; N]; R] {
    // SAFETY: the caller upholds this function's contract (the CPU features it is compiled for were
    // detected; pointers and lengths are in bounds, see its docs).
    unsafe {
        let m03 = _mm256_set1_epi8(0x03);
        let m0c = _mm256_set1_epi8(0x0c);
        let ones = _mm256_set1_epi16(1);
        let w = ctx.w.add(r * ctx.rb);
        let x = ctx.x.add(i0 * ctx.cols);
        let mut acc = [[_mm256_setzero_si256(); N]; R];
        for b in 0..ctx.cols / QK_K {
            for (dr, acc_r) in acc.iter_mut().enumerate() {
                // Planes 0, 2 into `a`, the 4×-scaled planes 1, 3 into `bb`, over both halves.
                let mut a = [_mm256_setzero_si256(); N];
                let mut bb = [_mm256_setzero_si256(); N];
                for h in 0..2 {
                    let wv = _mm256_loadu_si256(w.add(dr * ctx.rb + 64 * b + 32 * h) as *const _);
                    let w4 = _mm256_srli_epi16::<4>(wv);
                    let c0 = _mm256_and_si256(wv, m03);
                    let c1 = _mm256_and_si256(wv, m0c);
                    let c2 = _mm256_and_si256(w4, m03);
                    let c3 = _mm256_and_si256(w4, m0c);
                    for di in 0..N {
                        let xp = x.add(di * ctx.cols + QK_K * b + 128 * h);
                        let x0 = _mm256_loadu_si256(xp as *const _);
                        let x1 = _mm256_loadu_si256(xp.add(32) as *const _);
                        let x2 = _mm256_loadu_si256(xp.add(64) as *const _);
                        let x3 = _mm256_loadu_si256(xp.add(96) as *const _);
                        let p0 = _mm256_maddubs_epi16(c0, x0);
                        let p1 = _mm256_maddubs_epi16(c1, x1);
                        let p2 = _mm256_maddubs_epi16(c2, x2);
                        let p3 = _mm256_maddubs_epi16(c3, x3);
                        a[di] = _mm256_add_epi16(a[di], _mm256_add_epi16(p0, p2));
                        bb[di] = _mm256_add_epi16(bb[di], _mm256_add_epi16(p1, p3));
                    }
                }
                for di in 0..N {
                    let s = _mm256_add_epi16(_mm256_slli_epi16::<2>(a[di]), bb[di]);
                    acc_r[di] = _mm256_add_epi32(acc_r[di], _mm256_madd_epi16(s, ones));
                }
            }
        }
        let mut res = [[0i32; N]; R];
        for (res_r, acc_r) in res.iter_mut().zip(&acc) {
            for (v, &a) in res_r.iter_mut().zip(acc_r) {
                *v = hsum(a) >> 2;
            }
        }
        res
    }
}

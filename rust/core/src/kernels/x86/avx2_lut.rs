//! AVX2 lookup-table ternary × int8 kernel (`gemv_tq2_0_i8_avx2_lut`), T-MAC / bitnet.cpp TL style.
//!
//! Instead of multiplying, tabulate: for every pair of activations `(xa, xb)` and every pair
//! of codes `(ca, cb)`, the partial sum `(ca−1)·xa + (cb−1)·xb` is precomputed once per call
//! (16 entries, codes 0..3, so any byte is exact), and each weight nibble is looked up with
//! `vpshufb`. A TQ2_0 byte's low nibble holds the codes of elements `e` and `e+32`, its high
//! nibble `e+64` and `e+96` (`e = 128h + p` for byte `p` of half `h`): the nibbles index the
//! tables directly, no re-encoding.
//!
//! `vpshufb` looks up 32 indices in one 16-entry table per 128-bit lane, so one instruction must
//! serve 16 weight *rows* at the same byte position (not one row's 32 positions). Each 16-row
//! tile × 32-byte half-block is therefore transposed in registers first (4 rounds of in-lane
//! unpacks, 64 shuffles per 512 weight bytes): afterwards vector `v` holds byte `v` of the 16
//! rows in its low lane and byte `16 + v` in its high lane, and the two lanes use the two tables
//! stored side by side. The transposed indices are reused for every activation row (batching).
//!
//! Entries reach ±512, beyond a byte, so each table is stored as two byte planes (low byte,
//! high byte) looked up with the same index; `vpunpck{l,h}bw(lo, hi)` reassembles the i16
//! values, rows 0..8 and 8..16. Overflow: a half-block adds 32 lookups per lane, at most
//! `32·512 = 16 384` in i16; the two lanes are widened to i32 and summed once per half-block.
//!
//! Table memory: 16 bytes per activation element (`n × cols × 16`), built in [`prepare`].

use super::super::{PreparedActs, TernaryView};
use crate::ternary::QK_K;
use std::arch::x86_64::*;

/// Weight rows per tile (one `vpshufb` lane's worth).
const TILE: usize = 16;
/// Table bytes per half-block (128 elements) of one activation row: 16 byte positions ×
/// 2 nibbles × 2 byte planes × 32 bytes (two 16-entry tables, one per lane).
const HALF_TABLE: usize = 16 * 2 * 2 * 32;

/// Row sums (unused by this kernel, whose tables hold trit sums directly, but kept for
/// uniformity) and the pair-sum tables in `extra`.
///
/// Layout per activation row `i`, block `b`, half `h`, at `((i·nb + b)·2 + h) · HALF_TABLE`:
/// for `v` in 0..16, nibble `q` in 0..2 (low, high), plane in 0..2 (low byte, high byte),
/// 32 bytes at `((v·2 + q)·2 + plane)·32`: entries for byte position `p = v`, then `p = 16 + v`.
pub fn prepare(acts: &mut PreparedActs) {
    super::row_sums(acts);
    let mut t = vec![0i8; acts.x.len() * 16];
    // SAFETY: this kernel is only handed out by `super::fns` after AVX2 was detected.
    unsafe { build_tables(acts.x, &mut t) };
    acts.extra = t;
}

/// Fill the tables for activations `x` (a whole number of 128-element halves): for each pair
/// `(xa, xb)`, the 16 entries `(ca−1)·xa + (cb−1)·xb` are `xa·A + xb·B` with constant vectors
/// `A = [ca−1]`, `B = [cb−1]` over the 16 indices, then split into the two byte planes.
#[target_feature(enable = "avx2")]
unsafe fn build_tables(x: &[i8], t: &mut [i8]) {
    // SAFETY: the caller upholds this function's contract (the CPU features it is compiled for were
    // detected; pointers and lengths are in bounds, see its docs).
    unsafe {
        assert_eq!(t.len(), x.len() * 16);
        // Lane order of `_mm256_set_epi16` is reversed: entry `idx` is argument `15 − idx`.
        let ta = _mm256_set_epi16(2, 1, 0, -1, 2, 1, 0, -1, 2, 1, 0, -1, 2, 1, 0, -1);
        let tb = _mm256_set_epi16(2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0, -1, -1, -1, -1);
        // Per 128-bit lane: low bytes of the 8 words, then their high bytes.
        let split = _mm256_setr_epi8(
            0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15, //
            0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
        );
        for (xh, th) in x.chunks_exact(QK_K / 2).zip(t.chunks_exact_mut(HALF_TABLE)) {
            for p in 0..32 {
                let (v, lane) = (p % 16, p / 16);
                for q in 0..2 {
                    let xa = _mm256_set1_epi16(xh[64 * q + p] as i16);
                    let xb = _mm256_set1_epi16(xh[64 * q + p + 32] as i16);
                    let val =
                        _mm256_add_epi16(_mm256_mullo_epi16(ta, xa), _mm256_mullo_epi16(tb, xb));
                    // [lo 0..8, hi 0..8 | lo 8..16, hi 8..16] -> [lo 0..16 | hi 0..16]
                    let bytes =
                        _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_shuffle_epi8(val, split));
                    let base = (v * 2 + q) * 2 * 32 + lane * 16;
                    let dst = th.as_mut_ptr().add(base);
                    _mm_storeu_si128(dst as *mut _, _mm256_castsi256_si128(bytes));
                    _mm_storeu_si128(dst.add(32) as *mut _, _mm256_extracti128_si256::<1>(bytes));
                }
            }
        }
    }
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
        let rb = w.cols / 4;
        assert!(w.qs.len() == w.rows * (w.cols / 4) && w.cols.is_multiple_of(QK_K));
        assert!(r0 + nrows <= w.rows && acts.extra.len() == n * w.cols * 16 && acts.cols == w.cols);
        let mut acc = vec![_mm256_setzero_si256(); 2 * n];
        let mut res = vec![0i32; TILE * n];
        let mut pad = Vec::new();
        let mut r = 0;
        while r < nrows {
            let full = nrows - r >= TILE;
            let base = if full {
                w.qs.as_ptr().add((r0 + r) * rb)
            } else {
                // Tail: copy the remaining rows into a zero-padded 16-row tile.
                pad.resize(TILE * rb, 0u8);
                pad.fill(0);
                let src = &w.qs[(r0 + r) * rb..(r0 + nrows) * rb];
                pad[..src.len()].copy_from_slice(src);
                pad.as_ptr()
            };
            acc.fill(_mm256_setzero_si256());
            tile16(base, rb, w.cols, acts.extra.as_ptr(), &mut acc);
            for (i, a) in acc.chunks_exact(2).enumerate() {
                _mm256_storeu_si256(res.as_mut_ptr().add(i * TILE) as *mut _, a[0]);
                _mm256_storeu_si256(res.as_mut_ptr().add(i * TILE + 8) as *mut _, a[1]);
            }
            for dr in 0..TILE.min(nrows - r) {
                for i in 0..n {
                    out[(r + dr) * n + i] = res[i * TILE + dr];
                }
            }
            r += TILE;
        }
    }
}

/// In-lane 16 × 16 byte transpose of both 128-bit lanes: output `v` holds byte `v` of inputs
/// 0..16 (low lane) and byte `16 + v` (high lane), inputs in order.
#[target_feature(enable = "avx2")]
unsafe fn transpose16(r: &[__m256i; 16]) -> [__m256i; 16] {
    let z = _mm256_setzero_si256();
    // p[j][c]: rows 2j, 2j+1 interleaved, columns 8c..8c+8.
    let mut p = [[z; 2]; 8];
    for j in 0..8 {
        p[j][0] = _mm256_unpacklo_epi8(r[2 * j], r[2 * j + 1]);
        p[j][1] = _mm256_unpackhi_epi8(r[2 * j], r[2 * j + 1]);
    }
    // q[m][d]: rows 4m..4m+4, columns 4d..4d+4.
    let mut q = [[z; 4]; 4];
    for m in 0..4 {
        for c in 0..2 {
            q[m][2 * c] = _mm256_unpacklo_epi16(p[2 * m][c], p[2 * m + 1][c]);
            q[m][2 * c + 1] = _mm256_unpackhi_epi16(p[2 * m][c], p[2 * m + 1][c]);
        }
    }
    // s[t][f]: rows 8t..8t+8, columns 2f, 2f+1.
    let mut s = [[z; 8]; 2];
    for t in 0..2 {
        for d in 0..4 {
            s[t][2 * d] = _mm256_unpacklo_epi32(q[2 * t][d], q[2 * t + 1][d]);
            s[t][2 * d + 1] = _mm256_unpackhi_epi32(q[2 * t][d], q[2 * t + 1][d]);
        }
    }
    let mut o = [z; 16];
    for f in 0..8 {
        o[2 * f] = _mm256_unpacklo_epi64(s[0][f], s[1][f]);
        o[2 * f + 1] = _mm256_unpackhi_epi64(s[0][f], s[1][f]);
    }
    o
}

/// Accumulate the 16 rows at `w` (stride `rb`) against every activation row's tables:
/// `acc[2i]` gets rows 0..8, `acc[2i+1]` rows 8..16 (i32).
#[target_feature(enable = "avx2")]
unsafe fn tile16(w: *const u8, rb: usize, cols: usize, tabs: *const i8, acc: &mut [__m256i]) {
    // SAFETY: the caller upholds this function's contract (the CPU features it is compiled for were
    // detected; pointers and lengths are in bounds, see its docs).
    unsafe {
        let m0f = _mm256_set1_epi8(0x0f);
        let nh = cols / (QK_K / 2);
        for hb in 0..nh {
            let mut l = [_mm256_setzero_si256(); TILE];
            for (j, lj) in l.iter_mut().enumerate() {
                *lj = _mm256_loadu_si256(w.add(j * rb + 32 * hb) as *const _);
            }
            let o = transpose16(&l);
            let mut idx = [_mm256_setzero_si256(); 2 * TILE];
            for v in 0..TILE {
                idx[2 * v] = _mm256_and_si256(o[v], m0f);
                idx[2 * v + 1] = _mm256_and_si256(_mm256_srli_epi16::<4>(o[v]), m0f);
            }
            for (i, acc_i) in acc.chunks_exact_mut(2).enumerate() {
                let t = tabs.add((i * nh + hb) * HALF_TABLE);
                let mut sa = _mm256_setzero_si256();
                let mut sb = _mm256_setzero_si256();
                for (j, &ix) in idx.iter().enumerate() {
                    let tlo = _mm256_loadu_si256(t.add(64 * j) as *const _);
                    let thi = _mm256_loadu_si256(t.add(64 * j + 32) as *const _);
                    let lo = _mm256_shuffle_epi8(tlo, ix);
                    let hi = _mm256_shuffle_epi8(thi, ix);
                    sa = _mm256_add_epi16(sa, _mm256_unpacklo_epi8(lo, hi));
                    sb = _mm256_add_epi16(sb, _mm256_unpackhi_epi8(lo, hi));
                }
                // Low lane: byte positions 0..16, high lane: 16..32, same rows: widen and add both.
                let wa = _mm256_add_epi32(
                    _mm256_cvtepi16_epi32(_mm256_castsi256_si128(sa)),
                    _mm256_cvtepi16_epi32(_mm256_extracti128_si256::<1>(sa)),
                );
                let wb = _mm256_add_epi32(
                    _mm256_cvtepi16_epi32(_mm256_castsi256_si128(sb)),
                    _mm256_cvtepi16_epi32(_mm256_extracti128_si256::<1>(sb)),
                );
                acc_i[0] = _mm256_add_epi32(acc_i[0], wa);
                acc_i[1] = _mm256_add_epi32(acc_i[1], wb);
            }
        }
    }
}

//! Scalar reference kernel: decode each code, multiply, add. Slow and obviously right — the
//! oracle that every SIMD kernel is tested equal to.

use super::{PreparedActs, TernaryView};
use crate::ternary::tq2_0::element_position;
use crate::ternary::QK_K;

pub fn prepare(acts: &mut PreparedActs) {
    acts.sums = acts
        .x
        .chunks_exact(acts.cols)
        .map(|r| r.iter().map(|&v| v as i32).sum())
        .collect();
}

/// # Safety
/// Always safe; `unsafe` only to share [`super::RowsFn`]'s signature.
pub unsafe fn rows(w: &TernaryView, r0: usize, acts: &PreparedActs, out: &mut [i32]) {
    let n = acts.n;
    for (dr, out_r) in out.chunks_exact_mut(n).enumerate() {
        let row = w.row(r0 + dr);
        for (i, o) in out_r.iter_mut().enumerate() {
            let x = &acts.x[i * w.cols..(i + 1) * w.cols];
            let mut acc = 0i32;
            for (b, qs) in row.chunks_exact(QK_K / 4).enumerate() {
                for e in 0..QK_K {
                    let (byte, shift) = element_position(e);
                    let trit = ((qs[byte] >> shift) & 3) as i32 - 1;
                    acc += trit * x[b * QK_K + e] as i32;
                }
            }
            *o = acc;
        }
    }
}

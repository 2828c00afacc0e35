//! x86-64 SIMD ternary kernels, each behind runtime CPU-feature detection.
//!
//! | kernel        | inner loop                                                       | rows × acts tile  |
//! |---------------|------------------------------------------------------------------|-------------------|
//! | `avx512_vnni` | per row × 256: load, 3 `vgf2p8affineqb` + `vpandq`, 4 `vpdpbusd` | 16×1, 8×2, 4×4    |
//! | `avx2`        | per row × 256: 2 loads, 2 `vpsrlw`, 8 `vpand`, 8 `vpmaddubsw`   | 4×1, 2×2, 1×4     |
//! | `avx2_lut`    | per 16 rows × 128: transpose, 32 × (2 `vpshufb`, 2 `vpunpck`)    | 16 × every act    |
//! | `amx`         | per 32 rows: unpack to int8 trits; per 64 cols 4 `tileloadd`, 4 `tdpbssd` | 32×32 (n ≥ 16; else `avx512_vnni`) |
//!
//! All four are exact for *any* packed byte (code 3 included, which the scalar oracle decodes
//! as trit 2), so the tests can feed random bytes and demand equality.
//!
//! [`fns`] is the only way to get at the kernels: it returns them only after
//! `is_x86_feature_detected!` confirmed every feature their `#[target_feature]` enables.

pub mod amx;
mod avx2;
mod avx2_lut;
mod avx512_vnni;

use super::{Kernel, PrepareFn, PreparedActs, RowsFn};

/// The (prepare, rows) pair of a SIMD kernel if this CPU supports it.
pub fn fns(kernel: Kernel) -> Option<(PrepareFn, RowsFn)> {
    match kernel {
        Kernel::Scalar => None,
        Kernel::Avx2 if is_x86_feature_detected!("avx2") => {
            Some((avx2::prepare, avx2::rows as RowsFn))
        }
        Kernel::Avx2Lut if is_x86_feature_detected!("avx2") => {
            Some((avx2_lut::prepare, avx2_lut::rows as RowsFn))
        }
        Kernel::Avx512Vnni
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vnni") =>
        {
            // GFNI decodes a bit plane in one instruction instead of two (shift, mask).
            let rows = if is_x86_feature_detected!("gfni") {
                avx512_vnni::rows_gfni as RowsFn
            } else {
                avx512_vnni::rows_shift as RowsFn
            };
            Some((avx512_vnni::prepare, rows))
        }
        // `amx::available` checks AVX-512 F/BW/VNNI and GFNI too (its n < 16 path).
        Kernel::Amx if amx::available() => Some((amx::prepare, amx::rows as RowsFn)),
        _ => None,
    }
}

/// `Σ_c x[i][c]` per activation row (the `− Σx` of `Σ (code − 1)·x`).
fn row_sums(acts: &mut PreparedActs) {
    acts.sums = acts
        .x
        .chunks_exact(acts.cols)
        .map(|r| r.iter().map(|&v| v as i32).sum())
        .collect();
}

/// Split `n` activation rows into tiles of at most `max` rows: `(first row, rows)`.
fn act_tiles(n: usize, max: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..n.div_ceil(max)).map(move |t| (t * max, max.min(n - t * max)))
}

#[cfg(test)]
mod tests {
    use super::super::{scalar, PreparedActs, TernaryView};

    fn run(prepare: PrepareFn, rows_fn: RowsFn, w: &TernaryView, x: &[i8], n: usize) -> Vec<i32> {
        let mut acts = PreparedActs {
            x,
            n,
            cols: w.cols,
            sums: Vec::new(),
            extra: Vec::new(),
        };
        prepare(&mut acts);
        let mut out = vec![i32::MIN; w.rows * n];
        // SAFETY: callers check the CPU features of `rows_fn`.
        unsafe { rows_fn(w, 0, &acts, &mut out) };
        out
    }

    use super::{PrepareFn, RowsFn};

    /// `fns` hands out the GFNI variant of `avx512_vnni` wherever GFNI exists, so the shift
    /// variant (for Cascade Lake) is checked here directly against the scalar oracle.
    #[test]
    fn avx512_vnni_without_gfni_equals_scalar() {
        if !(is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni"))
        {
            eprintln!("note: no AVX-512 VNNI on this CPU; shift variant not tested");
            return;
        }
        let mut s = 7u64;
        let mut next = move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 33) as u8
        };
        for (rows, cols, n) in [
            (1, 256, 1),
            (37, 768, 1),
            (50, 512, 2),
            (21, 1024, 3),
            (19, 256, 9),
            (40, 2048, 5),
        ] {
            let qs: Vec<u8> = (0..rows * cols / 4).map(|_| next()).collect();
            let x: Vec<i8> = (0..n * cols)
                .map(|j| if j % 7 == 0 { -128 } else { next() as i8 })
                .collect();
            let w = TernaryView::new(&qs, rows, cols, 1.0).unwrap();
            let want = run(scalar::prepare, scalar::rows, &w, &x, n);
            let got = run(
                super::avx512_vnni::prepare,
                super::avx512_vnni::rows_shift,
                &w,
                &x,
                n,
            );
            assert_eq!(got, want, "{rows}×{cols}, n={n}");
        }
    }
}

//! Ternary quantization (BitNet b1.58) and the GGUF ternary block formats.
//!
//! Rounding: the training-side quantizers ([`quantize_absmean`], [`quantize_acts_i8`]) round
//! half to even, exactly like `torch.round`, so the Rust eval path and the torch fake-quant path
//! produce the same integers. The GGUF quantizers in [`tq2_0`] and [`tq1_0`] round half away
//! from zero, exactly like `gguf-py`'s `np_roundf`, so the bytes we write are the bytes it writes.

pub mod tq1_0;
pub mod tq2_0;

use crate::{shape_err, Result};

/// Number of weights in one TQ1_0 / TQ2_0 block (ggml's `QK_K`).
pub const QK_K: usize = 256;

/// Smallest weight scale: `mean|W|` is clamped to this so an all-zero matrix still divides.
pub const MIN_WEIGHT_SCALE: f32 = 1e-5;
/// Smallest activation absmax, for the same reason.
pub const MIN_ACT_ABSMAX: f32 = 1e-5;

/// A ternary tensor: trits in {-1, 0, 1} and one per-tensor scale; value = trit * scale.
#[derive(Debug, Clone, PartialEq)]
pub struct Ternary {
    pub trits: Vec<i8>,
    pub scale: f32,
}

/// BitNet b1.58 absmean quantization: `s = max(mean|w|, 1e-5)`, `t = clamp(round(w / s), -1, 1)`.
///
/// The mean is accumulated in f64 so the scale does not depend on summation order; values are
/// divided (not multiplied by a reciprocal) to match the torch reference `w / s`.
pub fn quantize_absmean(w: &[f32]) -> Result<Ternary> {
    if w.is_empty() {
        return Err(shape_err!("cannot quantize an empty tensor"));
    }
    if w.iter().any(|v| !v.is_finite()) {
        return Err(crate::Error::Value(
            "weights contain NaN or infinity".into(),
        ));
    }
    let mean = (w.iter().map(|v| v.abs() as f64).sum::<f64>() / w.len() as f64) as f32;
    let scale = mean.max(MIN_WEIGHT_SCALE);
    let trits = w
        .iter()
        .map(|&v| (v / scale).round_ties_even().clamp(-1.0, 1.0) as i8)
        .collect();
    Ok(Ternary { trits, scale })
}

/// Int8 activations of `n` rows of `k` values, one scale per row.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedActs {
    /// Row-major `n × k` int8 values in [-128, 127] (in practice [-127, 127]).
    pub values: Vec<i8>,
    /// Per-row dequantization scale `absmax / 127`: `x ≈ q * scale`.
    pub scales: Vec<f32>,
    pub n: usize,
    pub k: usize,
}

/// Per-token absmax int8 quantization: `q = clamp(round(x * (127 / max|x|)), -128, 127)`.
///
/// The multiplier `127 / max(absmax, 1e-5)` is computed once per row in f32, the same
/// expression the torch fake-quant uses, so both produce identical integers.
pub fn quantize_acts_i8(x: &[f32], k: usize) -> Result<QuantizedActs> {
    if k == 0 || !x.len().is_multiple_of(k) {
        return Err(shape_err!(
            "activation length {} is not a multiple of the row length {}",
            x.len(),
            k
        ));
    }
    let n = x.len() / k;
    let mut values = vec![0i8; x.len()];
    let mut scales = vec![0f32; n];
    for (r, (row, out)) in x
        .chunks_exact(k)
        .zip(values.chunks_exact_mut(k))
        .enumerate()
    {
        let (inv, scale) = act_row_scale(row);
        for (o, &v) in out.iter_mut().zip(row) {
            *o = (v * inv).round_ties_even().clamp(-128.0, 127.0) as i8;
        }
        scales[r] = scale;
    }
    Ok(QuantizedActs {
        values,
        scales,
        n,
        k,
    })
}

/// `(127 / absmax, absmax / 127)` for one activation row (absmax clamped to 1e-5).
///
/// A row holding NaN or ±inf gets `(NaN, NaN)`: its values then quantize to 0 and every output
/// of the row is NaN, as on the torch path (where `amax` is NaN or inf and `inf · 0 = NaN`).
/// (`f32::max` skips NaN, so without the flag a NaN would silently give finite outputs.)
#[inline]
pub fn act_row_scale(row: &[f32]) -> (f32, f32) {
    let (amax, nan) = row.iter().fold((0f32, false), |(m, nan), v| {
        (m.max(v.abs()), nan | v.is_nan())
    });
    if nan || amax.is_infinite() {
        return (f32::NAN, f32::NAN);
    }
    let amax = amax.max(MIN_ACT_ABSMAX);
    (127.0 / amax, amax / 127.0)
}

/// Round half away from zero, as `gguf-py`'s `np_roundf`.
#[inline]
pub(crate) fn roundf_away(x: f32) -> f32 {
    x.round()
}

/// Check that a row length fits whole 256-weight blocks.
pub fn check_block_multiple(cols: usize, what: &str) -> Result<()> {
    if cols == 0 || !cols.is_multiple_of(QK_K) {
        return Err(shape_err!(
            "{what}: row length {cols} is not a positive multiple of {QK_K} (the TQ1_0/TQ2_0 block size); \
             pad the rows to a multiple of {QK_K} before packing"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absmean_scale_and_trits() {
        let w = [0.5f32, -1.5, 0.0, 2.0];
        let t = quantize_absmean(&w).unwrap();
        assert!((t.scale - 1.0).abs() < 1e-7);
        assert_eq!(t.trits, vec![0, -1, 0, 1]); // 0.5 rounds to even (0)
    }

    #[test]
    fn absmean_zero_matrix_uses_min_scale() {
        let t = quantize_absmean(&[0.0; 8]).unwrap();
        assert_eq!(t.scale, MIN_WEIGHT_SCALE);
        assert!(t.trits.iter().all(|&v| v == 0));
    }

    #[test]
    fn absmean_rejects_nan_and_empty() {
        assert!(quantize_absmean(&[]).is_err());
        assert!(quantize_absmean(&[1.0, f32::NAN]).is_err());
    }

    #[test]
    fn acts_roundtrip_within_half_step() {
        let x: Vec<f32> = (0..64).map(|i| (i as f32 - 31.5) * 0.37).collect();
        let q = quantize_acts_i8(&x, 32).unwrap();
        assert_eq!(q.n, 2);
        for r in 0..2 {
            let s = q.scales[r];
            let row = &x[r * 32..(r + 1) * 32];
            let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(q.values[r * 32..(r + 1) * 32]
                .iter()
                .any(|&v| v.abs() == 127));
            for (i, &v) in row.iter().enumerate() {
                let back = q.values[r * 32 + i] as f32 * s;
                assert!((back - v).abs() <= 0.5 * amax / 127.0 + 1e-5);
            }
        }
        assert!(quantize_acts_i8(&x, 30).is_err());
    }

    #[test]
    fn non_finite_rows_give_nan_scales_and_other_rows_are_untouched() {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut x: Vec<f32> = (0..64).map(|i| i as f32 / 7.0 - 4.0).collect();
            x[40] = bad;
            let q = quantize_acts_i8(&x, 32).unwrap();
            assert!(q.scales[1].is_nan(), "{bad}: {:?}", q.scales);
            assert!(q.values[32..].iter().all(|&v| v == 0));
            let good = quantize_acts_i8(&x[..32], 32).unwrap();
            assert_eq!(q.scales[0], good.scales[0]);
            assert_eq!(q.values[..32], good.values[..]);
        }
    }
}

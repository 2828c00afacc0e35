//! Training diagnostics of the residual mixing matrices `H_res` of all layers.
//!
//! mHC's point is that `H_res` stays doubly stochastic, so the product of all of them — the map
//! the residual stream undergoes from the first layer to the last — keeps a gain of 1 instead of
//! exploding or vanishing. We log how far each matrix is from that (row- and column-sum errors)
//! and the gain of the product itself: its largest absolute row sum (the ∞-norm, the worst-case
//! amplification of the forward signal) and largest absolute column sum (the 1-norm, the same
//! for gradients flowing back).

use crate::{shape_err, Result};

/// Diagnostics of `L` matrices `H_0 … H_{L−1}` (`n × n` each).
#[derive(Debug, Clone, PartialEq)]
pub struct HresDiagnostics {
    pub n: usize,
    /// Per matrix: `max_i |Σ_j H[i, j] − 1|`.
    pub row_sum_err: Vec<f64>,
    /// Per matrix: `max_j |Σ_i H[i, j] − 1|`.
    pub col_sum_err: Vec<f64>,
    /// `H_{L−1} ⋯ H_1 H_0` (row-major `n × n`): with `x_{l+1} = H_l x_l`, `x_L = composite · x_0`.
    /// The identity when `L = 0`.
    pub composite: Vec<f64>,
    /// `max_i Σ_j |composite[i, j]|`.
    pub composite_gain: f64,
    /// `max_j Σ_i |composite[i, j]|`.
    pub composite_col_gain: f64,
}

impl HresDiagnostics {
    pub fn max_row_sum_err(&self) -> f64 {
        self.row_sum_err.iter().copied().fold(0.0, f64::max)
    }

    pub fn max_col_sum_err(&self) -> f64 {
        self.col_sum_err.iter().copied().fold(0.0, f64::max)
    }
}

/// Diagnostics of `mats.len() / n²` matrices stored back to back (row-major). Non-finite entries
/// propagate into the numbers (NaN in, NaN out) instead of failing: a diverging run should still
/// be able to log what it sees.
pub fn hres_diagnostics(mats: &[f64], n: usize) -> Result<HresDiagnostics> {
    if n == 0 {
        return Err(shape_err!(
            "H_res diagnostics: matrices must be at least 1 × 1"
        ));
    }
    let nn = n * n;
    if !mats.len().is_multiple_of(nn) {
        return Err(shape_err!(
            "H_res diagnostics: {} values are not a whole number of {n} × {n} matrices",
            mats.len()
        ));
    }
    // f64::max ignores NaN; keep it visible instead.
    let nan_max = |a: f64, b: f64| {
        if a.is_nan() || b.is_nan() {
            f64::NAN
        } else {
            a.max(b)
        }
    };
    let mut row_sum_err = Vec::new();
    let mut col_sum_err = Vec::new();
    let mut composite: Vec<f64> = (0..nn)
        .map(|k| if k / n == k % n { 1.0 } else { 0.0 })
        .collect();
    let mut next = vec![0.0; nn];
    for h in mats.chunks_exact(nn) {
        row_sum_err.push(
            h.chunks_exact(n)
                .map(|r| (r.iter().sum::<f64>() - 1.0).abs())
                .fold(0.0, nan_max),
        );
        col_sum_err.push(
            (0..n)
                .map(|j| ((0..n).map(|i| h[i * n + j]).sum::<f64>() - 1.0).abs())
                .fold(0.0, nan_max),
        );
        // next = H · composite
        for i in 0..n {
            for j in 0..n {
                next[i * n + j] = (0..n).map(|k| h[i * n + k] * composite[k * n + j]).sum();
            }
        }
        std::mem::swap(&mut composite, &mut next);
    }
    let composite_gain = composite
        .chunks_exact(n)
        .map(|r| r.iter().map(|v| v.abs()).sum::<f64>())
        .fold(0.0, nan_max);
    let composite_col_gain = (0..n)
        .map(|j| (0..n).map(|i| composite[i * n + j].abs()).sum::<f64>())
        .fold(0.0, nan_max);
    Ok(HresDiagnostics {
        n,
        row_sum_err,
        col_sum_err,
        composite,
        composite_gain,
        composite_col_gain,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubly_stochastic_stack_has_unit_gain() {
        let n = 3;
        let a = [0.5, 0.5, 0.0, 0.25, 0.25, 0.5, 0.25, 0.25, 0.5];
        let p = [0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0];
        let mats: Vec<f64> = a.iter().chain(&p).chain(&a).copied().collect();
        let d = hres_diagnostics(&mats, n).unwrap();
        assert_eq!(d.row_sum_err, vec![0.0; 3]);
        assert_eq!(d.col_sum_err, vec![0.0; 3]);
        assert!((d.composite_gain - 1.0).abs() < 1e-15);
        assert!((d.composite_col_gain - 1.0).abs() < 1e-15);
    }

    #[test]
    fn order_errors_and_gain_by_hand() {
        let n = 2;
        // H0 = [[2, 0], [0, 1]], H1 = [[1, 1], [0, 1]]: H1·H0 = [[2, 1], [0, 1]], H0·H1 = [[2, 2], [0, 1]].
        let mats = [2.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0];
        let d = hres_diagnostics(&mats, n).unwrap();
        assert_eq!(d.composite, vec![2.0, 1.0, 0.0, 1.0]);
        assert_eq!(d.composite_gain, 3.0);
        assert_eq!(d.composite_col_gain, 2.0);
        assert_eq!(d.row_sum_err, vec![1.0, 1.0]);
        assert_eq!(d.col_sum_err, vec![1.0, 1.0]);
        assert_eq!(d.max_row_sum_err(), 1.0);
    }

    #[test]
    fn empty_nan_and_shape() {
        let d = hres_diagnostics(&[], 3).unwrap();
        assert_eq!(d.composite_gain, 1.0);
        assert!(d.row_sum_err.is_empty());
        let d = hres_diagnostics(&[f64::NAN, 0.0, 0.0, 1.0], 2).unwrap();
        assert!(d.row_sum_err[0].is_nan() && d.composite_gain.is_nan());
        assert!(hres_diagnostics(&[1.0; 5], 2).is_err());
        assert!(hres_diagnostics(&[], 0).is_err());
    }
}

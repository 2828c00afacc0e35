//! Birkhoff–von Neumann decomposition: a doubly stochastic matrix as a convex combination of at
//! most `(n−1)²+1` permutation matrices (Birkhoff's algorithm).
//!
//! Used for diagnostics and to turn an `mhc` model (Sinkhorn `H_res`) into `mhc_lite` form
//! (weights over the permutation basis). Notable choices:
//!
//! * **Checked input.** Entries must be finite and `≥ −tol`, every row and column sum within
//!   `tol` of 1; otherwise [`Error::NotDoublyStochastic`] names the worst row/column (or the
//!   entry), its value and the tolerance. Entries in `[−tol, 0)` count as 0.
//! * **Exact balancing first.** A matrix that is doubly stochastic only within `tol` is first
//!   rescaled (Sinkhorn, which keeps the support) until its sums are 1 to rounding, so that
//!   Birkhoff's term bound holds. The decomposition therefore reconstructs the input to about
//!   `tol`, and exactly doubly stochastic input to rounding; [`Bvn::max_error`] reports it.
//! * **Bottleneck matchings.** Each step picks, among the perfect matchings inside the residual's
//!   support, one maximising its smallest entry (binary search over the entry values with Kuhn's
//!   augmenting paths), and subtracts that smallest entry times the permutation. The subtracted
//!   entry becomes exactly 0, so each step leaves the residual on a proper face of the (scaled)
//!   Birkhoff polytope, whose dimension `(n−1)²` thus bounds the number of steps; large first
//!   weights come out of the bottleneck choice. Terms are returned by decreasing weight.

use super::perm::permutation_rank;
use crate::{shape_err, Error, Result};

/// Residual entries at or below this are treated as exhausted (rounding noise of a subtraction).
const DROP: f64 = 64.0 * f64::EPSILON;

/// Most balancing sweeps spent on nearly doubly stochastic input.
const MAX_BALANCE_SWEEPS: usize = 1000;

/// A Birkhoff–von Neumann decomposition `M ≈ Σ_k weights[k] · P(perms[k])`.
#[derive(Debug, Clone, PartialEq)]
pub struct Bvn {
    pub n: usize,
    /// Positive weights summing to 1 (to rounding), largest first.
    pub weights: Vec<f64>,
    /// `weights.len() × n` permutation index vectors, flat: `perms[k·n + i] = j` ⇔ `P_k[i, j] = 1`.
    pub perms: Vec<usize>,
    /// `max_ij |M_ij − Σ_k w_k P_k[i, j]|` against the input as given.
    pub max_error: f64,
}

impl Bvn {
    /// Permutation `k` as an index vector.
    pub fn perm(&self, k: usize) -> &[usize] {
        &self.perms[k * self.n..(k + 1) * self.n]
    }

    /// The reconstruction `Σ_k w_k P_k`, row-major `n × n`.
    pub fn reconstruct(&self) -> Vec<f64> {
        let n = self.n;
        let mut out = vec![0.0; n * n];
        for (k, &w) in self.weights.iter().enumerate() {
            for (i, &j) in self.perm(k).iter().enumerate() {
                out[i * n + j] += w;
            }
        }
        out
    }

    /// The weights spread over the lexicographic permutation basis ([`super::permutations`]):
    /// a dense vector of `n!` entries (`n ≤ 8`).
    pub fn basis_weights(&self) -> Result<Vec<f64>> {
        let basis_len = super::perm::permutations(self.n)?.len() / self.n;
        let mut out = vec![0.0; basis_len];
        for (k, &w) in self.weights.iter().enumerate() {
            out[permutation_rank(self.perm(k))?] += w;
        }
        Ok(out)
    }
}

/// Birkhoff's bound on the number of terms: `(n−1)² + 1`.
pub fn max_terms(n: usize) -> usize {
    (n.saturating_sub(1)).pow(2) + 1
}

fn check_args(m: &[f64], n: usize, tol: f64) -> Result<()> {
    if n == 0 {
        return Err(shape_err!("BvN: the matrix must be at least 1 × 1"));
    }
    if n.checked_mul(n) != Some(m.len()) {
        return Err(shape_err!(
            "BvN: {} values do not make a {n} × {n} matrix",
            m.len()
        ));
    }
    if !(tol.is_finite() && (0.0..1.0).contains(&tol)) {
        return Err(Error::Value(format!(
            "BvN: tolerance {tol} must be finite and in [0, 1)"
        )));
    }
    Ok(())
}

/// Check that `m` (`n × n`, row-major) is doubly stochastic within `tol`: finite, entries
/// `≥ −tol`, row and column sums within `tol` of 1. The error names the worst offender.
pub fn check_doubly_stochastic(m: &[f64], n: usize, tol: f64) -> Result<()> {
    check_args(m, n, tol)?;
    if let Some(k) = m.iter().position(|v| !v.is_finite()) {
        return Err(Error::NotDoublyStochastic(format!(
            "entry ({}, {}) is {}",
            k / n,
            k % n,
            m[k]
        )));
    }
    let (kmin, vmin) =
        m.iter().copied().enumerate().fold(
            (0, f64::INFINITY),
            |a, (k, v)| if v < a.1 { (k, v) } else { a },
        );
    if vmin < -tol {
        return Err(Error::NotDoublyStochastic(format!(
            "entry ({}, {}) = {vmin:e} is negative (tolerance {tol:e})",
            kmin / n,
            kmin % n
        )));
    }
    let rows: Vec<f64> = m.chunks_exact(n).map(|r| r.iter().sum()).collect();
    let cols: Vec<f64> = (0..n).map(|j| (0..n).map(|i| m[i * n + j]).sum()).collect();
    let worst = |sums: &[f64]| {
        sums.iter()
            .enumerate()
            .map(|(i, &s)| (i, s, (s - 1.0).abs()))
            .fold((0, 1.0, 0.0), |a, b| if b.2 > a.2 { b } else { a })
    };
    for (what, sums) in [("row", &rows), ("column", &cols)] {
        let (i, s, err) = worst(sums);
        if err > tol {
            return Err(Error::NotDoublyStochastic(format!(
                "{what} {i} sums to {s} (|sum − 1| = {err:e} > tolerance {tol:e})"
            )));
        }
    }
    Ok(())
}

/// Sinkhorn-rescale a non-negative matrix until its row and column sums are 1 to rounding.
fn balance(r: &mut [f64], n: usize) {
    let target = 4.0 * n as f64 * f64::EPSILON;
    let mut cols = vec![0.0; n];
    for _ in 0..MAX_BALANCE_SWEEPS {
        cols.fill(0.0);
        for row in r.chunks_exact(n) {
            cols.iter_mut().zip(row).for_each(|(c, v)| *c += v);
        }
        let row_err = r
            .chunks_exact(n)
            .map(|row| (row.iter().sum::<f64>() - 1.0).abs())
            .fold(0.0, f64::max);
        let col_err = cols.iter().map(|c| (c - 1.0).abs()).fold(0.0, f64::max);
        if row_err.max(col_err) <= target {
            return;
        }
        for row in r.chunks_exact_mut(n) {
            row.iter_mut().zip(&cols).for_each(|(v, c)| *v /= c);
        }
        for row in r.chunks_exact_mut(n) {
            let s: f64 = row.iter().sum();
            row.iter_mut().for_each(|v| *v /= s);
        }
    }
}

/// Kuhn's augmenting path from row `i` over edges `r[i, j] ≥ thr`.
fn augment(
    i: usize,
    r: &[f64],
    n: usize,
    thr: f64,
    seen: &mut [bool],
    col_match: &mut [usize],
) -> bool {
    for j in 0..n {
        if r[i * n + j] >= thr && !seen[j] {
            seen[j] = true;
            if col_match[j] == usize::MAX || augment(col_match[j], r, n, thr, seen, col_match) {
                col_match[j] = i;
                return true;
            }
        }
    }
    false
}

/// A perfect matching (row → column) using only entries `≥ thr`, if one exists.
fn perfect_matching(r: &[f64], n: usize, thr: f64) -> Option<Vec<usize>> {
    let mut col_match = vec![usize::MAX; n];
    let mut seen = vec![false; n];
    for i in 0..n {
        seen.fill(false);
        if !augment(i, r, n, thr, &mut seen, &mut col_match) {
            return None;
        }
    }
    let mut perm = vec![0; n];
    for (j, &i) in col_match.iter().enumerate() {
        perm[i] = j;
    }
    Some(perm)
}

/// The perfect matching inside the positive support with the largest smallest entry, and that
/// entry; `None` if the support holds no perfect matching.
fn bottleneck_matching(r: &[f64], n: usize) -> Option<(Vec<usize>, f64)> {
    let mut vals: Vec<f64> = r.iter().copied().filter(|&v| v > 0.0).collect();
    if vals.len() < n {
        return None;
    }
    vals.sort_by(|a, b| b.total_cmp(a));
    vals.dedup();
    // Feasibility grows with the index (lower threshold, more edges): find the first feasible.
    let (mut lo, mut hi) = (0, vals.len() - 1);
    let mut best = perfect_matching(r, n, vals[hi])?;
    while lo < hi {
        let mid = (lo + hi) / 2;
        match perfect_matching(r, n, vals[mid]) {
            Some(p) => {
                hi = mid;
                best = p;
            }
            None => lo = mid + 1,
        }
    }
    let w = best
        .iter()
        .enumerate()
        .map(|(i, &j)| r[i * n + j])
        .fold(f64::INFINITY, f64::min);
    Some((best, w))
}

/// Decompose a doubly stochastic `n × n` matrix (row-major, within `tol`) into at most
/// `(n−1)²+1` weighted permutations; see the module docs.
pub fn bvn_decompose(m: &[f64], n: usize, tol: f64) -> Result<Bvn> {
    check_doubly_stochastic(m, n, tol)?;
    let mut r: Vec<f64> = m.iter().map(|&v| v.max(0.0)).collect();
    balance(&mut r, n);
    let mut terms: Vec<(f64, Vec<usize>)> = Vec::new();
    while terms.len() < max_terms(n) {
        let Some((perm, w)) = bottleneck_matching(&r, n) else {
            break;
        };
        for (i, &j) in perm.iter().enumerate() {
            let e = &mut r[i * n + j];
            *e -= w;
            if *e <= DROP {
                *e = 0.0;
            }
        }
        terms.push((w, perm));
    }
    let total: f64 = terms.iter().map(|t| t.0).sum();
    if terms.is_empty() || total <= 0.0 {
        // Unreachable for input that passed the check (its support holds a perfect matching).
        return Err(Error::NotDoublyStochastic(
            "no permutation fits inside the matrix's support".into(),
        ));
    }
    // Stable sort: equal weights keep the order they were found in.
    terms.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut bvn = Bvn {
        n,
        weights: terms.iter().map(|t| t.0 / total).collect(),
        perms: terms.into_iter().flat_map(|t| t.1).collect(),
        max_error: 0.0,
    };
    bvn.max_error = bvn
        .reconstruct()
        .iter()
        .zip(m)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    Ok(bvn)
}

#[cfg(test)]
mod tests {
    use super::super::perm::{is_permutation, permutations};
    use super::super::sinkhorn::sinkhorn_forward;
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// A random convex combination of `k` random permutations (an exactly known mixture).
    fn mixture(n: usize, k: usize, rng: &mut StdRng) -> Vec<f64> {
        let mut m = vec![0.0; n * n];
        let w: Vec<f64> = (0..k).map(|_| rng.random_range(0.01..1.0)).collect();
        let total: f64 = w.iter().sum();
        for w in w {
            let mut p: Vec<usize> = (0..n).collect();
            for i in (1..n).rev() {
                p.swap(i, rng.random_range(0..=i));
            }
            for (i, &j) in p.iter().enumerate() {
                m[i * n + j] += w / total;
            }
        }
        m
    }

    fn check(m: &[f64], n: usize, bvn: &Bvn) {
        assert!(
            bvn.weights.len() <= max_terms(n),
            "{} terms",
            bvn.weights.len()
        );
        assert!(bvn.weights.iter().all(|&w| w > 0.0));
        assert!((bvn.weights.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert!(bvn.weights.windows(2).all(|w| w[0] >= w[1]));
        for k in 0..bvn.weights.len() {
            assert!(is_permutation(bvn.perm(k)));
        }
        // Independent reconstruction.
        let mut rec = vec![0.0; n * n];
        for (k, w) in bvn.weights.iter().enumerate() {
            for i in 0..n {
                rec[i * n + bvn.perm(k)[i]] += w;
            }
        }
        let err = rec
            .iter()
            .zip(m)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(err < 1e-9, "reconstruction error {err}");
        assert!((err - bvn.max_error).abs() < 1e-15);
    }

    #[test]
    fn reconstructs_mixtures_of_permutations() {
        let mut rng = StdRng::seed_from_u64(1);
        for n in 1..=7 {
            for k in [1, 2, 3, n * n, 3 * n * n] {
                let m = mixture(n, k, &mut rng);
                let bvn = bvn_decompose(&m, n, 1e-9).unwrap();
                check(&m, n, &bvn);
            }
        }
    }

    #[test]
    fn reconstructs_sinkhorn_outputs() {
        let mut rng = StdRng::seed_from_u64(2);
        for n in 2..=8 {
            let x: Vec<f64> = (0..n * n).map(|_| rng.random_range(-2.0..2.0)).collect();
            let mut p = vec![0.0; n * n];
            sinkhorn_forward(&x, n, 2000, &mut p, 1).unwrap();
            let bvn = bvn_decompose(&p, n, 1e-9).unwrap();
            check(&p, n, &bvn);
        }
    }

    #[test]
    fn recovers_a_single_permutation_and_basis_weights() {
        let n = 4;
        let perms = permutations(n).unwrap();
        let (a, b) = (5, 17);
        let mut m = vec![0.0; n * n];
        for i in 0..n {
            m[i * n + perms[a * n + i]] += 0.75;
            m[i * n + perms[b * n + i]] += 0.25;
        }
        let bvn = bvn_decompose(&m, n, 1e-9).unwrap();
        assert_eq!(bvn.weights.len(), 2);
        assert_eq!(bvn.perm(0), &perms[a * n..(a + 1) * n]);
        let bw = bvn.basis_weights().unwrap();
        assert_eq!(bw.len(), 24);
        assert!((bw[a] - 0.75).abs() < 1e-15 && (bw[b] - 0.25).abs() < 1e-15);
        assert!((bw.iter().sum::<f64>() - 1.0).abs() < 1e-15);
    }

    #[test]
    fn nearly_doubly_stochastic_within_tolerance() {
        let mut rng = StdRng::seed_from_u64(3);
        let n = 5;
        let mut m = mixture(n, 10, &mut rng);
        m.iter_mut()
            .for_each(|v| *v += rng.random_range(-1e-8..1e-8));
        let bvn = bvn_decompose(&m, n, 1e-6).unwrap();
        assert!(bvn.weights.len() <= max_terms(n));
        assert!(bvn.max_error < 1e-6, "{}", bvn.max_error);
    }

    #[test]
    fn rejects_bad_input_with_clear_messages() {
        let n = 3;
        let id: Vec<f64> = (0..9).map(|k| if k % 4 == 0 { 1.0 } else { 0.0 }).collect();
        let err = |m: &[f64]| match bvn_decompose(m, n, 1e-6) {
            Err(Error::NotDoublyStochastic(msg)) => msg,
            other => panic!("expected NotDoublyStochastic, got {other:?}"),
        };
        let mut m = id.clone();
        m[0] = 0.9;
        let msg = err(&m);
        assert!(msg.contains("row 0") && msg.contains("0.9"), "{msg}");
        let mut m = id.clone();
        m[1] = 0.1; // row 0 sums to 1.1, column 1 too; the worst row is reported
        assert!(err(&m).contains("row 0"));
        // Rows fine, columns off.
        let m = vec![0.5, 0.5, 0.0, 0.5, 0.5, 0.0, 0.5, 0.0, 0.5];
        let msg = err(&m);
        assert!(msg.contains("column 0") && msg.contains("1.5"), "{msg}");
        let m = vec![1.5, -0.5, 0.0, -0.5, 1.5, 0.0, 0.0, 0.0, 1.0];
        let msg = err(&m);
        assert!(msg.contains("negative") && msg.contains("(0, 1)"), "{msg}");
        let mut m = id.clone();
        m[4] = f64::NAN;
        assert!(err(&m).contains("NaN"));
        assert!(matches!(bvn_decompose(&id, 2, 1e-6), Err(Error::Shape(_))));
        assert!(matches!(bvn_decompose(&[], 0, 1e-6), Err(Error::Shape(_))));
        assert!(matches!(bvn_decompose(&id, 3, -1.0), Err(Error::Value(_))));
        assert!(matches!(
            bvn_decompose(&id, 3, f64::NAN),
            Err(Error::Value(_))
        ));
        // Tiny negatives within tolerance are accepted and treated as 0.
        let mut m = id.clone();
        m[1] = -1e-8;
        m[0] = 1.0 + 1e-8;
        assert!(bvn_decompose(&m, n, 1e-6).is_ok());
    }
}

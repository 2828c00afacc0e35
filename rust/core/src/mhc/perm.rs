//! Permutations of `n` streams: the basis of `mhc_lite`'s `H_res = Σ_k softmax(a)_k P_k`.
//!
//! Order is lexicographic over index vectors, identity first — the order of Python's
//! `itertools.permutations(range(n))` — so a basis index means the same thing in Rust, torch
//! and checkpoints. `perm[i] = j` means `P[i, j] = 1`, i.e. `(P x)_i = x_{perm[i]}`.
//! The basis is capped at [`MAX_BASIS_N`] streams (8! = 40320 matrices); [`permutation_rank`]
//! maps any permutation back to its basis index.

use crate::{shape_err, Error, Result};

/// Largest `n` for which the full basis is built.
pub const MAX_BASIS_N: usize = 8;

/// Largest `n` whose `n!` fits a 64-bit index.
const MAX_RANK_N: usize = 20;

/// `n!` (only called for `n ≤ 20`).
pub fn factorial(n: usize) -> usize {
    (1..=n).product()
}

fn check_basis_n(n: usize) -> Result<()> {
    if n == 0 || n > MAX_BASIS_N {
        return Err(Error::Value(format!(
            "permutation basis: n = {n} streams is outside 1..={MAX_BASIS_N} (n! matrices; \
             {MAX_BASIS_N}! = {})",
            factorial(MAX_BASIS_N)
        )));
    }
    Ok(())
}

/// Step to the next permutation in lexicographic order; false after the last one.
fn next_permutation(p: &mut [usize]) -> bool {
    let Some(i) = (1..p.len()).rev().find(|&i| p[i - 1] < p[i]) else {
        return false;
    };
    // p[i] > p[i-1], so the search finds some j ≥ i.
    let j = (i..p.len()).rev().find(|&j| p[j] > p[i - 1]).unwrap_or(i);
    p.swap(i - 1, j);
    p[i..].reverse();
    true
}

/// All `n!` permutations of `0..n` as index vectors, flat (`n! × n`), lexicographic, identity
/// first. `1 ≤ n ≤ 8`.
pub fn permutations(n: usize) -> Result<Vec<usize>> {
    check_basis_n(n)?;
    let mut out = Vec::with_capacity(factorial(n) * n);
    let mut p: Vec<usize> = (0..n).collect();
    loop {
        out.extend_from_slice(&p);
        if !next_permutation(&mut p) {
            break;
        }
    }
    Ok(out)
}

/// All `n!` permutation matrices, flat (`n! × n × n`, row-major), in [`permutations`] order.
pub fn permutation_matrices(n: usize) -> Result<Vec<f32>> {
    let perms = permutations(n)?;
    let mut out = vec![0f32; perms.len() * n];
    for (k, p) in perms.chunks_exact(n).enumerate() {
        for (i, &j) in p.iter().enumerate() {
            out[(k * n + i) * n + j] = 1.0;
        }
    }
    Ok(out)
}

/// Whether `p` holds each of `0..p.len()` exactly once.
pub fn is_permutation(p: &[usize]) -> bool {
    let mut seen = vec![false; p.len()];
    p.iter()
        .all(|&j| j < p.len() && !std::mem::replace(&mut seen[j], true))
}

/// Index of a permutation in lexicographic order (its Lehmer code), i.e. its position in
/// [`permutations`]. Errors if `p` is not a permutation or has more than 20 elements.
pub fn permutation_rank(p: &[usize]) -> Result<usize> {
    if p.len() > MAX_RANK_N {
        return Err(shape_err!(
            "permutation of {} elements: ranks are defined up to {MAX_RANK_N}",
            p.len()
        ));
    }
    if !is_permutation(p) {
        return Err(Error::Value(format!(
            "{p:?} is not a permutation of 0..{}",
            p.len()
        )));
    }
    let n = p.len();
    let mut rank = 0;
    for i in 0..n {
        let smaller_after = p[i + 1..].iter().filter(|&&q| q < p[i]).count();
        rank += smaller_after * factorial(n - 1 - i);
    }
    Ok(rank)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_order_and_identity_first() {
        for n in 1..=MAX_BASIS_N {
            let p = permutations(n).unwrap();
            assert_eq!(p.len(), factorial(n) * n);
            let rows: Vec<&[usize]> = p.chunks_exact(n).collect();
            assert_eq!(rows[0], (0..n).collect::<Vec<_>>().as_slice());
            assert!(rows.windows(2).all(|w| w[0] < w[1]), "strictly increasing");
            assert!(rows.iter().all(|r| is_permutation(r)));
            for (k, r) in rows.iter().enumerate() {
                assert_eq!(permutation_rank(r).unwrap(), k);
            }
        }
    }

    #[test]
    fn small_case_by_hand() {
        assert_eq!(
            permutations(3).unwrap(),
            vec![0, 1, 2, 0, 2, 1, 1, 0, 2, 1, 2, 0, 2, 0, 1, 2, 1, 0]
        );
    }

    #[test]
    fn matrices_are_permutation_matrices() {
        let n = 4;
        let m = permutation_matrices(n).unwrap();
        let p = permutations(n).unwrap();
        assert_eq!(m.len(), 24 * 16);
        for (k, mat) in m.chunks_exact(n * n).enumerate() {
            for i in 0..n {
                let row = &mat[i * n..(i + 1) * n];
                assert_eq!(row.iter().sum::<f32>(), 1.0);
                assert_eq!(row[p[k * n + i]], 1.0);
                assert_eq!((0..n).map(|r| mat[r * n + i]).sum::<f32>(), 1.0);
            }
        }
    }

    #[test]
    fn errors() {
        assert!(matches!(permutations(0), Err(Error::Value(_))));
        assert!(matches!(permutations(9), Err(Error::Value(_))));
        assert!(matches!(permutation_rank(&[0, 0]), Err(Error::Value(_))));
        assert!(matches!(permutation_rank(&[1, 2]), Err(Error::Value(_))));
        assert!(matches!(
            permutation_rank(&(0..21).collect::<Vec<_>>()),
            Err(Error::Shape(_))
        ));
        assert_eq!(
            permutation_rank(&(0..20).rev().collect::<Vec<_>>()).unwrap(),
            factorial(20) - 1
        );
    }
}

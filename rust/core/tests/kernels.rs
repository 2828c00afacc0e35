//! Every SIMD ternary kernel equals the scalar oracle *exactly*, and the scalar oracle equals a
//! plain `Σ trit·x` over unpacked trits (so the oracle itself is checked against something that
//! knows nothing of the packed layout). Threaded runs equal single-threaded runs.
//!
//! Kernels this CPU cannot run are skipped with a note on stderr (`cargo test -- --nocapture`).

use nanochat_core::kernels::{
    gemm_i32, par_min_macs, ternary_linear, Kernel, TernaryMatrix, TernaryView, ALL_KERNELS,
};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The SIMD kernels runnable here; prints the ones skipped.
fn simd_kernels() -> Vec<Kernel> {
    for k in ALL_KERNELS {
        if !k.is_available() {
            eprintln!(
                "note: kernel '{}' is not available on this CPU; skipped",
                k.name()
            );
        }
    }
    Kernel::available()
        .into_iter()
        .filter(|&k| k != Kernel::Scalar)
        .collect()
}

#[derive(Clone, Copy, Debug)]
enum Weights {
    /// Uniform random trits.
    Random,
    AllMinus,
    AllPlus,
    /// Random bytes: codes 0..=3, code 3 included (the scalar oracle decodes it as trit 2;
    /// every kernel must agree even on data no quantizer writes).
    RawBytes,
}

#[derive(Clone, Copy, Debug)]
enum Acts {
    Random,
    /// Only −128, −127 and 127: the i16/i32 overflow corners.
    Extreme,
    AllMin,
    AllMax,
}

fn weights(
    mode: Weights,
    rows: usize,
    cols: usize,
    rng: &mut StdRng,
) -> (Vec<u8>, Option<Vec<i8>>) {
    let trits: Vec<i8> = match mode {
        Weights::RawBytes => return ((0..rows * cols / 4).map(|_| rng.random()).collect(), None),
        Weights::Random => (0..rows * cols).map(|_| rng.random_range(-1..=1)).collect(),
        Weights::AllMinus => vec![-1; rows * cols],
        Weights::AllPlus => vec![1; rows * cols],
    };
    let m = TernaryMatrix::from_trits(&trits, rows, cols, 1.0).unwrap();
    (m.qs, Some(trits))
}

fn acts(mode: Acts, len: usize, rng: &mut StdRng) -> Vec<i8> {
    (0..len)
        .map(|_| match mode {
            Acts::Random => rng.random(),
            Acts::Extreme => [-128, -127, 127][rng.random_range(0..3)],
            Acts::AllMin => -128,
            Acts::AllMax => 127,
        })
        .collect()
}

fn run(
    k: Kernel,
    qs: &[u8],
    rows: usize,
    cols: usize,
    x: &[i8],
    n: usize,
    threads: usize,
) -> Vec<i32> {
    let w = TernaryView::new(qs, rows, cols, 1.0).unwrap();
    let mut out = vec![i32::MIN; n * rows];
    gemm_i32(k, &w, x, n, &mut out, threads).unwrap();
    out
}

/// `out[i·rows + r] = Σ_c trit[r][c] · x[i][c]`, straight from the trits.
fn naive(trits: &[i8], rows: usize, cols: usize, x: &[i8], n: usize) -> Vec<i32> {
    let mut out = vec![0; n * rows];
    for i in 0..n {
        for r in 0..rows {
            out[i * rows + r] = (0..cols)
                .map(|c| trits[r * cols + c] as i32 * x[i * cols + c] as i32)
                .sum();
        }
    }
    out
}

/// Checks every kernel (and the oracle) on one case; returns a description of the first mismatch.
fn check_case(
    rows: usize,
    cols: usize,
    n: usize,
    wm: Weights,
    am: Acts,
    seed: u64,
    threads: &[usize],
) -> Result<(), String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let (qs, trits) = weights(wm, rows, cols, &mut rng);
    let x = acts(am, n * cols, &mut rng);
    let want = run(Kernel::Scalar, &qs, rows, cols, &x, n, 1);
    if let Some(t) = trits {
        if want != naive(&t, rows, cols, &x, n) {
            return Err(format!(
                "scalar != naive trits for {rows}×{cols}, n={n}, {wm:?}, {am:?}"
            ));
        }
    }
    for k in simd_kernels() {
        for &th in threads {
            let got = run(k, &qs, rows, cols, &x, n, th);
            if let Some(j) = (0..got.len()).find(|&j| got[j] != want[j]) {
                return Err(format!(
                    "{} ({th} threads) != scalar for {rows}×{cols}, n={n}, {wm:?}, {am:?}, seed {seed}: \
                     out[act {}][row {}] = {} vs {}",
                    k.name(),
                    j / rows,
                    j % rows,
                    got[j],
                    want[j]
                ));
            }
        }
    }
    Ok(())
}

fn weights_mode() -> impl Strategy<Value = Weights> {
    prop_oneof![
        4 => Just(Weights::Random),
        1 => Just(Weights::AllMinus),
        1 => Just(Weights::AllPlus),
        2 => Just(Weights::RawBytes),
    ]
}

fn acts_mode() -> impl Strategy<Value = Acts> {
    prop_oneof![
        4 => Just(Acts::Random),
        2 => Just(Acts::Extreme),
        1 => Just(Acts::AllMin),
        1 => Just(Acts::AllMax),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Random shapes (rows not multiples of the 4/16/32-row tiles, n across the 1..4 act tiles
    /// and beyond, and 16..40 for `amx`'s tiles: one, two or three 16-row activation tiles,
    /// ragged), random and extreme values: every kernel == scalar, on 1 and 2 threads.
    #[test]
    fn simd_equals_scalar(
        rows in 1usize..100,
        blocks in 1usize..=8,
        n in prop_oneof![1usize..=9, 16usize..=40],
        wm in weights_mode(),
        am in acts_mode(),
        seed in any::<u64>(),
    ) {
        let r = check_case(rows, blocks * 256, n, wm, am, seed, &[1, 2]);
        prop_assert!(r.is_ok(), "{}", r.unwrap_err());
    }
}

/// The worst case for every accumulator: the largest codes and activations, over a long row.
#[test]
fn overflow_corners() {
    for (wm, am) in [
        (Weights::AllMinus, Acts::AllMin),
        (Weights::AllPlus, Acts::AllMin),
        (Weights::AllPlus, Acts::AllMax),
        (Weights::RawBytes, Acts::Extreme),
    ] {
        for n in [3, 18] {
            check_case(37, 16384, n, wm, am, 5, &[1]).unwrap();
        }
    }
    // All codes 3 (byte 0xff) against −128: the largest products any kernel sees.
    let (rows, cols) = (19, 8192);
    let qs = vec![0xffu8; rows * cols / 4];
    for n in [1, 2, 5, 17] {
        let x = vec![-128i8; n * cols];
        let want = run(Kernel::Scalar, &qs, rows, cols, &x, n, 1);
        assert!(want.iter().all(|&v| v == 2 * -128 * cols as i32));
        for k in simd_kernels() {
            assert_eq!(run(k, &qs, rows, cols, &x, n, 1), want, "{}", k.name());
        }
    }
}

/// Shapes big enough to be split over threads (above every SIMD kernel's `par_min_macs`):
/// threaded == 1 thread == scalar, including thread counts that do not divide the row tiles.
#[test]
fn threaded_equals_single_threaded() {
    let cols = 2048;
    let most = simd_kernels()
        .into_iter()
        .map(par_min_macs)
        .max()
        .unwrap_or(0);
    let rows = most / cols + 77; // one GEMV over the threshold, rows not a tile multiple
    check_case(rows, cols, 1, Weights::Random, Acts::Random, 11, &[1, 2, 3]).unwrap();
    for n in [4, 33] {
        check_case(
            rows / 3,
            cols,
            n,
            Weights::RawBytes,
            Acts::Extreme,
            12,
            &[1, 2, 5],
        )
        .unwrap();
    }
}

/// `ternary_linear` (the f32 path) agrees across kernels to the bit: same integers, same scaling.
#[test]
fn ternary_linear_same_for_all_kernels() {
    let (rows, cols, n) = (70, 512, 3);
    let mut rng = StdRng::seed_from_u64(3);
    let wf: Vec<f32> = (0..rows * cols)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    let xf: Vec<f32> = (0..n * cols).map(|_| rng.random_range(-4.0..4.0)).collect();
    let m = TernaryMatrix::quantize(&wf, rows, cols).unwrap();
    let mut want = vec![0f32; n * rows];
    ternary_linear(Kernel::Scalar, &m.view().unwrap(), &xf, n, &mut want, 1).unwrap();
    for k in simd_kernels() {
        let mut got = vec![0f32; n * rows];
        ternary_linear(k, &m.view().unwrap(), &xf, n, &mut got, 2).unwrap();
        assert_eq!(got, want, "{}", k.name());
    }
}

#[test]
fn best_is_available_and_names_round_trip() {
    let best = Kernel::best();
    assert!(best.is_available());
    for k in Kernel::available() {
        assert_eq!(Kernel::from_name(k.name()).unwrap(), k);
    }
    eprintln!(
        "kernels here: {:?}, best {}",
        Kernel::available(),
        best.name()
    );
}

/// `TernaryView`'s fields are public, so a view can be built without `TernaryView::new`: a
/// mismatched one must be refused, not read out of bounds by a SIMD kernel.
#[test]
fn inconsistent_view_is_an_error() {
    let qs = vec![0x55u8; 64 * 10];
    let x = vec![1i8; 256];
    for k in Kernel::available() {
        let short = TernaryView {
            rows: 11,
            cols: 256,
            scale: 1.0,
            qs: &qs,
        };
        let mut out = vec![0; 11];
        assert!(
            gemm_i32(k, &short, &x, 1, &mut out, 1).is_err(),
            "{}",
            k.name()
        );
        let ragged = TernaryView {
            rows: 10,
            cols: 200,
            scale: 1.0,
            qs: &qs[..500],
        };
        let mut out = vec![0; 10];
        assert!(
            gemm_i32(k, &ragged, &x[..200], 1, &mut out, 1).is_err(),
            "{}",
            k.name()
        );
    }
}

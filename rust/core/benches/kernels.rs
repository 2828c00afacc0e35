//! Criterion benches of the ternary kernels: one GEMV per kernel and shape, on 1 thread and on
//! all cores, plus the batched form (8 activation rows in one call vs 8 GEMV calls).
//!
//! `cargo bench -p nanochat-core --bench kernels [-- FILTER]`; throughput is reported in
//! multiply-adds (elements = rows × cols × n). `benches/bench_kernels.py` prints the same
//! numbers as a table with torch and the scalar oracle alongside.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use nanochat_core::kernels::{gemm_i32, num_threads, Kernel, TernaryMatrix};
use std::time::Duration;

fn weights(rows: usize, cols: usize) -> TernaryMatrix {
    let trits: Vec<i8> = (0..rows * cols)
        .map(|i| ((i * 7919 + i / 13) % 3) as i8 - 1)
        .collect();
    TernaryMatrix::from_trits(&trits, rows, cols, 0.1).unwrap()
}

fn acts(n: usize, cols: usize) -> Vec<i8> {
    (0..n * cols).map(|i| ((i * 31) % 255) as i8).collect()
}

fn gemv(c: &mut Criterion) {
    let mut g = c.benchmark_group("gemv");
    g.sample_size(20).measurement_time(Duration::from_secs(2));
    let all = num_threads();
    for (rows, cols) in [(768, 768), (2048, 2048), (2560, 6912)] {
        let w = weights(rows, cols);
        let view = w.view().unwrap();
        let x = acts(1, cols);
        let mut out = vec![0i32; rows];
        g.throughput(Throughput::Elements((rows * cols) as u64));
        for k in Kernel::available() {
            if k == Kernel::Scalar && rows * cols > 1 << 20 {
                continue; // seconds per sample; the Python bench times it on a slice
            }
            for threads in [1, all] {
                let id =
                    BenchmarkId::new(format!("{}/{threads}t", k.name()), format!("{rows}x{cols}"));
                g.bench_function(id, |b| {
                    b.iter(|| gemm_i32(k, &view, &x, 1, &mut out, threads).unwrap())
                });
                if all == 1 {
                    break;
                }
            }
        }
    }
    g.finish();
}

fn batched(c: &mut Criterion) {
    let mut g = c.benchmark_group("batched");
    g.sample_size(20).measurement_time(Duration::from_secs(2));
    let (rows, cols, n) = (2048, 2048, 8);
    let w = weights(rows, cols);
    let view = w.view().unwrap();
    let x = acts(n, cols);
    let mut out = vec![0i32; n * rows];
    g.throughput(Throughput::Elements((rows * cols * n) as u64));
    for k in Kernel::available()
        .into_iter()
        .filter(|&k| k != Kernel::Scalar)
    {
        let shape = format!("{rows}x{cols}x{n}");
        g.bench_function(
            BenchmarkId::new(format!("{}/one_call", k.name()), &shape),
            |b| b.iter(|| gemm_i32(k, &view, &x, n, &mut out, 1).unwrap()),
        );
        g.bench_function(
            BenchmarkId::new(format!("{}/{n}_gemv_calls", k.name()), &shape),
            |b| {
                b.iter(|| {
                    for (xi, oi) in x.chunks_exact(cols).zip(out.chunks_exact_mut(rows)) {
                        gemm_i32(k, &view, xi, 1, oi, 1).unwrap();
                    }
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, gemv, batched);
criterion_main!(benches);

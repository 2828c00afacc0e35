use criterion::{criterion_group, criterion_main, Criterion};
use nanochat_core::kernels::{gemm_i32, Kernel, TernaryMatrix};

fn bench(c: &mut Criterion) {
    let (rows, cols) = (2048, 2048);
    let trits: Vec<i8> = (0..rows * cols)
        .map(|i| ((i * 7919) % 3) as i8 - 1)
        .collect();
    let w = TernaryMatrix::from_trits(&trits, rows, cols, 0.1).unwrap();
    let x: Vec<i8> = (0..cols).map(|i| ((i * 31) % 255) as i8).collect();
    let mut out = vec![0i32; rows];
    for k in Kernel::available() {
        c.bench_function(&format!("gemv_{}_{rows}x{cols}_1t", k.name()), |b| {
            b.iter(|| gemm_i32(k, &w.view().unwrap(), &x, 1, &mut out, 1).unwrap())
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);

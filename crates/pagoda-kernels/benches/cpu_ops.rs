//! CPU ops at SmolLM2-135M shapes (hidden 576, MLP 1536, vocabulary 49152).
//!
//! `linear` at decode (one row) reads every weight once, so its throughput is reported in bytes of
//! weights per second, to compare with the machine's memory bandwidth.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use half::{bf16, f16};
use pagoda_kernels::cpu::gemm::{Weights, linear, matmul};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

const HIDDEN: usize = 576;

fn random_vec(rng: &mut ChaCha8Rng, len: usize) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// `linear` with `m` rows against `[n, 576]` weights in each storage type.
fn bench_linear(c: &mut Criterion, group_name: &str, m: usize, ns: &[usize]) {
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let k = HIDDEN;
    let mut group = c.benchmark_group(group_name);
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(3));
    for &n in ns {
        let x = random_vec(&mut rng, m * k);
        let w = random_vec(&mut rng, n * k);
        let w_f16: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
        let w_bf16: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        let mut out = vec![0.0f32; m * n];
        for (dtype, weights) in [
            ("f32", Weights::F32(&w)),
            ("f16", Weights::F16(&w_f16)),
            ("bf16", Weights::BF16(&w_bf16)),
        ] {
            group.throughput(Throughput::Bytes(
                (weights.len() * weights.element_size()) as u64,
            ));
            group.bench_function(BenchmarkId::new(dtype, format!("m{m}_k{k}_n{n}")), |b| {
                b.iter(|| linear(black_box(&x), m, k, weights, n, None, black_box(&mut out)))
            });
        }
    }
    group.finish();
}

fn linear_decode(c: &mut Criterion) {
    // The MLP up/gate projection and the tied embedding used as the language-model head.
    bench_linear(c, "linear_decode", 1, &[1536, 49152]);
}

/// The `gemm` crate's own single-row path (through [`matmul`], weights transposed to `[k, n]`),
/// for comparison with `linear`'s threaded row-dot-product at the same shapes.
fn matmul_decode(c: &mut Criterion) {
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let k = HIDDEN;
    let mut group = c.benchmark_group("matmul_decode");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(3));
    for n in [1536, 49152] {
        let x = random_vec(&mut rng, k);
        let w = random_vec(&mut rng, k * n);
        let mut out = vec![0.0f32; n];
        group.throughput(Throughput::Bytes((w.len() * size_of::<f32>()) as u64));
        group.bench_function(BenchmarkId::new("f32", format!("m1_k{k}_n{n}")), |b| {
            b.iter(|| matmul(black_box(&x), black_box(&w), 1, k, n, black_box(&mut out)))
        });
    }
    group.finish();
}

fn linear_decode_batch(c: &mut Criterion) {
    bench_linear(c, "linear_decode_batch", 4, &[1536, 49152]);
}

fn linear_prefill(c: &mut Criterion) {
    bench_linear(c, "linear_prefill", 128, &[1536]);
}

criterion_group!(
    benches,
    linear_decode,
    matmul_decode,
    linear_decode_batch,
    linear_prefill
);
criterion_main!(benches);

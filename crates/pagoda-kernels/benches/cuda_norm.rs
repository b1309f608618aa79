//! CUDA norms and activations at Llama-3-8B widths (hidden 4096, MLP 14336), bf16.
//!
//! These kernels are bound by memory bandwidth, so throughput is the bytes each call must move
//! (inputs read once, outputs written once), to compare with the GPU's copy bandwidth. Each
//! sample times many calls between two device synchronisations, so it measures the GPU's work
//! and not only the launches.

mod common;

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use pagoda_kernels::cuda;
use pagoda_tensor::{CudaDevice, DType};

use common::{pattern, time_gpu};

const HIDDEN: usize = 4096;
const INTERMEDIATE: usize = 14336;
const ROWS: [usize; 3] = [1, 64, 2048];

fn bench_norms(c: &mut Criterion) {
    let Ok(device) = CudaDevice::get(0) else {
        eprintln!("cuda_norm: skipped: no GPU");
        return;
    };
    let dtype = DType::BF16;
    let size = dtype.size_in_bytes();
    let mut group = c.benchmark_group("cuda_norm_bf16");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    let weight = pattern(&[HIDDEN], dtype, &device);
    let bias = pattern(&[HIDDEN], dtype, &device);
    for rows in ROWS {
        let x = pattern(&[rows, HIDDEN], dtype, &device);
        let mut residual = pattern(&[rows, HIDDEN], dtype, &device);
        let row_bytes = (rows * HIDDEN * size) as u64;
        let id = |name: &str| BenchmarkId::new(name, format!("{rows}x{HIDDEN}"));

        group.throughput(Throughput::Bytes(2 * row_bytes));
        group.bench_function(id("rms_norm"), |b| {
            b.iter_custom(|iters| {
                time_gpu(&device, iters, || {
                    drop(black_box(cuda::norm::rms_norm(&x, &weight, 1e-5).unwrap()))
                })
            })
        });
        group.bench_function(id("layer_norm"), |b| {
            b.iter_custom(|iters| {
                time_gpu(&device, iters, || {
                    drop(black_box(
                        cuda::norm::layer_norm(&x, &weight, &bias, 1e-5).unwrap(),
                    ))
                })
            })
        });
        // x and the residual read, the residual and the output written.
        group.throughput(Throughput::Bytes(4 * row_bytes));
        group.bench_function(id("add_rms_norm"), |b| {
            b.iter_custom(|iters| {
                time_gpu(&device, iters, || {
                    drop(black_box(
                        cuda::norm::add_rms_norm(&x, &mut residual, &weight, 1e-5).unwrap(),
                    ))
                })
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("cuda_activation_bf16");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    for rows in ROWS {
        let gate = pattern(&[rows, INTERMEDIATE], dtype, &device);
        let up = pattern(&[rows, INTERMEDIATE], dtype, &device);
        group.throughput(Throughput::Bytes((3 * rows * INTERMEDIATE * size) as u64));
        group.bench_function(
            BenchmarkId::new("silu_and_mul", format!("{rows}x{INTERMEDIATE}")),
            |b| {
                b.iter_custom(|iters| {
                    time_gpu(&device, iters, || {
                        drop(black_box(
                            cuda::activation::silu_and_mul(&gate, &up).unwrap(),
                        ))
                    })
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, bench_norms);
criterion_main!(benches);

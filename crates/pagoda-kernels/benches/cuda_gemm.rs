//! cuBLAS `linear` at Llama-3-8B projection shapes, bf16.
//!
//! Decode (one row) reads every weight once: its throughput is weight bytes per second, to
//! compare with the GPU's copy bandwidth. Prefill is bound by tensor-core arithmetic: its
//! throughput is reported as elements = floating-point operations (2·m·n·k), so criterion's
//! "elem/s" reads as FLOP/s. Each sample times many calls between two device synchronisations.

mod common;

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use pagoda_kernels::cuda;
use pagoda_tensor::{CudaDevice, DType};

use common::{pattern, time_gpu};

fn bench_linear(c: &mut Criterion) {
    let Ok(device) = CudaDevice::get(0) else {
        eprintln!("cuda_gemm: skipped: no GPU");
        return;
    };
    let dtype = DType::BF16;
    // (k, n): the fused QKV projection, the MLP's gate/up projection, its down projection.
    let shapes = [(4096, 6144), (4096, 28672), (14336, 4096)];
    let mut group = c.benchmark_group("cuda_linear_bf16");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    for (k, n) in shapes {
        let w = pattern(&[n, k], dtype, &device);
        for m in [1usize, 2048] {
            let x = pattern(&[m, k], dtype, &device);
            let throughput = if m == 1 {
                Throughput::Bytes((n * k * dtype.size_in_bytes()) as u64)
            } else {
                Throughput::Elements((2 * m * n * k) as u64)
            };
            group.throughput(throughput);
            group.bench_function(
                BenchmarkId::new(format!("m{m}"), format!("k{k}_n{n}")),
                |b| {
                    b.iter_custom(|iters| {
                        time_gpu(&device, iters, || {
                            drop(black_box(cuda::gemm::linear(&x, &w, None).unwrap()))
                        })
                    })
                },
            );
        }
    }
    group.finish();
}

criterion_group!(benches, bench_linear);
criterion_main!(benches);

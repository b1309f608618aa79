//! cuBLAS `linear` at Llama-3-8B projection shapes, bf16.
//!
//! Decode (one row) reads every weight once: its throughput is weight bytes per second, to
//! compare with the GPU's copy bandwidth. Prefill is bound by tensor-core arithmetic: its
//! throughput is reported as elements = floating-point operations (2·m·n·k), so criterion's
//! "elem/s" reads as FLOP/s. Each sample times many calls between two device synchronisations.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use pagoda_kernels::cuda;
use pagoda_tensor::{CudaDevice, DType, Device, Tensor};

fn random(dims: &[usize], dtype: DType, device: &CudaDevice) -> Tensor {
    let len: usize = dims.iter().product();
    let values: Vec<f32> = (0..len)
        .map(|i| ((i * 7919) % 2048) as f32 / 1024.0 - 1.0)
        .collect();
    Tensor::from_slice(&values, dims.to_vec())
        .and_then(|t| t.to_dtype(dtype))
        .and_then(|t| t.to_device(&Device::Cuda(device.ordinal())))
        .expect("uploading a benchmark input")
}

fn time_gpu(device: &CudaDevice, iters: u64, mut f: impl FnMut()) -> Duration {
    device.synchronize().expect("synchronising before timing");
    let start = Instant::now();
    for _ in 0..iters {
        f();
    }
    device.synchronize().expect("synchronising after timing");
    start.elapsed()
}

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
        let w = random(&[n, k], dtype, &device);
        for m in [1usize, 2048] {
            let x = random(&[m, k], dtype, &device);
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

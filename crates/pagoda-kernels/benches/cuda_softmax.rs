//! CUDA row softmax, f16, on the shapes of shared/BENCH.md (rows x cols): 131072 x 4096,
//! 4096 x 32000 and 256 x 128256, beside a device-to-device copy, the ceiling for an op that must
//! read its input once and write its output once.
//!
//! Throughput is those bytes (read + write) per second. Each criterion sample times many calls
//! between two device synchronisations. After criterion's report a summary prints, per shape, the
//! median time of single calls, GB/s (10^9 bytes) and the fraction of the copy bandwidth measured
//! in the same run.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use half::f16;
use pagoda_kernels::cuda;
use pagoda_tensor::cudarc::driver::CudaSlice;
use pagoda_tensor::{CudaDevice, Device, Tensor};

const SHAPES: [(usize, usize); 3] = [(131_072, 4096), (4096, 32_000), (256, 128_256)];
/// Bytes of the copy that measures the ceiling: large enough that L2 (50 MB) plays no part.
const COPY_BYTES: usize = 1 << 30;

/// `rows x cols` f16 logits on the device, pseudo-random in [-8, 8): never zeros, which would
/// make every exp the same.
fn logits(rows: usize, cols: usize, device: &CudaDevice) -> Tensor {
    let values: Vec<f16> = (0..rows * cols)
        .map(|i| {
            let mut h = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            h ^= h >> 29;
            f16::from_f32((h % 4096) as f32 / 256.0 - 8.0)
        })
        .collect();
    Tensor::from_vec(values, vec![rows, cols])
        .and_then(|t| t.to_device(&Device::Cuda(device.ordinal())))
        .expect("uploading benchmark logits")
}

/// Times `iters` calls of `f` between device synchronisations.
fn time_gpu(device: &CudaDevice, iters: u64, mut f: impl FnMut()) -> Duration {
    device.synchronize().expect("synchronising before timing");
    let start = Instant::now();
    for _ in 0..iters {
        f();
    }
    device.synchronize().expect("synchronising after timing");
    start.elapsed()
}

/// The median of `runs` timings of one call each (after a warm-up call), in seconds.
fn median_seconds(device: &CudaDevice, runs: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut times: Vec<f64> = (0..runs)
        .map(|_| time_gpu(device, 1, &mut f).as_secs_f64())
        .collect();
    times.sort_by(f64::total_cmp);
    times[runs / 2]
}

struct CopyBuffers {
    from: CudaSlice<u8>,
    to: CudaSlice<u8>,
}

impl CopyBuffers {
    fn new(device: &CudaDevice) -> CopyBuffers {
        let stream = device.stream();
        let from = stream
            .clone_htod(&vec![0x5au8; COPY_BYTES])
            .expect("allocating the copy source");
        let to = stream
            .alloc_zeros::<u8>(COPY_BYTES)
            .expect("allocating the copy destination");
        CopyBuffers { from, to }
    }

    fn copy(&mut self, device: &CudaDevice) {
        device
            .stream()
            .memcpy_dtod(&self.from, &mut self.to)
            .expect("device-to-device copy");
    }
}

fn bench(c: &mut Criterion, device: &CudaDevice, copies: &mut CopyBuffers) {
    let mut group = c.benchmark_group("cuda_softmax_f16");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));

    group.throughput(Throughput::Bytes(2 * COPY_BYTES as u64));
    group.bench_function(BenchmarkId::new("copy", "1GiB"), |b| {
        b.iter_custom(|iters| time_gpu(device, iters, || copies.copy(device)))
    });
    for (rows, cols) in SHAPES {
        let x = logits(rows, cols, device);
        group.throughput(Throughput::Bytes((2 * rows * cols * 2) as u64));
        group.bench_function(
            BenchmarkId::new("softmax_rows", format!("{rows}x{cols}")),
            |b| {
                b.iter_custom(|iters| {
                    time_gpu(device, iters, || {
                        drop(black_box(cuda::softmax::softmax_rows(&x).expect("softmax")))
                    })
                })
            },
        );
    }
    group.finish();
}

fn summary(device: &CudaDevice, copies: &mut CopyBuffers) {
    const RUNS: usize = 21;
    let copy_seconds = median_seconds(device, RUNS, || copies.copy(device));
    let copy_rate = 2.0 * COPY_BYTES as f64 / copy_seconds / 1e9;
    println!("\nsoftmax f16 (median of {RUNS} calls; bytes = read + write)");
    println!(
        "{:>18} {:>10} {:>10} {:>8}",
        "rows x cols", "ms", "GB/s", "of copy"
    );
    println!(
        "{:>18} {:>10.3} {:>10.0} {:>8}",
        "copy 1 GiB",
        copy_seconds * 1e3,
        copy_rate,
        "100%"
    );
    for (rows, cols) in SHAPES {
        let x = logits(rows, cols, device);
        let seconds = median_seconds(device, RUNS, || {
            drop(cuda::softmax::softmax_rows(&x).expect("softmax"))
        });
        let rate = (2 * rows * cols * 2) as f64 / seconds / 1e9;
        println!(
            "{:>18} {:>10.3} {:>10.0} {:>7.1}%",
            format!("{rows}x{cols}"),
            seconds * 1e3,
            rate,
            100.0 * rate / copy_rate
        );
    }
}

fn main() {
    let Ok(device) = CudaDevice::get(0) else {
        eprintln!("cuda_softmax: skipped: no GPU");
        return;
    };
    let mut copies = CopyBuffers::new(&device);
    let mut criterion = Criterion::default().configure_from_args();
    bench(&mut criterion, &device, &mut copies);
    criterion.final_summary();
    summary(&device, &mut copies);
}

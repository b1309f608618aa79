//! CUDA row softmax, f16, on the shapes of shared/BENCH.md (rows x cols): 131072 x 4096,
//! 4096 x 32000 and 256 x 128256, beside a device-to-device copy, the ceiling for an op that must
//! read its input once and write its output once.
//!
//! Throughput is those bytes (read + write) per second. Each criterion sample times many calls
//! between two device synchronisations. After criterion's report a summary prints, per shape, the
//! median time per call, GB/s (10^9 bytes) and the fraction of the copy bandwidth measured in the
//! same run; then every form of the kernel that can take the shape (one block per row with 8, 16
//! or 32 values per thread, clusters of 2 or 4 blocks, the online form) is launched directly
//! with its own geometry, checked against `softmax_rows`' output and timed, to show which form
//! suits which row length.

mod common;

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput};
use half::f16;
use pagoda_kernels::cuda;
use pagoda_kernels::cuda::registry::{KernelModule, function};
use pagoda_tensor::cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use pagoda_tensor::{CudaDevice, CudaStorage, DType, Device, Tensor};

use common::{device_slice, median_seconds, time_gpu};

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

/// Prints the table of `softmax_rows` against the copy; returns the copy bandwidth in GB/s.
fn summary(device: &CudaDevice, copies: &mut CopyBuffers) -> f64 {
    const RUNS: usize = 21;
    let copy_seconds = median_seconds(device, RUNS, 10, || copies.copy(device));
    let copy_rate = 2.0 * COPY_BYTES as f64 / copy_seconds / 1e9;
    println!("\nsoftmax f16 (median of {RUNS} samples of 10 calls; bytes = read + write)");
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
        let seconds = median_seconds(device, RUNS, 10, || {
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
    copy_rate
}

/// One way to run a shape: a kernel of softmax.cu with its launch geometry.
#[derive(Debug)]
struct Form {
    kernel: &'static str,
    /// Blocks per row.
    cluster: usize,
    /// Values each thread holds in registers; 0 for the online form, which streams the row.
    per_thread: usize,
    threads: u32,
}

impl Form {
    /// Columns each block of a row holds: a whole number of 16-byte vectors of f16.
    fn segment(&self, cols: usize) -> usize {
        if self.cluster == 1 {
            cols
        } else {
            cols.div_ceil(self.cluster).next_multiple_of(8)
        }
    }
}

/// Every form of the kernel that can hold an f16 row of `cols`, each with the fewest whole warps
/// that cover its segment; the online form at three block sizes.
fn forms(cols: usize) -> Vec<Form> {
    let mut forms = Vec::new();
    let held = [
        ("softmax_row_e8", 1, 8),
        ("softmax_row_e16", 1, 16),
        ("softmax_row_e32", 1, 32),
        ("softmax_cluster2", 2, 32),
        ("softmax_cluster4", 4, 32),
    ];
    for (kernel, cluster, per_thread) in held {
        let mut form = Form {
            kernel,
            cluster,
            per_thread,
            threads: 0,
        };
        let vectors = form.segment(cols).div_ceil(8);
        let threads = vectors.div_ceil(per_thread / 8).next_multiple_of(32);
        if threads <= 1024 {
            form.threads = threads as u32;
            forms.push(form);
        }
    }
    for threads in [256, 512, 1024] {
        forms.push(Form {
            kernel: "softmax_online",
            cluster: 1,
            per_thread: 0,
            threads,
        });
    }
    forms
}

fn launch_form(
    device: &CudaDevice,
    form: &Form,
    x: &Tensor,
    y: &mut CudaStorage,
    rows: usize,
    cols: usize,
) {
    let name = format!("{}_f16", form.kernel);
    let kernel = function(device, KernelModule::Softmax, &name).expect("loading a softmax kernel");
    let clusters = rows.min(i32::MAX as usize / form.cluster);
    let config = LaunchConfig {
        grid_dim: ((clusters * form.cluster) as u32, 1, 1),
        block_dim: (form.threads, 1, 1),
        shared_mem_bytes: 0,
    };
    let (rows, cols_arg, segment) = (rows as u64, cols as i64, form.segment(cols) as i64);
    let stream = device.stream();
    let mut launch = stream.launch_builder(&kernel);
    launch
        .arg(device_slice(x))
        .arg(y.slice_mut())
        .arg(&rows)
        .arg(&cols_arg);
    if form.per_thread > 0 {
        launch.arg(&segment);
    }
    // SAFETY: as in `cuda::softmax`: (x, y, rows, cols[, segment]) is the kernels' signature, x
    // and y hold rows x cols f16 values, the block is whole warps covering the segment, and the
    // grid is a whole number of clusters.
    unsafe { launch.launch(config) }.unwrap_or_else(|e| panic!("launching {name}: {e}"));
}

/// Times every form on every shape and checks each one's output against `softmax_rows`'.
fn sweep(device: &CudaDevice, copy_rate: f64) {
    const RUNS: usize = 11;
    /// Rows compared per shape: enough to cover every block of a wave, cheap to download.
    const CHECKED_ELEMENTS: usize = 1 << 22;
    println!("\nevery form, launched directly into a preallocated output (no allocation per call)");
    println!(
        "{:>12} {:>18} {:>7} {:>8} {:>10} {:>10} {:>8} {:>10}",
        "rows x cols", "kernel", "blocks", "threads", "ms", "GB/s", "of copy", "check"
    );
    for (rows, cols) in SHAPES {
        let x = logits(rows, cols, device);
        let checked_rows = (CHECKED_ELEMENTS / cols).clamp(1, rows);
        let reference = cuda::softmax::softmax_rows(&x)
            .and_then(|y| Ok(y.narrow(0, 0, checked_rows)?.to_vec_f32()?))
            .expect("the reference softmax");
        let reference_max = reference.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        for form in forms(cols) {
            let mut y =
                CudaStorage::zeros(device, DType::F16, rows * cols).expect("allocating an output");
            let seconds = median_seconds(device, RUNS, 10, || {
                launch_form(device, &form, &x, &mut y, rows, cols)
            });
            let bytes = y
                .to_host_bytes(0..checked_rows * cols)
                .expect("downloading an output");
            let worst = bytes
                .chunks_exact(2)
                .zip(&reference)
                .map(|(b, r)| (f16::from_le_bytes([b[0], b[1]]).to_f32() - r).abs())
                .fold(
                    0.0f32,
                    |m, d| if d.is_nan() { f32::INFINITY } else { m.max(d) },
                );
            let check = if worst <= 1e-2 * reference_max {
                "ok"
            } else {
                "MISMATCH"
            };
            let rate = (2 * rows * cols * 2) as f64 / seconds / 1e9;
            println!(
                "{:>12} {:>18} {:>7} {:>8} {:>10.3} {:>10.0} {:>7.1}% {:>10}",
                format!("{rows}x{cols}"),
                form.kernel,
                form.cluster,
                form.threads,
                seconds * 1e3,
                rate,
                100.0 * rate / copy_rate,
                check
            );
        }
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
    let copy_rate = summary(&device, &mut copies);
    sweep(&device, copy_rate);
}

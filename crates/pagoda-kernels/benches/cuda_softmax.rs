//! CUDA row softmax, f16, on the shapes of shared/BENCH.md (rows x cols): 131072 x 4096,
//! 4096 x 32000 and 256 x 128256, beside a device-to-device copy, the ceiling for an op that must
//! read its input once and write its output once.
//!
//! Throughput is those bytes (read + write) per second. Each criterion sample times many calls
//! between two device synchronisations. After criterion's report a summary prints, per shape, the
//! median time per call, GB/s (10^9 bytes) and the fraction of the copy bandwidth measured in the
//! same run, and the form `softmax_rows` chose; then every form of the kernel that can take the
//! shape (`candidate_forms`: one block or a cluster of 2, 4 or 8 blocks per row holding 8 to 64
//! values per thread, the online form, and on Hopper the streamed form with 1 to 8 blocks per
//! row, 2 to 6 stages and 256 to 1024 threads) runs through `softmax_rows_with`, checked against
//! `softmax_rows`' output and timed, to show which form suits which row length; the logits shape
//! also in f32 and bf16. Each shape ends with the fastest form of each kind (held by one block,
//! held by a cluster, online, streamed) and the form `softmax_rows` takes.

mod common;

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput};
use half::f16;
use pagoda_kernels::cuda;
use pagoda_tensor::cudarc::driver::CudaSlice;
use pagoda_tensor::{CudaDevice, DType, Device, Tensor};

use common::{median_seconds, time_gpu};

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

/// [`logits`] in `dtype` (the same values: f16's are exact in f32 and, at these magnitudes, in
/// bf16 to its precision).
fn logits_in(rows: usize, cols: usize, dtype: DType, device: &CudaDevice) -> Tensor {
    logits(rows, cols, device)
        .to_dtype(dtype)
        .expect("converting benchmark logits")
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
        "{:>18} {:>10} {:>10} {:>8}  form",
        "rows x cols", "ms", "GB/s", "of copy"
    );
    println!(
        "{:>18} {:>10.3} {:>10.0} {:>8}",
        "copy 1 GiB",
        copy_seconds * 1e3,
        copy_rate,
        "100%"
    );
    let clusters = cuda::softmax::clusters_available(device).expect("compute capability");
    for (rows, cols) in SHAPES {
        let x = logits(rows, cols, device);
        let seconds = median_seconds(device, RUNS, 10, || {
            drop(cuda::softmax::softmax_rows(&x).expect("softmax"))
        });
        let rate = (2 * rows * cols * 2) as f64 / seconds / 1e9;
        println!(
            "{:>18} {:>10.3} {:>10.0} {:>7.1}%  {:?}",
            format!("{rows}x{cols}"),
            seconds * 1e3,
            rate,
            100.0 * rate / copy_rate,
            cuda::softmax::choose_form(cols, DType::F16, clusters)
        );
    }
    copy_rate
}

/// The logits shape of BENCH.md again in f32 and bf16, whose forms are not the f16 ones: f32 rows
/// take twice the registers, and the forms that hold 64 f32 or bf16 values per thread spill.
const OTHER_DTYPE_SHAPES: [(usize, usize); 1] = [(256, 128_256)];

/// Times every form on every shape (f16), and on [`OTHER_DTYPE_SHAPES`] in f32 and bf16, and
/// checks each one's output against `softmax_rows`'.
fn sweep(device: &CudaDevice, copy_rate: f64) {
    for (rows, cols) in SHAPES {
        sweep_shape(device, copy_rate, rows, cols, DType::F16);
    }
    for dtype in [DType::F32, DType::BF16] {
        for (rows, cols) in OTHER_DTYPE_SHAPES {
            sweep_shape(device, copy_rate, rows, cols, dtype);
        }
    }
}

fn sweep_shape(device: &CudaDevice, copy_rate: f64, rows: usize, cols: usize, dtype: DType) {
    const RUNS: usize = 11;
    /// Rows compared per shape: enough to cover every block of a wave, cheap to download.
    const CHECKED_ELEMENTS: usize = 1 << 22;
    println!("\nevery form that can hold {rows}x{cols} {dtype}, through softmax_rows_with");
    println!(
        "{:>12} {:>52} {:>10} {:>10} {:>8} {:>10}",
        "rows x cols", "form", "ms", "GB/s", "of copy", "check"
    );
    let clusters = cuda::softmax::clusters_available(device).expect("compute capability");
    let bytes = 2 * rows * cols * dtype.size_in_bytes();
    // The fastest checked form of each kind: (kind, form, seconds).
    let mut best: Vec<(&str, cuda::softmax::SoftmaxForm, f64)> = Vec::new();
    let x = logits_in(rows, cols, dtype, device);
    let checked_rows = (CHECKED_ELEMENTS / cols).clamp(1, rows);
    let reference = cuda::softmax::softmax_rows(&x)
        .and_then(|y| Ok(y.narrow(0, 0, checked_rows)?.to_vec_f32()?))
        .expect("the reference softmax");
    let reference_max = reference.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    for form in cuda::softmax::candidate_forms(cols, dtype, clusters) {
        let run = || cuda::softmax::softmax_rows_with(&x, form).expect("softmax");
        let seconds = median_seconds(device, RUNS, 10, || drop(run()));
        let output = run()
            .narrow(0, 0, checked_rows)
            .and_then(|y| y.to_vec_f32())
            .expect("downloading an output");
        let worst = output
            .iter()
            .zip(&reference)
            .map(|(y, r)| (y - r).abs())
            .fold(
                0.0f32,
                |m, d| if d.is_nan() { f32::INFINITY } else { m.max(d) },
            );
        let check = if worst <= 1e-2 * reference_max {
            "ok"
        } else {
            "MISMATCH"
        };
        let rate = bytes as f64 / seconds / 1e9;
        println!(
            "{:>12} {:>52} {:>10.3} {:>10.0} {:>7.1}% {:>10}",
            format!("{rows}x{cols}"),
            format!("{form:?}"),
            seconds * 1e3,
            rate,
            100.0 * rate / copy_rate,
            check
        );
        let kind = match form {
            cuda::softmax::SoftmaxForm::Held { blocks: 1, .. } => "held, one block",
            cuda::softmax::SoftmaxForm::Held { .. } => "held, cluster",
            cuda::softmax::SoftmaxForm::Online { .. } => "online",
            cuda::softmax::SoftmaxForm::Streamed { .. } => "streamed",
        };
        if check != "ok" {
            continue;
        }
        match best.iter_mut().find(|(k, ..)| *k == kind) {
            Some(entry) if entry.2 > seconds => *entry = (kind, form, seconds),
            Some(_) => {}
            None => best.push((kind, form, seconds)),
        }
    }
    println!(
        "  fastest of each kind at {rows}x{cols} {dtype} (softmax_rows takes {:?}):",
        cuda::softmax::choose_form(cols, dtype, clusters)
    );
    for (kind, form, seconds) in best {
        let rate = bytes as f64 / seconds / 1e9;
        println!(
            "  {:>16} {:>52} {:>10.3} {:>10.0} {:>7.1}%",
            kind,
            format!("{form:?}"),
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
    let copy_rate = summary(&device, &mut copies);
    sweep(&device, copy_rate);
}

//! The decode-time linear layers (one and four rows of activations) of Llama-3.2-3B and
//! Pythia-2.8B in f16, through `cuda::gemm::linear`, beside a device-to-device copy: a product
//! that reads its weights once can at best read them at the copy's rate.
//!
//! Throughput is the weight bytes per second. Every shape rotates over enough copies of its
//! weights that together they exceed the 50 MB L2, so each call reads DRAM as a decode step does.
//! After criterion's report a summary prints, per shape, the median time per call, GB/s
//! (10^9 bytes of weights) and the fraction of the copy bandwidth (read + write) measured in the
//! same run; then every form of `kernels/gemv.cu` is launched directly with its own geometry,
//! checked against `linear`'s output and timed side by side.

mod common;

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput};
use half::f16;
use pagoda_kernels::cuda;
use pagoda_kernels::cuda::registry::{KernelModule, function};
use pagoda_tensor::cudarc::driver::{LaunchConfig, PushKernelArg};
use pagoda_tensor::{CudaDevice, CudaStorage, DType, Tensor};

use common::{device_slice, median_seconds, seeded_f16, time_gpu};

/// (k, n) of the weight matrices `[n, k]`: Llama-3.2-3B's q/o, k/v, gate/up, down and lm-head
/// projections, then Pythia-2.8B's attention and MLP ones.
const SHAPES: [(usize, usize); 8] = [
    (3072, 3072),
    (3072, 1024),
    (3072, 8192),
    (8192, 3072),
    (2560, 2560),
    (2560, 10_240),
    (10_240, 2560),
    (3072, 128_256),
];
const ROWS: [usize; 2] = [1, 4];
/// The weight copies of one shape together cover at least this many bytes, several times L2.
const ROTATION_BYTES: usize = 200 << 20;
/// Bytes of the copy that measures the ceiling: large enough that L2 plays no part.
const COPY_BYTES: usize = 1 << 30;

/// One shape's weights, in as many copies as the rotation needs, and its activations.
struct Layer {
    k: usize,
    n: usize,
    weights: Vec<Tensor>,
    next: usize,
}

impl Layer {
    fn new(k: usize, n: usize, device: &CudaDevice) -> Layer {
        let copies = ROTATION_BYTES.div_ceil(Layer::bytes_of(k, n)).max(2);
        let weights = (0..copies as u64)
            .map(|c| seeded_f16(&[n, k], c, device))
            .collect();
        Layer {
            k,
            n,
            weights,
            next: 0,
        }
    }

    fn bytes_of(k: usize, n: usize) -> usize {
        k * n * 2
    }

    fn bytes(&self) -> usize {
        Layer::bytes_of(self.k, self.n)
    }

    /// The next weight copy of the rotation.
    fn weight(&mut self) -> &Tensor {
        self.next = (self.next + 1) % self.weights.len();
        &self.weights[self.next]
    }

    fn name(&self, m: usize) -> String {
        format!("m{m} {}x{}", self.k, self.n)
    }
}

fn bench(c: &mut Criterion, device: &CudaDevice, layers: &mut [Layer], inputs: &[Tensor]) {
    let mut group = c.benchmark_group("cuda_gemv_f16");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    for layer in layers.iter_mut() {
        group.throughput(Throughput::Bytes(layer.bytes() as u64));
        for (&m, x) in ROWS.iter().zip(inputs_for(inputs, layer.k)) {
            group.bench_function(BenchmarkId::new("linear", layer.name(m)), |b| {
                b.iter_custom(|iters| {
                    time_gpu(device, iters, || {
                        let w = layer.weight();
                        drop(black_box(cuda::gemm::linear(x, w, None).expect("linear")))
                    })
                })
            });
        }
    }
    group.finish();
}

/// The activations `[m, k]` for each of [`ROWS`], taken from `inputs` (k-major order).
fn inputs_for(inputs: &[Tensor], k: usize) -> impl Iterator<Item = &Tensor> {
    inputs.iter().filter(move |x| x.dims().last() == Some(&k))
}

fn activations(device: &CudaDevice) -> Vec<Tensor> {
    let mut ks: Vec<usize> = SHAPES.iter().map(|&(k, _)| k).collect();
    ks.sort_unstable();
    ks.dedup();
    ks.iter()
        .flat_map(|&k| ROWS.map(|m| seeded_f16(&[m, k], 1000 + m as u64, device)))
        .collect()
}

/// One way to run a product: a kernel of gemv.cu with its launch geometry.
struct Form {
    kernel: &'static str,
    /// Output columns per block, or per warp for the warp-per-row kernel.
    rows: usize,
    threads: u32,
    per_warp: bool,
}

const FORMS: [Form; 3] = [
    Form {
        kernel: "gemv",
        rows: 2,
        threads: 256,
        per_warp: true,
    },
    Form {
        kernel: "gemv_split",
        rows: 2,
        threads: 128,
        per_warp: false,
    },
    Form {
        kernel: "gemv_split",
        rows: 2,
        threads: 256,
        per_warp: false,
    },
];

fn launch_form(device: &CudaDevice, form: &Form, x: &Tensor, w: &Tensor, y: &mut CudaStorage) {
    let name = format!("{}_f16", form.kernel);
    let kernel = function(device, KernelModule::Gemv, &name).expect("loading a gemv kernel");
    let (m, k) = (x.dims()[0], x.dims()[1]);
    let n = w.dims()[0];
    let per_block = if form.per_warp {
        form.rows * form.threads as usize / 32
    } else {
        form.rows
    };
    let config = LaunchConfig {
        grid_dim: (n.div_ceil(per_block) as u32, 1, 1),
        block_dim: (form.threads, 1, 1),
        shared_mem_bytes: 0,
    };
    let (m, n, k, no_bias) = (m as u32, n as u32, k as u32, 0i32);
    // The split form's epilogue: no addend (null), identity activation.
    let (no_addend, identity) = (0u64, 0i32);
    let stream = device.stream();
    let mut launch = stream.launch_builder(&kernel);
    launch
        .arg(device_slice(x))
        .arg(device_slice(w))
        .arg(device_slice(x))
        .arg(&no_bias);
    // No second product (k2 = 0: x2, w2 and bias2 are unread, x and w stand in for them).
    let no_second_k = 0u32;
    if !form.per_warp {
        launch
            .arg(device_slice(x))
            .arg(device_slice(w))
            .arg(device_slice(x))
            .arg(&no_bias)
            .arg(&no_second_k)
            .arg(&no_addend)
            .arg(&identity);
    }
    launch.arg(y.slice_mut()).arg(&m).arg(&n).arg(&k);
    // SAFETY: (x, w, bias, bias_kind, out, m, n, k) is gemv's signature and gemv_split's has
    // (x2, w2, bias2, bias2_kind, k2, addend, act) after bias_kind; x holds m x k, w n x k and y m x n f16 values, the bias is
    // unread with bias_kind 0, the addend null, and the grid covers the n columns at the form's
    // rows per block (or per warp) with at most 256 threads.
    unsafe { launch.launch(config) }.unwrap_or_else(|e| panic!("launching {name}: {e}"));
}

/// Prints `linear` against the copy, then every form side by side.
fn summary(device: &CudaDevice, layers: &mut [Layer], inputs: &[Tensor]) {
    const RUNS: usize = 11;
    let copy_rate = cuda::memory::copy_bandwidth(device, COPY_BYTES, RUNS).expect("copy") / 1e9;
    println!("\nlinear f16 (median of {RUNS} samples of 20 calls; bytes = weights read)");
    println!("device-to-device copy: {copy_rate:.0} GB/s (read + write)");
    println!(
        "{:>18} {:>10} {:>10} {:>8}",
        "m k x n", "us", "GB/s", "of copy"
    );
    for layer in layers.iter_mut() {
        for (&m, x) in ROWS.iter().zip(inputs_for(inputs, layer.k)) {
            let seconds = median_seconds(device, RUNS, 20, || {
                let w = layer.weight();
                drop(cuda::gemm::linear(x, w, None).expect("linear"))
            });
            let rate = layer.bytes() as f64 / seconds / 1e9;
            println!(
                "{:>18} {:>10.2} {:>10.0} {:>7.1}%",
                layer.name(m),
                seconds * 1e6,
                rate,
                100.0 * rate / copy_rate
            );
        }
    }

    println!("\nevery form, launched directly into a preallocated output");
    println!(
        "{:>18} {:>20} {:>8} {:>10} {:>10} {:>8} {:>9}",
        "m k x n", "kernel", "threads", "us", "GB/s", "of copy", "check"
    );
    for layer in layers.iter_mut() {
        for (&m, x) in ROWS.iter().zip(inputs_for(inputs, layer.k)) {
            let reference = cuda::gemm::linear(x, &layer.weights[0], None)
                .and_then(|y| Ok(y.to_vec_f32()?))
                .expect("the reference product");
            let reference_max = reference.iter().fold(0.0f32, |a, v| a.max(v.abs()));
            for form in &FORMS {
                let mut y = CudaStorage::zeros(device, DType::F16, m * layer.n)
                    .expect("allocating an output");
                launch_form(device, form, x, &layer.weights[0], &mut y);
                let bytes = y.to_host_bytes(0..m * layer.n).expect("downloading");
                let worst = bytes
                    .chunks_exact(2)
                    .zip(&reference)
                    .map(|(b, r)| (f16::from_le_bytes([b[0], b[1]]).to_f32() - r).abs())
                    .fold(
                        0.0f32,
                        |a, d| if d.is_nan() { f32::INFINITY } else { a.max(d) },
                    );
                let check = if worst <= 1e-2 * reference_max {
                    "ok"
                } else {
                    "MISMATCH"
                };
                let seconds = median_seconds(device, RUNS, 20, || {
                    let w = layer.weight();
                    launch_form(device, form, x, w, &mut y)
                });
                let rate = layer.bytes() as f64 / seconds / 1e9;
                println!(
                    "{:>18} {:>20} {:>8} {:>10.2} {:>10.0} {:>7.1}% {:>9}",
                    layer.name(m),
                    form.kernel,
                    form.threads,
                    seconds * 1e6,
                    rate,
                    100.0 * rate / copy_rate,
                    check
                );
            }
        }
    }
}

fn main() {
    let Ok(device) = CudaDevice::get(0) else {
        eprintln!("cuda_gemv: skipped: no GPU");
        return;
    };
    let inputs = activations(&device);
    let mut layers: Vec<Layer> = SHAPES
        .iter()
        .map(|&(k, n)| Layer::new(k, n, &device))
        .collect();
    let mut criterion = Criterion::default().configure_from_args();
    bench(&mut criterion, &device, &mut layers, &inputs);
    criterion.final_summary();
    summary(&device, &mut layers, &inputs);
}

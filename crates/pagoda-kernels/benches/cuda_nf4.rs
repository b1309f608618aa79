//! NF4 weight products (`cuda::nf4::linear`) on the Llama-3.2-3B layer shapes of shared/BENCH.md -
//! fused q/k/v (k 3072, n 5120), fused gate/up (3072, 16384), down (8192, 3072) and o (3072,
//! 3072) - at m = 1, 4, 16 and 64 rows of f16 activations, beside the f16 products of the same
//! shapes and a device-to-device copy.
//!
//! Throughput is the bytes of the NF4 tensor (packed codes plus double-quantized scales), which a
//! product reads once. Every shape rotates over enough copies of its weights that together they
//! exceed the L2 cache, so each call reads DRAM as a decode step does. After criterion's report a
//! summary times each product inside a recorded CUDA graph of 20 calls (how decode steps run,
//! without the host's launch time) and prints, per shape and m: NF4 time, GB/s and fraction of
//! the copy bandwidth (read + write) measured in the same run; the f16 `linear` (pagoda's
//! skinny kernel up to 8 rows, cuBLAS above) and cuBLAS itself (strided-batched, batch 1) on f16
//! weights of the same shape, and their time over NF4's; and at 16 and 64 rows the other way to
//! run NF4, decoding the weights to f16 and calling cuBLAS. Each row is also one JSON line
//! (`{"bench": "pagoda_nf4", ...}`) for benches/peers/nf4_matmul.py to compare with
//! bitsandbytes.
//!
//! With `PAGODA_NF4_PROFILE=1` the bench instead launches every shape and m three times and
//! nothing else, announcing each as a JSON line (`{"profile": i, ...}`), for a profiler to time
//! the kernels alone (`ncu --clock-control none --csv --metrics gpu__time_duration.sum
//! -k regex:nf4_linear`, then `benches/peers/nf4_matmul.py --ncu`).

mod common;

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput};
use pagoda_kernels::cpu::nf4;
use pagoda_kernels::cuda;
use pagoda_kernels::cuda::nf4::CudaNf4;
use pagoda_kernels::ops::Epilogue;
use pagoda_tensor::{CudaDevice, DType, Tensor};

use common::{median_seconds, seeded_f16, time_gpu};

/// (k, n) of the weight matrices `[n, k]`.
const SHAPES: [(usize, usize, &str); 4] = [
    (3072, 5120, "q/k/v"),
    (3072, 16384, "gate/up"),
    (8192, 3072, "down"),
    (3072, 3072, "o"),
];
const ROWS: [usize; 4] = [1, 4, 16, 64];
/// The copies of one shape's weights together cover at least this many bytes, several times L2.
const ROTATION_BYTES: usize = 200 << 20;
/// Bytes of the copy that measures the ceiling.
const COPY_BYTES: usize = 1 << 30;
/// Calls per recorded graph, and samples per median.
const GRAPH_CALLS: usize = 20;
const RUNS: usize = 11;

/// One shape's weights: NF4 copies and f16 copies, rotated call by call.
struct Layer {
    k: usize,
    n: usize,
    role: &'static str,
    nf4: Vec<CudaNf4>,
    dense: Vec<Tensor>,
    next_nf4: usize,
    next_dense: usize,
}

impl Layer {
    fn new(k: usize, n: usize, role: &'static str, device: &CudaDevice) -> Layer {
        // Normal-looking weights (a sum of uniforms), quantized once and uploaded as often as
        // the rotation needs; the copies' contents need not differ to miss the cache.
        let values: Vec<f32> = (0..n * k)
            .map(|i| {
                let mut h = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                h ^= h >> 31;
                let a =
                    (h & 0xffff) as f32 + ((h >> 16) & 0xffff) as f32 + ((h >> 32) & 0xffff) as f32;
                (a / 65536.0 - 1.5) * 0.04
            })
            .collect();
        let blocks = nf4::quantize(&values, nf4::DEFAULT_BLOCK_SIZE, true).expect("quantizing");
        let nf4_copies = ROTATION_BYTES.div_ceil(blocks.storage_bytes()).max(2);
        let nf4 = (0..nf4_copies)
            .map(|_| CudaNf4::new(&blocks, device).expect("uploading NF4"))
            .collect();
        let dense_copies = ROTATION_BYTES.div_ceil(2 * n * k).max(2);
        let dense = (0..dense_copies as u64)
            .map(|c| seeded_f16(&[n, k], c, device))
            .collect();
        Layer {
            k,
            n,
            role,
            nf4,
            dense,
            next_nf4: 0,
            next_dense: 0,
        }
    }

    fn nf4_bytes(&self) -> usize {
        self.nf4[0].storage_bytes()
    }

    fn nf4(&mut self) -> &CudaNf4 {
        self.next_nf4 = (self.next_nf4 + 1) % self.nf4.len();
        &self.nf4[self.next_nf4]
    }

    fn dense(&mut self) -> &Tensor {
        self.next_dense = (self.next_dense + 1) % self.dense.len();
        &self.dense[self.next_dense]
    }

    fn name(&self, m: usize) -> String {
        format!("m{m} {}x{}", self.k, self.n)
    }

    /// One NF4 product of `x` with the next weight copy.
    fn nf4_linear(&mut self, x: &Tensor) -> pagoda_kernels::Result<Tensor> {
        let (k, n) = (self.k, self.n);
        let w = self.nf4();
        cuda::nf4::linear(x, w, k, 0..n, None, Epilogue::default())
    }
}

fn bench(c: &mut Criterion, device: &CudaDevice, layers: &mut [Layer], inputs: &[Tensor]) {
    let mut group = c.benchmark_group("cuda_nf4_f16");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_millis(600));
    for layer in layers.iter_mut() {
        group.throughput(Throughput::Bytes(layer.nf4_bytes() as u64));
        for x in inputs_for(inputs, layer.k) {
            let m = x.dims()[0];
            group.bench_function(BenchmarkId::new("nf4_linear", layer.name(m)), |b| {
                b.iter_custom(|iters| {
                    time_gpu(device, iters, || {
                        let out = layer.nf4_linear(x);
                        drop(black_box(out.expect("nf4_linear")))
                    })
                })
            });
        }
    }
    group.finish();
}

/// The activations `[m, k]` for each of [`ROWS`].
fn inputs_for(inputs: &[Tensor], k: usize) -> impl Iterator<Item = &Tensor> {
    inputs.iter().filter(move |x| x.dims().last() == Some(&k))
}

fn activations(device: &CudaDevice) -> Vec<Tensor> {
    let mut ks: Vec<usize> = SHAPES.iter().map(|&(k, _, _)| k).collect();
    ks.sort_unstable();
    ks.dedup();
    ks.iter()
        .flat_map(|&k| ROWS.map(|m| seeded_f16(&[m, k], 1000 + m as u64, device)))
        .collect()
}

/// Seconds per call of `call`, from a graph of [`GRAPH_CALLS`] recorded calls replayed
/// (median of [`RUNS`] samples of 5 replays), or timed eagerly when the calls cannot be recorded
/// (cuBLAS may refuse a capture); the flag says whether a graph was used.
fn seconds_per_call(
    device: &CudaDevice,
    mut call: impl FnMut() -> pagoda_kernels::Result<()>,
) -> (f64, bool) {
    // Warm-up: loads kernels and cuBLAS handles outside the capture.
    for _ in 0..3 {
        call().expect("warm-up call");
    }
    let recorded = device.capture(|| -> pagoda_kernels::Result<()> {
        for _ in 0..GRAPH_CALLS {
            call()?;
        }
        Ok(())
    });
    match recorded {
        Ok((graph, ())) => {
            let seconds = median_seconds(device, RUNS, 5, || graph.replay().expect("replay"));
            (seconds / GRAPH_CALLS as f64, true)
        }
        Err(_) => {
            let seconds = median_seconds(device, RUNS, GRAPH_CALLS as u64, || {
                call().expect("eager call")
            });
            (seconds, false)
        }
    }
}

/// Prints every product side by side, as a table and as JSON lines.
fn summary(device: &CudaDevice, layers: &mut [Layer], inputs: &[Tensor]) {
    let copy_rate = cuda::memory::copy_bandwidth(device, COPY_BYTES, RUNS).expect("copy") / 1e9;
    println!(
        "\nNF4 x f16 products (median of {RUNS} replays of a graph of {GRAPH_CALLS} calls; \
         bytes = packed codes + double-quantized scales)"
    );
    println!("device-to-device copy: {copy_rate:.0} GB/s (read + write)");
    println!(
        "{:>8} {:>16} {:>9} {:>8} {:>8} {:>11} {:>9} {:>9} {:>11} {:>10}",
        "role",
        "m k x n",
        "nf4 us",
        "GB/s",
        "of copy",
        "f16 lin us",
        "cuBLAS us",
        "cuBLAS/x",
        "decoded us",
        "graph"
    );
    for layer in layers.iter_mut() {
        for x in inputs_for(inputs, layer.k) {
            let m = x.dims()[0];
            let (nf4_s, nf4_graph) = seconds_per_call(device, || layer.nf4_linear(x).map(drop));
            let (dense_s, _) = seconds_per_call(device, || {
                let w = layer.dense();
                cuda::gemm::linear(x, w, None).map(drop)
            });
            let (k, n) = (layer.k, layer.n);
            let batched_x = x.reshape([1, m, k]).expect("x as a batch of one");
            let (cublas_s, cublas_graph) = seconds_per_call(device, || {
                // The f16 weight's memory as [1, k, n]: the same bytes, cuBLAS's plain layout.
                let w = layer.dense().reshape([1, k, n])?;
                cuda::gemm::matmul_strided_batched(&batched_x, &w).map(drop)
            });
            let decoded_s = (m >= 16).then(|| {
                seconds_per_call(device, || {
                    let dense = cuda::nf4::dequantize(layer.nf4(), 0, &[n, k], DType::F16)?;
                    cuda::gemm::linear(x, &dense, None).map(drop)
                })
                .0
            });
            let rate = layer.nf4_bytes() as f64 / nf4_s / 1e9;
            println!(
                "{:>8} {:>16} {:>9.2} {:>8.0} {:>7.1}% {:>11.2} {:>9.2} {:>8.2}x {:>11} {:>7}",
                layer.role,
                layer.name(m),
                nf4_s * 1e6,
                rate,
                100.0 * rate / copy_rate,
                dense_s * 1e6,
                cublas_s * 1e6,
                cublas_s / nf4_s,
                decoded_s.map_or("-".into(), |s| format!("{:.2}", s * 1e6)),
                if nf4_graph && cublas_graph {
                    "yes"
                } else {
                    "partly"
                }
            );
            println!(
                "{{\"bench\": \"pagoda_nf4\", \"k\": {k}, \"n\": {n}, \"m\": {m}, \"nf4_us\": {:.3}, \
                 \"nf4_bytes\": {}, \"nf4_gbps\": {rate:.1}, \"copy_gbps\": {copy_rate:.1}, \
                 \"f16_linear_us\": {:.3}, \"cublas_us\": {:.3}, \
                 \"decoded_us\": {}, \"graphs\": {}}}",
                nf4_s * 1e6,
                layer.nf4_bytes(),
                dense_s * 1e6,
                cublas_s * 1e6,
                decoded_s.map_or("null".into(), |s| format!("{:.3}", s * 1e6)),
                nf4_graph && cublas_graph
            );
        }
    }
}

/// Three launches of every shape and m, each group announced on stdout, for a profiler.
fn profile(device: &CudaDevice, layers: &mut [Layer], inputs: &[Tensor]) {
    let mut index = 0;
    for layer in layers.iter_mut() {
        for x in inputs_for(inputs, layer.k) {
            let m = x.dims()[0];
            println!(
                "{{\"profile\": {index}, \"k\": {}, \"n\": {}, \"m\": {m}, \"nf4_bytes\": {}, \
                 \"launches\": 3}}",
                layer.k,
                layer.n,
                layer.nf4_bytes()
            );
            for _ in 0..3 {
                drop(layer.nf4_linear(x).expect("nf4_linear"));
            }
            device.synchronize().expect("synchronising");
            index += 1;
        }
    }
}

fn main() {
    let Ok(device) = CudaDevice::get(0) else {
        eprintln!("cuda_nf4: skipped: no GPU");
        return;
    };
    let inputs = activations(&device);
    let mut layers: Vec<Layer> = SHAPES
        .iter()
        .map(|&(k, n, role)| Layer::new(k, n, role, &device))
        .collect();
    if std::env::var("PAGODA_NF4_PROFILE").is_ok_and(|v| v == "1") {
        profile(&device, &mut layers, &inputs);
        return;
    }
    let mut criterion = Criterion::default().configure_from_args();
    bench(&mut criterion, &device, &mut layers, &inputs);
    criterion.final_summary();
    summary(&device, &mut layers, &inputs);
}

//! NF4 weight products (`cuda::nf4::linear`) on the Llama-3.2-3B layer shapes of shared/BENCH.md -
//! fused q/k/v (k 3072, n 5120), fused gate/up (3072, 16384), down (8192, 3072) and o (3072,
//! 3072) - at m = 1, 4, 16 and 64 rows of f16 and bf16 activations, beside the f16 products of
//! the same shapes and a device-to-device copy.
//!
//! Throughput is the bytes of the NF4 tensor (packed codes plus double-quantized scales), which a
//! product reads once. Every shape rotates over enough copies of its weights that together they
//! exceed the L2 cache, so each call reads DRAM as a decode step does. After criterion's report a
//! summary times each product inside a recorded CUDA graph of 20 calls (how decode steps run,
//! without the host's launch time), between device events, and prints per shape, m and x dtype:
//! the NF4 time with each call allocating its output (stream-ordered, as `linear` does) and
//! into outputs allocated beforehand (`linear_into`: the kernel alone), GB/s and fraction of the
//! copy bandwidth (read + write) measured in the same run; the f16 `linear` (pagoda's skinny
//! kernel up to 8 rows, cuBLAS above) and cuBLAS itself (strided-batched, batch 1, allocating;
//! and `cublasGemmEx` into a kept output) on f16 weights of the same shape, and their time over
//! NF4's; and at 16 and 64 rows the other way to run NF4, decoding the weights to f16 and calling
//! cuBLAS. Each row is also one JSON line (`{"bench": "pagoda_nf4", ...}` for f16 x) for
//! benches/peers/nf4_matmul.py to compare with bitsandbytes. `PAGODA_NF4_ROWS` (comma-separated)
//! limits the summary to those row counts.
//!
//! With `PAGODA_NF4_PROFILE=1` the bench instead launches every shape and m three times and
//! nothing else, announcing each as a JSON line (`{"profile": i, ...}`), for a profiler to time
//! the kernels alone (`ncu --clock-control none --csv --metrics gpu__time_duration.sum
//! -k regex:nf4_`, then `benches/peers/nf4_matmul.py --ncu`).

mod common;

use std::ffi::c_void;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput};
use pagoda_kernels::cpu::nf4;
use pagoda_kernels::cuda;
use pagoda_kernels::cuda::nf4::CudaNf4;
use pagoda_kernels::ops::Epilogue;
use pagoda_tensor::cudarc::cublas::{CudaBlas, result as cublas, sys as cublas_sys};
use pagoda_tensor::cudarc::driver::sys::CUevent_flags;
use pagoda_tensor::cudarc::driver::{DevicePtr, DevicePtrMut};
use pagoda_tensor::{CudaDevice, DType, Device, Storage, Tensor};

use common::{seeded_f16, time_gpu};

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
/// Graph replays per timed sample.
const REPLAYS: usize = 10;

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

    /// One NF4 product of `x` with the next weight copy into `out`, allocated by the caller.
    fn nf4_linear_into(&mut self, x: &Tensor, out: &mut Tensor) -> pagoda_kernels::Result<()> {
        let (k, n) = (self.k, self.n);
        let w = self.nf4();
        cuda::nf4::linear_into(x, w, k, 0..n, None, Epilogue::default(), out)
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
/// [`REPLAYS`] times between two device events (median of [`RUNS`] samples), or timed eagerly
/// when the calls cannot be recorded (cuBLAS may refuse a capture); the flag says whether a
/// graph was used.
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
            let seconds = event_seconds(device, REPLAYS, || graph.replay().expect("replay"));
            (seconds / GRAPH_CALLS as f64, true)
        }
        Err(_) => {
            let seconds = event_seconds(device, REPLAYS * GRAPH_CALLS, || {
                call().expect("eager call")
            });
            (seconds, false)
        }
    }
}

/// The median over [`RUNS`] samples of the device time per `f` (each sample `times` calls of
/// `f` between two events), after one warm-up sample.
fn event_seconds(device: &CudaDevice, times: usize, mut f: impl FnMut()) -> f64 {
    let stream = device.stream();
    let timing = Some(CUevent_flags::CU_EVENT_DEFAULT);
    let mut samples: Vec<f64> = (0..=RUNS)
        .map(|_| {
            let start = stream.record_event(timing).expect("recording an event");
            for _ in 0..times {
                f();
            }
            let end = stream.record_event(timing).expect("recording an event");
            f64::from(start.elapsed_ms(&end).expect("timing events")) * 1e-3 / times as f64
        })
        .skip(1)
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// A cuBLAS f16 product `out [m, n] = x [m, k] · w [n, k]ᵀ` into a kept output, with f32
/// accumulation: the library's kernel alone, without the output's allocation.
struct CublasInto {
    blas: CudaBlas,
}

impl CublasInto {
    fn new(device: &CudaDevice) -> CublasInto {
        CublasInto {
            blas: CudaBlas::new(Arc::clone(device.stream())).expect("a cuBLAS handle"),
        }
    }

    fn linear(&self, device: &CudaDevice, x: &Tensor, w: &Tensor, out: &mut Tensor) {
        let (m, k) = (x.dims()[0], x.dims()[1]);
        let n = w.dims()[0];
        let stream = device.stream();
        let (alpha, beta) = (1.0f32, 0.0f32);
        let (x_ptr, _x_sync) = common::device_slice(x).device_ptr(stream);
        let (w_ptr, _w_sync) = common::device_slice(w).device_ptr(stream);
        let Storage::Cuda(out_storage) = out.storage_mut().expect("a kept output") else {
            panic!("the output is not on a GPU")
        };
        let (out_ptr, _out_sync) = out_storage.slice_mut().device_ptr_mut(stream);
        let dim = |v: usize| i32::try_from(v).expect("a cuBLAS dimension");
        // Column-major: outᵀ [n, m] = (w as col-major [k, n])ᵀ · (x as col-major [k, m]).
        // SAFETY: x, w and out hold m x k, n x k and m x n f16 values; alpha and beta are host
        // f32 values, as CUBLAS_COMPUTE_32F takes them.
        unsafe {
            cublas::gemm_ex(
                *self.blas.handle(),
                cublas_sys::cublasOperation_t::CUBLAS_OP_T,
                cublas_sys::cublasOperation_t::CUBLAS_OP_N,
                dim(n),
                dim(m),
                dim(k),
                (&alpha as *const f32).cast::<c_void>(),
                w_ptr as *const c_void,
                cublas_sys::cudaDataType::CUDA_R_16F,
                dim(k),
                x_ptr as *const c_void,
                cublas_sys::cudaDataType::CUDA_R_16F,
                dim(k),
                (&beta as *const f32).cast::<c_void>(),
                out_ptr as *mut c_void,
                cublas_sys::cudaDataType::CUDA_R_16F,
                dim(n),
                cublas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .expect("cublasGemmEx");
    }
}

/// The row counts the summary runs: `PAGODA_NF4_ROWS` (comma-separated), else [`ROWS`].
fn row_counts() -> Vec<usize> {
    std::env::var("PAGODA_NF4_ROWS").map_or_else(
        |_| ROWS.to_vec(),
        |list| {
            list.split(',')
                .map(|m| m.parse().expect("a row count"))
                .collect()
        },
    )
}

/// Prints every product side by side, as a table and as JSON lines.
fn summary(device: &CudaDevice, layers: &mut [Layer], inputs: &[Tensor]) {
    let copy_rate = cuda::memory::copy_bandwidth(device, COPY_BYTES, RUNS).expect("copy") / 1e9;
    let blas = CublasInto::new(device);
    let cuda_device = Device::Cuda(device.ordinal());
    println!(
        "\nNF4 products, us per call: median of {RUNS} samples of {REPLAYS} replays of a graph of \
         {GRAPH_CALLS} calls between device events. 'alloc': each call allocates its output \
         (stream-ordered, inside the graph); 'kernel': outputs allocated before the capture. \
         Bytes = packed codes + double-quantized scales; % of the copy bandwidth."
    );
    println!("device-to-device copy: {copy_rate:.0} GB/s (read + write)");
    println!(
        "{:>8} {:>15} {:>5} {:>9} {:>9} {:>7} {:>7} {:>7} {:>10} {:>9} {:>9} {:>8} {:>8} {:>10}",
        "role",
        "m k x n",
        "x",
        "alloc us",
        "kernel us",
        "GB/s",
        "%copy",
        "%c allc",
        "f16 lin us",
        "cuBLAS us",
        "cuBLAS k",
        "cB/nf4",
        "cBk/nf4k",
        "decoded us"
    );
    for layer in layers.iter_mut() {
        let (k, n) = (layer.k, layer.n);
        for m in row_counts() {
            let Some(x16) = inputs_for(inputs, k).find(|x| x.dims()[0] == m).cloned() else {
                continue;
            };
            let x_bf16 = x16.to_dtype(DType::BF16).expect("x in bf16");
            // The f16 references: our `linear` and cuBLAS with their outputs allocated per
            // call, and cuBLAS into a kept output.
            let (dense_s, _) = seconds_per_call(device, || {
                let w = layer.dense();
                cuda::gemm::linear(&x16, w, None).map(drop)
            });
            let batched_x = x16.reshape([1, m, k]).expect("x as a batch of one");
            let (cublas_s, cublas_graph) = seconds_per_call(device, || {
                // The f16 weight's memory as [1, k, n]: the same bytes, cuBLAS's plain layout.
                let w = layer.dense().reshape([1, k, n])?;
                cuda::gemm::matmul_strided_batched(&batched_x, &w).map(drop)
            });
            let decoded_s = (m >= 16).then(|| {
                seconds_per_call(device, || {
                    let dense = cuda::nf4::dequantize(layer.nf4(), 0, &[n, k], DType::F16)?;
                    cuda::gemm::linear(&x16, &dense, None).map(drop)
                })
                .0
            });
            let mut dense_out = Tensor::zeros([m, n], DType::F16, &cuda_device).expect("an output");
            let (cublas_kernel_s, cublas_kernel_graph) = seconds_per_call(device, || {
                let w = layer.dense().clone();
                blas.linear(device, &x16, &w, &mut dense_out);
                Ok(())
            });
            for x in [&x16, &x_bf16] {
                let dtype = x.dtype();
                let (alloc_s, alloc_graph) =
                    seconds_per_call(device, || layer.nf4_linear(x).map(drop));
                let mut out = Tensor::zeros([m, n], dtype, &cuda_device).expect("an output");
                let (kernel_s, _) = seconds_per_call(device, || layer.nf4_linear_into(x, &mut out));
                let bytes = layer.nf4_bytes() as f64;
                let (rate, alloc_rate) = (bytes / kernel_s / 1e9, bytes / alloc_s / 1e9);
                println!(
                    "{:>8} {:>15} {:>5} {:>9.2} {:>9.2} {:>7.0} {:>6.1}% {:>6.1}% {:>10.2} {:>9.2} \
                     {:>9.2} {:>7.2}x {:>7.2}x {:>10}{}",
                    layer.role,
                    layer.name(m),
                    format!("{dtype}"),
                    alloc_s * 1e6,
                    kernel_s * 1e6,
                    rate,
                    100.0 * rate / copy_rate,
                    100.0 * alloc_rate / copy_rate,
                    dense_s * 1e6,
                    cublas_s * 1e6,
                    cublas_kernel_s * 1e6,
                    cublas_s / alloc_s,
                    cublas_kernel_s / kernel_s,
                    decoded_s.map_or("-".into(), |s| format!("{:.2}", s * 1e6)),
                    if alloc_graph && cublas_graph && cublas_kernel_graph {
                        ""
                    } else {
                        " (not all graphs)"
                    }
                );
                // f16 rows keep the fields benches/peers/nf4_matmul.py reads.
                let tag = if dtype == DType::F16 {
                    "pagoda_nf4"
                } else {
                    "pagoda_nf4_bf16"
                };
                println!(
                    "{{\"bench\": \"{tag}\", \"k\": {k}, \"n\": {n}, \"m\": {m}, \
                     \"dtype\": \"{dtype}\", \"nf4_us\": {:.3}, \"nf4_kernel_us\": {:.3}, \
                     \"nf4_bytes\": {}, \"nf4_gbps\": {alloc_rate:.1}, \
                     \"nf4_kernel_gbps\": {rate:.1}, \"copy_gbps\": {copy_rate:.1}, \
                     \"f16_linear_us\": {:.3}, \"cublas_us\": {:.3}, \
                     \"cublas_kernel_us\": {:.3}, \"decoded_us\": {}, \"graphs\": {}}}",
                    alloc_s * 1e6,
                    kernel_s * 1e6,
                    layer.nf4_bytes(),
                    dense_s * 1e6,
                    cublas_s * 1e6,
                    cublas_kernel_s * 1e6,
                    decoded_s.map_or("null".into(), |s| format!("{:.3}", s * 1e6)),
                    alloc_graph && cublas_graph && cublas_kernel_graph
                );
            }
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

//! Flash-attention prefill, f16, on the shapes of shared/BENCH.md: B4 H32 S4096 D128 causal and
//! non-causal, B4 H32 S4096 D80 causal (Pythia) and B1 H32 S16384 D128 causal, K/V in pages of 16
//! tokens whose ids are shuffled (every sequence's table scattered and non-monotonic).
//!
//! Throughput is in floating-point operations: 4 * B * H * S^2 * D for the two products of
//! attention, half of that when causal (the convention of the FlashAttention papers and of
//! benches/peers/attention_prefill.py, which measures PyTorch SDPA's flash and cuDNN backends on
//! the same shapes). After criterion's report a summary prints, per shape, the median time per
//! call and TFLOP/s, also as one JSON line each (`{"bench": "pagoda_flash", ...}`) for the peer
//! script to compare, and every compiled tile shape of the head dimension, each checked against
//! the default shape's output; the other head dimensions (64, 96, 256) join that comparison.
//!
//! `PAGODA_FLASH_MMA_SYNC=1` leaves the warpgroup-MMA (sm_90a) shapes out, defaults included, as
//! on a GPU without them: the bench of the `mma.sync` kernel alone. `PAGODA_FLASH_SWEEP=short`
//! narrows the comparison to the BENCH.md shapes and, beside each default, the `mma.sync`
//! kernel's default (the kernel before wgmma), for a quick confirmation run.

mod common;

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput};
use pagoda_kernels::cpu::attention::AttentionParams;
use pagoda_kernels::cuda::flash_attention::{
    TILE_SHAPES, TileShape, default_tile_shape, flash_attention_prefill,
    flash_attention_prefill_with, sm90a_available,
};
use pagoda_kernels::cuda::paged_attention::DeviceBatchLayout;
use pagoda_tensor::{CudaDevice, Tensor};

use common::{median_seconds, scattered_block_ids, seeded_f16, time_gpu};

/// A BENCH.md prefill shape: `batch` sequences of `seq_len` tokens, `heads` heads of `head_dim`.
#[derive(Clone, Copy, Debug)]
struct Shape {
    batch: usize,
    heads: usize,
    seq_len: usize,
    head_dim: usize,
    causal: bool,
}

impl Shape {
    fn flops(&self) -> f64 {
        let full =
            4.0 * (self.batch * self.heads * self.head_dim) as f64 * (self.seq_len as f64).powi(2);
        if self.causal { full / 2.0 } else { full }
    }

    fn label(&self) -> String {
        format!(
            "B{} H{} S{} D{} {}",
            self.batch,
            self.heads,
            self.seq_len,
            self.head_dim,
            if self.causal { "causal" } else { "full" }
        )
    }
}

const SHAPES: [Shape; 4] = [
    Shape {
        batch: 4,
        heads: 32,
        seq_len: 4096,
        head_dim: 128,
        causal: true,
    },
    Shape {
        batch: 4,
        heads: 32,
        seq_len: 4096,
        head_dim: 128,
        causal: false,
    },
    Shape {
        batch: 4,
        heads: 32,
        seq_len: 4096,
        head_dim: 80,
        causal: true,
    },
    Shape {
        batch: 1,
        heads: 32,
        seq_len: 16_384,
        head_dim: 128,
        causal: true,
    },
];
/// The other head dimensions the kernel has, only in the comparison of tile shapes.
const SWEEP_ONLY: [Shape; 3] = [
    Shape {
        batch: 2,
        heads: 32,
        seq_len: 4096,
        head_dim: 64,
        causal: true,
    },
    Shape {
        batch: 2,
        heads: 32,
        seq_len: 4096,
        head_dim: 96,
        causal: true,
    },
    Shape {
        batch: 2,
        heads: 16,
        seq_len: 4096,
        head_dim: 256,
        causal: true,
    },
];
const BLOCK_SIZE: usize = 16;

/// One shape's inputs: packed queries, shuffled pages, the layout.
struct Inputs {
    q: Tensor,
    k_pages: Tensor,
    v_pages: Tensor,
    layout: DeviceBatchLayout,
    params: AttentionParams,
    causal: bool,
}

impl Inputs {
    fn new(shape: &Shape, device: &CudaDevice) -> Inputs {
        let Shape {
            batch,
            heads,
            seq_len,
            head_dim,
            causal,
        } = *shape;
        let blocks_per_seq = seq_len.div_ceil(BLOCK_SIZE);
        let num_blocks = batch * blocks_per_seq;
        let tables = scattered_block_ids(num_blocks);
        let query_start: Vec<u32> = (0..=batch).map(|b| (b * seq_len) as u32).collect();
        let context_len = vec![seq_len as u32; batch];
        let layout = DeviceBatchLayout::new(
            &query_start,
            &context_len,
            &tables,
            blocks_per_seq,
            BLOCK_SIZE,
            num_blocks,
            device,
        )
        .expect("building the batch layout");
        let page_dims = [num_blocks, BLOCK_SIZE, heads, head_dim];
        Inputs {
            q: seeded_f16(&[batch * seq_len, heads, head_dim], 1, device),
            k_pages: seeded_f16(&page_dims, 2, device),
            v_pages: seeded_f16(&page_dims, 3, device),
            layout,
            params: AttentionParams {
                num_heads: heads,
                num_kv_heads: heads,
                head_dim,
                scale: 1.0 / (head_dim as f32).sqrt(),
            },
            causal,
        }
    }

    fn run(&self, tiles: Option<TileShape>) -> Tensor {
        match tiles {
            Some(tiles) => flash_attention_prefill_with(
                &self.q,
                &self.layout,
                &self.params,
                &self.k_pages,
                &self.v_pages,
                self.causal,
                tiles,
            ),
            None => flash_attention_prefill(
                &self.q,
                &self.layout,
                &self.params,
                &self.k_pages,
                &self.v_pages,
                self.causal,
            ),
        }
        .expect("flash attention")
    }
}

/// Whether the bench runs the warpgroup-MMA shapes: where the device has them, unless
/// `PAGODA_FLASH_MMA_SYNC` is set.
fn use_wgmma(device: &CudaDevice) -> bool {
    sm90a_available(device).expect("reading the device's architecture")
        && std::env::var_os("PAGODA_FLASH_MMA_SYNC").is_none()
}

fn bench(c: &mut Criterion, device: &CudaDevice) {
    let wgmma = use_wgmma(device);
    let mut group = c.benchmark_group("cuda_flash_attention_f16");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for shape in SHAPES {
        let inputs = Inputs::new(&shape, device);
        let tiles = default_tile_shape(shape.head_dim, wgmma);
        group.throughput(Throughput::Elements(shape.flops() as u64));
        group.bench_function(BenchmarkId::new("prefill", shape.label()), |b| {
            b.iter_custom(|iters| time_gpu(device, iters, || drop(black_box(inputs.run(tiles)))))
        });
    }
    group.finish();
}

/// Median seconds per call of `inputs` with `tiles` (or the default shape).
fn seconds(device: &CudaDevice, inputs: &Inputs, tiles: Option<TileShape>) -> f64 {
    median_seconds(device, 11, 5, || drop(inputs.run(tiles)))
}

/// The largest |a - b| over the largest |b|, reading both outputs as f16.
fn relative_difference(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (
        a.to_vec_f32().expect("downloading an output"),
        b.to_vec_f32().expect("downloading an output"),
    );
    let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let worst = a.iter().zip(&b).fold(0.0f32, |m, (x, y)| {
        let d = (x - y).abs();
        if d.is_nan() { f32::INFINITY } else { m.max(d) }
    });
    f64::from(worst / scale.max(f32::MIN_POSITIVE))
}

/// One measurement as the JSON line benches/peers/attention_prefill.py reads.
fn json_line(shape: &Shape, seconds: f64) -> String {
    format!(
        concat!(
            "{{\"bench\": \"pagoda_flash\", \"B\": {}, \"H\": {}, \"S\": {}, \"D\": {}, ",
            "\"causal\": {}, \"ms\": {:.3}, \"tflops\": {:.1}}}"
        ),
        shape.batch,
        shape.heads,
        shape.seq_len,
        shape.head_dim,
        shape.causal,
        seconds * 1e3,
        shape.flops() / seconds / 1e12
    )
}

/// The per-shape table, each default's line also as JSON (printed as soon as it is measured, so
/// that a run cut short still leaves the peer script something to compare); every tile shape of
/// each head dimension, or with `PAGODA_FLASH_SWEEP=short` only the `mma.sync` default beside the
/// default.
fn summary(device: &CudaDevice) {
    let short = std::env::var("PAGODA_FLASH_SWEEP").is_ok_and(|v| v == "short");
    println!(
        "\nflash attention prefill f16, block_size {BLOCK_SIZE}, shuffled pages (median of 11 samples of 5 calls)"
    );
    println!(
        "{:>28} {:>26} {:>10} {:>9} {:>10}",
        "shape", "tiles", "ms", "TFLOP/s", "vs default"
    );
    let wgmma = use_wgmma(device);
    let shapes = SHAPES.iter().map(|s| (s, true));
    let sweep_only: &[Shape] = if short { &[] } else { &SWEEP_ONLY };
    for (shape, reported) in shapes.chain(sweep_only.iter().map(|s| (s, false))) {
        let inputs = Inputs::new(shape, device);
        let default = default_tile_shape(shape.head_dim, wgmma).expect("a default tile shape");
        let reference = inputs.run(Some(default));
        let base = seconds(device, &inputs, Some(default));
        if reported {
            println!("{}", json_line(shape, base));
        }
        let previous = default_tile_shape(shape.head_dim, false);
        let runnable = |t: &&TileShape| wgmma || !t.schedule.needs_sm90a();
        let wanted = |t: &&TileShape| !short || **t == default || Some(**t) == previous;
        for &tiles in TILE_SHAPES
            .iter()
            .filter(|t| t.head_dim == shape.head_dim)
            .filter(runnable)
            .filter(wanted)
        {
            let time = if tiles == default {
                base
            } else {
                seconds(device, &inputs, Some(tiles))
            };
            let check = if tiles == default {
                "default".to_owned()
            } else {
                let difference = relative_difference(&inputs.run(Some(tiles)), &reference);
                if difference < 1e-2 {
                    format!("{:.2}x", base / time)
                } else {
                    format!("MISMATCH {difference:.1e}")
                }
            };
            println!(
                "{:>28} {:>26} {:>10.3} {:>9.1} {:>10}",
                shape.label(),
                format!(
                    "m{} w{} n{} {:?}",
                    tiles.m_reps, tiles.warps, tiles.block_n, tiles.schedule
                ),
                time * 1e3,
                shape.flops() / time / 1e12,
                check
            );
        }
    }
}

fn main() {
    let Ok(device) = CudaDevice::get(0) else {
        eprintln!("cuda_flash_attention: skipped: no GPU");
        return;
    };
    let mut criterion = Criterion::default().configure_from_args();
    bench(&mut criterion, &device);
    criterion.final_summary();
    summary(&device);
}

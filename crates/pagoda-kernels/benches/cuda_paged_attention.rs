//! Paged decode attention, f16, on the shapes of shared/BENCH.md and issue 4: B64 H24 KVH8 L2048
//! D128 (Llama-3.2-3B's heads, 64 sequences of 2048 tokens) and B1 H32 KVH8 L32768 D128 (one
//! 32k-token context), and the short context of a W1 decode step (B1 H24 KVH8 L384 D128, which
//! no bandwidth figure describes: it is all fixed costs), one query token per sequence, K/V in pages of 16 tokens whose ids are
//! shuffled (every sequence's table scattered and non-monotonic).
//!
//! Decode attention must read every key and value of each context once, so its ceiling is the
//! memory's: throughput is the K/V bytes read per call (B x L x KV heads x D x 2 tensors x 2
//! bytes), to compare with the device-to-device copy bandwidth (read + write) measured in the same
//! run, as benches/peers/attention_decode.py does for PyTorch SDPA on contiguous K/V. Shapes whose
//! pages fit a few times in L2 rotate over several copies, so each call reads DRAM.
//!
//! After criterion's report a summary prints, per shape, the median time per call, GB/s (10^9
//! bytes) and the fraction of the copy bandwidth, also as one JSON line each (`{"bench":
//! "pagoda_decode", ...}`) for the peer script to compare, beside the previous default (the
//! four-warp tensor-core form capped for four blocks per SM, one tile of L2 prefetch, 66 splits
//! at B1 and 1 at B64: what the earlier rule chose on a 132-SM GPU) and beside the default with
//! its merge launched to overlap the split kernel's end; then the same call with other split counts, each checked against the default's output. With
//! `PAGODA_DECODE_SWEEP=full` the sweep also crosses every compiled form of the tensor-core
//! kernel for 128 dimensions (warps, register cap, pipelined loop) with every L2 prefetch depth,
//! and lists each shape's fastest choices last; the default and the previous default are timed
//! again at the end, to show the spread.

mod common;

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput};
use pagoda_kernels::cpu::attention::AttentionParams;
use pagoda_kernels::cuda;
use pagoda_kernels::cuda::paged_attention::{
    DecodeVariant, DeviceBatchLayout, MAX_PREFETCH_TILES, MAX_SPLITS, default_num_splits,
    paged_attention, paged_attention_variant,
};
use pagoda_tensor::{CudaDevice, Tensor};

use common::{median_seconds, scattered_block_ids, seeded_f16, time_gpu};

/// A decode shape: `batch` sequences of `context` tokens, `heads` query heads over `kv_heads`.
#[derive(Clone, Copy, Debug)]
struct Shape {
    batch: usize,
    heads: usize,
    kv_heads: usize,
    context: usize,
    head_dim: usize,
    /// The split count the previous default rule chose for the shape on a 132-SM GPU.
    previous_splits: usize,
}

impl Shape {
    /// K and V bytes one call reads.
    fn kv_bytes(&self) -> usize {
        self.batch * self.context * self.kv_heads * self.head_dim * 2 * 2
    }

    fn label(&self) -> String {
        format!(
            "B{} H{} KVH{} L{} D{}",
            self.batch, self.heads, self.kv_heads, self.context, self.head_dim
        )
    }
}

const SHAPES: [Shape; 3] = [
    Shape {
        batch: 64,
        heads: 24,
        kv_heads: 8,
        context: 2048,
        head_dim: 128,
        previous_splits: 1,
    },
    Shape {
        batch: 1,
        heads: 32,
        kv_heads: 8,
        context: 32_768,
        head_dim: 128,
        previous_splits: 66,
    },
    // A W1 decode step of Llama-3.2-3B: one sequence, the whole of a 384-token context.
    Shape {
        batch: 1,
        heads: 24,
        kv_heads: 8,
        context: 384,
        head_dim: 128,
        previous_splits: 6,
    },
];
const BLOCK_SIZE: usize = 16;
/// The page copies of one shape together cover at least this many bytes, several times L2.
const ROTATION_BYTES: usize = 400 << 20;
/// Bytes of the copy that measures the ceiling: large enough that L2 plays no part.
const COPY_BYTES: usize = 1 << 30;
const RUNS: usize = 11;

/// One shape's inputs: the query rows, shuffled pages (in as many copies as the rotation needs),
/// the layout.
struct Inputs {
    q: Tensor,
    pages: Vec<(Tensor, Tensor)>,
    next: usize,
    layout: DeviceBatchLayout,
    params: AttentionParams,
}

impl Inputs {
    fn new(shape: &Shape, device: &CudaDevice) -> Inputs {
        let Shape {
            batch,
            heads,
            kv_heads,
            context,
            head_dim,
            ..
        } = *shape;
        let blocks_per_seq = context.div_ceil(BLOCK_SIZE);
        let num_blocks = batch * blocks_per_seq;
        let tables = scattered_block_ids(num_blocks);
        let query_start: Vec<u32> = (0..=batch as u32).collect();
        let context_len = vec![context as u32; batch];
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
        let page_dims = [num_blocks, BLOCK_SIZE, kv_heads, head_dim];
        let copies = ROTATION_BYTES.div_ceil(shape.kv_bytes()).max(1) as u64;
        let pages = (0..copies)
            .map(|c| {
                (
                    seeded_f16(&page_dims, 2 + 2 * c, device),
                    seeded_f16(&page_dims, 3 + 2 * c, device),
                )
            })
            .collect();
        Inputs {
            q: seeded_f16(&[batch, heads, head_dim], 1, device),
            pages,
            next: 0,
            layout,
            params: AttentionParams {
                num_heads: heads,
                num_kv_heads: kv_heads,
                head_dim,
                scale: 1.0 / (head_dim as f32).sqrt(),
            },
        }
    }

    /// One call on the next copy of the pages, as `variant` says or the default.
    fn run(&mut self, variant: Option<&DecodeVariant>) -> Tensor {
        self.next = (self.next + 1) % self.pages.len();
        let (k, v) = &self.pages[self.next];
        match variant {
            Some(variant) => {
                paged_attention_variant(&self.q, &self.layout, &self.params, k, v, variant)
            }
            None => paged_attention(&self.q, &self.layout, &self.params, k, v),
        }
        .expect("paged attention")
    }

    fn default_splits(&self) -> usize {
        let (k, v) = &self.pages[0];
        default_num_splits(&self.q, &self.layout, &self.params, k, v).expect("the default splits")
    }
}

fn bench(c: &mut Criterion, device: &CudaDevice, inputs: &mut [Inputs]) {
    let mut group = c.benchmark_group("cuda_paged_attention_f16");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for (shape, inputs) in SHAPES.iter().zip(inputs.iter_mut()) {
        group.throughput(Throughput::Bytes(shape.kv_bytes() as u64));
        group.bench_function(BenchmarkId::new("decode", shape.label()), |b| {
            b.iter_custom(|iters| time_gpu(device, iters, || drop(black_box(inputs.run(None)))))
        });
    }
    group.finish();
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

/// One measurement as the JSON line benches/peers/attention_decode.py reads.
fn json_line(shape: &Shape, seconds: f64, copy_rate: f64, splits: usize) -> String {
    let rate = shape.kv_bytes() as f64 / seconds / 1e9;
    format!(
        concat!(
            "{{\"bench\": \"pagoda_decode\", \"B\": {}, \"H\": {}, \"KVH\": {}, \"L\": {}, \"D\": {}, ",
            "\"ms\": {:.4}, \"gbps\": {:.0}, \"copy_gbps\": {:.0}, \"of_copy\": {:.3}, \"splits\": {}}}"
        ),
        shape.batch,
        shape.heads,
        shape.kv_heads,
        shape.context,
        shape.head_dim,
        seconds * 1e3,
        rate,
        copy_rate,
        rate / copy_rate,
        splits
    )
}

/// One variant's median time, checked against the default's output: the time and a note
/// (`MISMATCH` when the outputs differ).
fn measure(
    device: &CudaDevice,
    inputs: &mut Inputs,
    reference: &Tensor,
    variant: &DecodeVariant,
) -> (f64, Option<String>) {
    let difference = relative_difference(&inputs.run(Some(variant)), reference);
    let time = median_seconds(device, RUNS, 10, || drop(inputs.run(Some(variant))));
    let note = (difference >= 1e-2).then(|| format!("MISMATCH {difference:.1e}"));
    (time, note)
}

/// Split counts the sweep tries for a shape: powers of two up to the most the context has 64-token
/// pieces for, the default and the previous default; with `full`, also the counts that give every
/// one of 132 SMs (an H100's, an H200's) 1 to 6 blocks of four warps, and multiples of 8 near
/// those, and no fewer than 8 unless the context has no more pieces. Shapes whose rows alone fill
/// the GPU try no more than 4.
fn sweep_splits(shape: &Shape, default: usize, full: bool) -> Vec<usize> {
    let max_splits = (shape.context / 64).min(MAX_SPLITS);
    let blocks_per_split = shape.batch * shape.kv_heads;
    let mut counts: Vec<usize> = (0..usize::BITS)
        .map(|p| 1usize << p)
        .take_while(|&s| s <= max_splits)
        .chain([default, shape.previous_splits])
        .collect();
    if full {
        counts.extend(
            (1..=6)
                .map(|per_sm: usize| (132 * per_sm).div_ceil(blocks_per_split))
                .filter(|&s| s <= max_splits),
        );
        counts.extend([24, 48]);
    }
    if blocks_per_split >= 132 {
        counts.retain(|&s| s <= 4 || s == default || s == shape.previous_splits);
        counts.push(3);
    } else if full && max_splits > 8 {
        counts.retain(|&s| s >= 8 || s == default || s == shape.previous_splits);
    }
    counts.sort_unstable();
    counts.dedup();
    counts
}

/// The previous default of a shape: the four-warp tensor-core form capped for four blocks per SM,
/// one tile of L2 prefetch, the split count the previous rule chose.
fn previous_default(shape: &Shape) -> DecodeVariant {
    DecodeVariant {
        num_splits: Some(shape.previous_splits),
        prefetch_tiles: Some(1),
        kernel: Some("mma_w4_b4".to_owned()),
        overlap_merge: None,
    }
}

/// The tensor-core forms the full sweep crosses (heads of 128 dimensions).
const SWEEP_KERNELS: [&str; 4] = ["mma_w4_b4", "mma_w4_b3", "mma_w4_b2_pl", "mma_w8_b1_pl"];

/// One timed choice: its time and what it was.
struct Measured {
    seconds: f64,
    kernel: String,
    prefetch: String,
    splits: usize,
}

/// The per-shape table, each line also as JSON; then the sweep of each shape.
fn summary(device: &CudaDevice, inputs: &mut [Inputs]) {
    let full = std::env::var("PAGODA_DECODE_SWEEP").is_ok_and(|v| v == "full");
    let copy_rate = cuda::memory::copy_bandwidth(device, COPY_BYTES, RUNS).expect("copy") / 1e9;
    println!(
        "\npaged decode attention f16, block_size {BLOCK_SIZE}, shuffled pages (median of {RUNS} \
         samples of 10 calls; bytes = K/V read)"
    );
    println!("device-to-device copy: {copy_rate:.0} GB/s (read + write)");
    let mut json = Vec::new();
    let mut best_lines = Vec::new();
    let mut table = Vec::new();
    for (shape, inputs) in SHAPES.iter().zip(inputs.iter_mut()) {
        let default = inputs.default_splits();
        let reference = inputs.run(None);
        let base = median_seconds(device, RUNS, 10, || drop(inputs.run(None)));
        let previous = previous_default(shape);
        let (before, note) = measure(device, inputs, &reference, &previous);
        if let Some(note) = note {
            println!("  {note}: previous default");
        }
        // The default with its merge launched to overlap the split kernel's end.
        let overlapped_merge = DecodeVariant {
            overlap_merge: Some(true),
            ..DecodeVariant::default()
        };
        let (overlapped, note) = measure(device, inputs, &reference, &overlapped_merge);
        if let Some(note) = note {
            println!("  {note}: overlapped merge launch");
        }
        json.push(json_line(shape, base, copy_rate, default));
        let rate = |time: f64| shape.kv_bytes() as f64 / time / 1e9;
        let line = |what: &str, time: f64| {
            format!(
                "{:>26} {what:<34} {:>7.1} us {:>5.0} GB/s {:>5.1}% of copy",
                shape.label(),
                time * 1e6,
                rate(time),
                100.0 * rate(time) / copy_rate
            )
        };
        println!("{}", line(&format!("default ({default} splits)"), base));
        println!("{}", line("previous default", before));
        println!("{}", line("default, overlapped merge launch", overlapped));
        table.push(line(
            &format!("default ({default} splits), {:.3}x previous", before / base),
            base,
        ));
        table.push(line("previous default", before));
        table.push(line(
            &format!(
                "default, overlapped merge launch ({:.3}x)",
                base / overlapped
            ),
            overlapped,
        ));

        let splits = sweep_splits(shape, default, full);
        let kernels: Vec<Option<&str>> = if full {
            SWEEP_KERNELS.iter().copied().map(Some).collect()
        } else {
            vec![None]
        };
        let depths: Vec<Option<u32>> = if full {
            (0..=MAX_PREFETCH_TILES).map(Some).collect()
        } else {
            vec![None]
        };
        println!(
            "{:>15} {:>8} | us per call at splits {splits:?} (* = different output)",
            "kernel", "prefetch"
        );
        let mut results = Vec::new();
        for &kernel in &kernels {
            for &depth in &depths {
                let mut cells = Vec::new();
                for &count in &splits {
                    let variant = DecodeVariant {
                        num_splits: Some(count),
                        prefetch_tiles: depth,
                        kernel: kernel.map(str::to_owned),
                        overlap_merge: None,
                    };
                    let (time, note) = measure(device, inputs, &reference, &variant);
                    cells.push(format!(
                        "{:.1}{}",
                        time * 1e6,
                        if note.is_some() { "*" } else { "" }
                    ));
                    if let Some(note) = &note {
                        println!("  {note}: {variant:?}");
                    } else {
                        results.push(Measured {
                            seconds: time,
                            kernel: kernel.unwrap_or("default").to_owned(),
                            prefetch: depth.map_or("default".to_owned(), |d| d.to_string()),
                            splits: count,
                        });
                    }
                }
                println!(
                    "{:>15} {:>8} | {}",
                    kernel.unwrap_or("default"),
                    depth.map_or("default".to_owned(), |d| d.to_string()),
                    cells.join(" ")
                );
            }
        }
        results.sort_by(|a, b| a.seconds.total_cmp(&b.seconds));
        for m in results.iter().take(if full { 12 } else { 4 }) {
            best_lines.push(format!(
                "{:>26} {:>15} prefetch {:>7} splits {:>3}: {:>6.1} us {:>5.0} GB/s \
                 {:>5.1}% of copy ({:.3}x default)",
                shape.label(),
                m.kernel,
                m.prefetch,
                m.splits,
                m.seconds * 1e6,
                rate(m.seconds),
                100.0 * rate(m.seconds) / copy_rate,
                base / m.seconds
            ));
        }
        if full {
            // The same two calls again after the sweep: their spread is the noise.
            let again = median_seconds(device, RUNS, 10, || drop(inputs.run(None)));
            let (before_again, _) = measure(device, inputs, &reference, &previous);
            table.push(line("default, again after the sweep", again));
            table.push(line("previous default, again", before_again));
        }
    }
    println!("\nfastest choices (copy {copy_rate:.0} GB/s):");
    for line in best_lines {
        println!("{line}");
    }
    println!();
    for line in json {
        println!("{line}");
    }
    println!("\ndefault against the previous default (copy {copy_rate:.0} GB/s):");
    for line in table {
        println!("{line}");
    }
}

fn main() {
    let Ok(device) = CudaDevice::get(0) else {
        eprintln!("cuda_paged_attention: skipped: no GPU");
        return;
    };
    let mut inputs: Vec<Inputs> = SHAPES.iter().map(|s| Inputs::new(s, &device)).collect();
    let mut criterion = Criterion::default().configure_from_args();
    bench(&mut criterion, &device, &mut inputs);
    criterion.final_summary();
    summary(&device, &mut inputs);
}

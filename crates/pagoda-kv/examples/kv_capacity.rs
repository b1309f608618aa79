//! How many sequences fit in a fixed KV-cache budget: paged blocks against contiguous
//! preallocation of every sequence's maximum length.
//!
//! ```sh
//! cargo run --release -p pagoda-kv --example kv_capacity [-- --budget-gib 16 --seed 0 --block-size 16]
//! ```
//!
//! The model is Llama-3.2-3B in f16 (28 layers, 8 KV heads of 128 dimensions: 112 KiB of K and V
//! per token, 131072 positions). The sequences are those of the W3 serving workload
//! (shared/BENCH.md): prompts of 64 to 1024 tokens and outputs of 32 to 512, uniform, from a
//! seeded generator; each is counted at its full length (prompt plus output), the most it holds.
//! Paged, sequences take whole blocks from the pool [`KvCacheConfig::blocks_for_budget`] sizes,
//! through the real allocator and block tables, until one does not fit; contiguous, each takes a
//! region of the maximum context whatever its length.

use std::process::ExitCode;

use pagoda_kv::{BlockAllocator, BlockTable, Error, KvCacheConfig};
use pagoda_tensor::{DType, Device};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Llama-3.2-3B's attention geometry (its config.json).
const LAYERS: usize = 28;
const KV_HEADS: usize = 8;
const HEAD_DIM: usize = 128;
const MAX_CONTEXT: usize = 131_072;
/// A serving engine's usual cap on the context, well above W3's longest sequence.
const SHORT_CONTEXT: usize = 4096;
/// W3's prompt and output lengths (shared/BENCH.md).
const PROMPT_LEN: std::ops::RangeInclusive<usize> = 64..=1024;
const OUTPUT_LEN: std::ops::RangeInclusive<usize> = 32..=512;

struct Args {
    budget_gib: f64,
    seed: u64,
    block_size: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        budget_gib: 16.0,
        seed: 0,
        block_size: 16,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value}: {e}");
        match flag.as_str() {
            "--budget-gib" => args.budget_gib = value.parse().map_err(|e| bad(&e))?,
            "--seed" => args.seed = value.parse().map_err(|e| bad(&e))?,
            "--block-size" => args.block_size = value.parse().map_err(|e| bad(&e))?,
            _ => {
                return Err(format!(
                    "unknown argument {flag}; expected --budget-gib, --seed or --block-size"
                ));
            }
        }
    }
    if !args.budget_gib.is_finite() || args.budget_gib <= 0.0 || args.block_size == 0 {
        return Err("the budget and the block size must be positive".into());
    }
    Ok(args)
}

/// One row of the table: a layout and how many of the workload's sequences it holds.
struct Row {
    layout: String,
    sequences: usize,
    /// Tokens those sequences hold over the tokens the layout reserved for them.
    used: f64,
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("kv_capacity: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let args = parse_args()?;
    let budget = (args.budget_gib * (1u64 << 30) as f64) as usize;
    let config = KvCacheConfig {
        num_layers: LAYERS,
        num_blocks: 1,
        block_size: args.block_size,
        num_kv_heads: KV_HEADS,
        head_dim: HEAD_DIM,
        dtype: DType::F16,
        device: Device::Cpu,
    };
    let token_bytes = config.bytes_per_block() / args.block_size;
    let num_blocks = config.blocks_for_budget(budget);

    // More sequences than any layout can hold, so each stops at its own limit.
    let budget_tokens = budget / token_bytes;
    let min_len = PROMPT_LEN.start() + OUTPUT_LEN.start();
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    let lengths: Vec<usize> = (0..budget_tokens / min_len + 1)
        .map(|_| rng.random_range(PROMPT_LEN) + rng.random_range(OUTPUT_LEN))
        .collect();

    let mut rows = vec![paged(&lengths, num_blocks, args.block_size)?];
    for max_len in [MAX_CONTEXT, SHORT_CONTEXT] {
        let sequences = budget / (max_len * token_bytes);
        let held: usize = lengths[..sequences].iter().sum();
        rows.push(Row {
            layout: format!("contiguous, {max_len} tokens each"),
            sequences,
            used: held as f64 / (sequences * max_len).max(1) as f64,
        });
    }

    let mean = lengths.iter().sum::<usize>() as f64 / lengths.len() as f64;
    println!(
        "Llama-3.2-3B f16 KV ({} KiB per token), budget {} GiB = {budget_tokens} tokens; W3 \
         sequences (prompt 64-1024 + output 32-512, mean {mean:.0} tokens), seed {}",
        token_bytes / 1024,
        args.budget_gib,
        args.seed
    );
    println!();
    println!("| layout | sequences that fit | tokens held / reserved | paged fits |");
    println!("|---|---|---|---|");
    let paged_count = rows[0].sequences as f64;
    for row in &rows {
        println!(
            "| {} | {} | {:.1}% | {:.1}x as many |",
            row.layout,
            row.sequences,
            100.0 * row.used,
            paged_count / row.sequences.max(1) as f64
        );
    }
    Ok(())
}

/// Sequences of `lengths`, in order, given whole blocks of `block_size` tokens from a pool of
/// `num_blocks` until the next one does not fit.
fn paged(lengths: &[usize], num_blocks: usize, block_size: usize) -> Result<Row, String> {
    let mut allocator = BlockAllocator::new(num_blocks);
    let mut tables = Vec::new();
    for &len in lengths {
        let mut table = BlockTable::new(block_size);
        match table.append(len, &mut allocator) {
            Ok(()) => tables.push(table),
            Err(Error::OutOfBlocks { .. }) => break,
            Err(e) => return Err(format!("allocating {len} tokens: {e}")),
        }
    }
    let held: usize = tables.iter().map(BlockTable::num_tokens).sum();
    Ok(Row {
        layout: format!("paged, {block_size}-token blocks"),
        sequences: tables.len(),
        used: held as f64 / (allocator.num_used() * block_size).max(1) as f64,
    })
}

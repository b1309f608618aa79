//! Parity with Hugging Face transformers on tiny random checkpoints of each architecture.
//!
//! `scripts/make_fixtures.py` built the checkpoints with transformers, saved them as safetensors
//! and wrote, beside each, the f32 logits transformers computes for a few prompts and its greedy
//! continuations. Here the same checkpoints run through pagoda over flat, multi-sequence batches,
//! on the CPU and, with the `cuda` feature and a GPU, on the GPU in f32, f16 and bf16.

use std::path::{Path, PathBuf};

use pagoda_kv::{BlockTable, KvCache, KvCacheConfig};
use pagoda_models::{Batch, BatchSequence, LoadOptions, Model, load_model};
use pagoda_tensor::DType;
use serde::Deserialize;

/// Largest allowed `max |ours - theirs| / max |theirs|` over a prompt's logits, in f32.
const MAX_RELATIVE_ERROR: f32 = 1e-4;
/// The same bound for 16-bit floats, whose rounding step (2^-8 for bf16) alone is near 4e-3.
const MAX_RELATIVE_ERROR_16_BIT: f32 = 2e-2;
const BLOCK_SIZE: usize = 4;

#[derive(Deserialize)]
struct Reference {
    prompts: Vec<ReferencePrompt>,
}

#[derive(Deserialize)]
struct ReferencePrompt {
    input_ids: Vec<u32>,
    /// `[len][vocab]`: logits at every position of the prompt.
    logits: Vec<Vec<f32>>,
    greedy: Vec<u32>,
}

/// The fixtures beside this file; a test binary run away from its source tree (the GPU bundle)
/// finds them relative to the crate directory it runs in.
fn fixture(name: &str) -> PathBuf {
    let beside_source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let root = if beside_source.is_dir() {
        beside_source
    } else {
        PathBuf::from("tests/fixtures")
    };
    root.join(name)
}

fn load(name: &str, options: &LoadOptions) -> (Box<dyn Model>, Reference) {
    let dir = fixture(name);
    let model = load_model(&dir, options).unwrap_or_else(|e| panic!("loading {name}: {e}"));
    let text = std::fs::read_to_string(dir.join("reference.json")).expect("reference.json");
    (
        model,
        serde_json::from_str(&text).expect("reference.json parses"),
    )
}

fn kv_cache(model: &dyn Model, num_blocks: usize) -> KvCache {
    let info = model.info();
    KvCache::new(KvCacheConfig {
        num_layers: info.num_layers,
        num_blocks,
        block_size: BLOCK_SIZE,
        num_kv_heads: info.num_kv_heads,
        head_dim: info.head_dim,
        dtype: info.dtype,
        device: info.device,
    })
    .expect("KV cache")
}

/// Appends one chunk of tokens per sequence and builds the flat batch that runs them all,
/// asking for the logits of every row when `all_rows`, else of each sequence's last row.
fn batch_of(
    chunks: &[&[u32]],
    tables: &mut [BlockTable],
    kv: &mut KvCache,
    all_rows: bool,
) -> Batch {
    let mut batch = Batch::default();
    for (chunk, table) in chunks.iter().zip(tables.iter_mut()) {
        if chunk.is_empty() {
            continue;
        }
        let start = table.num_tokens();
        table.append(chunk.len(), kv.allocator()).expect("blocks");
        let query_start = batch.tokens.len();
        for (i, &token) in chunk.iter().enumerate() {
            batch.tokens.push(token);
            batch.positions.push((start + i) as u32);
            batch.slots.push(table.slot(start + i).expect("slot"));
            if all_rows || i + 1 == chunk.len() {
                batch.logits_rows.push(query_start + i);
            }
        }
        batch.sequences.push(BatchSequence {
            query_start,
            query_len: chunk.len(),
            context_len: table.num_tokens(),
            block_table: table.block_ids_u32(),
        });
    }
    batch
}

fn relative_error(ours: &[f32], theirs: &[f32]) -> f32 {
    let scale = theirs.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let diff = ours
        .iter()
        .zip(theirs)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    diff / scale
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}

/// Every prompt in one batch, prefilled in two chunks (so the second attends to cached K/V
/// from the first), then decoded greedily together.
fn check_parity(name: &str, options: &LoadOptions) {
    let (model, reference) = load(name, options);
    let f32_compute = model.info().dtype == DType::F32;
    let tolerance = if f32_compute {
        MAX_RELATIVE_ERROR
    } else {
        MAX_RELATIVE_ERROR_16_BIT
    };
    let vocab = model.info().vocab_size;
    let mut kv = kv_cache(model.as_ref(), 256);
    let mut tables: Vec<BlockTable> = reference
        .prompts
        .iter()
        .map(|_| BlockTable::new(BLOCK_SIZE))
        .collect();

    let splits: Vec<usize> = reference
        .prompts
        .iter()
        .map(|p| p.input_ids.len().div_ceil(2))
        .collect();
    let mut logits_per_prompt: Vec<Vec<f32>> = vec![Vec::new(); reference.prompts.len()];
    for half in 0..2 {
        let chunks: Vec<&[u32]> = reference
            .prompts
            .iter()
            .zip(&splits)
            .map(|(p, &s)| {
                if half == 0 {
                    &p.input_ids[..s]
                } else {
                    &p.input_ids[s..]
                }
            })
            .collect();
        let batch = batch_of(&chunks, &mut tables, &mut kv, true);
        let logits = model
            .forward(&batch, &mut kv)
            .expect("forward")
            .to_vec_f32()
            .unwrap();
        let mut row = 0;
        for (p, chunk) in chunks.iter().enumerate() {
            logits_per_prompt[p]
                .extend_from_slice(&logits[row * vocab..(row + chunk.len()) * vocab]);
            row += chunk.len();
        }
    }
    for (p, prompt) in reference.prompts.iter().enumerate() {
        let theirs: Vec<f32> = prompt.logits.iter().flatten().copied().collect();
        let error = relative_error(&logits_per_prompt[p], &theirs);
        eprintln!(
            "{name} {:?} {}: prompt {p}: relative error {error:e}",
            options.device,
            model.info().dtype
        );
        assert!(
            error < tolerance,
            "{name}, prompt {p} ({} tokens): relative error {error:e}",
            prompt.input_ids.len()
        );
    }
    if !f32_compute {
        // 16-bit rounding may flip a near-tie, so greedy tokens are compared in f32 only.
        return;
    }

    let mut next: Vec<u32> = logits_per_prompt
        .iter()
        .map(|l| argmax(&l[l.len() - vocab..]))
        .collect();
    let mut generated: Vec<Vec<u32>> = next.iter().map(|&t| vec![t]).collect();
    let steps = reference.prompts[0].greedy.len() - 1;
    for _ in 0..steps {
        let chunks: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
        let chunk_refs: Vec<&[u32]> = chunks.iter().map(|c| c.as_slice()).collect();
        let batch = batch_of(&chunk_refs, &mut tables, &mut kv, false);
        let logits = model
            .forward(&batch, &mut kv)
            .expect("decode")
            .to_vec_f32()
            .unwrap();
        next = logits.chunks(vocab).map(argmax).collect();
        for (g, &t) in generated.iter_mut().zip(&next) {
            g.push(t);
        }
    }
    for (p, prompt) in reference.prompts.iter().enumerate() {
        assert_eq!(
            generated[p], prompt.greedy,
            "{name}, prompt {p}: greedy tokens"
        );
    }
    for table in &mut tables {
        table.free(kv.allocator()).unwrap();
    }

    // One sequence alone: its decode steps are single rows, which run the fused projections as
    // one product (a batch of several rows runs them part by part).
    let prompt = &reference.prompts[1];
    let mut table = BlockTable::new(BLOCK_SIZE);
    let mut next = prompt.input_ids.clone();
    let mut alone = Vec::new();
    while alone.len() < prompt.greedy.len() {
        let batch = batch_of(&[&next], std::slice::from_mut(&mut table), &mut kv, false);
        let logits = model
            .forward(&batch, &mut kv)
            .expect("decode alone")
            .to_vec_f32()
            .unwrap();
        next = vec![argmax(&logits)];
        alone.push(next[0]);
    }
    assert_eq!(
        alone, prompt.greedy,
        "{name}: greedy tokens of a sequence decoded alone"
    );
    table.free(kv.allocator()).unwrap();
    assert_eq!(kv.allocator_ref().num_free(), 256, "every block returned");
}

const FIXTURES: [&str; 4] = [
    "tiny-gpt-neox",
    "tiny-gpt-neox-sequential",
    "tiny-llama",
    "tiny-llama-tied",
];

#[test]
fn gpt_neox_parallel_residual_matches_transformers() {
    check_parity(FIXTURES[0], &LoadOptions::default());
}

#[test]
fn gpt_neox_sequential_residual_matches_transformers() {
    check_parity(FIXTURES[1], &LoadOptions::default());
}

#[test]
fn llama_sharded_with_llama3_rope_matches_transformers() {
    check_parity(FIXTURES[2], &LoadOptions::default());
}

#[test]
fn llama_with_tied_embeddings_matches_transformers() {
    check_parity(FIXTURES[3], &LoadOptions::default());
}

/// Every fixture on the GPU, in each dtype the CUDA kernels claim.
#[cfg(feature = "cuda")]
#[test]
fn every_fixture_matches_transformers_on_the_gpu() {
    if pagoda_tensor::CudaDevice::get(0).is_err() {
        assert!(
            std::env::var("PAGODA_REQUIRE_GPU").as_deref() != Ok("1"),
            "PAGODA_REQUIRE_GPU=1 but no GPU could be opened"
        );
        eprintln!("skipped: no GPU");
        return;
    }
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for name in FIXTURES {
            check_parity(
                name,
                &LoadOptions {
                    device: pagoda_tensor::Device::Cuda(0),
                    dtype: Some(dtype),
                    ..LoadOptions::default()
                },
            );
        }
    }
}

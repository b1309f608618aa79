//! Decode steps replayed from a recorded CUDA graph ([`StepGraph`]) against the same steps run
//! eagerly: two sequences of different lengths decode side by side in two KV caches, one through
//! `Model::forward`, one through the graph, fed the same tokens; every step's logits must agree
//! (the two paths launch the same kernels, the attention split only into other pieces), and the
//! graph must refuse batches and caches it was not recorded for.
//!
//! Without a GPU the test skips, unless `PAGODA_REQUIRE_GPU=1`.

#![cfg(feature = "cuda")]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use pagoda_kv::{BlockTable, KvCache, KvCacheConfig};
use pagoda_models::{Batch, BatchSequence, LoadOptions, Model, StepGraph, load_model};
use pagoda_tensor::{CudaDevice, DType, Device, Tensor};
use rand::{RngExt, SeedableRng};

const BLOCK_SIZE: usize = 16;
const STEPS: usize = 40;

fn fixture(name: &str) -> PathBuf {
    let beside_source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let root = if beside_source.is_dir() {
        beside_source
    } else {
        PathBuf::from("tests/fixtures")
    };
    root.join(name)
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

/// One batch holding the newest token of every sequence (its table already covers it).
fn decode_batch(tokens: &[u32], tables: &[BlockTable]) -> Batch {
    let mut batch = Batch::default();
    for (i, (&token, table)) in tokens.iter().zip(tables).enumerate() {
        let position = table.num_tokens() - 1;
        batch.tokens.push(token);
        batch.positions.push(position as u32);
        batch.slots.push(table.slot(position).expect("slot"));
        batch.sequences.push(BatchSequence {
            query_start: i,
            query_len: 1,
            context_len: table.num_tokens(),
            block_table: table.block_ids_u32(),
        });
        batch.logits_rows.push(i);
    }
    batch
}

fn prefill(model: &dyn Model, kv: &mut KvCache, prompt: &[u32]) -> BlockTable {
    let mut table = BlockTable::new(BLOCK_SIZE);
    table.append(prompt.len(), kv.allocator()).expect("blocks");
    let batch = Batch::last_of_sequence(prompt, &table).expect("batch");
    model.forward(&batch, kv).expect("prefill");
    table
}

fn rows(logits: &Tensor) -> Vec<f32> {
    logits.to_vec_f32().expect("logits to host")
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

fn relative_error(ours: &[f32], reference: &[f32]) -> f32 {
    let scale = reference
        .iter()
        .fold(0f32, |m, v| m.max(v.abs()))
        .max(1e-30);
    let diff = ours
        .iter()
        .zip(reference)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    diff / scale
}

fn check(name: &str, dtype: DType) {
    let model: Arc<dyn Model> = Arc::from(
        load_model(
            &fixture(name),
            &LoadOptions {
                device: Device::Cuda(0),
                dtype: Some(dtype),
                ..LoadOptions::default()
            },
        )
        .unwrap_or_else(|e| panic!("loading {name}: {e}")),
    );
    let vocab = model.info().vocab_size as u32;
    let seed = rand::rng().random::<u64>();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let prompts: Vec<Vec<u32>> = [23usize, 5]
        .iter()
        .map(|&len| (0..len).map(|_| rng.random_range(0..vocab)).collect())
        .collect();
    let max_blocks = (prompts[0].len() + STEPS).div_ceil(BLOCK_SIZE);
    let num_blocks = 2 * max_blocks + 2;
    let mut eager_kv = kv_cache(model.as_ref(), num_blocks);
    let mut graph_kv = kv_cache(model.as_ref(), num_blocks);
    let mut eager_tables: Vec<BlockTable> = prompts
        .iter()
        .map(|p| prefill(model.as_ref(), &mut eager_kv, p))
        .collect();
    let mut graph_tables: Vec<BlockTable> = prompts
        .iter()
        .map(|p| prefill(model.as_ref(), &mut graph_kv, p))
        .collect();

    let bound = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
    let mut tokens: Vec<u32> = prompts.iter().map(|p| p[p.len() - 1]).collect();
    let mut graph: Option<StepGraph> = None;
    for step in 0..STEPS {
        for table in eager_tables.iter_mut() {
            table.append(1, eager_kv.allocator()).expect("blocks");
        }
        for table in graph_tables.iter_mut() {
            table.append(1, graph_kv.allocator()).expect("blocks");
        }
        let eager = rows(
            &model
                .forward(&decode_batch(&tokens, &eager_tables), &mut eager_kv)
                .expect("eager step"),
        );
        let batch = decode_batch(&tokens, &graph_tables);
        let replayed = match graph.as_mut() {
            Some(graph) => rows(graph.run(&batch, &mut graph_kv).expect("graph step")),
            None => rows(
                graph
                    .insert(
                        StepGraph::record(Arc::clone(&model), &batch, max_blocks, &mut graph_kv)
                            .expect("recording"),
                    )
                    .logits(),
            ),
        };
        let error = relative_error(&replayed, &eager);
        assert!(
            error < bound,
            "{name} {dtype} step {step} (seed {seed}): graph and eager logits differ by {error:e}"
        );
        tokens = eager
            .chunks(vocab as usize)
            .map(argmax)
            .collect::<Vec<u32>>();
    }

    let graph = graph.as_mut().expect("recorded");
    // Another cache: refused, whatever its contents.
    for table in eager_tables.iter_mut() {
        table.append(1, eager_kv.allocator()).expect("blocks");
    }
    let other = decode_batch(&tokens, &eager_tables);
    let refused = graph
        .run(&other, &mut eager_kv)
        .err()
        .map(|e| e.to_string());
    assert!(
        refused.as_deref().is_some_and(|m| m.contains("KV cache")),
        "{refused:?}"
    );
    // A batch of another shape: refused.
    for table in graph_tables.iter_mut() {
        table.append(1, graph_kv.allocator()).expect("blocks");
    }
    let one = decode_batch(&tokens[..1], &graph_tables[..1]);
    let refused = graph.run(&one, &mut graph_kv).err().map(|e| e.to_string());
    assert!(
        refused
            .as_deref()
            .is_some_and(|m| m.contains("does not fit")),
        "{refused:?}"
    );
}

fn gpu_present() -> bool {
    match CudaDevice::get(0) {
        Ok(_) => true,
        Err(e) => {
            assert!(
                !std::env::var("PAGODA_REQUIRE_GPU").is_ok_and(|v| v == "1"),
                "PAGODA_REQUIRE_GPU=1 but no GPU: {e}"
            );
            eprintln!("skipped: no GPU ({e})");
            false
        }
    }
}

#[test]
fn graph_replays_match_eager_decode() {
    if !gpu_present() {
        return;
    }
    for name in ["tiny-llama", "tiny-gpt-neox"] {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            check(name, dtype);
        }
    }
}

//! Parity of models at their real sizes on a GPU with float32 Hugging Face transformers.
//!
//! `scripts/gpu_parity_reference.py --out DIR` writes, per model, a random-weight float16
//! checkpoint of the model's real config and `reference.safetensors`: a few prompts and the
//! logits transformers computes for them with the same weights upcast to float32 (see the script
//! for the tensors it holds). For every subfolder of `$PAGODA_GPU_PARITY_DIR` this test loads the
//! checkpoint on `Device::Cuda(0)` in f16 and in bf16 (and f32 where the checkpoint is small) and
//! runs the prompts two ways over a paged KV cache:
//!
//! * `prefill`: all prompts as one flat batch;
//! * `decode`: all prompts but their last 16 tokens as one flat batch, then those tokens one step
//!   at a time, every prompt in the same batch, so that attention reads what earlier steps cached.
//!
//! Each compares its logits rows with the reference by relative L2 error per prompt and prints one
//! line per (model, dtype, mode, prompt), starting with `parity `, beside the error transformers
//! itself makes in the same dtype. Whether the last position's argmax agrees is reported only:
//! with random weights the top two logits can lie closer together than half-precision rounding.
//!
//! Without a parity folder or a GPU the test skips, unless `PAGODA_REQUIRE_GPU=1`. With
//! `PAGODA_PARITY_ON_CPU=1` the same check runs on the CPU in f32, which rehearses the whole
//! pipeline on a machine without a GPU (references from `--tiny --device cpu`).

#![cfg(feature = "cuda")]

use std::fmt;
use std::path::{Path, PathBuf};

use pagoda_kv::{BlockTable, KvCache, KvCacheConfig};
use pagoda_models::{Batch, BatchSequence, LoadOptions, Model, load_model};
use pagoda_tensor::safetensors::SafeTensors;
use pagoda_tensor::{CudaDevice, DType, Device};

const PARITY_DIR: &str = "PAGODA_GPU_PARITY_DIR";
const BLOCK_SIZE: usize = 16;
/// Tokens at the end of each prompt that the `decode` mode feeds one step at a time.
const DECODE_STEPS: usize = 16;
/// Checkpoints up to this size are also run in f32 on the GPU (the real ones would take twice
/// their f16 memory and load time for a check the tiny ones already make).
const F32_CHECKPOINT_BYTES: u64 = 256 << 20;

/// Largest allowed relative L2 error `||ours - ref|| / ||ref||` of a prompt's logits rows.
///
/// Half-precision activations round every intermediate to 11 (f16) or 8 (bf16) significant bits,
/// a relative step of 2^-11 = 4.9e-4 and 2^-8 = 3.9e-3, and the errors of some 30 layers add up to
/// many such steps: transformers' own f16 and bf16 runs land near 7e-4 and 7e-3 on the 2-layer tiny
/// models and up to 7e-3 and 1.4e-1 on Llama-3.2-3B (the reference records them for every model,
/// and the report prints them beside ours). bf16, with 3 fewer mantissa bits, rounds 8 times as
/// coarsely as f16 and gets 8 times its bound. An indexing, masking or RoPE mistake gives errors
/// of order 1. f32 differs from the reference only in summation order.
fn max_relative_error(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => 1e-2,
        DType::BF16 => 8e-2,
        _ => 1e-4,
    }
}

/// One prompt of a reference: its ids, and the float32 logits of positions `start..ids.len()`.
struct Prompt {
    ids: Vec<u32>,
    start: usize,
    /// `[ids.len() - start, vocab]`, row-major.
    logits: Vec<f32>,
}

struct Reference {
    prompts: Vec<Prompt>,
    vocab: usize,
    /// transformers' own relative error in f16 and bf16, per prompt, when the file records it.
    hf_f16: Option<Vec<f32>>,
    hf_bf16: Option<Vec<f32>>,
}

fn read_reference(dir: &Path) -> Reference {
    let path = dir.join("reference.safetensors");
    let file = SafeTensors::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let get = |name: &str| {
        file.get(name)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    };
    let mut prompts = Vec::new();
    let mut vocab = 0;
    while file.contains(&format!("prompt.{}", prompts.len())) {
        let i = prompts.len();
        let ids: Vec<u32> = get(&format!("prompt.{i}"))
            .to_vec::<i32>()
            .expect("prompt ids are int32")
            .into_iter()
            .map(|id| u32::try_from(id).expect("token ids are not negative"))
            .collect();
        let start = get(&format!("logits_start.{i}"))
            .to_vec::<i32>()
            .expect("logits_start is int32")[0];
        let start = usize::try_from(start).expect("logits_start is not negative");
        let logits = get(&format!("logits.{i}"));
        let dims = logits.dims().to_vec();
        assert_eq!(
            dims.first().copied(),
            Some(ids.len() - start),
            "{}: logits.{i} rows",
            path.display()
        );
        vocab = dims[1];
        prompts.push(Prompt {
            ids,
            start,
            logits: logits.to_vec::<f32>().expect("logits are float32"),
        });
    }
    assert!(!prompts.is_empty(), "{}: no prompt.0", path.display());
    let hf = |name: &str| {
        file.contains(name)
            .then(|| get(name).to_vec::<f32>().expect("float32"))
    };
    Reference {
        prompts,
        vocab,
        hf_f16: hf("hf_rel_error.f16"),
        hf_bf16: hf("hf_rel_error.bf16"),
    }
}

/// Appends one chunk of tokens per sequence (skipping empty ones) and builds the flat batch that
/// runs them, asking for the logits of the rows at or after each sequence's `want_from` position.
/// Returns the batch and, per sequence, how many logits rows it contributes.
fn batch_of(
    chunks: &[&[u32]],
    want_from: &[usize],
    tables: &mut [BlockTable],
    kv: &mut KvCache,
) -> (Batch, Vec<usize>) {
    let mut batch = Batch::default();
    let mut rows = vec![0; chunks.len()];
    for (s, (chunk, table)) in chunks.iter().zip(tables.iter_mut()).enumerate() {
        if chunk.is_empty() {
            continue;
        }
        let start = table.num_tokens();
        table
            .append(chunk.len(), kv.allocator())
            .expect("the cache is sized for every prompt");
        let query_start = batch.tokens.len();
        for (i, &token) in chunk.iter().enumerate() {
            let position = start + i;
            batch.tokens.push(token);
            batch.positions.push(position as u32);
            batch.slots.push(table.slot(position).expect("slot"));
            if position >= want_from[s] {
                batch.logits_rows.push(query_start + i);
                rows[s] += 1;
            }
        }
        batch.sequences.push(BatchSequence {
            query_start,
            query_len: chunk.len(),
            context_len: table.num_tokens(),
            block_table: table.block_ids_u32(),
        });
    }
    (batch, rows)
}

fn kv_cache(model: &dyn Model, reference: &Reference) -> KvCache {
    let info = model.info();
    let num_blocks = reference
        .prompts
        .iter()
        .map(|p| p.ids.len().div_ceil(BLOCK_SIZE))
        .sum();
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

/// Runs one batch and hands each sequence its logits rows, appended to `out`.
fn forward_into(
    model: &dyn Model,
    batch: &Batch,
    rows: &[usize],
    kv: &mut KvCache,
    out: &mut [Vec<f32>],
) {
    let vocab = model.info().vocab_size;
    let logits = model
        .forward(batch, kv)
        .expect("forward")
        .to_vec_f32()
        .expect("logits to the host");
    assert_eq!(logits.len(), batch.logits_rows.len() * vocab, "logits size");
    let mut offset = 0;
    for (s, &n) in rows.iter().enumerate() {
        out[s].extend_from_slice(&logits[offset..offset + n * vocab]);
        offset += n * vocab;
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Prefill,
    Decode,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Mode::Prefill => "prefill",
            Mode::Decode => "decode",
        })
    }
}

/// Logits per prompt, for the reference's positions (`Prefill`) or the last `DECODE_STEPS` of
/// them (`Decode`), and the position each prompt's returned rows start at.
fn run(model: &dyn Model, reference: &Reference, mode: Mode) -> Vec<(usize, Vec<f32>)> {
    let mut kv = kv_cache(model, reference);
    let prompts = &reference.prompts;
    let mut tables: Vec<BlockTable> = prompts.iter().map(|_| kv.new_block_table()).collect();
    let mut logits = vec![Vec::new(); prompts.len()];
    let first_checked: Vec<usize> = match mode {
        Mode::Prefill => prompts.iter().map(|p| p.start).collect(),
        Mode::Decode => prompts
            .iter()
            .map(|p| p.start.max(p.ids.len().saturating_sub(DECODE_STEPS)))
            .collect(),
    };
    match mode {
        Mode::Prefill => {
            let chunks: Vec<&[u32]> = prompts.iter().map(|p| p.ids.as_slice()).collect();
            let (batch, rows) = batch_of(&chunks, &first_checked, &mut tables, &mut kv);
            forward_into(model, &batch, &rows, &mut kv, &mut logits);
        }
        Mode::Decode => {
            // The prefix batch asks for each prefix's last row only because a forward pass must
            // return some logits; those rows are dropped.
            let prefixes: Vec<&[u32]> = prompts
                .iter()
                .zip(&first_checked)
                .map(|(p, &from)| &p.ids[..from])
                .collect();
            let last_rows: Vec<usize> =
                prefixes.iter().map(|c| c.len().saturating_sub(1)).collect();
            let (batch, rows) = batch_of(&prefixes, &last_rows, &mut tables, &mut kv);
            if !batch.tokens.is_empty() {
                let mut dropped = vec![Vec::new(); prompts.len()];
                forward_into(model, &batch, &rows, &mut kv, &mut dropped);
            }
            for step in 0..DECODE_STEPS {
                let chunks: Vec<&[u32]> = prompts
                    .iter()
                    .zip(&first_checked)
                    .map(|(p, &from)| p.ids.get(from + step..from + step + 1).unwrap_or(&[]))
                    .collect();
                let (batch, rows) = batch_of(&chunks, &first_checked, &mut tables, &mut kv);
                if batch.tokens.is_empty() {
                    break;
                }
                forward_into(model, &batch, &rows, &mut kv, &mut logits);
            }
        }
    }
    for table in &mut tables {
        table.free(kv.allocator()).expect("blocks go back");
    }
    first_checked.into_iter().zip(logits).collect()
}

fn relative_l2(ours: &[f32], reference: &[f32]) -> f64 {
    let (diff, norm) = ours
        .iter()
        .zip(reference)
        .fold((0.0f64, 0.0f64), |(d, n), (&a, &b)| {
            let (a, b) = (f64::from(a), f64::from(b));
            (d + (a - b) * (a - b), n + b * b)
        });
    (diff / norm).sqrt()
}

fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}

fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        DType::F32 => "f32",
        _ => "other",
    }
}

/// One line of the report; `error > bound` fails the test.
struct Outcome {
    line: String,
    failed: bool,
}

/// Checks every model of one reference folder in each of `dtypes` on `device`.
fn check_model(dir: &Path, device: Device, dtypes: &[Option<DType>]) -> Vec<Outcome> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let reference = read_reference(dir);
    let mut outcomes = Vec::new();
    for &dtype in dtypes {
        let model = load_model(
            dir,
            &LoadOptions {
                device,
                dtype,
                ..LoadOptions::default()
            },
        )
        .unwrap_or_else(|e| panic!("loading {} as {dtype:?}: {e}", dir.display()));
        let model = model.as_ref();
        let info = model.info();
        assert_eq!(info.vocab_size, reference.vocab, "{name}: vocabulary size");
        let label = format!(
            "{}{}",
            dtype_name(info.dtype),
            match device {
                Device::Cpu => "-cpu",
                Device::Cuda(_) => "",
            }
        );
        let bound = max_relative_error(info.dtype);
        let hf = match info.dtype {
            DType::F16 => reference.hf_f16.as_deref(),
            DType::BF16 => reference.hf_bf16.as_deref(),
            _ => None,
        };
        for mode in [Mode::Prefill, Mode::Decode] {
            for (i, (from, ours)) in run(model, &reference, mode).into_iter().enumerate() {
                let prompt = &reference.prompts[i];
                let skip = (from - prompt.start) * reference.vocab;
                let theirs = &prompt.logits[skip..];
                assert_eq!(
                    ours.len(),
                    theirs.len(),
                    "{name} {label} {mode} prompt {i}: rows"
                );
                let error = relative_l2(&ours, theirs);
                let last = theirs.len() - reference.vocab;
                let agrees = argmax(&ours[last..]) == argmax(&theirs[last..]);
                let hf_error = hf
                    .and_then(|e| e.get(i))
                    .map_or_else(|| "-".to_string(), |e| format!("{e:.2e}"));
                let failed = !error.is_finite() || error >= bound;
                outcomes.push(Outcome {
                    line: format!(
                        "parity {name:<20} {label:<8} {mode:<7} p{i} len={:<4} rows={:<4} rel_l2={error:.3e} bound={bound:.0e} hf={hf_error:<8} last_argmax={} {}",
                        prompt.ids.len(),
                        ours.len() / reference.vocab,
                        if agrees { "same" } else { "DIFFERS" },
                        if failed { "FAIL" } else { "ok" },
                    ),
                    failed,
                });
            }
        }
    }
    outcomes
}

/// Every model folder under `root` (a folder holding `reference.safetensors`), sorted.
fn model_dirs(root: &Path) -> Vec<PathBuf> {
    let entries =
        std::fs::read_dir(root).unwrap_or_else(|e| panic!("reading {}: {e}", root.display()));
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.join("reference.safetensors").is_file())
        .collect();
    dirs.sort();
    assert!(
        !dirs.is_empty(),
        "{}: no model folder with a reference.safetensors",
        root.display()
    );
    dirs
}

/// Bytes of a checkpoint's weight files (the reference excluded).
fn checkpoint_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.ends_with(".safetensors") && name != "reference.safetensors"
        })
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

fn report(outcomes: &[Outcome]) {
    for outcome in outcomes {
        println!("{}", outcome.line);
    }
    let failed = outcomes.iter().filter(|o| o.failed).count();
    assert_eq!(
        failed,
        0,
        "{failed} of {} parity checks over their bound",
        outcomes.len()
    );
}

fn require_gpu() -> bool {
    std::env::var("PAGODA_REQUIRE_GPU").is_ok_and(|v| v == "1")
}

#[test]
fn models_on_gpu_match_float32_transformers() {
    let Some(root) = std::env::var_os(PARITY_DIR) else {
        assert!(
            !require_gpu(),
            "PAGODA_REQUIRE_GPU=1 but {PARITY_DIR} is not set"
        );
        eprintln!("skipped: set {PARITY_DIR} (scripts/gpu_parity_reference.py --out DIR)");
        return;
    };
    if let Err(e) = CudaDevice::get(0) {
        assert!(
            !require_gpu(),
            "PAGODA_REQUIRE_GPU=1 but no GPU is usable: {e}"
        );
        eprintln!("skipped: no GPU ({e})");
        return;
    }
    let mut outcomes = Vec::new();
    for dir in model_dirs(Path::new(&root)) {
        let mut dtypes = vec![Some(DType::F16), Some(DType::BF16)];
        if checkpoint_bytes(&dir) <= F32_CHECKPOINT_BYTES {
            dtypes.push(Some(DType::F32));
        }
        outcomes.extend(check_model(&dir, Device::Cuda(0), &dtypes));
    }
    report(&outcomes);
}

#[test]
fn models_on_cpu_match_float32_transformers() {
    if std::env::var("PAGODA_PARITY_ON_CPU").as_deref() != Ok("1") {
        eprintln!("skipped: set PAGODA_PARITY_ON_CPU=1 to run the parity check on the CPU");
        return;
    }
    let root = std::env::var_os(PARITY_DIR)
        .unwrap_or_else(|| panic!("PAGODA_PARITY_ON_CPU=1 needs {PARITY_DIR}"));
    let mut outcomes = Vec::new();
    for dir in model_dirs(Path::new(&root)) {
        outcomes.extend(check_model(&dir, Device::Cpu, &[None]));
    }
    report(&outcomes);
}

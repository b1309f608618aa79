//! `pagoda bench decode`: W1 of the benchmark suite - batch-1 greedy decode of random tokens -
//! reported against its floor, the time to read every weight once at the card's copy bandwidth.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use pagoda_kernels::ops;
use pagoda_kv::{BlockTable, KvCache, KvCacheConfig};
use pagoda_models::{Batch, LoadOptions, Model, Quantization, StepGraph, load_model};
use pagoda_tensor::{CudaDevice, DType, Device};
use rand::{RngExt, SeedableRng};

use crate::load_bar::LoadBar;

/// Bytes copied per bandwidth probe: far beyond the L2 cache, so the copy runs from DRAM.
const PROBE_BYTES: usize = 1 << 30;
const BLOCK_SIZE: usize = 16;

pub struct DecodeBench<'a> {
    pub model: &'a Path,
    pub device: Device,
    pub dtype: Option<DType>,
    pub quantize: Option<Quantization>,
    pub prompt_len: usize,
    pub new_tokens: usize,
    pub warmup: usize,
    pub reps: usize,
    pub seed: u64,
    /// On a GPU, replay decode steps as a recorded CUDA graph (prefill always runs eagerly).
    pub graphs: bool,
}

type BoxError = Box<dyn std::error::Error>;

impl DecodeBench<'_> {
    /// Runs the benchmark and returns its report as one JSON object.
    pub fn run(&self) -> Result<serde_json::Value, BoxError> {
        if self.prompt_len == 0 || self.new_tokens < 2 || self.reps == 0 {
            return Err("bench decode needs a prompt, at least 2 new tokens and 1 rep".into());
        }
        let load_start = Instant::now();
        let bar = LoadBar::start(self.model);
        let model = load_model(
            self.model,
            &LoadOptions {
                device: self.device,
                dtype: self.dtype,
                quantize: self.quantize,
                progress: Some(bar.progress()),
            },
        );
        bar.finish();
        let model: Arc<dyn Model> = Arc::from(model?);
        let load_seconds = load_start.elapsed().as_secs_f64();
        let info = model.info().clone();
        let context = self.prompt_len + self.new_tokens;
        if context > info.max_position_embeddings {
            return Err(format!(
                "prompt + new tokens = {context} exceeds the model's context of {}",
                info.max_position_embeddings
            )
            .into());
        }
        let mut kv = KvCache::new(KvCacheConfig {
            num_layers: info.num_layers,
            num_blocks: context.div_ceil(BLOCK_SIZE),
            block_size: BLOCK_SIZE,
            num_kv_heads: info.num_kv_heads,
            head_dim: info.head_dim,
            dtype: info.dtype,
            device: info.device,
        })?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(self.seed);
        let prompt: Vec<u32> = (0..self.prompt_len)
            .map(|_| rng.random_range(0..info.vocab_size as u32))
            .collect();

        let graphs = self.graphs && self.device != Device::Cpu;
        let mut graph = None;
        let mut ttft = Vec::new();
        let mut tpot = Vec::new();
        for rep in 0..self.warmup + self.reps {
            let (first, per_token) =
                self.decode_once(&model, &mut kv, &prompt, graphs.then_some(&mut graph))?;
            if rep + 1 == self.warmup {
                pagoda_kernels::profile::reset();
            }
            if rep >= self.warmup {
                ttft.push(first);
                tpot.push(per_token);
            }
        }
        // With PAGODA_PROFILE set: where the timed reps spent their time, op by op.
        for (op, calls, seconds) in pagoda_kernels::profile::report() {
            eprintln!(
                "profile {op:18} {calls:8} calls {:10.3} ms {:8.2} us/call",
                seconds * 1e3,
                seconds * 1e6 / calls as f64
            );
        }
        let ttft = median(&mut ttft);
        let tpot = median(&mut tpot);
        let bandwidth = copy_bandwidth(self.device)?;
        let floor = bandwidth.map(|b| info.weight_bytes as f64 / b);
        Ok(serde_json::json!({
            "bench": "decode",
            "engine": "pagoda",
            "model": self.model.display().to_string(),
            "architecture": format!("{:?}", info.architecture),
            "device": format!("{:?}", self.device),
            "dtype": info.dtype.name(),
            "quantize": self.quantize.as_ref().map(|q| format!("{q:?}")),
            "weight_bytes": info.weight_bytes,
            "prompt_len": self.prompt_len,
            "new_tokens": self.new_tokens,
            "reps": self.reps,
            "cuda_graphs": graphs,
            "load_s": load_seconds,
            "ttft_ms": ttft * 1e3,
            "tpot_ms": tpot * 1e3,
            "tok_s": 1.0 / tpot,
            "copy_bandwidth_gb_s": bandwidth.map(|b| b / 1e9),
            "floor_tpot_ms": floor.map(|f| f * 1e3),
            "fraction_of_floor": floor.map(|f| f / tpot),
        }))
    }

    /// One greedy generation: returns (time to first token, mean time per later token), in
    /// seconds. Each step waits for its token on the host, as a server streaming it would. With
    /// `graph`, decode steps replay the graph recorded there (recorded by the first decode step
    /// that finds none).
    fn decode_once(
        &self,
        model: &Arc<dyn Model>,
        kv: &mut KvCache,
        prompt: &[u32],
        mut graph: Option<&mut Option<StepGraph>>,
    ) -> Result<(f64, f64), BoxError> {
        let mut table = BlockTable::new(BLOCK_SIZE);
        let max_blocks = (self.prompt_len + self.new_tokens).div_ceil(BLOCK_SIZE);
        let start = Instant::now();
        let mut token = step(model.as_ref(), kv, &mut table, prompt)?;
        let first = start.elapsed().as_secs_f64();
        let decode_start = Instant::now();
        for _ in 1..self.new_tokens {
            token = match graph.as_deref_mut() {
                None => step(model.as_ref(), kv, &mut table, &[token])?,
                Some(graph) => graph_step(model, graph, max_blocks, kv, &mut table, token)?,
            };
        }
        let per_token = decode_start.elapsed().as_secs_f64() / (self.new_tokens - 1) as f64;
        table.free(kv.allocator())?;
        Ok((first, per_token))
    }
}

/// Appends `tokens` to the sequence and returns the greedy next token.
fn step(
    model: &dyn Model,
    kv: &mut KvCache,
    table: &mut BlockTable,
    tokens: &[u32],
) -> Result<u32, BoxError> {
    table.append(tokens.len(), kv.allocator())?;
    let batch = Batch::last_of_sequence(tokens, table)?;
    let logits = model.forward(&batch, kv)?;
    greedy(&logits)
}

/// [`step`] for one token through the recorded graph, recording it first if there is none.
fn graph_step(
    model: &Arc<dyn Model>,
    graph: &mut Option<StepGraph>,
    max_blocks: usize,
    kv: &mut KvCache,
    table: &mut BlockTable,
    token: u32,
) -> Result<u32, BoxError> {
    table.append(1, kv.allocator())?;
    let batch = Batch::last_of_sequence(&[token], table)?;
    let logits = match graph {
        Some(graph) => graph.run(&batch, kv)?,
        None => graph
            .insert(StepGraph::record(
                Arc::clone(model),
                &batch,
                max_blocks,
                kv,
            )?)
            .logits(),
    };
    greedy(logits)
}

fn greedy(logits: &pagoda_tensor::Tensor) -> Result<u32, BoxError> {
    let ids = ops::argmax(logits)?.to_vec::<u32>()?;
    ids.first()
        .copied()
        .ok_or_else(|| "argmax returned no token".into())
}

/// The device's copy bandwidth in bytes per second (read + write), the rate every floor is
/// measured against; none on the CPU.
pub(crate) fn copy_bandwidth(device: Device) -> Result<Option<f64>, BoxError> {
    Ok(match device {
        Device::Cuda(ordinal) => Some(pagoda_kernels::cuda::memory::copy_bandwidth(
            &CudaDevice::get(ordinal)?,
            PROBE_BYTES,
            10,
        )?),
        Device::Cpu => None,
    })
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

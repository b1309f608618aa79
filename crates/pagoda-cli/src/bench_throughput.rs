//! `pagoda bench throughput`: W2 of the benchmark suite - many requests at once (64 x 128-token
//! random prompts, 256 greedy tokens each, no end-of-sequence) through the continuous-batching
//! engine - reported as output tokens per second and against the floor of its decode steps.
//!
//! The floor of one decode step reads every weight once and every sequence's KV cache once at
//! the card's copy bandwidth. When every request is admitted at the start (the engine's
//! `max_num_seqs` covers them), all sequences decode in lockstep, so step `t` of the decode phase
//! holds `prompt + t` tokens of each: the floor of the phase is the sum over its steps.

use std::path::Path;
use std::time::Instant;

use pagoda_engine::{DType, Device, Engine, Prompt, SamplingParams};
use pagoda_models::Quantization;
use rand::{RngExt, SeedableRng};

use crate::load_bar::LoadBar;

type BoxError = Box<dyn std::error::Error>;

pub struct ThroughputBench<'a> {
    pub model: &'a Path,
    pub device: Device,
    pub dtype: Option<DType>,
    pub quantize: Option<Quantization>,
    /// Requests submitted at once, for each run.
    pub batch_sizes: Vec<usize>,
    pub prompt_len: usize,
    pub new_tokens: usize,
    pub seed: u64,
    pub cuda_graphs: bool,
}

impl ThroughputBench<'_> {
    /// Runs the benchmark at every batch size and returns one JSON report per run.
    pub fn run(&self) -> Result<Vec<serde_json::Value>, BoxError> {
        if self.prompt_len == 0 || self.new_tokens < 2 || self.batch_sizes.is_empty() {
            return Err(
                "bench throughput needs a prompt, at least 2 new tokens and a batch size".into(),
            );
        }
        if self.batch_sizes.contains(&0) {
            return Err("batch sizes must be at least 1".into());
        }
        let largest = self.batch_sizes.iter().copied().max().unwrap_or(1);
        let load_start = Instant::now();
        let bar = LoadBar::start(self.model);
        let mut builder = Engine::builder()
            .model(self.model)
            .on_load_progress(bar.callback())
            .device(self.device)
            .max_num_seqs(largest)
            // Room to prefill every prompt in one step, so that all sequences decode together.
            .max_batch_tokens((largest * self.prompt_len).max(2048))
            .max_context_tokens(self.prompt_len + self.new_tokens)
            .prefix_caching(false)
            .cuda_graphs(self.cuda_graphs);
        if let Some(dtype) = self.dtype {
            builder = builder.dtype(dtype);
        }
        if let Some(quantize) = self.quantize {
            builder = builder.quantize(quantize);
        }
        let engine = builder.build();
        bar.finish();
        let mut engine = engine?;
        let load_seconds = load_start.elapsed().as_secs_f64();
        let info = engine.model().info().clone();
        let bandwidth = crate::bench::copy_bandwidth(self.device)?;
        // K and V of one token in every layer.
        let kv_bytes_per_token =
            2 * info.num_layers * info.num_kv_heads * info.head_dim * info.dtype.size_in_bytes();

        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(self.seed);
        let mut reports = Vec::new();
        // The first (smallest) run also warms the engine up: kernels compile, graphs record.
        let mut sizes = vec![self.batch_sizes[0]];
        sizes.extend(&self.batch_sizes);
        for (run, &batch) in sizes.iter().enumerate() {
            let params = SamplingParams {
                max_tokens: self.new_tokens,
                ignore_eos: true,
                ..SamplingParams::default()
            };
            // With PAGODA_PROFILE set, each run's report says where its steps spent their time.
            pagoda_kernels::profile::reset();
            let start = Instant::now();
            for _ in 0..batch {
                let prompt: Vec<u32> = (0..self.prompt_len)
                    .map(|_| rng.random_range(0..info.vocab_size as u32))
                    .collect();
                engine.add_request(Prompt::Tokens(prompt), params.clone())?;
            }
            let mut first_tokens = Vec::with_capacity(batch);
            let mut generated = 0usize;
            let mut decode_start = None;
            let mut steps = 0usize;
            while engine.has_unfinished() {
                let outputs = engine.step()?;
                steps += 1;
                for output in &outputs {
                    if output.completion_tokens == output.token_ids_delta.len()
                        && !output.token_ids_delta.is_empty()
                    {
                        first_tokens.push(start.elapsed().as_secs_f64());
                    }
                    generated += output.token_ids_delta.len();
                }
                if decode_start.is_none() && first_tokens.len() == batch {
                    decode_start = Some(Instant::now());
                }
            }
            let seconds = start.elapsed().as_secs_f64();
            if run == 0 {
                continue;
            }
            let decode_seconds = decode_start.map(|d| d.elapsed().as_secs_f64());
            // Decode steps t = 1 .. new_tokens - 1, each reading the weights and prompt + t
            // tokens of KV per sequence.
            let decode_floor = bandwidth.map(|b| {
                (1..self.new_tokens)
                    .map(|t| {
                        let kv = batch * (self.prompt_len + t) * kv_bytes_per_token;
                        (info.weight_bytes + kv) as f64 / b
                    })
                    .sum::<f64>()
            });
            first_tokens.sort_by(f64::total_cmp);
            let ttft_median = first_tokens.get(first_tokens.len() / 2).copied();
            let metrics = engine.metrics();
            let profile: serde_json::Map<String, serde_json::Value> =
                pagoda_kernels::profile::report()
                    .into_iter()
                    .map(|(op, calls, seconds)| {
                        let entry = serde_json::json!({"calls": calls, "ms": seconds * 1e3});
                        (op.to_string(), entry)
                    })
                    .collect();
            reports.push(serde_json::json!({
                "profile": profile,
                "bench": "throughput",
                "engine": "pagoda",
                "model": self.model.display().to_string(),
                "architecture": format!("{:?}", info.architecture),
                "device": format!("{:?}", self.device),
                "dtype": info.dtype.name(),
                "quantize": self.quantize.as_ref().map(|q| format!("{q:?}")),
                "cuda_graphs": self.cuda_graphs,
                "load_s": load_seconds,
                "requests": batch,
                "prompt_len": self.prompt_len,
                "new_tokens": self.new_tokens,
                "generated_tokens": generated,
                "steps": steps,
                "seconds": seconds,
                "output_tok_s": generated as f64 / seconds,
                "ttft_median_ms": ttft_median.map(|t| t * 1e3),
                "decode_seconds": decode_seconds,
                "tpot_ms": decode_seconds.map(|d| d * 1e3 / (self.new_tokens - 1) as f64),
                "copy_bandwidth_gb_s": bandwidth.map(|b| b / 1e9),
                "decode_floor_s": decode_floor,
                "fraction_of_decode_floor": decode_floor.zip(decode_seconds).map(|(f, d)| f / d),
                "preemptions_total": metrics.preemptions_total,
            }));
        }
        Ok(reports)
    }
}

/// Draws the runs of `reports` (one per batch size) into `dir/throughput.png`: output tokens/s
/// and TPOT against the number of requests. Returns the file written.
pub fn plot(dir: &Path, reports: &[serde_json::Value]) -> Result<std::path::PathBuf, BoxError> {
    use crate::bench_serve::plot::{Series, write_scaling};
    std::fs::create_dir_all(dir)
        .map_err(|e| format!("creating the plot directory {}: {e}", dir.display()))?;
    let points = |key: &str| -> Vec<(f64, f64)> {
        let mut points: Vec<(f64, f64)> = reports
            .iter()
            .filter_map(|r| Some((r["requests"].as_f64()?, r[key].as_f64()?)))
            .collect();
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        points
    };
    let label = reports
        .first()
        .and_then(|r| r["model"].as_str())
        .map(|m| {
            Path::new(m)
                .file_name()
                .map_or(m.to_owned(), |n| n.to_string_lossy().into_owned())
                .to_uppercase()
        })
        .unwrap_or_default();
    let series = |key: &str| {
        vec![Series {
            label: label.clone(),
            points: points(key),
        }]
    };
    let path = dir.join("throughput.png");
    write_scaling(
        &path,
        &[
            ("OUTPUT TOKENS/S BY REQUESTS", series("output_tok_s")),
            ("TPOT (MS) BY REQUESTS", series("tpot_ms")),
        ],
    )?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plot_is_a_png_of_every_run() {
        let dir = tempfile::tempdir().unwrap();
        let reports: Vec<serde_json::Value> =
            [(1, 310.0, 3.2), (64, 12870.0, 4.7), (8, 2100.0, 3.8)]
                .iter()
                .map(|&(requests, tok_s, tpot)| {
                    serde_json::json!({
                        "model": "/tmp/parity/llama-3.2-3b",
                        "requests": requests,
                        "output_tok_s": tok_s,
                        "tpot_ms": tpot,
                    })
                })
                .collect();
        let path = plot(dir.path(), &reports).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        if let Ok(keep) = std::env::var("PAGODA_KEEP_PLOT") {
            std::fs::copy(&path, keep).unwrap();
        }
    }
}

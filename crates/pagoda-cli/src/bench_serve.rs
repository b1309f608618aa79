//! `pagoda bench serve`: replays W3 of the benchmark suite (Poisson arrivals, seeded prompt and
//! output lengths) against a running OpenAI-compatible server, streaming every response, and
//! reports throughput, TTFT / TPOT / end-to-end latency percentiles and failures as one JSON
//! line per request rate, optionally with every request as JSON and PNG plots.

mod client;
mod pixel_font;
pub(crate) mod plot;
mod stats;
mod workload;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use stats::{RequestRecord, Summary};
use workload::WorkloadSpec;

type BoxError = Box<dyn std::error::Error>;

#[derive(Args)]
pub struct BenchServeArgs {
    /// Base URL of the server (plain HTTP).
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    url: String,
    /// The model to ask for; by default the first one the server lists at /v1/models.
    #[arg(long)]
    model: Option<String>,
    /// Mean arrivals per second. Several rates (`--rate 5,20,50`) run one after another.
    #[arg(long, value_delimiter = ',', default_value = "5")]
    rate: Vec<f64>,
    /// Seconds of arrivals at each rate: rate x duration requests are sent.
    #[arg(long, default_value_t = 300.0)]
    duration: f64,
    /// Seed of the arrivals, lengths and prompt tokens.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Shortest prompt, in tokens (lengths are uniform between min and max).
    #[arg(long, default_value_t = 64)]
    prompt_len_min: usize,
    /// Longest prompt, in tokens.
    #[arg(long, default_value_t = 1024)]
    prompt_len_max: usize,
    /// Fewest tokens a request asks for (uniform between min and max; sent with `ignore_eos`).
    #[arg(long, default_value_t = 32)]
    output_len_min: usize,
    /// Most tokens a request asks for.
    #[arg(long, default_value_t = 512)]
    output_len_max: usize,
    /// Prompt token ids are drawn below this; every model served must have at least as many.
    #[arg(long, default_value_t = 32_000)]
    vocab_size: u32,
    /// Sampling temperature of every request (0 is greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Seconds after which a request counts as failed.
    #[arg(long, default_value_t = 600.0)]
    timeout: f64,
    /// Write every run, each request included, to this JSON file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Write latency.png and timeline.png into this directory.
    #[arg(long)]
    plots: Option<PathBuf>,
}

/// What a server says about itself at /v1/models.
struct ServedModel {
    id: String,
    max_model_len: Option<usize>,
}

pub fn run(args: BenchServeArgs) -> Result<(), BoxError> {
    args.check()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting the async runtime: {e}"))?;
    runtime.block_on(run_async(args))
}

impl BenchServeArgs {
    fn check(&self) -> Result<(), BoxError> {
        if let Some(rate) = self.rate.iter().find(|r| !(r.is_finite() && **r > 0.0)) {
            return Err(format!("--rate must be positive, not {rate}").into());
        }
        if !(self.duration.is_finite() && self.duration > 0.0) {
            return Err("--duration must be a positive number of seconds".into());
        }
        if !(self.timeout.is_finite() && self.timeout > 0.0) {
            return Err("--timeout must be a positive number of seconds".into());
        }
        if self.prompt_len_min == 0 || self.prompt_len_min > self.prompt_len_max {
            return Err("prompt lengths need 1 <= --prompt-len-min <= --prompt-len-max".into());
        }
        if self.output_len_min == 0 || self.output_len_min > self.output_len_max {
            return Err("output lengths need 1 <= --output-len-min <= --output-len-max".into());
        }
        if self.vocab_size == 0 {
            return Err("--vocab-size must be positive".into());
        }
        Ok(())
    }

    fn spec(&self, rate: f64) -> WorkloadSpec {
        WorkloadSpec {
            rate,
            num_requests: (rate * self.duration).round().max(1.0) as usize,
            prompt_len: self.prompt_len_min..=self.prompt_len_max,
            output_len: self.output_len_min..=self.output_len_max,
            vocab_size: self.vocab_size,
            seed: self.seed,
        }
    }
}

async fn run_async(args: BenchServeArgs) -> Result<(), BoxError> {
    let base = args.url.trim_end_matches('/').to_owned();
    let http = client::client(Duration::from_secs_f64(args.timeout))
        .map_err(|e| format!("setting up the HTTP client: {e}"))?;
    let served = served_model(&http, &base).await?;
    let model = args.model.clone().unwrap_or(served.id);
    if let Some(context) = served.max_model_len {
        let longest = args.spec(1.0).longest_request();
        if longest > context {
            return Err(format!(
                "the server's context holds {context} tokens, but a request may take {longest} \
                 (--prompt-len-max + --output-len-max); lower those"
            )
            .into());
        }
    }
    let endpoint = format!("{base}/v1/completions");
    let mut runs: Vec<(f64, serde_json::Value, Vec<RequestRecord>)> = Vec::new();
    for &rate in &args.rate {
        let spec = args.spec(rate);
        let (records, wall_s) = replay(&http, &endpoint, &model, &spec, args.temperature).await;
        let summary = Summary::of(&records, wall_s);
        eprintln!(
            "{rate} req/s: {} of {} completed, {} failed, {:.1} output tok/s",
            summary.completed, summary.requests, summary.failed, summary.output_tok_s
        );
        for error in summary.errors.iter().take(5) {
            eprintln!("  {} x {}", error.count, error.message);
        }
        let report = report(&args, &base, &model, rate, &summary)?;
        println!("{report}");
        runs.push((rate, report, records));
    }
    if let Some(path) = &args.out {
        let json = serde_json::json!({
            "runs": runs.iter().map(|(_, report, records)| {
                let mut run = report.clone();
                run["requests"] = serde_json::json!(records);
                run
            }).collect::<Vec<_>>()
        });
        std::fs::write(path, serde_json::to_string_pretty(&json)?)
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    if let Some(dir) = &args.plots {
        let plot_runs: Vec<plot::Run<'_>> = runs
            .iter()
            .map(|(rate, _, records)| plot::Run {
                label: format!("{rate} REQ/S"),
                records,
            })
            .collect();
        for file in plot::write(dir, &plot_runs)? {
            eprintln!("wrote {}", file.display());
        }
    }
    Ok(())
}

/// The model id and context length the server reports; also tells a person early when nothing
/// is listening at `base`.
async fn served_model(http: &reqwest::Client, base: &str) -> Result<ServedModel, BoxError> {
    let url = format!("{base}/v1/models");
    let unreachable = |e: &dyn std::fmt::Display| {
        format!("cannot list the models at {url} ({e}); is the server running there?")
    };
    let response = http
        .get(&url)
        .send()
        .await
        .map_err(|e| unreachable(&client::describe(&e)))?;
    if !response.status().is_success() {
        return Err(unreachable(&response.status()).into());
    }
    let text = response.text().await.map_err(|e| unreachable(&e))?;
    let list: serde_json::Value = serde_json::from_str(&text).map_err(|e| unreachable(&e))?;
    let first = &list["data"][0];
    let id = first["id"]
        .as_str()
        .ok_or_else(|| format!("{url} lists no model; pass --model"))?;
    Ok(ServedModel {
        id: id.to_owned(),
        max_model_len: first["max_model_len"]
            .as_u64()
            .and_then(|n| usize::try_from(n).ok()),
    })
}

/// Sends every request of `spec` at its arrival time, each on its own task, and waits for all.
/// Returns the records in arrival order and the seconds from the start to the last response.
async fn replay(
    http: &reqwest::Client,
    endpoint: &str,
    model: &str,
    spec: &WorkloadSpec,
    temperature: f32,
) -> (Vec<RequestRecord>, f64) {
    let requests = spec.requests();
    let progress = ProgressBar::new(requests.len() as u64);
    if let Ok(style) = ProgressStyle::with_template(
        "{prefix} [{bar:40.cyan/blue}] {pos}/{len} done, {msg} {elapsed_precise}",
    ) {
        progress.set_style(style.progress_chars("=> "));
    }
    progress.set_prefix(format!("{} req/s", spec.rate));
    progress.set_message("0 failed");
    let failed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let tokio_start = tokio::time::Instant::from_std(start);
    let mut tasks = Vec::with_capacity(requests.len());
    for request in requests {
        tokio::time::sleep_until(tokio_start + request.at).await;
        let (http, endpoint, model) = (http.clone(), endpoint.to_owned(), model.to_owned());
        let (progress, failed) = (progress.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            let record = client::send(&http, &endpoint, &model, &request, temperature, start).await;
            if record.error.is_some() {
                let n = failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                progress.set_message(format!("{n} failed"));
            }
            progress.inc(1);
            record
        }));
    }
    let mut records = Vec::with_capacity(tasks.len());
    for task in tasks {
        records.push(task.await.unwrap_or_else(|e| RequestRecord {
            sent_at: 0.0,
            prompt_tokens: 0,
            max_tokens: 0,
            output_tokens: 0,
            ttft: None,
            e2e: None,
            error: Some(format!("the client task failed: {e}")),
        }));
    }
    let wall_s = start.elapsed().as_secs_f64();
    progress.finish();
    (records, wall_s)
}

/// One run's report: the workload that was sent and what was measured.
fn report(
    args: &BenchServeArgs,
    url: &str,
    model: &str,
    rate: f64,
    summary: &Summary,
) -> Result<serde_json::Value, BoxError> {
    let mut report = serde_json::json!({
        "bench": "serve",
        "url": url,
        "model": model,
        "rate": rate,
        "duration_s": args.duration,
        "seed": args.seed,
        "prompt_len": [args.prompt_len_min, args.prompt_len_max],
        "output_len": [args.output_len_min, args.output_len_max],
        "temperature": args.temperature,
    });
    if let (Some(report), serde_json::Value::Object(measured)) =
        (report.as_object_mut(), serde_json::to_value(summary)?)
    {
        report.extend(measured);
    }
    Ok(report)
}

//! The `pagoda` command-line tool.

mod bench;
mod bench_serve;
mod bench_throughput;
mod chat;
mod load_bar;
mod serve;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Args, Parser, Subcommand, ValueEnum};
use pagoda_engine::{ChatMessage, DType, Device, Engine, Prompt, SamplingParams};
use pagoda_models::{Nf4Options, Quantization};

#[derive(Parser)]
#[command(
    name = "pagoda",
    version,
    about = "LLM inference: generate text with GPT-NeoX and Llama models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Continue a prompt; only the generated text goes to stdout, logs go to stderr.
    Generate(GenerateArgs),
    /// Talk with a model in the terminal, using its chat template; replies stream as they come.
    Chat(chat::ChatArgs),
    /// Serve a model over HTTP with the OpenAI API (completions, chat completions, models),
    /// plus /health and Prometheus /metrics.
    Serve(serve::ServeArgs),
    /// Measure speed; prints one JSON line per run.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// W1: batch-1 greedy decode of a random prompt, against the floor of reading every weight
    /// once per token at the card's copy bandwidth.
    Decode(DecodeArgs),
    /// W2: many requests at once (64 x 128-token prompts, 256 greedy tokens each) through the
    /// continuous-batching engine; output tokens per second against the decode steps' floor.
    Throughput(ThroughputArgs),
    /// W3: replay Poisson arrivals of random-length requests against a running server,
    /// streaming, and report throughput and TTFT / TPOT / end-to-end latency percentiles.
    Serve(bench_serve::BenchServeArgs),
}

#[derive(Args)]
struct DecodeArgs {
    /// A GGUF file or a Hugging Face model directory (no tokenizer needed).
    #[arg(long)]
    model: PathBuf,
    #[arg(long, value_enum, default_value = "cuda")]
    device: DeviceArg,
    #[arg(long, value_enum)]
    dtype: Option<DTypeArg>,
    /// Quantize the weights as they load.
    #[arg(long, value_enum)]
    quantize: Option<QuantizeArg>,
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    #[arg(long, default_value_t = 256)]
    new_tokens: usize,
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Seed of the random prompt.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Launch every kernel of a decode step from the host instead of replaying the step as a
    /// recorded CUDA graph.
    #[arg(long)]
    eager: bool,
}

#[derive(Args)]
struct ThroughputArgs {
    /// A Hugging Face model directory (with tokenizer.json) or a GGUF file.
    #[arg(long)]
    model: PathBuf,
    #[arg(long, value_enum, default_value = "cuda")]
    device: DeviceArg,
    #[arg(long, value_enum)]
    dtype: Option<DTypeArg>,
    /// Quantize the weights as they load.
    #[arg(long, value_enum)]
    quantize: Option<QuantizeArg>,
    /// Requests submitted at once; several (comma-separated) give one run each, the table of
    /// throughput and TPOT as the batch grows.
    #[arg(long, value_delimiter = ',', default_value = "64")]
    batch_sizes: Vec<usize>,
    /// Also draw output tokens/s and TPOT against the number of requests into
    /// DIR/throughput.png.
    #[arg(long, value_name = "DIR")]
    plots: Option<PathBuf>,
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    #[arg(long, default_value_t = 256)]
    new_tokens: usize,
    /// Seed of the random prompts.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Launch every kernel of a decode step from the host instead of replaying recorded CUDA
    /// graphs.
    #[arg(long)]
    eager: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum DeviceArg {
    Cpu,
    Cuda,
}

/// Weights quantized as they load.
#[derive(Clone, Copy, ValueEnum)]
enum QuantizeArg {
    /// 4-bit NormalFloat in blocks of 64 with double-quantized scales (bitsandbytes' format);
    /// attention and MLP projections, the lm head stays 16-bit.
    Nf4,
}

impl QuantizeArg {
    fn quantization(self) -> Quantization {
        match self {
            QuantizeArg::Nf4 => Quantization::Nf4(Nf4Options::default()),
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum DTypeArg {
    F32,
    F16,
    Bf16,
}

#[derive(Args)]
struct GenerateArgs {
    /// A GGUF file, or a Hugging Face model directory (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// 0 picks the most likely token every time (greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Keep the smallest set of tokens whose probability reaches this (1 = off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Keep only the k most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Drop tokens less likely than this fraction of the most likely one (0 = off).
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    /// Seed of the sampler: the same seed gives the same text.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    /// Keep generating past end-of-sequence tokens (for benchmarks).
    #[arg(long)]
    ignore_eos: bool,
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
    /// Weight dtype (and on a GPU the compute dtype); default: as stored on the CPU, f16 or bf16
    /// on a GPU.
    #[arg(long, value_enum)]
    dtype: Option<DTypeArg>,
    /// Quantize the weights as they load.
    #[arg(long, value_enum)]
    quantize: Option<QuantizeArg>,
    /// The text to continue.
    prompt: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result: Result<(), Box<dyn std::error::Error>> = match cli.command {
        Command::Generate(args) => generate(args).map_err(Into::into),
        Command::Bench(BenchCommand::Decode(args)) => bench_decode(args),
        Command::Bench(BenchCommand::Throughput(args)) => bench_throughput(args),
        Command::Chat(args) => chat::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Bench(BenchCommand::Serve(args)) => bench_serve::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

impl DeviceArg {
    fn device(self) -> Device {
        match self {
            DeviceArg::Cpu => Device::Cpu,
            DeviceArg::Cuda => Device::Cuda(0),
        }
    }
}

impl DTypeArg {
    fn dtype(self) -> DType {
        match self {
            DTypeArg::F32 => DType::F32,
            DTypeArg::F16 => DType::F16,
            DTypeArg::Bf16 => DType::BF16,
        }
    }
}

fn bench_decode(args: DecodeArgs) -> Result<(), Box<dyn std::error::Error>> {
    let report = bench::DecodeBench {
        model: &args.model,
        device: args.device.device(),
        dtype: args.dtype.map(DTypeArg::dtype),
        quantize: args.quantize.map(QuantizeArg::quantization),
        prompt_len: args.prompt_len,
        new_tokens: args.new_tokens,
        warmup: args.warmup,
        reps: args.reps,
        seed: args.seed,
        graphs: !args.eager,
    }
    .run()?;
    println!("{report}");
    Ok(())
}

fn bench_throughput(args: ThroughputArgs) -> Result<(), Box<dyn std::error::Error>> {
    let reports = bench_throughput::ThroughputBench {
        model: &args.model,
        device: args.device.device(),
        dtype: args.dtype.map(DTypeArg::dtype),
        quantize: args.quantize.map(QuantizeArg::quantization),
        batch_sizes: args.batch_sizes,
        prompt_len: args.prompt_len,
        new_tokens: args.new_tokens,
        seed: args.seed,
        cuda_graphs: !args.eager,
    }
    .run()?;
    for report in &reports {
        println!("{report}");
    }
    if let Some(dir) = &args.plots {
        let path = bench_throughput::plot(dir, &reports)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

fn generate(args: GenerateArgs) -> Result<(), pagoda_engine::Error> {
    let device = args.device.device();
    let params = SamplingParams {
        max_tokens: args.max_tokens,
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        min_p: args.min_p,
        seed: Some(args.seed),
        ignore_eos: args.ignore_eos,
        ..SamplingParams::default()
    };
    params.validate()?;
    let load_start = Instant::now();
    let bar = load_bar::LoadBar::start(&args.model);
    let mut builder = Engine::builder()
        .model(&args.model)
        .device(device)
        .on_load_progress(bar.callback());
    if let Some(dtype) = args.dtype {
        builder = builder.dtype(dtype.dtype());
    }
    if let Some(quantize) = args.quantize {
        builder = builder.quantize(quantize.quantization());
    }
    let engine = builder.build();
    bar.finish();
    let mut engine = engine?;
    eprintln!(
        "loaded {} in {:.2} s",
        args.model.display(),
        load_start.elapsed().as_secs_f64()
    );
    let prompt = if args.chat {
        Prompt::Chat(vec![ChatMessage {
            role: "user".into(),
            content: args.prompt,
        }])
    } else {
        Prompt::Text(args.prompt)
    };
    let start = Instant::now();
    let id = engine.add_request(prompt, params)?;
    let mut stdout = std::io::stdout().lock();
    let mut first_token_at = None;
    let mut last = None;
    while engine.has_unfinished() {
        for output in engine.step()? {
            if !output.token_ids_delta.is_empty() {
                first_token_at.get_or_insert_with(|| start.elapsed());
            }
            let written = stdout
                .write_all(output.text_delta.as_bytes())
                .and_then(|()| stdout.flush());
            match written {
                // A reader that stops early (`pagoda generate ... | head`) ends generation, not
                // in an error.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                    engine.abort(id);
                    return Ok(());
                }
                Err(e) => {
                    return Err(pagoda_engine::Error::Internal(format!(
                        "writing to stdout: {e}"
                    )));
                }
                Ok(()) => {}
            }
            if output.is_finished() {
                last = Some(output);
            }
        }
    }
    writeln!(stdout).ok();
    let Some(last) = last else {
        return Err(pagoda_engine::Error::Internal(
            "the request ended without a last output".into(),
        ));
    };
    let time_to_first_token = first_token_at.unwrap_or_else(|| start.elapsed());
    let decoded = last.completion_tokens.saturating_sub(1);
    let decode_secs = start
        .elapsed()
        .saturating_sub(time_to_first_token)
        .as_secs_f64();
    eprintln!(
        "{} prompt tokens, {} generated (finish: {}); time to first token {:.1} ms, decode {:.1} \
         tok/s",
        last.prompt_tokens,
        last.completion_tokens,
        last.finish_reason.map_or("none", |reason| reason.as_str()),
        time_to_first_token.as_secs_f64() * 1e3,
        if decode_secs > 0.0 {
            decoded as f64 / decode_secs
        } else {
            0.0
        }
    );
    Ok(())
}

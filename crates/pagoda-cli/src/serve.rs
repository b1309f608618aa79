//! `pagoda serve`: the OpenAI-compatible HTTP server of pagoda-server over one model; and the
//! engine options `serve` and `chat` share.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use pagoda_engine::Engine;
use pagoda_server::ServerConfig;

use crate::load_bar::LoadBar;
use crate::{DTypeArg, DeviceArg, QuantizeArg};

type BoxError = Box<dyn std::error::Error>;

/// Which model to load and where to run it.
#[derive(Args)]
pub struct EngineArgs {
    /// A GGUF file, or a Hugging Face model directory (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
    /// Weight dtype (and on a GPU the compute dtype); default: as stored on the CPU, f16 or bf16
    /// on a GPU.
    #[arg(long, value_enum)]
    pub dtype: Option<DTypeArg>,
    /// Quantize the weights as they load.
    #[arg(long, value_enum)]
    pub quantize: Option<QuantizeArg>,
    /// The longest prompt plus reply, in tokens, to reserve KV memory for; default: the
    /// model's context, at most 8192.
    #[arg(long)]
    pub max_context_tokens: Option<usize>,
    /// GiB of KV cache; default: on a GPU 90% of the memory left after the weights (less 1 GiB
    /// for activations), on the CPU 1 GiB.
    #[arg(long)]
    pub kv_cache_gib: Option<f64>,
    /// Most requests computing at once (default 256); the rest wait in the engine's queue.
    #[arg(long)]
    pub max_num_seqs: Option<usize>,
    /// Most tokens computed in one step (default 2048); longer prompts prefill in chunks.
    #[arg(long)]
    pub max_batch_tokens: Option<usize>,
    /// Compute every prompt in full instead of reusing the KV blocks of a shared prefix.
    #[arg(long)]
    pub no_prefix_caching: bool,
    /// On a GPU, launch every kernel of a decode step from the host instead of replaying the
    /// step as a recorded CUDA graph.
    #[arg(long)]
    pub eager: bool,
}

impl EngineArgs {
    /// Loads the model, with a progress bar on stderr while the weights load.
    pub fn load(&self) -> Result<Engine, BoxError> {
        if !self.model.exists() {
            return Err(format!(
                "there is no model at {}: give a GGUF file or a Hugging Face model directory",
                self.model.display()
            )
            .into());
        }
        let mut builder = Engine::builder()
            .model(&self.model)
            .device(self.device.device());
        if let Some(dtype) = self.dtype {
            builder = builder.dtype(dtype.dtype());
        }
        if let Some(quantize) = self.quantize {
            builder = builder.quantize(quantize.quantization());
        }
        if let Some(tokens) = self.max_context_tokens {
            builder = builder.max_context_tokens(tokens);
        }
        if let Some(gib) = self.kv_cache_gib {
            if !(gib.is_finite() && gib > 0.0) {
                return Err(format!("--kv-cache-gib must be a positive size, not {gib}").into());
            }
            builder = builder.kv_cache_memory((gib * f64::from(1u32 << 30)) as usize);
        }
        if let Some(n) = self.max_num_seqs {
            builder = builder.max_num_seqs(n);
        }
        if let Some(n) = self.max_batch_tokens {
            builder = builder.max_batch_tokens(n);
        }
        let bar = LoadBar::start(&self.model);
        builder = builder
            .prefix_caching(!self.no_prefix_caching)
            .cuda_graphs(!self.eager)
            .on_load_progress(bar.callback());
        let start = Instant::now();
        let engine = builder.build();
        bar.finish();
        let engine = engine.map_err(|e| format!("could not load {}: {e}", self.model.display()))?;
        eprintln!(
            "loaded {} in {:.1} s",
            self.model.display(),
            start.elapsed().as_secs_f64()
        );
        Ok(engine)
    }
}

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    engine: EngineArgs,
    /// The address to listen on; 0.0.0.0 for every interface.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Requests in flight (running or queued) before more are answered 429.
    #[arg(long, default_value_t = ServerConfig::default().max_pending_requests)]
    max_pending_requests: usize,
    /// The model id clients name in requests; default: the model's own name.
    #[arg(long)]
    served_model_name: Option<String>,
}

pub fn run(args: ServeArgs) -> Result<(), BoxError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting the async runtime: {e}"))?;
    // The port first: a busy one should not cost a model load to find out.
    let address = format!("{}:{}", args.host, args.port);
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(&address))
        .map_err(|e| format!("cannot listen on {address}: {e}"))?;
    let handle = args.engine.load()?.spawn();
    let config = ServerConfig {
        max_pending_requests: args.max_pending_requests,
        model_name: args.served_model_name,
        ..ServerConfig::default()
    };
    let model = config
        .model_name
        .clone()
        .unwrap_or_else(|| handle.model_name().to_owned());
    let app = pagoda_server::router(handle.clone(), config);
    let local = listener.local_addr().map_or(address, |a| a.to_string());
    eprintln!("serving {model} at http://{local}/v1 (Ctrl-C stops)");
    let served = runtime.block_on(pagoda_server::serve(listener, app, stop_signal()));
    handle.shutdown();
    served.map_err(|e| format!("the server stopped: {e}").into())
}

/// Resolves at the first Ctrl-C, after which requests in flight may finish; a second Ctrl-C
/// exits at once.
async fn stop_signal() {
    if tokio::signal::ctrl_c().await.is_err() {
        // Without a signal handler the server runs until it is killed.
        std::future::pending::<()>().await;
    }
    eprintln!("stopping: letting requests in flight finish (Ctrl-C again to quit now)");
    tokio::spawn(async {
        if tokio::signal::ctrl_c().await.is_ok() {
            std::process::exit(130);
        }
    });
}

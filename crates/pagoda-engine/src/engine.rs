//! The engine: a model, its tokenizer and a paged KV cache, serving many requests at once by
//! continuous batching.
//!
//! Each [`Engine::step`] asks the scheduler for this step's work (decodes of the running
//! requests, then prefill chunks of waiting ones), runs all of it as one forward pass over a flat
//! batch, samples a token for every request whose known tokens the step completed, and turns
//! those tokens into text deltas, checking stop conditions on the way.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use pagoda_kernels::profile::OpTimer;
use pagoda_kv::{KvBlockManager, KvCache, KvCacheConfig, SeqId};
use pagoda_models::{
    CheckpointFormat, LoadEvent, LoadOptions, LoadProgress, Model, ModelInfo, Quantization,
    load_model,
};
use pagoda_sched::{
    KvSpace, NewRequest, RequestId, SampledToken, Scheduler, SchedulerConfig, SchedulerOutput,
};
use pagoda_tensor::gguf::GgufFile;
use pagoda_tensor::{DType, Device, Tensor};

use crate::chat_template::{ChatMessage, ChatTemplate};
use crate::decode_graphs::DecodeGraphs;
use crate::device_sampling::{DeviceRow, sample_rows};
use crate::intake::{Intake, Prompt};
use crate::kv_space::ManagedKvSpace;
use crate::metrics::Metrics;
use crate::output::{Completion, RequestOutput};
use crate::params::{FinishReason, SamplingParams};
use crate::sampler::{RequestSampler, Sample, fresh_seed};
use crate::step_batch::{CPU_MAX_FORWARD_ROWS, Chunk, is_decode, pack};
use crate::text_stream::TextStream;
use crate::tokenizer::{GgufVocab, Tokenizer};
use crate::{Error, Result};

/// Tokens per KV block. 16 is the usual choice of paged-attention engines: small enough that
/// little of a block goes unused, large enough that block tables stay short.
const DEFAULT_BLOCK_SIZE: usize = 16;

/// The longest sequence by default, in tokens. Models that accept 128k positions would
/// otherwise require KV memory for a context few prompts use; ask for more with
/// [`EngineBuilder::max_context_tokens`].
const DEFAULT_MAX_CONTEXT_TOKENS: usize = 8192;

/// Requests running at once by default (vLLM's default `max_num_seqs`).
const DEFAULT_MAX_NUM_SEQS: usize = 256;

/// Tokens computed per step by default: room for the decodes of every running request and a
/// prefill chunk (vLLM's default with chunked prefill for online serving).
const DEFAULT_MAX_BATCH_TOKENS: usize = 2048;

/// KV memory on the CPU when none is given: a few thousand to a few hundred thousand tokens for
/// the small models that run there.
const DEFAULT_CPU_KV_BYTES: usize = 1 << 30;

/// Share of the free GPU memory (after the weights are placed) the KV cache may take when no
/// budget is given, as vLLM's `gpu_memory_utilization`.
const GPU_MEMORY_FRACTION: f64 = 0.9;

/// GPU memory kept out of the KV budget for a step's activations, logits and the cuBLAS
/// workspace: a 2048-token step of a 3B-parameter model needs a few hundred MiB.
const GPU_ACTIVATION_HEADROOM: usize = 1 << 30;

/// Share of the KV blocks an admission must leave free for running requests to grow into
/// (vLLM's default watermark).
const WATERMARK_FRACTION: usize = 100;

/// Builds an [`Engine`]: `Engine::builder().model(path).build()?`.
#[derive(Clone, Debug)]
pub struct EngineBuilder {
    model: Option<PathBuf>,
    device: Device,
    dtype: Option<DType>,
    quantize: Option<Quantization>,
    block_size: usize,
    max_context_tokens: Option<usize>,
    kv_cache_memory: Option<usize>,
    max_num_seqs: usize,
    max_batch_tokens: usize,
    prefix_caching: bool,
    cuda_graphs: bool,
    tokenizer: Option<Tokenizer>,
    model_name: Option<String>,
    load_progress: Option<LoadProgress>,
}

impl EngineBuilder {
    /// A GGUF file, or a Hugging Face directory with config.json, safetensors and tokenizer.json.
    pub fn model(mut self, path: impl AsRef<Path>) -> Self {
        self.model = Some(path.as_ref().to_owned());
        self
    }

    pub fn device(mut self, device: Device) -> Self {
        self.device = device;
        self
    }

    /// The dtype of the weights (and on a GPU of activations and the KV cache); by default the
    /// checkpoint's own on the CPU, f16 or bf16 on a GPU.
    pub fn dtype(mut self, dtype: DType) -> Self {
        self.dtype = Some(dtype);
        self
    }

    /// Quantize the dense weights as they load (see [`Quantization`]).
    pub fn quantize(mut self, quantization: Quantization) -> Self {
        self.quantize = Some(quantization);
        self
    }

    /// Tokens per KV-cache block (16 by default).
    pub fn block_size(mut self, tokens: usize) -> Self {
        self.block_size = tokens;
        self
    }

    /// The longest sequence (prompt + output) a request may have; at most the model's context.
    /// By default the model's context, capped at 8192 tokens.
    pub fn max_context_tokens(mut self, tokens: usize) -> Self {
        self.max_context_tokens = Some(tokens);
        self
    }

    /// Bytes of KV cache. By default, on a GPU, 90% of the memory free once the weights are
    /// placed, less 1 GiB for activations; on the CPU 1 GiB, or less when that is more than
    /// `max_num_seqs` sequences of the whole context take. It must hold at least one sequence
    /// of the whole context.
    pub fn kv_cache_memory(mut self, bytes: usize) -> Self {
        self.kv_cache_memory = Some(bytes);
        self
    }

    /// Most requests running at once (256 by default).
    pub fn max_num_seqs(mut self, n: usize) -> Self {
        self.max_num_seqs = n;
        self
    }

    /// Most tokens computed in one step, over all requests (2048 by default). Longer prompts are
    /// prefilled in chunks over several steps.
    pub fn max_batch_tokens(mut self, n: usize) -> Self {
        self.max_batch_tokens = n;
        self
    }

    /// Whether a prompt that starts like an earlier one reuses that one's KV blocks instead of
    /// computing them again (on by default).
    pub fn prefix_caching(mut self, on: bool) -> Self {
        self.prefix_caching = on;
        self
    }

    /// Whether decode steps on a GPU replay recorded CUDA graphs (on by default).
    ///
    /// Every engine on one GPU enqueues its work on that device's single stream, and recording
    /// a graph captures that stream: engines that share a GPU within one process must not step
    /// at the same time while graphs are on (step them from one thread, or turn graphs off).
    pub fn cuda_graphs(mut self, on: bool) -> Self {
        self.cuda_graphs = on;
        self
    }

    /// Use this tokenizer instead of the checkpoint's (which then needs none); the chat template
    /// is then ChatML.
    pub fn tokenizer(mut self, tokenizer: Tokenizer) -> Self {
        self.tokenizer = Some(tokenizer);
        self
    }

    /// The name the model is served under; by default the checkpoint's file or directory name.
    pub fn model_name(mut self, name: impl Into<String>) -> Self {
        self.model_name = Some(name.into());
        self
    }

    /// Calls `report` as the weights load, with the bytes of the checkpoint placed so far out of
    /// its total (see [`LoadProgress`] for when); the last event of a load that succeeded has
    /// [`LoadEvent::is_done`].
    pub fn on_load_progress(mut self, report: impl Fn(LoadEvent) + Send + Sync + 'static) -> Self {
        self.load_progress = Some(LoadProgress::new(report));
        self
    }

    /// Loads the model and tokenizer and sizes the KV cache.
    ///
    /// # Errors
    /// [`Error::Config`] for a missing model or limits that cannot work together (among them a
    /// KV budget too small for one sequence of the whole context); the loaders' errors.
    pub fn build(self) -> Result<Engine> {
        let path = self
            .model
            .clone()
            .ok_or(Error::Config("no model given: call .model(path)".into()))?;
        for (name, value) in [
            ("block size", self.block_size),
            ("max_num_seqs", self.max_num_seqs),
            ("max_batch_tokens", self.max_batch_tokens),
        ] {
            if value == 0 {
                return Err(Error::Config(format!("{name} must be positive")));
            }
        }
        let (tokenizer, chat_template) = match self.tokenizer.clone() {
            Some(tokenizer) => (tokenizer, None),
            None => load_tokenizer(&path)?,
        };
        let model: Arc<dyn Model> = Arc::from(load_model(
            &path,
            &LoadOptions {
                device: self.device,
                dtype: self.dtype,
                quantize: self.quantize,
                progress: self.load_progress.clone(),
            },
        )?);
        let info = model.info().clone();
        if tokenizer.vocab_size() > info.vocab_size {
            return Err(Error::Config(format!(
                "the tokenizer has {} tokens but the model only {}",
                tokenizer.vocab_size(),
                info.vocab_size
            )));
        }
        let context = match self.max_context_tokens {
            Some(0) => return Err(Error::Config("max context tokens must be positive".into())),
            Some(n) => n.min(info.max_position_embeddings),
            None => info.max_position_embeddings.min(DEFAULT_MAX_CONTEXT_TOKENS),
        };
        let model_name = self
            .model_name
            .clone()
            .unwrap_or_else(|| name_of_checkpoint(&path));
        let intake = Intake::new(
            tokenizer,
            chat_template,
            model_name,
            info.vocab_size,
            context,
        );
        self.assemble(model, intake)
    }

    /// The KV cache, scheduler and graphs for a loaded model.
    fn assemble(self, model: Arc<dyn Model>, intake: Intake) -> Result<Engine> {
        let info = model.info().clone();
        let context = intake.max_context;
        let mut geometry = KvCacheConfig {
            num_layers: info.num_layers,
            num_blocks: 0,
            block_size: self.block_size,
            num_kv_heads: info.num_kv_heads,
            head_dim: info.head_dim,
            dtype: info.dtype,
            device: info.device,
        };
        let blocks_per_seq = context.div_ceil(self.block_size);
        let budget = match self.kv_cache_memory {
            Some(bytes) => bytes,
            None => default_kv_budget(&info, &geometry, blocks_per_seq, self.max_num_seqs)?,
        };
        if let Device::Cuda(ordinal) = info.device {
            load_kernels(ordinal)?;
        }
        let graphs = self.cuda_graphs && info.device.is_cuda();
        // Padded decode rows write into a block of their own that no request is given.
        let pad_blocks = usize::from(graphs);
        let page_blocks = geometry.blocks_for_budget(budget);
        let managed = page_blocks.saturating_sub(pad_blocks);
        if managed < blocks_per_seq {
            return Err(Error::Config(format!(
                "a KV cache of {budget} bytes holds {managed} blocks of {} tokens ({} bytes \
                 each), but one sequence of the whole context ({context} tokens) needs \
                 {blocks_per_seq}: give more KV memory or fewer max_context_tokens",
                self.block_size,
                geometry.bytes_per_block()
            )));
        }
        geometry.num_blocks = page_blocks;
        let kv = KvCache::pages_only(geometry)?;
        let manager = KvBlockManager::new(managed, self.block_size)?;
        let space = if self.prefix_caching {
            ManagedKvSpace::new(manager)
        } else {
            ManagedKvSpace::without_prefix_caching(manager)
        };
        let mut config = SchedulerConfig::new(context);
        config.max_num_seqs = self.max_num_seqs;
        config.max_batch_tokens = self.max_batch_tokens;
        config.watermark_blocks = managed / WATERMARK_FRACTION;
        let scheduler =
            Scheduler::new(config, space).map_err(|e| Error::Config(format!("scheduler: {e}")))?;
        let graphs = graphs.then(|| {
            DecodeGraphs::new(
                self.max_num_seqs,
                blocks_per_seq,
                managed as u32,
                self.block_size,
            )
        });
        Ok(Engine {
            max_forward_rows: match info.device {
                Device::Cpu => CPU_MAX_FORWARD_ROWS,
                Device::Cuda(_) => usize::MAX,
            },
            model,
            intake: Arc::new(intake),
            kv,
            scheduler,
            requests: HashMap::new(),
            pending: Vec::new(),
            metrics: Metrics::default(),
            graphs,
            prefix_caching: self.prefix_caching,
        })
    }
}

/// The KV budget when none is given (see [`EngineBuilder::kv_cache_memory`]).
fn default_kv_budget(
    info: &ModelInfo,
    geometry: &KvCacheConfig,
    blocks_per_seq: usize,
    max_num_seqs: usize,
) -> Result<usize> {
    match info.device {
        Device::Cpu => {
            let enough = geometry
                .bytes_per_block()
                .saturating_mul(blocks_per_seq)
                .saturating_mul(max_num_seqs);
            Ok(DEFAULT_CPU_KV_BYTES.min(enough))
        }
        Device::Cuda(ordinal) => {
            let free = free_device_memory(ordinal)?;
            Ok(((free as f64 * GPU_MEMORY_FRACTION) as usize)
                .saturating_sub(GPU_ACTIVATION_HEADROOM))
        }
    }
}

/// Compiles (or reads from the disk cache) every kernel module on GPU `ordinal`, in parallel,
/// before the engine takes requests: compiled one by one as the first steps need them, they
/// would hold those steps up for tens of seconds.
#[cfg(feature = "cuda")]
fn load_kernels(ordinal: usize) -> Result<()> {
    use pagoda_kernels::cuda::KernelModule;
    let device = pagoda_tensor::CudaDevice::get(ordinal)?;
    Ok(pagoda_kernels::cuda::registry::preload(
        &device,
        &KernelModule::ALL,
    )?)
}

/// Without the `cuda` feature no model reaches a GPU.
#[cfg(not(feature = "cuda"))]
fn load_kernels(_ordinal: usize) -> Result<()> {
    Ok(())
}

/// Bytes free on GPU `ordinal` now.
#[cfg(feature = "cuda")]
fn free_device_memory(ordinal: usize) -> Result<usize> {
    let device = pagoda_tensor::CudaDevice::get(ordinal)?;
    device.synchronize()?;
    let (free, _total) = device
        .context()
        .mem_get_info()
        .map_err(|e| Error::Internal(format!("asking cuda:{ordinal} for its free memory: {e}")))?;
    Ok(free)
}

/// Bytes free on GPU `ordinal` now.
#[cfg(not(feature = "cuda"))]
fn free_device_memory(ordinal: usize) -> Result<usize> {
    Err(Error::Config(format!(
        "cuda:{ordinal} asked for, but pagoda-engine was built without the `cuda` feature"
    )))
}

/// The name a checkpoint is served under: its file name without the extension, or its
/// directory's name.
fn name_of_checkpoint(path: &Path) -> String {
    let name = if path.is_dir() {
        path.file_name()
    } else {
        path.file_stem()
    };
    name.map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// The engine's state of one unfinished request.
struct ActiveRequest {
    params: SamplingParams,
    sampler: RequestSampler,
    text: TextStream,
    prompt_tokens: usize,
    /// Tokens emitted so far (a stopping token is not).
    completion_tokens: usize,
    arrival: Instant,
    admitted: bool,
    last_token_at: Option<Instant>,
    /// A stop string ended the text; nothing is left to flush.
    text_stopped: bool,
}

impl ActiveRequest {
    fn output(&self, id: RequestId) -> RequestOutput {
        RequestOutput::empty(id, self.prompt_tokens, self.completion_tokens)
    }
}

/// The logits of a step's token-producing rows, in step order.
enum StepLogits {
    /// Rows of f32 on the host (CPU models).
    Host(Vec<f32>),
    /// `[rows, vocab]` tensors on the GPU, one per forward pass, sampled there.
    Device(Vec<Tensor>),
}

/// Runs one model over many requests at once.
///
/// [`add_request`](Self::add_request) queues a request, [`step`](Self::step) runs one step of
/// every running request and returns what each produced, [`abort`](Self::abort) ends one.
/// [`generate`](Self::generate) does all of that for a list of prompts, and
/// [`spawn`](Self::spawn) moves the engine onto a thread of its own behind an
/// [`EngineHandle`](crate::EngineHandle) for concurrent callers.
pub struct Engine {
    model: Arc<dyn Model>,
    intake: Arc<Intake>,
    kv: KvCache,
    scheduler: Scheduler<ManagedKvSpace>,
    requests: HashMap<RequestId, ActiveRequest>,
    /// Outputs to return from the next step: final outputs of aborted requests, and those
    /// `generate` took from steps but did not own.
    pending: Vec<RequestOutput>,
    metrics: Metrics,
    graphs: Option<DecodeGraphs>,
    /// Most token rows per forward pass.
    max_forward_rows: usize,
    prefix_caching: bool,
}

impl Engine {
    pub fn builder() -> EngineBuilder {
        EngineBuilder {
            model: None,
            device: Device::Cpu,
            dtype: None,
            quantize: None,
            block_size: DEFAULT_BLOCK_SIZE,
            max_context_tokens: None,
            kv_cache_memory: None,
            max_num_seqs: DEFAULT_MAX_NUM_SEQS,
            max_batch_tokens: DEFAULT_MAX_BATCH_TOKENS,
            prefix_caching: true,
            cuda_graphs: true,
            tokenizer: None,
            model_name: None,
            load_progress: None,
        }
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.intake.tokenizer
    }

    pub fn model(&self) -> &dyn Model {
        self.model.as_ref()
    }

    /// The name the model is served under.
    pub fn model_name(&self) -> &str {
        &self.intake.model_name
    }

    /// The longest sequence, prompt plus output, a request may have.
    pub fn max_context_tokens(&self) -> usize {
        self.intake.max_context
    }

    /// Renders chat messages with the model's template, or ChatML when it has none.
    pub fn render_chat(&self, messages: &[ChatMessage]) -> Result<String> {
        self.intake.render_chat(messages)
    }

    /// Tokenizes a prompt as generation sees it; refuses an empty one and ids outside the
    /// vocabulary.
    pub fn prompt_tokens(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        self.intake.prompt_tokens(prompt)
    }

    /// Queues a request; its outputs come from later [`step`](Self::step)s.
    ///
    /// # Errors
    /// [`Error::InvalidRequest`] for an empty prompt, token ids outside the vocabulary, a prompt
    /// plus `max_tokens` beyond the context, or invalid sampling values; tokenizer and template
    /// errors.
    pub fn add_request(&mut self, prompt: Prompt, params: SamplingParams) -> Result<RequestId> {
        let tokens = self.intake.prompt_tokens(&prompt)?;
        self.intake.check(tokens.len(), &params)?;
        let id = self.intake.next_id();
        self.add_checked(id, tokens, params, Instant::now())?;
        Ok(id)
    }

    /// Queues a request whose prompt and parameters [`Intake`] has checked.
    pub(crate) fn add_checked(
        &mut self,
        id: RequestId,
        tokens: Vec<u32>,
        params: SamplingParams,
        arrival: Instant,
    ) -> Result<()> {
        let seed = params.seed.unwrap_or_else(|| fresh_seed(id.0));
        let sampler =
            RequestSampler::new(&params, seed).map_err(|e| Error::InvalidRequest(e.to_string()))?;
        let prompt_tokens = tokens.len();
        self.scheduler
            .add_request(NewRequest::new(id, tokens, params.max_tokens))
            .map_err(|e| Error::InvalidRequest(e.to_string()))?;
        self.metrics.prompt_tokens_total += prompt_tokens as u64;
        self.requests.insert(
            id,
            ActiveRequest {
                text: TextStream::new(params.stop.clone()),
                params,
                sampler,
                prompt_tokens,
                completion_tokens: 0,
                arrival,
                admitted: false,
                last_token_at: None,
                text_stopped: false,
            },
        );
        Ok(())
    }

    /// Ends a request at once: its KV blocks are freed now, and the next [`step`](Self::step)
    /// returns its last output, with [`FinishReason::Abort`]. Returns false for an unknown or
    /// finished request.
    pub fn abort(&mut self, id: RequestId) -> bool {
        self.scheduler.abort(id);
        let Some(request) = self.requests.remove(&id) else {
            return false;
        };
        let mut output = request.output(id);
        output.finish_reason = Some(FinishReason::Abort);
        self.pending.push(output);
        self.metrics.requests_aborted_total += 1;
        true
    }

    /// Whether [`step`](Self::step) has anything left to do or report.
    pub fn has_unfinished(&self) -> bool {
        !self.requests.is_empty() || !self.pending.is_empty()
    }

    /// Requests queued or running.
    pub fn num_unfinished_requests(&self) -> usize {
        self.requests.len()
    }

    /// A snapshot of the counters, gauges and latency histograms.
    pub fn metrics(&self) -> Metrics {
        let stats = self.scheduler.kv().manager().stats();
        Metrics {
            num_running: self.scheduler.num_running(),
            num_waiting: self.scheduler.num_waiting(),
            num_preempted: self.scheduler.num_preempted(),
            kv_usage: stats.usage() as f32,
            prefix_cache_hit_rate: stats.prefix_hit_rate() as f32,
            ..self.metrics.clone()
        }
    }

    /// Runs one step: every scheduled request's chunk through the model in one batch, a token
    /// sampled for each request whose known tokens the step completed. Returns one output per
    /// request that got a token or finished.
    ///
    /// # Errors
    /// When the forward pass fails, the requests of the step are aborted (their last outputs,
    /// with [`FinishReason::Abort`], come from the next step) and the error is returned; the
    /// engine stays usable.
    pub fn step(&mut self) -> Result<Vec<RequestOutput>> {
        let mut outputs = std::mem::take(&mut self.pending);
        let plan = {
            let _timer = OpTimer::start("engine.schedule", Device::Cpu);
            self.scheduler
                .schedule()
                .map_err(|e| Error::Internal(format!("scheduling a step: {e}")))?
        };
        self.metrics.preemptions_total += plan.preempted.len() as u64;
        if plan.is_empty() {
            return Ok(outputs);
        }
        let now = Instant::now();
        for scheduled in plan.scheduled.iter().filter(|s| s.newly_admitted) {
            if let Some(request) = self.requests.get_mut(&scheduled.id)
                && !request.admitted
            {
                request.admitted = true;
                self.metrics
                    .queue_time
                    .observe((now - request.arrival).as_secs_f64());
            }
        }
        let ran = self
            .run_model(&plan)
            .and_then(|logits| self.sample(&plan, logits, &mut outputs));
        match ran {
            Ok(()) => Ok(outputs),
            Err(e) => {
                // The scheduler still waits for this step: close it by aborting its requests,
                // so that the next step starts clean.
                if self.scheduler.is_step_in_flight() {
                    self.fail_step(&plan, &e);
                }
                self.pending.splice(0..0, outputs);
                Err(e)
            }
        }
    }

    /// Runs the step's chunks through the model and commits the computed tokens to the prefix
    /// cache. Returns the logits of the chunks that produce a token, in step order.
    fn run_model(&mut self, plan: &SchedulerOutput) -> Result<StepLogits> {
        let copies = self.scheduler.kv_mut().manager_mut().take_copies();
        self.kv.copy_blocks(&copies)?;
        let manager = self.scheduler.kv().manager();
        let chunks = plan
            .scheduled
            .iter()
            .map(|s| {
                let table = manager.table(SeqId(s.id.0)).ok_or_else(|| {
                    Error::Internal(format!("{} was scheduled without a block table", s.id))
                })?;
                Ok(Chunk {
                    tokens: &s.token_ids,
                    start: s.start,
                    table,
                    wants_logits: s.produces_token,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let batches = {
            let _timer = OpTimer::start("engine.pack", Device::Cpu);
            pack(&chunks, self.max_forward_rows)?
        };
        let logits = {
            let _timer = OpTimer::start("engine.forward", self.model.info().device);
            self.forward(&batches)?
        };
        if self.prefix_caching {
            self.commit(plan)?;
        }
        Ok(logits)
    }

    /// The logits rows of `batches`, run in order: left on the device on a GPU (sampling runs
    /// there), copied to the host as f32 on the CPU.
    fn forward(&mut self, batches: &[pagoda_models::Batch]) -> Result<StepLogits> {
        let on_device = self.model.info().device.is_cuda();
        if let (Some(graphs), [batch]) = (&mut self.graphs, batches)
            && is_decode(batch)
        {
            let replayed = graphs.run(&self.model, batch, &mut self.kv)?;
            if let Some(error) = graphs.last_error.take() {
                self.metrics.last_error = Some(error);
            }
            if let Some(logits) = replayed {
                return Ok(StepLogits::Device(vec![logits]));
            }
        }
        let mut host = Vec::new();
        let mut device = Vec::new();
        for batch in batches {
            let out = self.model.forward(batch, &mut self.kv)?;
            if batch.logits_rows.is_empty() {
                continue;
            }
            if on_device {
                device.push(out);
            } else {
                host.extend(out.to_vec_f32()?);
            }
        }
        Ok(if on_device {
            StepLogits::Device(device)
        } else {
            StepLogits::Host(host)
        })
    }

    /// Puts the blocks the step filled into the prefix cache.
    fn commit(&mut self, plan: &SchedulerOutput) -> Result<()> {
        let block_size = self.scheduler.kv().block_size();
        for scheduled in &plan.scheduled {
            // Only a step that fills a block adds anything to the cache.
            if scheduled.end() / block_size == scheduled.start / block_size {
                continue;
            }
            let Some(tokens) = self
                .scheduler
                .request(scheduled.id)
                .map(|r| r.tokens()[..scheduled.end()].to_vec())
            else {
                continue;
            };
            self.scheduler
                .kv_mut()
                .manager_mut()
                .commit(SeqId(scheduled.id.0), &tokens)?;
        }
        Ok(())
    }

    /// Samples the step's tokens, reports them to the scheduler and builds the outputs. On
    /// error the step is still in flight.
    fn sample(
        &mut self,
        plan: &SchedulerOutput,
        logits: StepLogits,
        outputs: &mut Vec<RequestOutput>,
    ) -> Result<()> {
        let sampled = {
            let _timer = OpTimer::start("engine.sample", self.model.info().device);
            self.pick_tokens(plan, logits)?
        };
        let _timer = OpTimer::start("engine.outputs", Device::Cpu);
        let tokenizer = &self.intake.tokenizer;
        let now = Instant::now();
        let mut samples = Vec::new();
        let mut failed = Vec::new();
        // Where each sampled request's output is in `outputs`.
        let mut output_of = HashMap::new();
        for (id, sample) in sampled {
            let Some(request) = self.requests.get_mut(&id) else {
                failed.push((
                    id,
                    Error::Internal(format!("{id} has no state to sample with")),
                ));
                continue;
            };
            let sample = match sample {
                Ok(sample) => sample,
                Err(e) => {
                    failed.push((id, e));
                    continue;
                }
            };
            match request.last_token_at {
                None => self
                    .metrics
                    .time_to_first_token
                    .observe((now - request.arrival).as_secs_f64()),
                Some(last) => self
                    .metrics
                    .time_per_output_token
                    .observe((now - last).as_secs_f64()),
            }
            request.last_token_at = Some(now);
            self.metrics.generation_tokens_total += 1;

            let token = sample.token;
            let params = &request.params;
            let stop_token = params.stop_token_ids.contains(&token)
                || (!params.ignore_eos && tokenizer.eos_token_ids().contains(&token));
            let mut output = request.output(id);
            let mut stopped = stop_token;
            if !stop_token {
                match request.text.push(tokenizer, token) {
                    Ok(delta) => {
                        output.text_delta = delta.text;
                        request.text_stopped = delta.stopped;
                        stopped = delta.stopped;
                    }
                    Err(e) => {
                        failed.push((id, e));
                        continue;
                    }
                }
                request.completion_tokens += 1;
                output.completion_tokens = request.completion_tokens;
                output.token_ids_delta.push(token);
                output.logprobs_delta.extend(sample.logprob);
            }
            samples.push(SampledToken { id, token, stopped });
            output_of.insert(id, outputs.len());
            outputs.push(output);
        }
        for (id, error) in failed {
            self.fail_request(id, &error);
        }
        // Their last outputs belong to this step.
        outputs.append(&mut self.pending);
        let finished = self
            .scheduler
            .update(&samples)
            .map_err(|e| Error::Internal(format!("reporting a step to the scheduler: {e}")))?;
        for (id, reason) in finished {
            let (Some(request), Some(&index)) = (self.requests.remove(&id), output_of.get(&id))
            else {
                continue;
            };
            self.finish(request, reason, &mut outputs[index], now);
        }
        Ok(())
    }

    /// One token (or the reason there is none) for each request of `plan` that produces one, in
    /// step order, from the step's logits.
    fn pick_tokens(
        &mut self,
        plan: &SchedulerOutput,
        logits: StepLogits,
    ) -> Result<Vec<(RequestId, Result<Sample>)>> {
        let ids: Vec<RequestId> = plan
            .scheduled
            .iter()
            .filter(|s| s.produces_token)
            .map(|s| s.id)
            .collect();
        let missing = |id: RequestId| Error::Internal(format!("{id} has no state to sample with"));
        match logits {
            StepLogits::Host(mut logits) => {
                let vocab = self.model.info().vocab_size;
                let rows = logits.chunks_exact_mut(vocab);
                Ok(ids
                    .iter()
                    .zip(rows)
                    .map(|(&id, row)| {
                        let sample = match (self.requests.get_mut(&id), self.scheduler.request(id))
                        {
                            (Some(request), Some(tokens)) => {
                                request
                                    .sampler
                                    .sample(row, tokens.prompt(), tokens.output())
                            }
                            _ => Err(missing(id)),
                        };
                        (id, sample)
                    })
                    .collect())
            }
            StepLogits::Device(tensors) => {
                // Every request appears once in a step, so each sampler is borrowed once.
                let mut samplers: HashMap<RequestId, &mut RequestSampler> = self
                    .requests
                    .iter_mut()
                    .map(|(&id, request)| (id, &mut request.sampler))
                    .collect();
                let mut sampled = Vec::with_capacity(ids.len());
                let mut next = ids.iter();
                for tensor in &tensors {
                    let count = tensor.dims().first().copied().unwrap_or(0);
                    let batch: Vec<RequestId> = next.by_ref().take(count).copied().collect();
                    let mut rows = Vec::with_capacity(count);
                    for &id in &batch {
                        let (Some(sampler), Some(tokens)) =
                            (samplers.remove(&id), self.scheduler.request(id))
                        else {
                            return Err(missing(id));
                        };
                        rows.push(DeviceRow {
                            sampler,
                            prompt: tokens.prompt(),
                            output: tokens.output(),
                        });
                    }
                    let samples = sample_rows(tensor, &mut rows)?;
                    sampled.extend(batch.into_iter().zip(samples));
                }
                if sampled.len() != ids.len() {
                    return Err(Error::Internal(format!(
                        "{} logits rows for {} requests",
                        sampled.len(),
                        ids.len()
                    )));
                }
                Ok(sampled)
            }
        }
    }

    /// Completes the last output of a request the scheduler finished.
    fn finish(
        &mut self,
        mut request: ActiveRequest,
        reason: pagoda_sched::FinishReason,
        output: &mut RequestOutput,
        now: Instant,
    ) {
        let mut reason = match reason {
            pagoda_sched::FinishReason::Length => FinishReason::Length,
            pagoda_sched::FinishReason::Stopped => FinishReason::Stop,
            pagoda_sched::FinishReason::Aborted => FinishReason::Abort,
        };
        if !request.text_stopped {
            // Text held back for a stop string that never came, and trailing bytes.
            match request.text.finish(&self.intake.tokenizer) {
                Ok(rest) => {
                    output.text_delta.push_str(&rest.text);
                    if rest.stopped {
                        reason = FinishReason::Stop;
                    }
                }
                Err(e) => {
                    self.record_error(&e);
                    reason = FinishReason::Abort;
                }
            }
        }
        output.finish_reason = Some(reason);
        if reason == FinishReason::Abort {
            self.metrics.requests_aborted_total += 1;
        } else {
            self.metrics.requests_finished_total += 1;
            self.metrics
                .e2e_latency
                .observe((now - request.arrival).as_secs_f64());
        }
    }

    /// Aborts every request of a failed step.
    fn fail_step(&mut self, plan: &SchedulerOutput, error: &Error) {
        self.metrics.step_errors_total += 1;
        for scheduled in &plan.scheduled {
            self.fail_request(scheduled.id, error);
        }
        // Every request of the step is aborted, so the scheduler expects no sample.
        if let Err(e) = self.scheduler.update(&[]) {
            self.metrics.last_error = Some(format!("closing a failed step: {e}"));
        }
    }

    /// Aborts one request because of `error`.
    fn fail_request(&mut self, id: RequestId, error: &Error) {
        self.record_error(error);
        self.abort(id);
    }

    /// Keeps `error` as the metrics' last error.
    pub(crate) fn record_error(&mut self, error: &Error) {
        self.metrics.last_error = Some(error.to_string());
    }

    /// Runs `prompts` to completion with the same parameters and returns their completions in
    /// order. Other requests in the engine progress too; their outputs are kept for the next
    /// [`step`](Self::step).
    ///
    /// # Errors
    /// A refused prompt (nothing is generated then), or a failed step (the prompts' requests
    /// are aborted).
    pub fn generate(
        &mut self,
        prompts: Vec<Prompt>,
        params: &SamplingParams,
    ) -> Result<Vec<Completion>> {
        let mut ids = Vec::with_capacity(prompts.len());
        for prompt in prompts {
            match self.add_request(prompt, params.clone()) {
                Ok(id) => ids.push(id),
                Err(e) => {
                    self.abort_quietly(&ids);
                    return Err(e);
                }
            }
        }
        let mut completions: HashMap<RequestId, Completion> =
            ids.iter().map(|&id| (id, Completion::new(id))).collect();
        let mut others = Vec::new();
        let mut unfinished = ids.len();
        while unfinished > 0 {
            let outputs = match self.step() {
                Ok(outputs) => outputs,
                Err(e) => {
                    self.abort_quietly(&ids);
                    self.pending.extend(others);
                    return Err(e);
                }
            };
            for output in outputs {
                match completions.get_mut(&output.id) {
                    Some(completion) => {
                        unfinished -= usize::from(output.is_finished());
                        completion.push(output);
                    }
                    None => others.push(output),
                }
            }
        }
        self.pending.extend(others);
        Ok(ids.iter().filter_map(|id| completions.remove(id)).collect())
    }

    /// Aborts `ids` without reporting them.
    fn abort_quietly(&mut self, ids: &[RequestId]) {
        for &id in ids {
            self.abort(id);
        }
        self.pending.retain(|output| !ids.contains(&output.id));
    }

    /// The tokenizer, template and limits, shared with handles.
    pub(crate) fn intake(&self) -> &Arc<Intake> {
        &self.intake
    }
}

/// The tokenizer and chat template that belong with a checkpoint.
fn load_tokenizer(path: &Path) -> Result<(Tokenizer, Option<ChatTemplate>)> {
    match CheckpointFormat::detect(path)? {
        CheckpointFormat::HuggingFace => {
            let tokenizer_json = path.join("tokenizer.json");
            if !tokenizer_json.is_file() {
                return Err(Error::Config(format!(
                    "{} has no tokenizer.json; pagoda needs the Hugging Face fast tokenizer file",
                    path.display()
                )));
            }
            let tokenizer = Tokenizer::from_file(&tokenizer_json)?;
            let template =
                ChatTemplate::from_tokenizer_config(&path.join("tokenizer_config.json"))?;
            Ok((tokenizer, template))
        }
        CheckpointFormat::Gguf => {
            let file = GgufFile::open(path)?;
            let vocab = GgufVocab::from_gguf(&file)?;
            let tokenizer = Tokenizer::from_gguf(&vocab)?;
            let template = match &vocab.chat_template {
                Some(source) => Some(ChatTemplate::new(
                    source,
                    vocab.bos_token_id.and_then(|id| tokenizer.id_to_token(id)),
                    vocab.eos_token_id.and_then(|id| tokenizer.id_to_token(id)),
                )?),
                None => None,
            };
            Ok((tokenizer, template))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_tokenizer::byte_level;
    use pagoda_kv::KvCache;
    use pagoda_models::{Batch, StepInputs};
    use pagoda_tensor::Tensor;

    /// Token that makes [`Flaky`] fail.
    const POISON: u32 = 7;

    /// A real model whose forward pass fails for any batch holding [`POISON`].
    struct Flaky(Box<dyn Model>);

    impl Model for Flaky {
        fn info(&self) -> &ModelInfo {
            self.0.info()
        }

        fn forward(&self, batch: &Batch, kv: &mut KvCache) -> pagoda_models::Result<Tensor> {
            if batch.tokens.contains(&POISON) {
                return Err(pagoda_models::Error::Batch("poisoned batch".into()));
            }
            self.0.forward(batch, kv)
        }

        fn forward_inputs(
            &self,
            inputs: &StepInputs,
            kv: &mut KvCache,
        ) -> pagoda_models::Result<Tensor> {
            self.0.forward_inputs(inputs, kv)
        }
    }

    fn flaky_engine() -> Engine {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../pagoda-models/tests/fixtures/tiny-llama");
        let model = load_model(&path, &LoadOptions::default()).expect("the tiny model");
        let info = model.info().clone();
        let intake = Intake::new(
            byte_level(),
            None,
            "flaky".into(),
            info.vocab_size,
            info.max_position_embeddings,
        );
        Engine::builder()
            .assemble(Arc::new(Flaky(model)), intake)
            .expect("an engine")
    }

    fn params(max_tokens: usize) -> SamplingParams {
        SamplingParams {
            max_tokens,
            ignore_eos: true,
            ..SamplingParams::default()
        }
    }

    #[test]
    fn a_failed_step_aborts_its_requests_and_the_engine_goes_on() {
        let mut engine = flaky_engine();
        let poisoned = engine
            .add_request(Prompt::Tokens(vec![3, POISON, 4]), params(5))
            .unwrap();
        let bystander = engine
            .add_request(Prompt::Tokens(vec![3, 4, 5]), params(5))
            .unwrap();
        assert!(engine.step().is_err());
        let metrics = engine.metrics();
        assert_eq!(metrics.step_errors_total, 1);
        assert!(metrics.last_error.is_some_and(|e| e.contains("poisoned")));
        assert_eq!(metrics.requests_aborted_total, 2);
        assert_eq!(metrics.kv_usage, 0.0);
        let outputs = engine.step().unwrap();
        let reasons: Vec<_> = outputs.iter().map(|o| (o.id, o.finish_reason)).collect();
        assert_eq!(
            reasons,
            [
                (poisoned, Some(FinishReason::Abort)),
                (bystander, Some(FinishReason::Abort))
            ]
        );
        assert!(!engine.has_unfinished());

        let out = engine
            .generate(vec![Prompt::Tokens(vec![3, 4, 5])], &params(5))
            .unwrap();
        assert_eq!(out[0].token_ids.len(), 5);
        assert_eq!(out[0].finish_reason, FinishReason::Length);
    }

    #[test]
    fn a_served_engine_survives_failed_steps() {
        let handle = flaky_engine().spawn();
        let mut poisoned = handle
            .submit(Prompt::Tokens(vec![POISON, POISON]), params(5))
            .unwrap();
        let last = poisoned.recv().unwrap();
        assert_eq!(last.finish_reason, Some(FinishReason::Abort));
        assert!(poisoned.recv().is_none());
        let mut fine = handle
            .submit(Prompt::Tokens(vec![1, 2]), params(4))
            .unwrap();
        let mut tokens = 0;
        let mut reason = None;
        while let Some(output) = fine.recv() {
            tokens += output.token_ids_delta.len();
            reason = output.finish_reason;
        }
        assert_eq!((tokens, reason), (4, Some(FinishReason::Length)));
        assert_eq!(handle.metrics().step_errors_total, 1);
        handle.shutdown();
    }

    #[test]
    fn checkpoints_are_named_after_their_file_or_directory() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        assert_eq!(name_of_checkpoint(dir), "pagoda-engine");
        assert_eq!(
            name_of_checkpoint(Path::new("models/SmolLM2-135M-Instruct.Q4_1.gguf")),
            "SmolLM2-135M-Instruct.Q4_1"
        );
    }
}

//! The engine: a model, its tokenizer and chat template, and a KV cache, behind a builder.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pagoda_kernels::cpu::sampling::Sampler;
use pagoda_kv::{BlockTable, KvCache, KvCacheConfig};
use pagoda_models::{Batch, CheckpointFormat, LoadOptions, Model, load_model};
use pagoda_tensor::gguf::GgufFile;
use pagoda_tensor::{DType, Device};

use crate::chat_template::{ChatMessage, ChatTemplate};
use crate::detokenize::IncrementalDecoder;
use crate::params::{FinishReason, GenerationParams};
use crate::tokenizer::{GgufVocab, Tokenizer};
use crate::{Error, Result};

/// Tokens per KV block. 16 is the usual choice of paged-attention engines: small enough that
/// little of a block goes unused, large enough that block tables stay short.
const DEFAULT_BLOCK_SIZE: usize = 16;

/// KV memory reserved by default, in tokens of one sequence. Models that accept 128k positions
/// would otherwise reserve gigabytes for a context few prompts use; ask for more with
/// [`EngineBuilder::max_context_tokens`].
const DEFAULT_MAX_CONTEXT_TOKENS: usize = 8192;

/// What to run a prompt through.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Prompt {
    /// Raw text, tokenized as is.
    Text(String),
    /// Chat messages, rendered with the model's chat template (and a generation prompt).
    Chat(Vec<ChatMessage>),
    /// Token ids, used as they are.
    Tokens(Vec<u32>),
}

/// The result of one generation.
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub prompt_tokens: usize,
    pub finish_reason: FinishReason,
    /// Time to first token: tokenization, prefill and the first sample.
    pub time_to_first_token: Duration,
    /// Time spent after the first token, over `token_ids.len() - 1` decode steps.
    pub decode_time: Duration,
}

/// Builds an [`Engine`]: `Engine::builder().model(path).build()?`.
#[derive(Clone, Debug)]
pub struct EngineBuilder {
    model: Option<PathBuf>,
    device: Device,
    dtype: Option<DType>,
    block_size: usize,
    max_context_tokens: Option<usize>,
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

    /// Tokens per KV-cache block.
    pub fn block_size(mut self, tokens: usize) -> Self {
        self.block_size = tokens;
        self
    }

    /// The longest sequence (prompt + output) to reserve KV memory for; at most the model's
    /// context. By default the model's context, capped at 8192 tokens.
    pub fn max_context_tokens(mut self, tokens: usize) -> Self {
        self.max_context_tokens = Some(tokens);
        self
    }

    pub fn build(self) -> Result<Engine> {
        let path = self
            .model
            .ok_or(Error::Config("no model given: call .model(path)".into()))?;
        if self.block_size == 0 {
            return Err(Error::Config("block size must be positive".into()));
        }
        let (tokenizer, chat_template) = load_tokenizer(&path)?;
        let model = load_model(
            &path,
            &LoadOptions {
                device: self.device,
                dtype: self.dtype,
            },
        )?;
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
        let kv = KvCache::new(KvCacheConfig {
            num_layers: info.num_layers,
            num_blocks: context.div_ceil(self.block_size),
            block_size: self.block_size,
            num_kv_heads: info.num_kv_heads,
            head_dim: info.head_dim,
            dtype: info.dtype,
            device: info.device,
        })?;
        Ok(Engine {
            model,
            tokenizer,
            chat_template,
            kv,
            context,
        })
    }
}

/// Runs one model: `generate` turns a prompt into text, streaming it as it goes if asked.
pub struct Engine {
    model: Box<dyn Model>,
    tokenizer: Tokenizer,
    chat_template: Option<ChatTemplate>,
    kv: KvCache,
    context: usize,
}

impl Engine {
    pub fn builder() -> EngineBuilder {
        EngineBuilder {
            model: None,
            device: Device::Cpu,
            dtype: None,
            block_size: DEFAULT_BLOCK_SIZE,
            max_context_tokens: None,
        }
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn model(&self) -> &dyn Model {
        self.model.as_ref()
    }

    /// The longest sequence, prompt plus output, the engine can run.
    pub fn max_context_tokens(&self) -> usize {
        self.context
    }

    /// Renders chat messages with the model's template, or ChatML when it has none.
    pub fn render_chat(&self, messages: &[ChatMessage]) -> Result<String> {
        match &self.chat_template {
            Some(template) => template.render(messages, true),
            None => ChatTemplate::chatml().render(messages, true),
        }
    }

    /// Tokenizes a prompt as generation sees it.
    pub fn prompt_tokens(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        let ids = match prompt {
            Prompt::Text(text) => self.tokenizer.encode(text, true)?,
            // The template writes any BOS itself; encoding must not add a second one.
            Prompt::Chat(messages) => self.tokenizer.encode(&self.render_chat(messages)?, false)?,
            Prompt::Tokens(ids) => ids.clone(),
        };
        if ids.is_empty() {
            return Err(Error::InvalidRequest("the prompt is empty".into()));
        }
        if let Some(&bad) = ids
            .iter()
            .find(|&&id| id as usize >= self.model.info().vocab_size)
        {
            return Err(Error::InvalidRequest(format!(
                "token id {bad} is outside the vocabulary of {}",
                self.model.info().vocab_size
            )));
        }
        Ok(ids)
    }

    /// Generates a completion of `prompt`.
    pub fn generate(&mut self, prompt: &Prompt, params: &GenerationParams) -> Result<Generation> {
        self.generate_stream(prompt, params, |_| Ok(()))
    }

    /// Generates a completion of `prompt`, handing each new piece of text to `on_text` as soon
    /// as it is complete UTF-8. An error from `on_text` stops generation and is returned.
    pub fn generate_stream(
        &mut self,
        prompt: &Prompt,
        params: &GenerationParams,
        mut on_text: impl FnMut(&str) -> Result<()>,
    ) -> Result<Generation> {
        let start = Instant::now();
        params.validate()?;
        let prompt_ids = self.prompt_tokens(prompt)?;
        let needed = prompt_ids.len() + params.max_tokens;
        if needed > self.context {
            return Err(Error::InvalidRequest(format!(
                "the prompt has {} tokens and up to {} more were asked for, {needed} in all, \
                 but the context holds {} tokens",
                prompt_ids.len(),
                params.max_tokens,
                self.context
            )));
        }
        let mut sampler = Sampler::new(params.sampling.clone(), params.seed)?;
        let mut table = BlockTable::new(self.kv.config().block_size);
        let result = self.run(
            &prompt_ids,
            params,
            &mut sampler,
            &mut table,
            &mut on_text,
            start,
        );
        // Blocks go back whether generation finished or failed half way.
        table.free(self.kv.allocator())?;
        result
    }

    fn run(
        &mut self,
        prompt_ids: &[u32],
        params: &GenerationParams,
        sampler: &mut Sampler,
        table: &mut BlockTable,
        on_text: &mut impl FnMut(&str) -> Result<()>,
        start: Instant,
    ) -> Result<Generation> {
        let mut decoder = IncrementalDecoder::new();
        let mut text = String::new();
        let mut output = Vec::with_capacity(params.max_tokens);
        let mut finish_reason = FinishReason::Length;
        let mut first_token_at = None;
        let mut pending: Vec<u32> = prompt_ids.to_vec();
        while output.len() < params.max_tokens {
            let logits = self.forward(&pending, table)?;
            let token = sampler.sample(&logits.to_vec_f32()?)?;
            first_token_at.get_or_insert_with(|| start.elapsed());
            if !params.ignore_eos && self.tokenizer.eos_token_ids().contains(&token) {
                finish_reason = FinishReason::Stop;
                break;
            }
            output.push(token);
            if let Some(delta) = decoder.push(&self.tokenizer, token)? {
                text.push_str(&delta);
                on_text(&delta)?;
            }
            pending = vec![token];
        }
        if let Some(rest) = decoder.finish(&self.tokenizer)? {
            text.push_str(&rest);
            on_text(&rest)?;
        }
        let time_to_first_token = first_token_at.unwrap_or_else(|| start.elapsed());
        Ok(Generation {
            text,
            token_ids: output,
            prompt_tokens: prompt_ids.len(),
            finish_reason,
            time_to_first_token,
            decode_time: start.elapsed().saturating_sub(time_to_first_token),
        })
    }

    /// Appends `tokens` to the sequence of `table` and returns the logits of the last one.
    fn forward(&mut self, tokens: &[u32], table: &mut BlockTable) -> Result<pagoda_tensor::Tensor> {
        table.append(tokens.len(), self.kv.allocator())?;
        let batch = Batch::last_of_sequence(tokens, table)?;
        Ok(self.model.forward(&batch, &mut self.kv)?)
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

//! Model definitions: GPT-NeoX (Pythia) and Llama (Llama 2/3.x, SmolLM2), loaded from Hugging Face
//! checkpoints or GGUF files.
//!
//! A model does not own a KV cache: [`Model::forward`] runs over a flat, unpadded [`Batch`] of tokens
//! from several sequences and reads and writes K/V through their block tables in a
//! [`pagoda_kv::KvCache`] that the caller owns.

mod batch;
mod bnb;
pub mod config;
mod error;
mod gguf_llama;
mod gpt_neox;
mod layers;
mod llama;
mod load_progress;
mod loader;
mod quantization;
mod step;
mod weights;

pub use batch::{Batch, BatchSequence};
pub use config::{Architecture, GptNeoxConfig, LlamaConfig, ModelConfig};
pub use error::{Error, Result};
pub use gpt_neox::GptNeox;
pub use llama::Llama;
pub use load_progress::{LoadEvent, LoadProgress};
pub use loader::{CheckpointFormat, LoadOptions, load_model};
pub use quantization::{Nf4Options, Quantization, QuantizedLayers};
pub use step::{StepBuffers, StepGraph, StepInputs, StepShape};

use pagoda_kv::KvCache;
use pagoda_tensor::{DType, Device, Tensor};

/// The shape facts of a model that the engine and the KV cache need.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelInfo {
    pub architecture: Architecture,
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    /// The longest sequence (prompt + generated) the model's position encoding supports.
    pub max_position_embeddings: usize,
    /// Where the model runs.
    pub device: Device,
    /// The dtype of activations, logits and the KV cache: f32 on the CPU, f16 or bf16 on a GPU.
    pub dtype: DType,
    /// Bytes of all weights as placed on the device: what one decode step must read at least.
    pub weight_bytes: usize,
}

/// A causal language model that runs over flat batches of tokens.
pub trait Model: Send + Sync {
    fn info(&self) -> &ModelInfo;

    /// Runs every token of `batch` through the model, writing their K/V into `kv` at
    /// `batch.slots`, and returns logits `[batch.logits_rows.len(), vocab_size]` (on the model's
    /// device, in its dtype) for the rows that asked for them, in that order.
    fn forward(&self, batch: &Batch, kv: &mut KvCache) -> Result<Tensor> {
        let inputs = StepInputs::new(batch, self.info(), kv)?;
        self.forward_inputs(&inputs, kv)
    }

    /// [`Model::forward`] over inputs already on the model's device ([`StepInputs::new`], or
    /// [`StepBuffers`] for inputs rewritten in place, as a recorded [`StepGraph`] needs).
    fn forward_inputs(&self, inputs: &StepInputs, kv: &mut KvCache) -> Result<Tensor>;
}

//! Opens a checkpoint - a Hugging Face model directory or a GGUF file - and builds its model.

use std::path::Path;

use pagoda_tensor::gguf::GgufFile;
use pagoda_tensor::safetensors::SafeTensors;
use pagoda_tensor::{DType, Device};

use crate::bnb::check_quantization_config;
use crate::gguf_llama::{GgufLlamaWeights, llama_config};
use crate::load_progress::{LoadProgress, LoadTracker, TrackedSource};
use crate::quantization::Quantization;
use crate::weights::{WeightLoader, WeightSource};
use crate::{Architecture, Error, GptNeox, Llama, Model, ModelConfig, ModelInfo, Result};

/// How a checkpoint is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckpointFormat {
    /// A directory with `config.json` and safetensors weights.
    HuggingFace,
    Gguf,
}

impl CheckpointFormat {
    pub fn detect(path: &Path) -> Result<Self> {
        if path.is_dir() {
            Ok(Self::HuggingFace)
        } else if path.is_file() {
            Ok(Self::Gguf)
        } else {
            Err(Error::Io {
                path: path.to_owned(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no such file or directory",
                ),
            })
        }
    }
}

/// Where and in what precision to run a model, and who hears how the load goes.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub device: Device,
    /// The dtype of the weight matrices, and on a GPU of the activations and the KV cache too.
    /// `None`: on the CPU, each matrix as stored (GGUF quantized tensors as f32); on a GPU, the
    /// checkpoint's bf16 if it is stored so, else f16. CPU activations are always f32.
    pub dtype: Option<DType>,
    /// Quantize dense weights as they load (`None`: keep the checkpoint's precision). A
    /// checkpoint that bitsandbytes saved in NF4 loads in NF4 either way.
    pub quantize: Option<Quantization>,
    /// Told how many bytes of the checkpoint are loaded as tensors are placed (see
    /// [`LoadProgress`]).
    pub progress: Option<LoadProgress>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            dtype: None,
            quantize: None,
            progress: None,
        }
    }
}

/// Loads the model at `path`: a Hugging Face directory (config.json + safetensors, sharded or
/// not) or a GGUF file (Llama).
pub fn load_model(path: &Path, options: &LoadOptions) -> Result<Box<dyn Model>> {
    match CheckpointFormat::detect(path)? {
        CheckpointFormat::HuggingFace => {
            let config_path = path.join("config.json");
            let config = ModelConfig::from_file(&config_path)?;
            check_quantization(&config_path)?;
            let weights = SafeTensors::open_dir(path)?;
            let stored = stored_float_dtype(&weights);
            build(config, &weights, options, stored)
        }
        CheckpointFormat::Gguf => {
            let file = GgufFile::open(path)?;
            let config = llama_config(&file, path)?;
            let weights = GgufLlamaWeights {
                file: &file,
                num_heads: config.num_attention_heads,
                num_kv_heads: config.num_key_value_heads,
            };
            build(ModelConfig::Llama(config), &weights, options, DType::F32)
        }
    }
}

fn build(
    config: ModelConfig,
    weights: &dyn WeightSource,
    options: &LoadOptions,
    stored: DType,
) -> Result<Box<dyn Model>> {
    let (matrix_dtype, dtype) = match options.device {
        Device::Cpu => (options.dtype, DType::F32),
        Device::Cuda(_) => {
            let dtype = options.dtype.unwrap_or(if stored == DType::BF16 {
                DType::BF16
            } else {
                DType::F16
            });
            (Some(dtype), dtype)
        }
    };
    if let Some(d) = matrix_dtype
        && !d.is_float()
    {
        return Err(Error::WeightDType {
            name: "every matrix".into(),
            dtype: d,
            what: "model (use f32, f16 or bf16)",
        });
    }
    let tracker = options
        .progress
        .clone()
        .map(|progress| LoadTracker::start(progress, weights));
    let tracked = tracker.as_ref().map(|tracker| TrackedSource {
        inner: weights,
        tracker,
    });
    let source = match &tracked {
        Some(tracked) => tracked as &dyn WeightSource,
        None => weights,
    };
    let loader = WeightLoader::new(
        source,
        options.device,
        matrix_dtype,
        options.quantize,
        tracker.as_ref(),
    );
    let info =
        |architecture, num_layers, num_kv_heads, head_dim, vocab_size, max_position_embeddings| {
            ModelInfo {
                architecture,
                num_layers,
                num_kv_heads,
                head_dim,
                vocab_size,
                max_position_embeddings,
                device: options.device,
                dtype,
                // Counted as the weights load.
                weight_bytes: 0,
            }
        };
    let model: Box<dyn Model> = match config {
        ModelConfig::GptNeox(c) => {
            let info = info(
                Architecture::GptNeox,
                c.num_hidden_layers,
                c.num_attention_heads,
                c.head_dim(),
                c.vocab_size,
                c.max_position_embeddings,
            );
            Box::new(GptNeox::load(c, &loader, info)?)
        }
        ModelConfig::Llama(c) => {
            let info = info(
                Architecture::Llama,
                c.num_hidden_layers,
                c.num_key_value_heads,
                c.head_dim,
                c.vocab_size,
                c.max_position_embeddings,
            );
            Box::new(Llama::load(c, &loader, info)?)
        }
    };
    if let Some(tracker) = &tracker {
        tracker.finish();
    }
    Ok(model)
}

/// Refuses a checkpoint quantized by a method pagoda does not read (see [`crate::bnb`]).
fn check_quantization(config_path: &Path) -> Result<()> {
    let text = std::fs::read_to_string(config_path).map_err(|source| Error::Io {
        path: config_path.to_owned(),
        source,
    })?;
    let config: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Config {
        path: config_path.to_owned(),
        message: format!("invalid JSON: {e}"),
    })?;
    check_quantization_config(&config).map_err(|message| Error::Config {
        path: config_path.to_owned(),
        message,
    })
}

/// The float dtype most of a checkpoint's tensors are stored in.
fn stored_float_dtype(weights: &SafeTensors) -> DType {
    let mut counts = [0usize; 3];
    for name in weights.names() {
        match weights.info(name).map(|(dtype, _)| dtype) {
            Some(DType::F32) => counts[0] += 1,
            Some(DType::F16) => counts[1] += 1,
            Some(DType::BF16) => counts[2] += 1,
            _ => {}
        }
    }
    let most = counts
        .iter()
        .enumerate()
        .max_by_key(|(_, c)| **c)
        .map_or(0, |(i, _)| i);
    [DType::F32, DType::F16, DType::BF16][most]
}

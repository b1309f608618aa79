//! Opens a checkpoint - a Hugging Face model directory or a GGUF file - and builds its model.

use std::path::Path;

use pagoda_tensor::gguf::GgufFile;
use pagoda_tensor::safetensors::SafeTensors;

use crate::gguf_llama::{GgufLlamaWeights, llama_config};
use crate::weights::WeightLoader;
use crate::{Error, GptNeox, Llama, Model, ModelConfig, Result};

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

/// Loads the model at `path`: a Hugging Face directory (config.json + safetensors, sharded or
/// not) or a GGUF file. Weights keep their stored float dtype where the CPU kernels take it
/// (f32, f16, bf16); GGUF quantized tensors are dequantized to f32.
pub fn load_model(path: &Path) -> Result<Box<dyn Model>> {
    match CheckpointFormat::detect(path)? {
        CheckpointFormat::HuggingFace => {
            let config = ModelConfig::from_file(&path.join("config.json"))?;
            let weights = SafeTensors::open_dir(path)?;
            let loader = WeightLoader::new(&weights);
            Ok(match config {
                ModelConfig::GptNeox(c) => Box::new(GptNeox::load(c, &loader)?),
                ModelConfig::Llama(c) => Box::new(Llama::load(c, &loader)?),
            })
        }
        CheckpointFormat::Gguf => {
            let file = GgufFile::open(path)?;
            let config = llama_config(&file, path)?;
            let weights = GgufLlamaWeights {
                file: &file,
                num_heads: config.num_attention_heads,
                num_kv_heads: config.num_key_value_heads,
            };
            let loader = WeightLoader::new(&weights);
            Ok(Box::new(Llama::load(config, &loader)?))
        }
    }
}

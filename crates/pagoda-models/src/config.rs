//! `config.json` of Hugging Face checkpoints, for the architectures pagoda runs.
//!
//! Both the classic keys (`rope_theta`, `rope_scaling`, `rotary_pct`, `rotary_emb_base`) and the
//! `rope_parameters` block that transformers 5 writes are understood.

use std::path::Path;

use pagoda_kernels::cpu::rope::Llama3RopeScaling;
use serde_json::{Map, Value};

use crate::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    GptNeox,
    Llama,
}

/// The feed-forward activation, by its transformers name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `gelu`: the exact, erf-based GELU.
    GeluExact,
    /// `gelu_new`, `gelu_fast`, `gelu_pytorch_tanh`: the tanh approximation.
    GeluTanh,
    /// `silu` / `swish`.
    Silu,
}

#[derive(Clone, Debug, PartialEq)]
pub enum ModelConfig {
    GptNeox(GptNeoxConfig),
    Llama(LlamaConfig),
}

/// GPT-NeoX as in Pythia: fused QKV with biases, partial rotary, optional parallel residual.
#[derive(Clone, Debug, PartialEq)]
pub struct GptNeoxConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Fraction of each head's dimensions that RoPE rotates (`rotary_pct`).
    pub partial_rotary_factor: f32,
    pub rope_theta: f32,
    pub max_position_embeddings: usize,
    pub layer_norm_eps: f32,
    pub use_parallel_residual: bool,
    pub hidden_act: Activation,
    pub attention_bias: bool,
    pub tie_word_embeddings: bool,
}

/// Llama 2/3.x and its relatives (SmolLM2): RMSNorm, GQA, SwiGLU.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub rope_scaling: Option<Llama3RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub hidden_act: Activation,
}

impl GptNeoxConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Rotated dimensions per head, truncated as transformers does (`int(head_dim * pct)`).
    pub fn rotary_dim(&self) -> usize {
        (self.head_dim() as f64 * self.partial_rotary_factor as f64) as usize
    }
}

impl ModelConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::from_json(&text).map_err(|e| match e {
            Error::Config { message, .. } => Error::Config {
                path: path.to_owned(),
                message,
            },
            other => other,
        })
    }

    pub fn from_json(text: &str) -> Result<Self> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| config_error(format!("invalid JSON: {e}")))?;
        let obj = value
            .as_object()
            .ok_or_else(|| config_error("expected a JSON object".into()))?;
        let fields = Fields(obj);
        let architecture = match obj
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(Value::as_str)
        {
            Some(name) => name.to_owned(),
            None => match obj.get("model_type").and_then(Value::as_str) {
                Some("gpt_neox") => "GPTNeoXForCausalLM".into(),
                Some("llama") => "LlamaForCausalLM".into(),
                Some(other) => return Err(Error::UnknownArchitecture(other.into())),
                None => {
                    return Err(config_error(
                        "neither `architectures` nor `model_type` is set".into(),
                    ));
                }
            },
        };
        let config = match architecture.as_str() {
            "GPTNeoXForCausalLM" => Self::GptNeox(GptNeoxConfig::parse(&fields)?),
            "LlamaForCausalLM" => Self::Llama(LlamaConfig::parse(&fields)?),
            other => return Err(Error::UnknownArchitecture(other.into())),
        };
        config.check()?;
        Ok(config)
    }

    pub fn architecture(&self) -> Architecture {
        match self {
            Self::GptNeox(_) => Architecture::GptNeox,
            Self::Llama(_) => Architecture::Llama,
        }
    }

    fn check(&self) -> Result<()> {
        let (hidden, heads, kv_heads, head_dim) = match self {
            Self::GptNeox(c) => (
                c.hidden_size,
                c.num_attention_heads,
                c.num_attention_heads,
                c.head_dim(),
            ),
            Self::Llama(c) => (
                c.hidden_size,
                c.num_attention_heads,
                c.num_key_value_heads,
                c.head_dim,
            ),
        };
        if hidden == 0 || heads == 0 || kv_heads == 0 || head_dim == 0 {
            return Err(config_error(
                "sizes and head counts must be positive".into(),
            ));
        }
        if heads % kv_heads != 0 {
            return Err(config_error(format!(
                "num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})"
            )));
        }
        if let Self::GptNeox(c) = self {
            if hidden % heads != 0 {
                return Err(config_error(format!(
                    "hidden_size ({hidden}) is not a multiple of num_attention_heads ({heads})"
                )));
            }
            if c.rotary_dim() == 0 || c.rotary_dim() % 2 != 0 {
                return Err(config_error(format!(
                    "rotary_pct {} gives {} rotated dimensions of {head_dim}; an even, positive count is needed",
                    c.partial_rotary_factor,
                    c.rotary_dim()
                )));
            }
        }
        if head_dim % 2 != 0 {
            return Err(config_error(format!(
                "head_dim {head_dim} must be even for RoPE"
            )));
        }
        Ok(())
    }
}

impl GptNeoxConfig {
    fn parse(f: &Fields) -> Result<Self> {
        let rope = f.rope_parameters();
        Ok(Self {
            vocab_size: f.usize("vocab_size")?,
            hidden_size: f.usize("hidden_size")?,
            intermediate_size: f.usize("intermediate_size")?,
            num_hidden_layers: f.usize("num_hidden_layers")?,
            num_attention_heads: f.usize("num_attention_heads")?,
            partial_rotary_factor: f
                .f32_in(rope, "partial_rotary_factor")
                .or_else(|| f.f32_opt("rotary_pct"))
                .unwrap_or(0.25),
            rope_theta: f
                .f32_in(rope, "rope_theta")
                .or_else(|| f.f32_opt("rotary_emb_base"))
                .or_else(|| f.f32_opt("rope_theta"))
                .unwrap_or(10_000.0),
            max_position_embeddings: f.usize("max_position_embeddings")?,
            layer_norm_eps: f.f32_opt("layer_norm_eps").unwrap_or(1e-5),
            use_parallel_residual: f.bool_or("use_parallel_residual", true)?,
            hidden_act: f.activation("gelu")?,
            attention_bias: f.bool_or("attention_bias", true)?,
            tie_word_embeddings: f.bool_or("tie_word_embeddings", false)?,
        })
    }
}

impl LlamaConfig {
    fn parse(f: &Fields) -> Result<Self> {
        let hidden_size = f.usize("hidden_size")?;
        let num_attention_heads = f.usize("num_attention_heads")?;
        let head_dim = match f.0.get("head_dim") {
            Some(Value::Null) | None => hidden_size.checked_div(num_attention_heads).unwrap_or(0),
            Some(_) => f.usize("head_dim")?,
        };
        let rope = f.rope_parameters();
        let rope_theta = f
            .f32_in(rope, "rope_theta")
            .or_else(|| f.f32_opt("rope_theta"))
            .unwrap_or(10_000.0);
        let scaling = rope.or_else(|| f.0.get("rope_scaling").and_then(Value::as_object));
        Ok(Self {
            vocab_size: f.usize("vocab_size")?,
            hidden_size,
            intermediate_size: f.usize("intermediate_size")?,
            num_hidden_layers: f.usize("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads: match f.0.get("num_key_value_heads") {
                Some(Value::Null) | None => num_attention_heads,
                Some(_) => f.usize("num_key_value_heads")?,
            },
            head_dim,
            rms_norm_eps: f.f32_opt("rms_norm_eps").unwrap_or(1e-6),
            rope_theta,
            rope_scaling: parse_rope_scaling(scaling)?,
            max_position_embeddings: f.usize("max_position_embeddings")?,
            tie_word_embeddings: f.bool_or("tie_word_embeddings", false)?,
            attention_bias: f.bool_or("attention_bias", false)?,
            mlp_bias: f.bool_or("mlp_bias", false)?,
            hidden_act: f.activation("silu")?,
        })
    }
}

fn parse_rope_scaling(block: Option<&Map<String, Value>>) -> Result<Option<Llama3RopeScaling>> {
    let Some(block) = block else { return Ok(None) };
    let kind = block
        .get("rope_type")
        .or_else(|| block.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    match kind {
        "default" => Ok(None),
        "llama3" => {
            let num = |key: &str| {
                block
                    .get(key)
                    .and_then(Value::as_f64)
                    .ok_or_else(|| config_error(format!("llama3 rope scaling needs `{key}`")))
            };
            Ok(Some(Llama3RopeScaling {
                factor: num("factor")? as f32,
                low_freq_factor: num("low_freq_factor")? as f32,
                high_freq_factor: num("high_freq_factor")? as f32,
                original_max_position_embeddings: num("original_max_position_embeddings")? as usize,
            }))
        }
        other => Err(config_error(format!(
            "rope scaling `{other}` is not supported (supported: default, llama3)"
        ))),
    }
}

fn config_error(message: String) -> Error {
    Error::Config {
        path: "config.json".into(),
        message,
    }
}

/// Typed access to the fields of a config object, with errors that name the key.
struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    fn usize(&self, key: &str) -> Result<usize> {
        match self.0.get(key) {
            Some(v) => v.as_u64().map(|n| n as usize).ok_or_else(|| {
                config_error(format!("`{key}` must be a non-negative integer, found {v}"))
            }),
            None => Err(config_error(format!("missing `{key}`"))),
        }
    }

    fn f32_opt(&self, key: &str) -> Option<f32> {
        self.0.get(key).and_then(Value::as_f64).map(|v| v as f32)
    }

    fn f32_in(&self, block: Option<&Map<String, Value>>, key: &str) -> Option<f32> {
        block?.get(key)?.as_f64().map(|v| v as f32)
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.0.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| config_error(format!("`{key}` must be true or false, found {v}"))),
        }
    }

    fn rope_parameters(&self) -> Option<&Map<String, Value>> {
        self.0.get("rope_parameters").and_then(Value::as_object)
    }

    fn activation(&self, default: &str) -> Result<Activation> {
        let name = self
            .0
            .get("hidden_act")
            .and_then(Value::as_str)
            .unwrap_or(default);
        match name {
            "gelu" => Ok(Activation::GeluExact),
            "gelu_new" | "gelu_fast" | "gelu_pytorch_tanh" => Ok(Activation::GeluTanh),
            "silu" | "swish" => Ok(Activation::Silu),
            other => Err(config_error(format!(
                "activation `{other}` is not supported"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pythia_config_with_classic_keys() {
        let json = r#"{"architectures": ["GPTNeoXForCausalLM"], "vocab_size": 50304, "hidden_size": 2560,
            "intermediate_size": 10240, "num_hidden_layers": 32, "num_attention_heads": 32,
            "rotary_pct": 0.25, "rotary_emb_base": 10000, "max_position_embeddings": 2048,
            "layer_norm_eps": 1e-5, "use_parallel_residual": true, "hidden_act": "gelu"}"#;
        let ModelConfig::GptNeox(c) = ModelConfig::from_json(json).unwrap() else {
            panic!("expected GPT-NeoX")
        };
        assert_eq!(c.head_dim(), 80);
        assert_eq!(c.rotary_dim(), 20);
        assert!(c.attention_bias && !c.tie_word_embeddings);
    }

    #[test]
    fn llama3_config_with_rope_scaling() {
        let json = r#"{"architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 3072,
            "intermediate_size": 8192, "num_hidden_layers": 28, "num_attention_heads": 24,
            "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192, "rope_type": "llama3"},
            "max_position_embeddings": 131072, "tie_word_embeddings": true}"#;
        let ModelConfig::Llama(c) = ModelConfig::from_json(json).unwrap() else {
            panic!("expected Llama")
        };
        assert_eq!(c.num_key_value_heads, 8);
        assert_eq!(c.rope_theta, 500_000.0);
        assert_eq!(c.rope_scaling.unwrap().factor, 32.0);
        assert!(c.tie_word_embeddings);
    }

    #[test]
    fn errors_name_the_problem() {
        let unknown = r#"{"architectures": ["MambaForCausalLM"]}"#;
        assert!(
            matches!(ModelConfig::from_json(unknown), Err(Error::UnknownArchitecture(a)) if a == "MambaForCausalLM")
        );
        let missing = r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 64}"#;
        let message = ModelConfig::from_json(missing).unwrap_err().to_string();
        assert!(message.contains("num_attention_heads"), "{message}");
        let bad_gqa = r#"{"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 64,
            "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 4,
            "num_key_value_heads": 3, "max_position_embeddings": 16}"#;
        let message = ModelConfig::from_json(bad_gqa).unwrap_err().to_string();
        assert!(message.contains("multiple"), "{message}");
        let yarn = r#"{"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 64,
            "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 4,
            "max_position_embeddings": 16, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}"#;
        let message = ModelConfig::from_json(yarn).unwrap_err().to_string();
        assert!(message.contains("yarn"), "{message}");
        assert!(ModelConfig::from_json("{").is_err());
    }
}

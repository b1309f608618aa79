//! Llama models stored as GGUF (llama.cpp's format): metadata mapped onto [`LlamaConfig`] and
//! tensors served under their Hugging Face names, so one Llama definition runs both.

use pagoda_tensor::gguf::{GgufFile, GgufTensorInfo, GgufValue};
use pagoda_tensor::{DType, Tensor};

use crate::config::{Activation, LlamaConfig};
use crate::weights::WeightSource;
use crate::{Error, Result};

/// Builds the Llama configuration from a GGUF file's `llama.*` metadata.
pub(crate) fn llama_config(file: &GgufFile, path: &std::path::Path) -> Result<LlamaConfig> {
    let config_error = |message: String| Error::Config {
        path: path.to_owned(),
        message,
    };
    let architecture = file
        .get("general.architecture")
        .and_then(GgufValue::as_str)
        .ok_or_else(|| config_error("missing `general.architecture`".into()))?;
    if architecture != "llama" {
        return Err(Error::UnknownArchitecture(format!("{architecture} (GGUF)")));
    }
    let required = |key: &str| {
        file.get(&format!("llama.{key}"))
            .and_then(GgufValue::as_u64)
            .map(|v| v as usize)
            .ok_or_else(|| config_error(format!("missing or non-integer `llama.{key}`")))
    };
    let optional_f32 = |key: &str| {
        file.get(&format!("llama.{key}"))
            .and_then(GgufValue::as_f32)
    };
    if let Some(kind) = file
        .get("llama.rope.scaling.type")
        .and_then(GgufValue::as_str)
        && kind != "none"
    {
        return Err(config_error(format!(
            "GGUF rope scaling `{kind}` is not supported"
        )));
    }
    if file.tensor_info("rope_freqs.weight").is_some() {
        return Err(config_error(
            "per-frequency RoPE factors (`rope_freqs.weight`, Llama 3.1+) are not supported in GGUF files yet; \
             load the Hugging Face checkpoint instead"
                .into(),
        ));
    }
    let hidden_size = required("embedding_length")?;
    let num_attention_heads = required("attention.head_count")?;
    if num_attention_heads == 0 {
        return Err(config_error("`llama.attention.head_count` is 0".into()));
    }
    let vocab_size = match file.get("llama.vocab_size").and_then(GgufValue::as_u64) {
        Some(v) => v as usize,
        None => file
            .tensor_info("token_embd.weight")
            .map(|t| t.dims[0])
            .ok_or_else(|| {
                config_error("no `llama.vocab_size` and no `token_embd.weight`".into())
            })?,
    };
    Ok(LlamaConfig {
        vocab_size,
        hidden_size,
        intermediate_size: required("feed_forward_length")?,
        num_hidden_layers: required("block_count")?,
        num_attention_heads,
        num_key_value_heads: required("attention.head_count_kv").unwrap_or(num_attention_heads),
        head_dim: required("rope.dimension_count").unwrap_or(hidden_size / num_attention_heads),
        rms_norm_eps: optional_f32("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
        rope_theta: optional_f32("rope.freq_base").unwrap_or(10_000.0),
        rope_scaling: None,
        max_position_embeddings: required("context_length")?,
        tie_word_embeddings: file.tensor_info("output.weight").is_none(),
        attention_bias: file.tensor_info("blk.0.attn_q.bias").is_some(),
        mlp_bias: false,
        hidden_act: Activation::Silu,
    })
}

/// Serves a GGUF llama file's tensors under Hugging Face names, dequantized to f32.
pub(crate) struct GgufLlamaWeights<'a> {
    pub(crate) file: &'a GgufFile,
    pub(crate) num_heads: usize,
    pub(crate) num_kv_heads: usize,
}

/// Which rows of a projection llama.cpp's converter reordered, and over how many heads.
enum Permuted {
    No,
    Heads(usize),
}

impl GgufLlamaWeights<'_> {
    fn gguf_name(&self, hf_name: &str) -> Option<(String, Permuted)> {
        let simple = match hf_name {
            "model.embed_tokens.weight" => Some("token_embd.weight"),
            "model.norm.weight" => Some("output_norm.weight"),
            "lm_head.weight" => Some("output.weight"),
            _ => None,
        };
        if let Some(name) = simple {
            return Some((name.into(), Permuted::No));
        }
        let rest = hf_name.strip_prefix("model.layers.")?;
        let (layer, part) = rest.split_once('.')?;
        let (module, suffix) = part.rsplit_once('.')?;
        let (gguf_module, permuted) = match module {
            "input_layernorm" => ("attn_norm", Permuted::No),
            "post_attention_layernorm" => ("ffn_norm", Permuted::No),
            "self_attn.q_proj" => ("attn_q", Permuted::Heads(self.num_heads)),
            "self_attn.k_proj" => ("attn_k", Permuted::Heads(self.num_kv_heads)),
            "self_attn.v_proj" => ("attn_v", Permuted::No),
            "self_attn.o_proj" => ("attn_output", Permuted::No),
            "mlp.gate_proj" => ("ffn_gate", Permuted::No),
            "mlp.up_proj" => ("ffn_up", Permuted::No),
            "mlp.down_proj" => ("ffn_down", Permuted::No),
            _ => return None,
        };
        Some((format!("blk.{layer}.{gguf_module}.{suffix}"), permuted))
    }

    fn load(&self, hf_name: &str) -> Result<Tensor> {
        let (name, permuted) =
            self.gguf_name(hf_name)
                .ok_or_else(|| pagoda_tensor::Error::MissingTensor {
                    name: hf_name.into(),
                    file: "the GGUF name mapping".into(),
                })?;
        let tensor = self.file.tensor(&name, DType::F32)?;
        match permuted {
            Permuted::No => Ok(tensor),
            Permuted::Heads(heads) => unpermute_rows(&tensor, heads, &name),
        }
    }
}

impl WeightSource for GgufLlamaWeights<'_> {
    fn contains(&self, name: &str) -> bool {
        self.gguf_name(name)
            .is_some_and(|(gguf, _)| self.file.tensor_info(&gguf).is_some())
    }

    fn load_matrix(&self, name: &str) -> Result<Tensor> {
        self.load(name)
    }

    fn load_f32(&self, name: &str) -> Result<Tensor> {
        self.load(name)
    }

    fn load_raw(&self, name: &str) -> Result<Tensor> {
        self.load(name)
    }

    fn stored_bytes(&self, name: &str) -> Option<u64> {
        let (gguf, _) = self.gguf_name(name)?;
        self.file.tensor_info(&gguf).and_then(stored_bytes)
    }

    fn stored_total(&self) -> (u64, usize) {
        self.file
            .tensor_infos()
            .iter()
            .filter_map(stored_bytes)
            .fold((0, 0), |(bytes, count), b| (bytes + b, count + 1))
    }
}

/// Bytes a tensor's data takes in the file: whole blocks of its ggml type; `None` for a type
/// this crate cannot read.
fn stored_bytes(info: &GgufTensorInfo) -> Option<u64> {
    if !info.ggml_type.is_supported() {
        return None;
    }
    let (block_elems, block_bytes) = info.ggml_type.block_layout()?;
    Some((info.elem_count().div_ceil(block_elems) * block_bytes) as u64)
}

/// Undoes the row order llama.cpp's converter gives the Q and K projections.
///
/// The converter stores each head's rows interleaved (`reshape(heads, 2, d/2, ..).swapaxes(1, 2)`)
/// for its pairwise RoPE; Hugging Face models rotate halves, so row `i * 2 + j` of a head goes back
/// to row `j * d/2 + i`. Works on weights `[rows, cols]` and biases `[rows]` alike.
fn unpermute_rows(tensor: &Tensor, heads: usize, name: &str) -> Result<Tensor> {
    let rows = tensor.dims()[0];
    let cols = tensor.dims().get(1).copied().unwrap_or(1);
    if heads == 0 || !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) {
        return Err(Error::WeightShape {
            name: name.into(),
            expected: vec![heads, 2, rows / heads.max(1) / 2, cols],
            got: tensor.dims().to_vec(),
        });
    }
    let head_dim = rows / heads;
    let half = head_dim / 2;
    let src = tensor.as_slice::<f32>()?;
    let mut out = vec![0.0f32; src.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let from = (h * head_dim + i * 2 + j) * cols;
                let to = (h * head_dim + j * half + i) * cols;
                out[to..to + cols].copy_from_slice(&src[from..from + cols]);
            }
        }
    }
    Ok(Tensor::from_vec(out, tensor.dims().to_vec())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Applies the converter's permutation the way its source describes it, then checks that
    /// `unpermute_rows` restores the original.
    #[test]
    fn unpermute_inverts_the_converter_permutation() {
        let (heads, head_dim, cols) = (3, 8, 5);
        let rows = heads * head_dim;
        let original: Vec<f32> = (0..rows * cols).map(|v| v as f32).collect();
        let half = head_dim / 2;
        let mut permuted = vec![0.0; original.len()];
        for h in 0..heads {
            for j in 0..2 {
                for i in 0..half {
                    // reshape(heads, 2, half, cols)[h, j, i] moves to swapaxes(1, 2)[h, i, j].
                    let from = ((h * 2 + j) * half + i) * cols;
                    let to = ((h * half + i) * 2 + j) * cols;
                    permuted[to..to + cols].copy_from_slice(&original[from..from + cols]);
                }
            }
        }
        let tensor = Tensor::from_vec(permuted, [rows, cols]).unwrap();
        let restored = unpermute_rows(&tensor, heads, "attn_q").unwrap();
        assert_eq!(restored.to_vec::<f32>().unwrap(), original);
        assert!(unpermute_rows(&tensor, 5, "attn_q").is_err());
    }
}

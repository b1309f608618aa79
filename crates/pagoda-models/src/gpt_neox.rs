//! GPT-NeoX, as used by the Pythia suite.

use std::sync::Arc;

use pagoda_kernels::cpu::activation;
use pagoda_kernels::cpu::rope::RopeTable;
use pagoda_kv::KvCache;
use pagoda_tensor::Tensor;

use crate::config::{Activation, GptNeoxConfig};
use crate::layers::{
    Embedding, Linear, Norm, PagedSelfAttention, add_in_place, check_kv_cache, gather_rows,
};
use crate::weights::WeightLoader;
use crate::{Architecture, Batch, Model, ModelInfo, Result};

struct Layer {
    input_layernorm: Norm,
    post_attention_layernorm: Norm,
    query_key_value: Linear,
    dense: Linear,
    dense_h_to_4h: Linear,
    dense_4h_to_h: Linear,
}

pub struct GptNeox {
    config: GptNeoxConfig,
    info: ModelInfo,
    embed_in: Embedding,
    layers: Vec<Layer>,
    final_layer_norm: Norm,
    embed_out: Linear,
    attention: PagedSelfAttention,
}

impl GptNeox {
    pub(crate) fn load(config: GptNeoxConfig, loader: &WeightLoader<'_>) -> Result<Self> {
        let c = &config;
        let (hidden, eps) = (c.hidden_size, c.layer_norm_eps);
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let p = format!("gpt_neox.layers.{i}");
                Ok(Layer {
                    input_layernorm: Norm::layer_norm(
                        loader,
                        &format!("{p}.input_layernorm"),
                        hidden,
                        eps,
                    )?,
                    post_attention_layernorm: Norm::layer_norm(
                        loader,
                        &format!("{p}.post_attention_layernorm"),
                        hidden,
                        eps,
                    )?,
                    query_key_value: Linear::load(
                        loader,
                        &format!("{p}.attention.query_key_value"),
                        hidden,
                        3 * hidden,
                        c.attention_bias,
                    )?,
                    dense: Linear::load(
                        loader,
                        &format!("{p}.attention.dense"),
                        hidden,
                        hidden,
                        c.attention_bias,
                    )?,
                    dense_h_to_4h: Linear::load(
                        loader,
                        &format!("{p}.mlp.dense_h_to_4h"),
                        hidden,
                        c.intermediate_size,
                        true,
                    )?,
                    dense_4h_to_h: Linear::load(
                        loader,
                        &format!("{p}.mlp.dense_4h_to_h"),
                        c.intermediate_size,
                        hidden,
                        true,
                    )?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let embed_in = Embedding::load(loader, "gpt_neox.embed_in.weight", c.vocab_size, hidden)?;
        let embed_out = if c.tie_word_embeddings && !loader.contains("embed_out.weight") {
            embed_in.as_linear()
        } else {
            Linear::load(loader, "embed_out", hidden, c.vocab_size, false)?
        };
        let rope = RopeTable::new(
            c.rotary_dim(),
            c.rope_theta,
            c.max_position_embeddings,
            None,
        )?;
        let info = ModelInfo {
            architecture: Architecture::GptNeox,
            num_layers: c.num_hidden_layers,
            num_kv_heads: c.num_attention_heads,
            head_dim: c.head_dim(),
            vocab_size: c.vocab_size,
            max_position_embeddings: c.max_position_embeddings,
        };
        Ok(Self {
            attention: PagedSelfAttention {
                num_heads: c.num_attention_heads,
                num_kv_heads: c.num_attention_heads,
                head_dim: c.head_dim(),
                rope: Arc::new(rope),
            },
            final_layer_norm: Norm::layer_norm(loader, "gpt_neox.final_layer_norm", hidden, eps)?,
            embed_in,
            embed_out,
            layers,
            info,
            config,
        })
    }

    pub fn config(&self) -> &GptNeoxConfig {
        &self.config
    }

    fn attention(
        &self,
        layer: usize,
        x: &[f32],
        batch: &Batch,
        kv: &mut KvCache,
    ) -> Result<Vec<f32>> {
        let weights = &self.layers[layer];
        let tokens = batch.num_tokens();
        let qkv = weights.query_key_value.forward(x, tokens)?;
        let (q, mut k, v) = split_qkv_per_head(
            &qkv,
            tokens,
            self.config.num_attention_heads,
            self.info.head_dim,
        );
        let mut q = q;
        let context = self
            .attention
            .forward(layer, &mut q, &mut k, &v, batch, kv)?;
        weights.dense.forward(&context, tokens)
    }

    fn mlp(&self, layer: usize, x: &[f32], tokens: usize) -> Result<Vec<f32>> {
        let weights = &self.layers[layer];
        let mut h = weights.dense_h_to_4h.forward(x, tokens)?;
        match self.config.hidden_act {
            Activation::GeluExact => activation::gelu_exact(&mut h),
            Activation::GeluTanh => activation::gelu_tanh(&mut h),
            Activation::Silu => h.iter_mut().for_each(|v| *v /= 1.0 + (-*v).exp()),
        }
        weights.dense_4h_to_h.forward(&h, tokens)
    }
}

/// GPT-NeoX's fused projection lays its output out per head as `[q | k | v]` (each `head_dim`
/// wide), not as three blocks; this regroups it into `[tokens, heads * head_dim]` for each.
fn split_qkv_per_head(
    qkv: &[f32],
    tokens: usize,
    heads: usize,
    head_dim: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let width = heads * head_dim;
    let mut parts = [
        vec![0.0; tokens * width],
        vec![0.0; tokens * width],
        vec![0.0; tokens * width],
    ];
    for t in 0..tokens {
        for h in 0..heads {
            let src = (t * heads + h) * 3 * head_dim;
            let dst = t * width + h * head_dim;
            for (i, part) in parts.iter_mut().enumerate() {
                part[dst..dst + head_dim]
                    .copy_from_slice(&qkv[src + i * head_dim..src + (i + 1) * head_dim]);
            }
        }
    }
    let [q, k, v] = parts;
    (q, k, v)
}

impl Model for GptNeox {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn forward(&self, batch: &Batch, kv: &mut KvCache) -> Result<Tensor> {
        batch.validate(self.info.max_position_embeddings)?;
        check_kv_cache(&self.info, kv)?;
        let tokens = batch.num_tokens();
        let mut hidden = self.embed_in.forward(&batch.tokens)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let attn = self.attention(i, &layer.input_layernorm.forward(&hidden)?, batch, kv)?;
            if self.config.use_parallel_residual {
                let mlp = self.mlp(i, &layer.post_attention_layernorm.forward(&hidden)?, tokens)?;
                add_in_place(&mut hidden, &attn);
                add_in_place(&mut hidden, &mlp);
            } else {
                add_in_place(&mut hidden, &attn);
                let mlp = self.mlp(i, &layer.post_attention_layernorm.forward(&hidden)?, tokens)?;
                add_in_place(&mut hidden, &mlp);
            }
        }
        let last = gather_rows(&hidden, self.config.hidden_size, &batch.logits_rows);
        let normed = self.final_layer_norm.forward(&last)?;
        let rows = batch.logits_rows.len();
        let logits = self.embed_out.forward(&normed, rows)?;
        Ok(Tensor::from_vec(logits, [rows, self.info.vocab_size])?)
    }
}

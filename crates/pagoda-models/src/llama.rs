//! Llama 2/3.x and models of the same shape (SmolLM2).

use pagoda_kernels::cpu::rope::RopeTable;
use pagoda_kernels::ops;
use pagoda_kv::KvCache;
use pagoda_tensor::Tensor;

use crate::config::{Activation, LlamaConfig};
use crate::layers::{Embedding, FusedLinear, Linear, Norm, PagedSelfAttention, three};
use crate::weights::WeightLoader;
use crate::{Error, Model, ModelInfo, Result, StepInputs};

struct Layer {
    input_layernorm: Norm,
    post_attention_layernorm: Norm,
    /// `q_proj`, `k_proj` and `v_proj`, fused.
    qkv_proj: FusedLinear,
    o_proj: Linear,
    /// `gate_proj` and `up_proj`, fused.
    gate_up_proj: FusedLinear,
    down_proj: Linear,
}

pub struct Llama {
    config: LlamaConfig,
    info: ModelInfo,
    embed_tokens: Embedding,
    layers: Vec<Layer>,
    norm: Norm,
    lm_head: Linear,
    attention: PagedSelfAttention,
}

impl Llama {
    pub(crate) fn load(
        config: LlamaConfig,
        loader: &WeightLoader<'_>,
        mut info: ModelInfo,
    ) -> Result<Self> {
        let c = &config;
        if c.hidden_act != Activation::Silu {
            return Err(Error::Config {
                path: "config.json".into(),
                message: format!("Llama models use silu; found {:?}", c.hidden_act),
            });
        }
        let (hidden, eps) = (c.hidden_size, c.rms_norm_eps);
        let q_width = c.num_attention_heads * c.head_dim;
        let kv_width = c.num_key_value_heads * c.head_dim;
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let p = format!("model.layers.{i}");
                let attn = |name: &str, out: usize, input: usize| {
                    Linear::load(
                        loader,
                        &format!("{p}.self_attn.{name}"),
                        input,
                        out,
                        c.attention_bias,
                    )
                };
                let mlp = |name: &str, out: usize, input: usize| {
                    Linear::load(loader, &format!("{p}.mlp.{name}"), input, out, c.mlp_bias)
                };
                Ok(Layer {
                    input_layernorm: Norm::rms_norm(
                        loader,
                        &format!("{p}.input_layernorm"),
                        hidden,
                        eps,
                    )?,
                    post_attention_layernorm: Norm::rms_norm(
                        loader,
                        &format!("{p}.post_attention_layernorm"),
                        hidden,
                        eps,
                    )?,
                    qkv_proj: FusedLinear::load(
                        loader,
                        &format!("{p}.self_attn"),
                        &[
                            ("q_proj", q_width),
                            ("k_proj", kv_width),
                            ("v_proj", kv_width),
                        ],
                        hidden,
                        c.attention_bias,
                    )?,
                    o_proj: attn("o_proj", hidden, q_width)?,
                    gate_up_proj: FusedLinear::load(
                        loader,
                        &format!("{p}.mlp"),
                        &[
                            ("gate_proj", c.intermediate_size),
                            ("up_proj", c.intermediate_size),
                        ],
                        hidden,
                        c.mlp_bias,
                    )?,
                    down_proj: mlp("down_proj", hidden, c.intermediate_size)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let embed_tokens =
            Embedding::load(loader, "model.embed_tokens.weight", c.vocab_size, hidden)?;
        // Checkpoints that tie their embeddings usually store no lm_head; some store a copy anyway.
        let lm_head = if loader.contains("lm_head.weight") {
            Linear::load(loader, "lm_head", hidden, c.vocab_size, false)?
        } else if c.tie_word_embeddings {
            embed_tokens.as_linear(loader)?
        } else {
            return Err(pagoda_tensor::Error::MissingTensor {
                name: "lm_head.weight".into(),
                file: "the checkpoint (tie_word_embeddings is false)".into(),
            }
            .into());
        };
        let rope = RopeTable::new(
            c.head_dim,
            c.rope_theta,
            c.max_position_embeddings,
            c.rope_scaling,
        )?;
        let attention = PagedSelfAttention::new(
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
            rope,
            &info.device,
        )?;
        let norm = Norm::rms_norm(loader, "model.norm", hidden, eps)?;
        info.weight_bytes = loader.placed_bytes();
        Ok(Self {
            attention,
            norm,
            embed_tokens,
            lm_head,
            layers,
            info,
            config,
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }
}

impl Model for Llama {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn forward_inputs(&self, ctx: &StepInputs, kv: &mut KvCache) -> Result<Tensor> {
        let mut residual = self.embed_tokens.forward(&ctx.tokens)?;
        // The last sublayer's output, not yet added to the residual: the add runs fused with the
        // next norm.
        let mut pending: Option<Tensor> = None;
        for (i, layer) in self.layers.iter().enumerate() {
            let x = layer
                .input_layernorm
                .add_forward(pending.take(), &mut residual)?;
            let [q, k, v] = three(layer.qkv_proj.forward(&x)?)?;
            let attn = self.attention.forward(i, q, k, v, ctx, kv)?;
            let x = layer
                .post_attention_layernorm
                .add_forward(Some(layer.o_proj.forward(&attn)?), &mut residual)?;
            let act = layer.gate_up_proj.forward_gated(&x)?;
            pending = Some(layer.down_proj.forward(&act)?);
        }
        let hidden = self.norm.add_forward(pending, &mut residual)?;
        let rows = ops::embedding(&hidden, &ctx.logits_rows)?;
        self.lm_head.forward(&rows)
    }
}

//! GPT-NeoX, as used by the Pythia suite.

use pagoda_kernels::cpu::rope::RopeTable;
use pagoda_kernels::ops::{self, Epilogue, OutputActivation};
use pagoda_kv::KvCache;
use pagoda_tensor::Tensor;

use crate::config::{Activation, GptNeoxConfig};
use crate::layers::{
    Embedding, FusedLinear, Linear, Norm, PagedSelfAttention, fused_and_linear, three,
};
use crate::quantization::{LayerRole, RawWeight};
use crate::weights::WeightLoader;
use crate::{Model, ModelInfo, Result, StepInputs};

struct Layer {
    input_layernorm: Norm,
    post_attention_layernorm: Norm,
    /// `query_key_value`, with its rows regrouped as `[q; k; v]`.
    qkv_proj: FusedLinear,
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
    pub(crate) fn load(
        config: GptNeoxConfig,
        loader: &WeightLoader<'_>,
        mut info: ModelInfo,
    ) -> Result<Self> {
        let c = &config;
        let (hidden, eps) = (c.hidden_size, c.layer_norm_eps);
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let p = format!("gpt_neox.layers.{i}");
                let qkv_proj =
                    split_query_key_value(loader, c, &format!("{p}.attention.query_key_value"))?;
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
                    qkv_proj,
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
            embed_in.as_linear(loader)?
        } else {
            Linear::load(loader, "embed_out", hidden, c.vocab_size, false)?
        };
        let rope = RopeTable::new(
            c.rotary_dim(),
            c.rope_theta,
            c.max_position_embeddings,
            None,
        )?;
        let attention = PagedSelfAttention::new(
            c.num_attention_heads,
            c.num_attention_heads,
            c.head_dim(),
            rope,
            &info.device,
        )?;
        let final_layer_norm = Norm::layer_norm(loader, "gpt_neox.final_layer_norm", hidden, eps)?;
        info.weight_bytes = loader.placed_bytes();
        Ok(Self {
            attention,
            final_layer_norm,
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

    /// The MLP's activation, which runs fused into its first product.
    fn mlp_activation(&self) -> Result<OutputActivation> {
        match self.config.hidden_act {
            Activation::GeluExact => Ok(OutputActivation::Gelu),
            Activation::GeluTanh => Ok(OutputActivation::GeluTanh),
            Activation::Silu => Err(crate::Error::Config {
                path: "config.json".into(),
                message: "GPT-NeoX with silu is not supported".into(),
            }),
        }
    }

    /// The MLP's hidden activations of `x`.
    fn mlp_hidden(&self, layer: &Layer, x: &Tensor) -> Result<Tensor> {
        layer.dense_h_to_4h.forward_with(
            x,
            Epilogue {
                activation: self.mlp_activation()?,
                addend: None,
            },
        )
    }
}

/// GPT-NeoX's fused projection lays its output rows out per head as `[q | k | v]` (each
/// `head_dim` rows); they are regrouped here as `[all q; all k; all v]` so that Q, K and V come out
/// as contiguous blocks, as the attention kernels read them.
fn split_query_key_value(
    loader: &WeightLoader<'_>,
    c: &GptNeoxConfig,
    prefix: &str,
) -> Result<FusedLinear> {
    let (hidden, heads, head_dim) = (c.hidden_size, c.num_attention_heads, c.head_dim());
    let name = format!("{prefix}.weight");
    let weight = match loader.raw_linear_weight(&name, 3 * hidden, hidden)? {
        RawWeight::Dense(weight) => RawWeight::Dense(
            weight
                .reshape([heads, 3, head_dim, hidden])?
                .permute(&[1, 0, 2, 3])?
                .contiguous()?
                .reshape([3 * hidden, hidden])?,
        ),
        // Rows of NF4 weights move whole: row (part, head, d) of the result is row
        // (head, part, d) of the checkpoint.
        RawWeight::Nf4 { blocks, rows, cols } => {
            let order: Vec<usize> = (0..rows)
                .map(|r| {
                    let (part, head, d) = (r / hidden, (r % hidden) / head_dim, r % head_dim);
                    (head * 3 + part) * head_dim + d
                })
                .collect();
            let blocks =
                blocks
                    .permute_rows(cols, &order)
                    .map_err(|e| crate::Error::Quantization {
                        name: name.clone(),
                        message: e.to_string(),
                    })?;
            RawWeight::Nf4 { blocks, rows, cols }
        }
    };
    let bias = if c.attention_bias {
        let bias = loader
            .raw_vector(&format!("{prefix}.bias"), 3 * hidden)?
            .reshape([heads, 3, head_dim])?
            .permute(&[1, 0, 2])?
            .contiguous()?
            .reshape([3 * hidden])?;
        Some(loader.place_vector(bias)?)
    } else {
        None
    };
    Ok(FusedLinear::new(
        loader.place_linear_weight(weight, LayerRole::Attention, &name)?,
        bias,
        vec![hidden; 3],
    ))
}

impl Model for GptNeox {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn forward_inputs(&self, ctx: &StepInputs, kv: &mut KvCache) -> Result<Tensor> {
        let mut residual = self.embed_in.forward(&ctx.tokens)?;
        // The sum of the last layer's sublayer outputs, not yet added to the residual: the add
        // runs fused with the next norm.
        let mut pending: Option<Tensor> = None;
        for (i, layer) in self.layers.iter().enumerate() {
            // A parallel-residual block normalises the same residual twice (attention and MLP
            // inputs): both norms come out of one pass.
            let (x, mlp_input) = if self.config.use_parallel_residual {
                let (x, mlp_input) = layer.input_layernorm.add_forward_dual(
                    &layer.post_attention_layernorm,
                    pending.take(),
                    &mut residual,
                )?;
                (x, Some(mlp_input))
            } else {
                let x = layer
                    .input_layernorm
                    .add_forward(pending.take(), &mut residual)?;
                (x, None)
            };
            pending = Some(match mlp_input {
                // x + dense(attn(ln1(x))) + mlp(ln2(x)): the QKV and MLP up projections are
                // independent (one launch for a single row), and the attention's output
                // projection and the MLP's down projection sum into the same outputs (one pass
                // over both).
                Some(mlp_input) => {
                    let activation = Epilogue {
                        activation: self.mlp_activation()?,
                        addend: None,
                    };
                    let (qkv, h) = fused_and_linear(
                        (&layer.qkv_proj, &x),
                        (&layer.dense_h_to_4h, &mlp_input),
                        activation,
                    )?;
                    let [q, k, v] = three(qkv)?;
                    let attn = self.attention.forward(i, q, k, v, ctx, kv)?;
                    layer
                        .dense
                        .forward_pair(&attn, &layer.dense_4h_to_h, &h, None)?
                }
                // h = x + dense(attn(ln1(x))); h + mlp(ln2(h))
                None => {
                    let [q, k, v] = three(layer.qkv_proj.forward(&x)?)?;
                    let attn = self.attention.forward(i, q, k, v, ctx, kv)?;
                    let attn = layer.dense.forward(&attn)?;
                    let h = layer
                        .post_attention_layernorm
                        .add_forward(Some(attn), &mut residual)?;
                    let h = self.mlp_hidden(layer, &h)?;
                    layer.dense_4h_to_h.forward(&h)?
                }
            });
        }
        let hidden = self.final_layer_norm.add_forward(pending, &mut residual)?;
        let rows = ops::embedding(&hidden, &ctx.logits_rows)?;
        self.embed_out.forward(&rows)
    }
}

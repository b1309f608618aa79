//! The building blocks both architectures share, on the CPU kernels.

use std::sync::Arc;

use pagoda_kernels::cpu::attention::{AttentionParams, SequenceSpan, paged_attention};
use pagoda_kernels::cpu::kv_write::{PageGeometry, write_kv};
use pagoda_kernels::cpu::rope::{RopeTable, apply_rope};
use pagoda_kernels::cpu::{embedding, gemm, norm};
use pagoda_kv::KvCache;
use pagoda_tensor::Tensor;

use crate::weights::{WeightLoader, as_weights};
use crate::{Batch, Error, ModelInfo, Result};

/// `y = x Wᵀ + b` with `W` stored `[out_features, in_features]`, as in `nn.Linear`.
pub(crate) struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    in_features: usize,
    out_features: usize,
}

impl Linear {
    pub(crate) fn load(
        loader: &WeightLoader<'_>,
        prefix: &str,
        in_features: usize,
        out_features: usize,
        bias: bool,
    ) -> Result<Self> {
        let weight = loader.matrix(&format!("{prefix}.weight"), out_features, in_features)?;
        let bias = if bias {
            Some(loader.vector(&format!("{prefix}.bias"), out_features)?)
        } else {
            None
        };
        Ok(Self::new(weight, bias))
    }

    pub(crate) fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        let (out_features, in_features) = (weight.dims()[0], weight.dims()[1]);
        Self {
            weight,
            bias,
            in_features,
            out_features,
        }
    }

    pub(crate) fn forward(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        let mut out = vec![0.0; rows * self.out_features];
        let bias = match &self.bias {
            Some(b) => Some(b.as_slice::<f32>()?),
            None => None,
        };
        gemm::linear(
            x,
            rows,
            self.in_features,
            as_weights(&self.weight)?,
            self.out_features,
            bias,
            &mut out,
        )?;
        Ok(out)
    }
}

pub(crate) struct Embedding {
    table: Tensor,
    hidden: usize,
}

impl Embedding {
    pub(crate) fn load(
        loader: &WeightLoader<'_>,
        name: &str,
        vocab: usize,
        hidden: usize,
    ) -> Result<Self> {
        Ok(Self {
            table: loader.matrix(name, vocab, hidden)?,
            hidden,
        })
    }

    pub(crate) fn forward(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let mut out = vec![0.0; ids.len() * self.hidden];
        embedding::embedding(as_weights(&self.table)?, self.hidden, ids, &mut out)?;
        Ok(out)
    }

    /// The table as an output projection, for models that tie their embeddings.
    pub(crate) fn as_linear(&self) -> Linear {
        Linear::new(self.table.clone(), None)
    }
}

pub(crate) enum Norm {
    Layer {
        weight: Tensor,
        bias: Tensor,
        eps: f32,
    },
    Rms {
        weight: Tensor,
        eps: f32,
    },
}

impl Norm {
    pub(crate) fn layer_norm(
        loader: &WeightLoader<'_>,
        prefix: &str,
        hidden: usize,
        eps: f32,
    ) -> Result<Self> {
        Ok(Self::Layer {
            weight: loader.vector(&format!("{prefix}.weight"), hidden)?,
            bias: loader.vector(&format!("{prefix}.bias"), hidden)?,
            eps,
        })
    }

    pub(crate) fn rms_norm(
        loader: &WeightLoader<'_>,
        prefix: &str,
        hidden: usize,
        eps: f32,
    ) -> Result<Self> {
        Ok(Self::Rms {
            weight: loader.vector(&format!("{prefix}.weight"), hidden)?,
            eps,
        })
    }

    pub(crate) fn forward(&self, x: &[f32]) -> Result<Vec<f32>> {
        let mut out = vec![0.0; x.len()];
        match self {
            Self::Layer { weight, bias, eps } => {
                let hidden = weight.elem_count();
                norm::layer_norm(
                    x,
                    hidden,
                    weight.as_slice()?,
                    bias.as_slice()?,
                    *eps,
                    &mut out,
                )?
            }
            Self::Rms { weight, eps } => {
                let hidden = weight.elem_count();
                norm::rms_norm(x, hidden, weight.as_slice()?, *eps, &mut out)?
            }
        }
        Ok(out)
    }
}

/// Causal self-attention over the paged KV cache: RoPE on Q and K, K/V written into the
/// sequence's pages, then attention over everything the sequence has cached.
pub(crate) struct PagedSelfAttention {
    pub(crate) num_heads: usize,
    pub(crate) num_kv_heads: usize,
    pub(crate) head_dim: usize,
    pub(crate) rope: Arc<RopeTable>,
}

impl PagedSelfAttention {
    /// `q`: `[tokens, num_heads * head_dim]`, `k`, `v`: `[tokens, num_kv_heads * head_dim]`.
    /// Returns `[tokens, num_heads * head_dim]`.
    pub(crate) fn forward(
        &self,
        layer: usize,
        q: &mut [f32],
        k: &mut [f32],
        v: &[f32],
        batch: &Batch,
        kv: &mut KvCache,
    ) -> Result<Vec<f32>> {
        apply_rope(
            q,
            self.num_heads,
            self.head_dim,
            &batch.positions,
            &self.rope,
        )?;
        apply_rope(
            k,
            self.num_kv_heads,
            self.head_dim,
            &batch.positions,
            &self.rope,
        )?;
        let config = kv.config();
        let geometry = PageGeometry {
            num_blocks: config.num_blocks,
            block_size: config.block_size,
            num_kv_heads: config.num_kv_heads,
            head_dim: config.head_dim,
        };
        let pages = kv.layer_mut(layer);
        write_kv(
            k,
            v,
            &batch.slots,
            &geometry,
            pages.k.as_mut_slice()?,
            pages.v.as_mut_slice()?,
        )?;
        let spans: Vec<SequenceSpan<'_>> = batch
            .sequences
            .iter()
            .map(|s| SequenceSpan {
                query_start: s.query_start,
                query_len: s.query_len,
                context_len: s.context_len,
                block_table: &s.block_table,
            })
            .collect();
        let params = AttentionParams {
            num_heads: self.num_heads,
            num_kv_heads: self.num_kv_heads,
            head_dim: self.head_dim,
            scale: (self.head_dim as f32).powf(-0.5),
        };
        let mut out = vec![0.0; q.len()];
        paged_attention(
            q,
            &spans,
            &params,
            &geometry,
            pages.k.as_slice()?,
            pages.v.as_slice()?,
            &mut out,
        )?;
        Ok(out)
    }
}

/// Fails early when the KV cache was built for another model.
pub(crate) fn check_kv_cache(info: &ModelInfo, kv: &KvCache) -> Result<()> {
    let c = kv.config();
    if c.num_layers != info.num_layers
        || c.num_kv_heads != info.num_kv_heads
        || c.head_dim != info.head_dim
    {
        return Err(Error::Batch(format!(
            "the KV cache has {} layers x {} KV heads x {} dims, the model needs {} x {} x {}",
            c.num_layers,
            c.num_kv_heads,
            c.head_dim,
            info.num_layers,
            info.num_kv_heads,
            info.head_dim
        )));
    }
    Ok(())
}

/// Picks the rows whose logits were asked for out of `[tokens, hidden]`.
pub(crate) fn gather_rows(x: &[f32], hidden: usize, rows: &[usize]) -> Vec<f32> {
    rows.iter()
        .flat_map(|&r| x[r * hidden..(r + 1) * hidden].iter().copied())
        .collect()
}

pub(crate) fn add_in_place(acc: &mut [f32], x: &[f32]) {
    acc.iter_mut().zip(x).for_each(|(a, b)| *a += b);
}

//! The building blocks both architectures share, on [`pagoda_kernels::ops`], so that one model
//! definition runs on the CPU and on a GPU.

use pagoda_kernels::cpu::attention::AttentionParams;
use pagoda_kernels::cpu::rope::RopeTable;
use pagoda_kernels::ops::{
    self, Epilogue, LayerKv, LinearJob, NormWeights, OutputActivation, Rope,
};
use pagoda_kv::KvCache;
use pagoda_tensor::{Device, Tensor};

use crate::quantization::{LayerRole, LinearWeight, RawWeight, concat_tensor_rows};
use crate::step::StepInputs;
use crate::weights::WeightLoader;
use crate::{Error, Result};

/// `y = x Wᵀ + b` with `W` stored `[out_features, in_features]`, as in `nn.Linear`; the weight
/// dense or in NF4 ([`LinearWeight`]), as the checkpoint and the load options decide.
pub(crate) struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
}

impl Linear {
    pub(crate) fn load(
        loader: &WeightLoader<'_>,
        prefix: &str,
        in_features: usize,
        out_features: usize,
        bias: bool,
    ) -> Result<Self> {
        let weight =
            loader.linear_weight(&format!("{prefix}.weight"), out_features, in_features)?;
        let bias = if bias {
            Some(loader.vector(&format!("{prefix}.bias"), out_features)?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    pub(crate) fn new(weight: LinearWeight, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.weight.linear(x, self.bias.as_ref())
    }

    /// [`Self::forward`] followed by `epilogue`, fused into the product where the device can.
    pub(crate) fn forward_with(&self, x: &Tensor, epilogue: Epilogue<'_>) -> Result<Tensor> {
        self.weight
            .linear_with_epilogue(x, self.bias.as_ref(), epilogue)
    }

    /// `self(x) + other(x2) + addend`, the two layers having the same outputs: one pass over
    /// both weights where the device can ([`ops::linear_pair`], dense weights only).
    pub(crate) fn forward_pair(
        &self,
        x: &Tensor,
        other: &Linear,
        x2: &Tensor,
        addend: Option<&Tensor>,
    ) -> Result<Tensor> {
        if let (LinearWeight::Dense(w), LinearWeight::Dense(w2)) = (&self.weight, &other.weight) {
            return Ok(ops::linear_pair(
                (x, w, self.bias.as_ref()),
                (x2, w2, other.bias.as_ref()),
                addend,
            )?);
        }
        let first = self.forward(x)?;
        let first = match addend {
            Some(addend) => ops::add(&first, addend)?,
            None => first,
        };
        other.forward_with(
            x2,
            Epilogue {
                activation: OutputActivation::Identity,
                addend: Some(&first),
            },
        )
    }
}

/// Several projections of the same input stored as one matrix, `[out_1 + out_2 + .., in]`
/// (dense or NF4, the parts joined without decoding).
///
/// A single row (a decode step) runs one product over the whole matrix and takes each part as a
/// view of the output row, which is contiguous: one launch instead of several, and one longer
/// stream of weights. More rows run one product per part over row ranges of the same matrix, so
/// every part comes out contiguous as the kernels that follow read it.
pub(crate) struct FusedLinear {
    weight: LinearWeight,
    bias: Option<Tensor>,
    widths: Vec<usize>,
}

impl FusedLinear {
    /// Loads `{prefix}.{part}.weight` (and `.bias`) for each `(part, out_features)`.
    pub(crate) fn load(
        loader: &WeightLoader<'_>,
        prefix: &str,
        parts: &[(&str, usize)],
        in_features: usize,
        bias: bool,
    ) -> Result<Self> {
        let names: Vec<String> = parts
            .iter()
            .map(|(part, _)| format!("{prefix}.{part}.weight"))
            .collect();
        let weights = parts
            .iter()
            .zip(&names)
            .map(|((_, out), name)| loader.raw_linear_weight(name, *out, in_features))
            .collect::<Result<Vec<_>>>()?;
        let role = LayerRole::of(&names[0]);
        let weight = RawWeight::concat_rows(weights, &loader.nf4_options(role), prefix)?;
        let biases = if bias {
            let biases = parts
                .iter()
                .map(|(part, out)| loader.raw_vector(&format!("{prefix}.{part}.bias"), *out))
                .collect::<Result<Vec<_>>>()?;
            Some(loader.place_vector(concat_tensor_rows(&biases)?)?)
        } else {
            None
        };
        Ok(Self {
            weight: loader.place_linear_weight(weight, role, prefix)?,
            bias: biases,
            widths: parts.iter().map(|(_, out)| *out).collect(),
        })
    }

    /// A fused matrix already in `[part 1; part 2; ..]` row order.
    pub(crate) fn new(weight: LinearWeight, bias: Option<Tensor>, widths: Vec<usize>) -> Self {
        Self {
            weight,
            bias,
            widths,
        }
    }

    /// One output row of the whole matrix as one (contiguous) view per part.
    fn split_row(&self, out: Tensor) -> Result<Vec<Tensor>> {
        let mut parts = Vec::with_capacity(self.widths.len());
        let mut start = 0;
        for &width in &self.widths {
            parts.push(out.narrow(1, start, width)?);
            start += width;
        }
        Ok(parts)
    }

    /// `x` `[rows, in]` through every part: one `[rows, out_i]` tensor per part.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let rows = x.dims()[0];
        let mut parts = Vec::with_capacity(self.widths.len());
        let mut start = 0;
        if rows == 1 {
            let out = self.weight.linear(x, self.bias.as_ref())?;
            return self.split_row(out);
        } else {
            for &width in &self.widths {
                let weight = self.weight.narrow_rows(start, width)?;
                let bias = self
                    .bias
                    .as_ref()
                    .map(|b| b.narrow(0, start, width))
                    .transpose()?;
                parts.push(weight.linear(x, bias.as_ref())?);
                start += width;
            }
        }
        Ok(parts)
    }

    /// `silu(gate) * up` of a fused `[gate; up]` projection (SwiGLU), the activation fused into
    /// the product where the device can.
    pub(crate) fn forward_gated(&self, x: &Tensor) -> Result<Tensor> {
        if self.widths.len() != 2 || self.widths[0] != self.widths[1] {
            return Err(Error::Batch(format!(
                "a gated projection needs two parts of equal width, got {:?}",
                self.widths
            )));
        }
        let epilogue = Epilogue {
            activation: OutputActivation::SiluGate,
            addend: None,
        };
        self.weight
            .linear_with_epilogue(x, self.bias.as_ref(), epilogue)
    }
}

/// The three parts of a fused Q/K/V projection.
/// `fused(x)` (every part) and `epilogue(other(x2))`, two independent products: for a single
/// row, side by side in one launch where the device can ([`ops::linear_side_by_side`]).
pub(crate) fn fused_and_linear(
    (fused, x): (&FusedLinear, &Tensor),
    (other, x2): (&Linear, &Tensor),
    epilogue: Epilogue<'_>,
) -> Result<(Vec<Tensor>, Tensor)> {
    let (LinearWeight::Dense(w), LinearWeight::Dense(w2)) = (&fused.weight, &other.weight) else {
        return Ok((fused.forward(x)?, other.forward_with(x2, epilogue)?));
    };
    if x.dims().first() != Some(&1) {
        return Ok((fused.forward(x)?, other.forward_with(x2, epilogue)?));
    }
    let (out, out2) = ops::linear_side_by_side(
        LinearJob {
            x,
            w,
            bias: fused.bias.as_ref(),
            epilogue: Epilogue::default(),
        },
        LinearJob {
            x: x2,
            w: w2,
            bias: other.bias.as_ref(),
            epilogue,
        },
    )?;
    Ok((fused.split_row(out)?, out2))
}

pub(crate) fn three(parts: Vec<Tensor>) -> Result<[Tensor; 3]> {
    <[Tensor; 3]>::try_from(parts)
        .map_err(|parts| Error::Batch(format!("expected Q, K and V, got {} parts", parts.len())))
}

pub(crate) struct Embedding {
    table: Tensor,
    name: String,
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
            name: name.to_owned(),
        })
    }

    pub(crate) fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(ops::embedding(&self.table, ids)?)
    }

    /// The table as an output projection, for models that tie their embeddings: the table
    /// itself, or a quantized copy when the load options quantize the lm_head.
    pub(crate) fn as_linear(&self, loader: &WeightLoader<'_>) -> Result<Linear> {
        if loader.nf4_selected(LayerRole::LmHead) {
            let [vocab, hidden] = [self.table.dims()[0], self.table.dims()[1]];
            let raw = RawWeight::Dense(loader.raw_matrix(&self.name, vocab, hidden)?);
            let weight = loader.place_linear_weight(raw, LayerRole::LmHead, &self.name)?;
            return Ok(Linear::new(weight, None));
        }
        Ok(Linear::new(LinearWeight::Dense(self.table.clone()), None))
    }
}

/// RMSNorm (no bias) or LayerNorm.
pub(crate) struct Norm {
    weight: Tensor,
    bias: Option<Tensor>,
    eps: f32,
}

impl Norm {
    pub(crate) fn layer_norm(
        loader: &WeightLoader<'_>,
        prefix: &str,
        hidden: usize,
        eps: f32,
    ) -> Result<Self> {
        Self::load(loader, prefix, hidden, eps, true)
    }

    pub(crate) fn rms_norm(
        loader: &WeightLoader<'_>,
        prefix: &str,
        hidden: usize,
        eps: f32,
    ) -> Result<Self> {
        Self::load(loader, prefix, hidden, eps, false)
    }

    fn load(
        loader: &WeightLoader<'_>,
        prefix: &str,
        hidden: usize,
        eps: f32,
        with_bias: bool,
    ) -> Result<Self> {
        let bias = with_bias
            .then(|| loader.vector(&format!("{prefix}.bias"), hidden))
            .transpose()?;
        Ok(Self {
            weight: loader.vector(&format!("{prefix}.weight"), hidden)?,
            bias,
            eps,
        })
    }

    fn weights(&self) -> NormWeights<'_> {
        NormWeights {
            weight: &self.weight,
            bias: self.bias.as_ref(),
            eps: self.eps,
        }
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(ops::norm(x, &self.weights())?)
    }

    /// [`Self::add_forward`], and the new residual normalised by `second` as well (one pass
    /// where the device can): a parallel-residual block's attention and MLP inputs.
    pub(crate) fn add_forward_dual(
        &self,
        second: &Norm,
        pending: Option<Tensor>,
        residual: &mut Tensor,
    ) -> Result<(Tensor, Tensor)> {
        match pending {
            Some(x) => Ok(ops::add_norm_dual(
                &x,
                residual,
                &self.weights(),
                &second.weights(),
            )?),
            None => Ok((self.forward(residual)?, second.forward(residual)?)),
        }
    }

    /// Adds the sublayer output `pending` (if any) into `residual`, then normalises it: a
    /// pre-norm transformer's residual step, fused.
    pub(crate) fn add_forward(
        &self,
        pending: Option<Tensor>,
        residual: &mut Tensor,
    ) -> Result<Tensor> {
        match pending {
            Some(x) => Ok(ops::add_norm(&x, residual, &self.weights())?),
            None => self.forward(residual),
        }
    }
}

/// Causal self-attention over the paged KV cache: RoPE on Q, RoPE on K fused with writing K/V
/// into the sequence's pages, then attention over everything the sequence has cached.
pub(crate) struct PagedSelfAttention {
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    rope: Rope,
}

impl PagedSelfAttention {
    pub(crate) fn new(
        num_heads: usize,
        num_kv_heads: usize,
        head_dim: usize,
        rope: RopeTable,
        device: &Device,
    ) -> Result<Self> {
        Ok(Self {
            num_heads,
            num_kv_heads,
            head_dim,
            rope: Rope::new(rope, device)?,
        })
    }

    /// `q`: `[tokens, num_heads * head_dim]`, `k`, `v`: `[tokens, num_kv_heads * head_dim]`.
    /// Returns `[tokens, num_heads * head_dim]`.
    pub(crate) fn forward(
        &self,
        layer: usize,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        ctx: &StepInputs,
        kv: &mut KvCache,
    ) -> Result<Tensor> {
        let tokens = q.dims()[0];
        let k = reshaped(k, &[tokens, self.num_kv_heads, self.head_dim])?;
        let v = reshaped(v, &[tokens, self.num_kv_heads, self.head_dim])?;
        let q = reshaped(q, &[tokens, self.num_heads, self.head_dim])?;
        let pages = kv.layer_mut(layer);
        let q = ops::rope_qk_write_kv(
            &q,
            &k,
            &v,
            &ctx.positions,
            &ctx.slots,
            &self.rope,
            LayerKv {
                k_pages: &mut pages.k,
                v_pages: &mut pages.v,
            },
        )?;
        let params = AttentionParams {
            num_heads: self.num_heads,
            num_kv_heads: self.num_kv_heads,
            head_dim: self.head_dim,
            scale: (self.head_dim as f32).powf(-0.5),
        };
        let out = ops::paged_attention(&q, &ctx.layout, &params, &pages.k, &pages.v)?;
        reshaped(out, &[tokens, self.num_heads * self.head_dim])
    }
}

/// A reshaped view of `t` that owns its storage alone (the original is consumed), so it can be
/// written in place.
pub(crate) fn reshaped(t: Tensor, dims: &[usize]) -> Result<Tensor> {
    Ok(t.reshape(dims.to_vec())?)
}

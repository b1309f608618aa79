//! Quantized weights: which linear layers are stored in NF4 when a checkpoint is quantized on
//! load ([`Quantization`]), and the weight of a linear layer in either form ([`LinearWeight`]).
//!
//! Embeddings and norms always stay in 16 (or 32) bits: an embedding is a row gather, which NF4
//! would only slow down, and a norm's weights are one vector per layer. Checkpoints that
//! bitsandbytes saved quantized (transformers' `load_in_4bit`) load as NF4 whatever the options
//! say, tensor by tensor (see [`crate::bnb`]).

use pagoda_kernels::cpu::nf4::{self, Nf4Blocks};
use pagoda_kernels::ops::{self, Epilogue, Nf4Weight};
use pagoda_tensor::{DType, Tensor};

use crate::{Error, Result};

/// How to quantize a checkpoint's weights as it loads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quantization {
    /// NF4 (QLoRA's 4-bit NormalFloat, in bitsandbytes' layout) for the layers the options
    /// select.
    Nf4(Nf4Options),
}

/// NF4 quantization on load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Nf4Options {
    /// Values per quantization block: a power of two from 32 to 4096. The GPU's fused product
    /// takes blocks of 64 or more; 64 is bitsandbytes' and transformers' default.
    pub block_size: usize,
    /// Quantize the block scales too (QLoRA's double quantization): 0.127 bits of scale per
    /// weight instead of 0.5, so a decode step reads about 9% fewer bytes.
    pub double_quant: bool,
    /// Which linear layers are quantized.
    pub layers: QuantizedLayers,
}

impl Default for Nf4Options {
    fn default() -> Self {
        Self {
            block_size: nf4::DEFAULT_BLOCK_SIZE,
            double_quant: true,
            layers: QuantizedLayers::default(),
        }
    }
}

/// The linear layers that are stored in NF4; the rest keep the checkpoint's precision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuantizedLayers {
    /// Every layer's Q/K/V and output projections.
    pub attention: bool,
    /// Every layer's MLP projections.
    pub mlp: bool,
    /// The output projection onto the vocabulary (`lm_head`, `embed_out`), which transformers
    /// leaves in 16 bits; with tied embeddings a quantized copy of the table is made, and the
    /// embedding itself stays in 16 bits.
    pub lm_head: bool,
}

impl Default for QuantizedLayers {
    fn default() -> Self {
        Self {
            attention: true,
            mlp: true,
            lm_head: false,
        }
    }
}

/// What a linear layer's weight is for, as its Hugging Face name says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LayerRole {
    Attention,
    Mlp,
    LmHead,
    /// Anything else: never quantized on load.
    Other,
}

impl LayerRole {
    /// The role of the weight called `name` (`model.layers.3.mlp.down_proj.weight`, ...).
    pub(crate) fn of(name: &str) -> Self {
        if name.starts_with("lm_head.") || name.starts_with("embed_out.") {
            LayerRole::LmHead
        } else if name.contains(".mlp.") {
            LayerRole::Mlp
        } else if name.contains(".self_attn.") || name.contains(".attention.") {
            LayerRole::Attention
        } else {
            LayerRole::Other
        }
    }
}

impl Quantization {
    /// The NF4 settings to store a weight of `role` with, or `None` to keep it dense.
    pub(crate) fn nf4_for(&self, role: LayerRole) -> Option<Nf4Options> {
        let Quantization::Nf4(options) = *self;
        let layers = options.layers;
        let selected = match role {
            LayerRole::Attention => layers.attention,
            LayerRole::Mlp => layers.mlp,
            LayerRole::LmHead => layers.lm_head,
            LayerRole::Other => false,
        };
        selected.then_some(options)
    }
}

/// A weight matrix `[rows, cols]` on the host as a checkpoint holds it: dense, or already NF4.
pub(crate) enum RawWeight {
    Dense(Tensor),
    Nf4 {
        blocks: Nf4Blocks,
        rows: usize,
        cols: usize,
    },
}

impl RawWeight {
    pub(crate) fn cols(&self) -> usize {
        match self {
            RawWeight::Dense(t) => t.dims().get(1).copied().unwrap_or(0),
            RawWeight::Nf4 { cols, .. } => *cols,
        }
    }

    /// The weight in NF4: quantized with `options` if dense.
    pub(crate) fn into_nf4(
        self,
        options: &Nf4Options,
        name: &str,
    ) -> Result<(Nf4Blocks, usize, usize)> {
        match self {
            RawWeight::Nf4 { blocks, rows, cols } => Ok((blocks, rows, cols)),
            RawWeight::Dense(tensor) => {
                let (rows, cols) = (tensor.dims()[0], tensor.dims()[1]);
                let blocks = nf4::quantize(
                    &tensor.to_vec_f32()?,
                    options.block_size,
                    options.double_quant,
                )
                .map_err(|e| Error::Quantization {
                    name: name.into(),
                    message: e.to_string(),
                })?;
                Ok((blocks, rows, cols))
            }
        }
    }

    /// Stacks weights along their rows (a fused projection). Dense parts stay dense; if any
    /// part is NF4, all become NF4 (dense parts quantized with `options`) and are joined
    /// without decoding.
    pub(crate) fn concat_rows(
        parts: Vec<RawWeight>,
        options: &Nf4Options,
        name: &str,
    ) -> Result<RawWeight> {
        if parts.iter().all(|p| matches!(p, RawWeight::Dense(_))) {
            let tensors: Vec<Tensor> = parts
                .into_iter()
                .filter_map(|p| match p {
                    RawWeight::Dense(t) => Some(t),
                    RawWeight::Nf4 { .. } => None,
                })
                .collect();
            return Ok(RawWeight::Dense(concat_tensor_rows(&tensors)?));
        }
        let cols = parts.first().map_or(0, RawWeight::cols);
        let mut blocks = Vec::with_capacity(parts.len());
        let mut rows = 0;
        for part in parts {
            let (b, r, c) = part.into_nf4(options, name)?;
            if c != cols {
                return Err(Error::Quantization {
                    name: name.into(),
                    message: format!("parts of {cols} and {c} columns cannot be stacked"),
                });
            }
            rows += r;
            blocks.push(b);
        }
        let blocks = Nf4Blocks::concat(&blocks).map_err(|e| Error::Quantization {
            name: name.into(),
            message: e.to_string(),
        })?;
        Ok(RawWeight::Nf4 { blocks, rows, cols })
    }
}

/// Stacks matrices (or vectors) of one dtype along their first dimension, on the CPU.
pub(crate) fn concat_tensor_rows(parts: &[Tensor]) -> Result<Tensor> {
    fn stack<T: pagoda_tensor::Element>(parts: &[Tensor]) -> Result<Tensor> {
        let mut dims = parts[0].dims().to_vec();
        dims[0] = parts.iter().map(|p| p.dims()[0]).sum();
        let mut values = Vec::with_capacity(dims.iter().product());
        for part in parts {
            values.extend(part.to_vec::<T>()?);
        }
        Ok(Tensor::from_vec(values, dims)?)
    }
    match parts.first().map(Tensor::dtype) {
        Some(DType::F32) => stack::<f32>(parts),
        Some(DType::F16) => stack::<half::f16>(parts),
        Some(DType::BF16) => stack::<half::bf16>(parts),
        other => Err(Error::Batch(format!(
            "cannot stack weights of dtype {other:?}"
        ))),
    }
}

/// A linear layer's weight `[out_features, in_features]` where the model runs: dense (f32,
/// f16 or bf16) or NF4.
#[derive(Clone, Debug)]
pub(crate) enum LinearWeight {
    Dense(Tensor),
    Nf4(Nf4Weight),
}

impl LinearWeight {
    /// `x · wᵀ (+ bias)`.
    pub(crate) fn linear(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        Ok(match self {
            LinearWeight::Dense(w) => ops::linear(x, w, bias)?,
            LinearWeight::Nf4(w) => ops::nf4_linear(x, w, bias)?,
        })
    }

    /// [`Self::linear`] followed by `epilogue`, fused where the device can.
    pub(crate) fn linear_with_epilogue(
        &self,
        x: &Tensor,
        bias: Option<&Tensor>,
        epilogue: Epilogue<'_>,
    ) -> Result<Tensor> {
        Ok(match self {
            LinearWeight::Dense(w) => ops::linear_with_epilogue(x, w, bias, epilogue)?,
            LinearWeight::Nf4(w) => ops::nf4_linear_with_epilogue(x, w, bias, epilogue)?,
        })
    }

    /// Rows `start .. start + len`, without copying.
    pub(crate) fn narrow_rows(&self, start: usize, len: usize) -> Result<Self> {
        Ok(match self {
            LinearWeight::Dense(w) => LinearWeight::Dense(w.narrow(0, start, len)?),
            LinearWeight::Nf4(w) => LinearWeight::Nf4(w.narrow_rows(start, len)?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_follow_the_hugging_face_names() {
        let cases = [
            (
                "model.layers.0.self_attn.q_proj.weight",
                LayerRole::Attention,
            ),
            (
                "gpt_neox.layers.1.attention.query_key_value.weight",
                LayerRole::Attention,
            ),
            (
                "gpt_neox.layers.1.attention.dense.weight",
                LayerRole::Attention,
            ),
            ("model.layers.2.mlp.gate_proj.weight", LayerRole::Mlp),
            ("gpt_neox.layers.0.mlp.dense_4h_to_h.weight", LayerRole::Mlp),
            ("lm_head.weight", LayerRole::LmHead),
            ("embed_out.weight", LayerRole::LmHead),
            ("model.embed_tokens.weight", LayerRole::Other),
        ];
        for (name, role) in cases {
            assert_eq!(LayerRole::of(name), role, "{name}");
        }
    }

    #[test]
    fn options_select_layers() {
        let default = Quantization::Nf4(Nf4Options::default());
        assert!(default.nf4_for(LayerRole::Attention).is_some());
        assert!(default.nf4_for(LayerRole::Mlp).is_some());
        assert!(default.nf4_for(LayerRole::LmHead).is_none());
        assert!(default.nf4_for(LayerRole::Other).is_none());
        let only_lm_head = Quantization::Nf4(Nf4Options {
            layers: QuantizedLayers {
                attention: false,
                mlp: false,
                lm_head: true,
            },
            ..Nf4Options::default()
        });
        assert!(only_lm_head.nf4_for(LayerRole::Mlp).is_none());
        assert!(only_lm_head.nf4_for(LayerRole::LmHead).is_some());
    }
}

//! Without the `cuda` feature: the signatures of `cuda::norm`, each failing with
//! [`pagoda_tensor::Error::CudaNotCompiled`].

use pagoda_tensor::Tensor;

use crate::{Error, Result};

/// RMSNorm on the GPU; always fails without the `cuda` feature.
pub fn rms_norm(_x: &Tensor, _weight: &Tensor, _eps: f32) -> Result<Tensor> {
    Err(Error::Tensor(pagoda_tensor::Error::CudaNotCompiled))
}

/// LayerNorm on the GPU; always fails without the `cuda` feature.
pub fn layer_norm(_x: &Tensor, _weight: &Tensor, _bias: &Tensor, _eps: f32) -> Result<Tensor> {
    Err(Error::Tensor(pagoda_tensor::Error::CudaNotCompiled))
}

/// Residual add fused with RMSNorm on the GPU; always fails without the `cuda` feature.
pub fn add_rms_norm(
    _x: &Tensor,
    _residual: &mut Tensor,
    _weight: &Tensor,
    _eps: f32,
) -> Result<Tensor> {
    Err(Error::Tensor(pagoda_tensor::Error::CudaNotCompiled))
}

/// Residual add fused with LayerNorm on the GPU; always fails without the `cuda` feature.
pub fn add_layer_norm(
    _x: &Tensor,
    _residual: &mut Tensor,
    _weight: &Tensor,
    _bias: &Tensor,
    _eps: f32,
) -> Result<Tensor> {
    Err(Error::Tensor(pagoda_tensor::Error::CudaNotCompiled))
}

/// A residual add with two LayerNorms on the GPU; always fails without the `cuda` feature.
pub fn add_layer_norm_dual(
    _x: &Tensor,
    _residual: &mut Tensor,
    _first: (&Tensor, &Tensor),
    _second: (&Tensor, &Tensor),
    _eps: f32,
) -> Result<(Tensor, Tensor)> {
    Err(Error::Tensor(pagoda_tensor::Error::CudaNotCompiled))
}

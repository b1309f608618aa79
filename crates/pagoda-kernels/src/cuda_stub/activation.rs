//! Without the `cuda` feature: the signatures of `cuda::activation`, each failing with
//! [`pagoda_tensor::Error::CudaNotCompiled`].

use pagoda_tensor::Tensor;

use crate::{Error, Result};

/// GELU on the GPU; always fails without the `cuda` feature.
pub fn gelu(_x: &Tensor, _tanh_approximation: bool) -> Result<Tensor> {
    Err(Error::Tensor(pagoda_tensor::Error::CudaNotCompiled))
}

/// `silu(gate) * up` on the GPU; always fails without the `cuda` feature.
pub fn silu_and_mul(_gate: &Tensor, _up: &Tensor) -> Result<Tensor> {
    Err(Error::Tensor(pagoda_tensor::Error::CudaNotCompiled))
}

/// Elementwise `a + b` on the GPU; always fails without the `cuda` feature.
pub fn add(_a: &Tensor, _b: &Tensor) -> Result<Tensor> {
    Err(Error::Tensor(pagoda_tensor::Error::CudaNotCompiled))
}
